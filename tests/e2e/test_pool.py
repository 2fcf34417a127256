"""Pools and limits end to end (SPEC 3.3): a real PostgreSQL, real proxies, real drivers.

What a user of a pooler relies on: many clients share few server connections and every
transaction still commits correctly; limits (borrow timeout, client count, idle clients)
give clear errors; a dying server connection or a vanishing client only hurts itself;
server connections are initialised, health-checked, trimmed when idle, never handed over
dirty; cancel works through the proxy.

Every test logs in as its own freshly created role, so the backend counts it reads on
the server are its own (other proxies in the session keep idle connections for `app`).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import re
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass

import asyncpg
import psycopg
import psycopg2
import psycopg2.errors
import pytest

from conftest import SUPERUSER_PASSWORD, backends
from unpinned.backend.pool import Borrower

TIMEOUT_MESSAGE = "Timed-out waiting to acquire database connection."
COUNT_SQL = ("SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
             "AND backend_type = 'client backend'")

_role_ids = itertools.count(1)


# ---------------------------------------------------------------------------- helpers


@dataclass
class Role:
    name: str
    password: str
    users_file: str


@pytest.fixture
def role(pg, tmp_path) -> Role:
    """A new login role with a users file naming only it: its backends are this test's alone."""
    name = f"pool_r{next(_role_ids)}"
    password = f"{name}-secret"
    pg.create_role(name, password)
    users = tmp_path / "users.toml"
    users.write_text(f'[users.{name}]\npassword = "{password}"\n')
    return Role(name, password, str(users))


@pytest.fixture(scope="module")
def su(pg):
    """A direct superuser connection to PostgreSQL (not through any proxy)."""
    conn = psycopg2.connect(pg.dsn(), connect_timeout=10)
    conn.autocommit = True
    yield conn
    conn.close()


def sql(su, query: str, *args):
    with su.cursor() as cur:
        cur.execute(query, args or None)
        return cur.fetchall() if cur.description else None


def make_table(su, role: Role, name: str, ddl: str) -> None:
    sql(su, f"DROP TABLE IF EXISTS {name}")
    sql(su, f"CREATE TABLE {name} ({ddl})")
    sql(su, f"GRANT ALL ON {name} TO {role.name}")


def start(make_proxy, role: Role, **options):
    return make_proxy(users_file=role.users_file, **options)


def p2(handle, role: Role, autocommit: bool = False):
    conn = psycopg2.connect(**handle.kwargs(user=role.name, password=role.password), connect_timeout=10)
    conn.autocommit = autocommit
    return conn


def one(conn, query: str, *args):
    with conn.cursor() as cur:
        cur.execute(query, args or None)
        return cur.fetchone()[0]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll until predicate() is truthy; return its value, or fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"within {timeout} s: {what} (last value {value!r})")
        time.sleep(interval)


def server_pids(handle, role: Role) -> set[int]:
    """PIDs of the server connections in the proxy's pool for the role (idle and busy)."""
    pool = handle.pool(user=role.name)
    if pool is None:
        return set()
    return handle.call(lambda: {c.state.pid for c in list(pool.idle) + list(pool.busy)})


def backend_states(su, role: Role) -> list[tuple[int, str]]:
    return [tuple(r) for r in sql(su, "SELECT pid, coalesce(state, '') FROM pg_stat_activity "
                                      "WHERE usename = %s AND backend_type = 'client backend'", role.name)]


def backend_count(su, role: Role) -> int:
    return sql(su, COUNT_SQL, role.name)[0][0]


def proxy_clients(handle) -> int:
    return handle.call(lambda: len(handle.proxy.clients))


class Sampler(threading.Thread):
    """Samples, every `interval` s until stopped, the server's backends for a role and the pool's size."""

    def __init__(self, pg, handle, role: Role, interval: float = 0.05):
        super().__init__(name="pool-sampler", daemon=True)
        self.pg, self.handle, self.role, self.interval = pg, handle, role, interval
        self.backends: list[int] = []
        self.pool_sizes: list[int] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            conn = psycopg2.connect(self.pg.dsn(), connect_timeout=10)
            conn.autocommit = True
            try:
                cur = conn.cursor()
                while not self._stop_event.is_set():
                    cur.execute(COUNT_SQL, (self.role.name,))
                    self.backends.append(cur.fetchone()[0])
                    self.pool_sizes.append(self.handle.server_count(user=self.role.name))
                    self._stop_event.wait(self.interval)
            finally:
                conn.close()
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------------------- 1. many clients, few servers


N_CLIENTS = 500
TXNS_PER_CLIENT = 3
POOL_SIZE = 10


@pytest.mark.timeout(120)
async def test_500_clients_share_a_pool_of_10(pg, su, make_proxy, role):
    make_table(su, role, "pool_t1_rows", "client int NOT NULL, k int NOT NULL, PRIMARY KEY (client, k)")
    make_table(su, role, "pool_t1_counter", "id int PRIMARY KEY, n int NOT NULL")
    sql(su, "INSERT INTO pool_t1_counter VALUES (1, 0)")
    h = start(make_proxy, role, pool_size=POOL_SIZE, max_client_connections=1000)
    dsn = h.dsn(user=role.name, password=role.password)

    sampler = Sampler(pg, h, role)
    sampler.start()
    conns: list[asyncpg.Connection] = []
    try:
        results = await asyncio.gather(*(asyncpg.connect(dsn, timeout=60) for _ in range(N_CLIENTS)),
                                       return_exceptions=True)
        conns = [c for c in results if isinstance(c, asyncpg.Connection)]
        failures = [r for r in results if not isinstance(r, asyncpg.Connection)]
        assert not failures, f"{len(failures)} of {N_CLIENTS} clients could not connect: {failures[:3]!r}"
        assert await asyncio.to_thread(proxy_clients, h) == N_CLIENTS

        async def work(i: int, conn: asyncpg.Connection) -> list[int]:
            for k in range(TXNS_PER_CLIENT):
                async with conn.transaction():
                    await conn.execute("INSERT INTO pool_t1_rows (client, k) VALUES ($1, $2)", i, k)
                    await conn.execute("UPDATE pool_t1_counter SET n = n + 1 WHERE id = 1")
            rows = await conn.fetch("SELECT k FROM pool_t1_rows WHERE client = $1 ORDER BY k", i)
            return [r["k"] for r in rows]

        seen = await asyncio.gather(*(work(i, c) for i, c in enumerate(conns)))
    finally:
        await asyncio.gather(*(c.close(timeout=10) for c in conns), return_exceptions=True)
        await asyncio.to_thread(sampler.stop)

    # Every transaction committed, and each client saw exactly its own rows.
    assert all(s == list(range(TXNS_PER_CLIENT)) for s in seen), \
        [(i, s) for i, s in enumerate(seen) if s != list(range(TXNS_PER_CLIENT))][:5]
    assert sql(su, "SELECT n FROM pool_t1_counter WHERE id = 1")[0][0] == N_CLIENTS * TXNS_PER_CLIENT
    assert sql(su, "SELECT count(*), count(DISTINCT client) FROM pool_t1_rows")[0] == \
        (N_CLIENTS * TXNS_PER_CLIENT, N_CLIENTS)
    # The server never had more backends for this user than the pool allows.
    assert len(sampler.backends) >= 5, "the sampler hardly ran"
    assert max(sampler.pool_sizes) == POOL_SIZE, "the clients never filled the pool: the limit went untested"
    assert max(sampler.backends) <= POOL_SIZE, f"server backends peaked at {max(sampler.backends)}"
    assert max(sampler.pool_sizes) <= POOL_SIZE, f"pool size peaked at {max(sampler.pool_sizes)}"
    assert backends(pg, role.name) <= POOL_SIZE


# ---------------------------------------------------------------------------- 2. borrow timeout


@pytest.mark.timeout(60)
def test_borrow_timeout_gives_the_rds_error(make_proxy, role):
    h = start(make_proxy, role, pool_size=1, borrow_timeout=1)
    dsn = h.dsn(user=role.name, password=role.password)
    a = psycopg.connect(dsn, connect_timeout=10)
    b = psycopg.connect(dsn, connect_timeout=10)
    try:
        assert a.execute("SELECT 1").fetchone() == (1,)   # BEGIN; SELECT 1 -- left open
        assert a.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as excinfo:
            b.execute("SELECT 1")
        waited = time.monotonic() - started
        assert excinfo.value.diag.message_primary == TIMEOUT_MESSAGE
        assert excinfo.value.sqlstate == "53300"
        assert 0.9 <= waited < 3.0, f"the borrow timeout of 1 s fired after {waited:.2f} s"

        # A's transaction was never disturbed.
        assert a.execute("SELECT 2").fetchone() == (2,)
        a.commit()
        with psycopg.connect(dsn, connect_timeout=10) as c:
            assert c.execute("SELECT 'after'").fetchone() == ("after",)
        assert a.execute("SELECT 3").fetchone() == (3,)
        a.commit()
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_borrow_timeout_while_a_connection_opens_leaks_nothing(su, make_proxy, role):
    """A borrow that times out while the pool is still opening a server connection for it (here
    a slow init query) must not leave that connection behind, open but outside the pool."""
    h = start(make_proxy, role, pool_size=1, borrow_timeout=1, init_query="SELECT pg_sleep(2)")
    dsn = h.dsn(user=role.name, password=role.password)
    with pytest.raises(psycopg.OperationalError, match=re.escape(TIMEOUT_MESSAGE)):
        psycopg.connect(dsn, connect_timeout=10).close()
    # The connection opened for the client that gave up stays in the pool: the next client
    # may get it in time (then it is served) or time out too; either way nothing leaks.
    try:
        psycopg.connect(dsn, connect_timeout=10).close()
    except psycopg.OperationalError as e:
        assert TIMEOUT_MESSAGE in str(e)

    # Every server backend of the user is one the pool knows and counts (give the backends
    # whose init query was cut short time to finish it and exit).
    deadline = time.monotonic() + 6
    while True:
        on_server, in_pool = backend_count(su, role), h.server_count(user=role.name)
        if (on_server == in_pool and on_server <= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert on_server == in_pool and on_server <= 1, \
        f"the server has {on_server} backends for the user, the pool (size 1) counts {in_pool}"
    time.sleep(0.5)
    assert backend_count(su, role) == h.server_count(user=role.name) <= 1, backend_states(su, role)


# ---------------------------------------------------------------------------- 3. a server connection dies


@pytest.mark.timeout(60)
def test_killed_server_connection_only_hurts_its_client(pg, su, make_proxy, role):
    make_table(su, role, "pool_t3", "who text")
    h = start(make_proxy, role, pool_size=5)
    a = p2(h, role)
    others = [p2(h, role) for _ in range(4)]
    try:
        # B..E work, and stay in open transactions holding the rest of the pool.
        other_pids = [one(c, "SELECT pg_backend_pid()") for c in others]
        for i, c in enumerate(others):
            with c.cursor() as cur:
                cur.execute("INSERT INTO pool_t3 VALUES (%s)", (f"other{i}",))
        with a.cursor() as cur:
            cur.execute("INSERT INTO pool_t3 VALUES ('a')")
        victim = one(a, "SELECT pg_backend_pid()")
        assert victim not in other_pids
        assert victim in server_pids(h, role)

        assert pg.psql(f"SELECT pg_terminate_backend({victim})", user="postgres",
                       password=SUPERUSER_PASSWORD) == "t"

        with pytest.raises(psycopg2.OperationalError):
            one(a, "SELECT 1")

        # Everyone else carries on in their transactions, on their own backends, and commits.
        for c, pid in zip(others, other_pids):
            assert one(c, "SELECT pg_backend_pid()") == pid
            c.commit()
        assert sorted(r[0] for r in sql(su, "SELECT who FROM pool_t3")) == \
            ["other0", "other1", "other2", "other3"]

        # The pool heals: the dead connection is gone and a new client gets work done.
        wait_for(lambda: victim not in server_pids(h, role), 5, "the dead server connection left the pool")
        wait_for(lambda: victim not in [p for p, _ in backend_states(su, role)], 5, "the backend exited")
        fresh = p2(h, role, autocommit=True)
        try:
            assert one(fresh, "SELECT 42") == 42
            with fresh.cursor() as cur:
                cur.execute("INSERT INTO pool_t3 VALUES ('fresh')")
            for c in others:
                assert one(c, "SELECT 1") == 1
                c.commit()
        finally:
            fresh.close()
        assert h.server_count(user=role.name) > 0
        assert victim not in server_pids(h, role)
        assert "a" not in [r[0] for r in sql(su, "SELECT who FROM pool_t3")]
    finally:
        for c in [a, *others]:
            c.close()


# ---------------------------------------------------------------------------- 4. a client vanishes


def _vanish(conn) -> None:
    """Close a psycopg2 connection's socket under it: no Terminate message, just EOF."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        s.shutdown(socket.SHUT_RDWR)
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_client_vanishing_mid_transaction_releases_its_locks(su, make_proxy, role):
    make_table(su, role, "pool_t4", "id int PRIMARY KEY, v int NOT NULL")
    sql(su, "INSERT INTO pool_t4 VALUES (1, 0)")
    h = start(make_proxy, role, pool_size=2)
    a = p2(h, role)
    b = p2(h, role)
    try:
        assert one(a, "SELECT v FROM pool_t4 WHERE id = 1 FOR UPDATE") == 0
        with a.cursor() as cur:
            cur.execute("UPDATE pool_t4 SET v = 99 WHERE id = 1")
        a_pid = one(a, "SELECT pg_backend_pid()")
        # The lock is really held.
        with pytest.raises(psycopg2.errors.LockNotAvailable):
            one(b, "SELECT v FROM pool_t4 WHERE id = 1 FOR UPDATE NOWAIT")
        b.rollback()

        _vanish(a)

        def can_lock():
            try:
                return ("locked", one(b, "SELECT v FROM pool_t4 WHERE id = 1 FOR UPDATE NOWAIT"))
            except psycopg2.errors.LockNotAvailable:
                b.rollback()
                return None
        _, value = wait_for(can_lock, 3, "another client could lock the row", interval=0.1)
        assert value == 0, "the vanished client's uncommitted update survived"
        b.rollback()

        states = backend_states(su, role)
        assert not [s for s in states if s[1].startswith("idle in transaction")], states
        # The vanished client's server connection is clean wherever it went (pool or closed).
        for pid, state in states:
            if pid == a_pid:
                assert state == "idle"
        with b.cursor() as cur:
            cur.execute("SELECT v FROM pool_t4 WHERE id = 1")
            assert cur.fetchone()[0] == 0
        b.commit()
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_client_vanishing_while_its_statement_runs(pg, su, make_proxy, role):
    """The statement still runs on the server when its client goes: the server connection must
    not be dropped from the pool's books while its backend goes on (holding locks, counting
    against the server's connections) -- stop it, and count it until it is gone."""
    make_table(su, role, "pool_t4b", "id int PRIMARY KEY, v int NOT NULL")
    sql(su, "INSERT INTO pool_t4b VALUES (1, 0)")
    h = start(make_proxy, role, pool_size=1, borrow_timeout=30)
    a = p2(h, role)
    b = p2(h, role)
    outcome: list = []

    def a_sleeps():
        try:
            outcome.append(one(a, "SELECT pg_sleep(8)"))
        except BaseException as e:
            outcome.append(e)

    sampler = Sampler(pg, h, role, interval=0.02)
    try:
        assert one(a, "SELECT v FROM pool_t4b WHERE id = 1 FOR UPDATE") == 0
        with a.cursor() as cur:
            cur.execute("UPDATE pool_t4b SET v = 99 WHERE id = 1")
        t = threading.Thread(target=a_sleeps)
        t.start()
        wait_for(lambda: sql(su, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
                                 "AND state = 'active' AND query = 'SELECT pg_sleep(8)'", role.name)[0][0],
                 10, "A's statement started on the server")
        sampler.start()
        _vanish(a)
        t.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg2.OperationalError), outcome

        def can_lock():
            try:
                return ("locked", one(b, "SELECT v FROM pool_t4b WHERE id = 1 FOR UPDATE NOWAIT"))
            except psycopg2.errors.LockNotAvailable:
                b.rollback()
                return None
        _, value = wait_for(can_lock, 3, "another client could lock the row", interval=0.1)
        assert value == 0, "the vanished client's uncommitted update survived"
        b.rollback()
        time.sleep(0.2)
    finally:
        if sampler.is_alive():
            sampler.stop()
        a.close()
        b.close()
    assert sampler.backends, "the sampler never ran"
    assert max(sampler.backends) <= 1, f"{max(sampler.backends)} server backends for a pool of 1"
    assert not [st for st in backend_states(su, role) if st[1].startswith("idle in transaction")]


# ---------------------------------------------------------------------------- 5. idle clients


@pytest.mark.timeout(60)
def test_idle_client_timeout(make_proxy, role):
    h = start(make_proxy, role, client_idle_timeout=1)
    # psycopg 3, because psycopg2 drops the server's last words (it does so with PostgreSQL's own
    # idle_session_timeout too) and only says "server closed the connection unexpectedly".
    idle = psycopg.connect(h.dsn(user=role.name, password=role.password), autocommit=True, connect_timeout=10)
    active = p2(h, role, autocommit=True)
    try:
        assert idle.execute("SELECT 1").fetchone() == (1,)
        started = time.monotonic()
        closed_after = None
        while time.monotonic() - started < 4.0:
            assert one(active, "SELECT 1") == 1
            readable, _, _ = select.select([idle.fileno()], [], [], 0.3)
            if readable and closed_after is None:
                closed_after = time.monotonic() - started
        assert closed_after is not None, "the idle client was never disconnected"
        assert 0.9 <= closed_after <= 3.0, f"the idle client was disconnected after {closed_after:.2f} s"
        with pytest.raises(psycopg.OperationalError, match="idle") as excinfo:
            idle.execute("SELECT 1")
        assert excinfo.value.sqlstate == "57P05"
        assert one(active, "SELECT 'still here'") == "still here"
    finally:
        idle.close()
        active.close()


# ---------------------------------------------------------------------------- 6. client limit


@pytest.mark.timeout(60)
def test_max_client_connections(make_proxy, role):
    h = start(make_proxy, role, max_client_connections=3)
    conns = [p2(h, role, autocommit=True) for _ in range(3)]
    try:
        with pytest.raises(psycopg2.OperationalError, match="maximum number of client connections"):
            p2(h, role).close()
        for i, c in enumerate(conns):
            assert one(c, "SELECT %s::int", i) == i
        conns.pop(0).close()
        wait_for(lambda: proxy_clients(h) == 2, 5, "the proxy noticed a client left")
        conns.append(p2(h, role, autocommit=True))
        for i, c in enumerate(conns):
            assert one(c, "SELECT %s::int", i) == i
    finally:
        for c in conns:
            c.close()


# ---------------------------------------------------------------------------- 7. init query


@pytest.mark.timeout(60)
def test_init_query_runs_once_on_every_new_server_connection(su, make_proxy, role):
    make_table(su, role, "pool_t7_init_log", "pid int NOT NULL")
    h = start(make_proxy, role, pool_size=3, init_query="INSERT INTO pool_t7_init_log SELECT pg_backend_pid()")
    conns = [p2(h, role) for _ in range(3)]
    try:
        # Three clients in transactions at once: three server connections.
        pids = {one(c, "SELECT pg_backend_pid()") for c in conns}
        assert len(pids) == 3
        logged = [r[0] for r in sql(su, "SELECT pid FROM pool_t7_init_log")]
        assert sorted(logged) == sorted(pids)
        for c in conns:
            c.commit()
        # Reusing them does not run it again.
        for _ in range(5):
            for c in conns:
                assert one(c, "SELECT pg_backend_pid()") in pids
                c.commit()
        assert sorted(r[0] for r in sql(su, "SELECT pid FROM pool_t7_init_log")) == sorted(pids)
    finally:
        for c in conns:
            c.close()


@pytest.mark.timeout(60)
def test_harmless_init_query(make_proxy, role):
    h = start(make_proxy, role, init_query="SELECT 1")
    c = p2(h, role, autocommit=True)
    try:
        assert one(c, "SELECT current_user") == role.name
        assert one(c, "SELECT 2 + 2") == 4
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_failing_init_query_gives_a_clear_error(make_proxy, role):
    h = start(make_proxy, role, init_query="SELEC 1")
    for _ in range(2):  # and again: the proxy is still there and says the same
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match="syntax error"):
            c = p2(h, role, autocommit=True)
            try:
                one(c, "SELECT 1")
            finally:
                c.close()
        assert time.monotonic() - started < 5
    assert h.thread.is_alive()
    assert h.server_count(user=role.name) == 0, "a failed server connection is still counted in the pool"


# ---------------------------------------------------------------------------- 8. health check


@pytest.mark.timeout(60)
def test_health_check_replaces_a_terminated_idle_connection(pg, su, make_proxy, role):
    h = start(make_proxy, role, health_check_after=0.2, pool_size=2)
    c = p2(h, role, autocommit=True)
    try:
        first = one(c, "SELECT pg_backend_pid()")
        wait_for(lambda: h.call(lambda: [x.state.pid for x in h.pool(user=role.name).idle]) == [first], 5,
                 "the server connection went back to the pool")
        assert pg.psql(f"SELECT pg_terminate_backend({first})", user="postgres",
                       password=SUPERUSER_PASSWORD) == "t"
        time.sleep(0.4)
        second = one(c, "SELECT pg_backend_pid()")   # no error for the client
        assert second != first
        assert one(c, "SELECT 'fine'") == "fine"
        assert first not in server_pids(h, role)
        assert h.server_count(user=role.name) <= 2
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_health_check_replaces_an_unresponsive_idle_connection(make_proxy, role):
    # A backend that is stopped, not gone: its socket stays open, only a check can tell.
    h = start(make_proxy, role, health_check_after=0.2, pool_size=2, connect_timeout=1)
    c = p2(h, role, autocommit=True)
    stuck = one(c, "SELECT pg_backend_pid()")
    wait_for(lambda: h.call(lambda: [x.state.pid for x in h.pool(user=role.name).idle]) == [stuck], 5,
             "the server connection went back to the pool")
    os.kill(stuck, signal.SIGSTOP)
    try:
        time.sleep(0.4)
        started = time.monotonic()
        fresh = one(c, "SELECT pg_backend_pid()")
        took = time.monotonic() - started
        assert fresh != stuck
        assert took < 5, f"the query waited {took:.1f} s"
        assert stuck not in server_pids(h, role)
    finally:
        os.kill(stuck, signal.SIGCONT)
        c.close()


# ---------------------------------------------------------------------------- 9. idle server connections


def _fill_pool(h, role: Role, n: int) -> list:
    conns = [p2(h, role) for _ in range(n)]
    pids = {one(c, "SELECT pg_backend_pid()") for c in conns}
    assert len(pids) == n
    for c in conns:
        c.commit()
    return conns


@pytest.mark.timeout(60)
def test_server_idle_timeout_closes_idle_server_connections(su, make_proxy, role):
    h = start(make_proxy, role, pool_size=4, max_idle=10, server_idle_timeout=1)
    conns = _fill_pool(h, role, 4)
    try:
        stopped = time.monotonic()
        assert backend_count(su, role) == 4
        wait_for(lambda: backend_count(su, role) == 0, 5, "idle server connections were closed")
        took = time.monotonic() - stopped
        assert took <= 3.2, f"idle server connections closed after {took:.1f} s"
        assert h.server_count(user=role.name) == 0
        # The clients are still connected and get a new server connection when they need one.
        for c in conns:
            assert one(c, "SELECT 1") == 1
            c.commit()
    finally:
        for c in conns:
            c.close()


@pytest.mark.timeout(60)
def test_max_idle_trims_the_pool(su, make_proxy, role):
    h = start(make_proxy, role, pool_size=4, max_idle=1, server_idle_timeout=300)
    conns = _fill_pool(h, role, 4)
    try:
        wait_for(lambda: backend_count(su, role) == 1, 3.5, "the pool kept at most max_idle idle connections")
        time.sleep(1.2)
        assert backend_count(su, role) == 1
        assert h.server_count(user=role.name) == 1
    finally:
        for c in conns:
            c.close()


# ---------------------------------------------------------------------------- 10. session state


@pytest.mark.timeout(60)
def test_session_setting_never_leaks_to_another_client(make_proxy, role):
    h = start(make_proxy, role, pool_size=1, borrow_timeout=30)
    a = p2(h, role, autocommit=True)
    b = p2(h, role, autocommit=True)
    seen_by_b: list = []

    def b_reads():
        try:
            seen_by_b.append(one(b, "SHOW statement_timeout"))
        except BaseException as e:
            seen_by_b.append(e)

    try:
        default = one(b, "SHOW statement_timeout")
        assert default != "1234ms"
        with a.cursor() as cur:
            cur.execute("SET statement_timeout = '1234ms'")
        reader = threading.Thread(target=b_reads)
        reader.start()
        assert one(a, "SHOW statement_timeout") == "1234ms"
        # Across A's own transactions the value persists.
        a.autocommit = False
        for _ in range(3):
            assert one(a, "SHOW statement_timeout") == "1234ms"
            a.commit()
        a.autocommit = True
        time.sleep(0.3)   # give B every chance to run on the server connection A set up
        assert one(a, "SHOW statement_timeout") == "1234ms"
        a.close()
        reader.join(20)
        assert not reader.is_alive(), "B never got a server connection after A left"
        assert seen_by_b == [default]
        assert one(b, "SHOW statement_timeout") == default
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------- 11. cancel


@pytest.mark.timeout(60)
def test_cancel_from_another_thread(su, make_proxy, role):
    # psycopg 3's cancel_safe, not psycopg2's conn.cancel(): psycopg2 holds the GIL while libpq
    # waits for the cancel connection to close, and this proxy runs on a thread of this process.
    h = start(make_proxy, role, pool_size=2)
    c = psycopg.connect(h.dsn(user=role.name, password=role.password), autocommit=True, connect_timeout=10)
    outcome: list = []

    def sleeper():
        try:
            outcome.append(c.execute("SELECT pg_sleep(30)").fetchone())
        except BaseException as e:
            outcome.append(e)

    try:
        started = time.monotonic()
        t = threading.Thread(target=sleeper)
        t.start()
        wait_for(lambda: sql(su, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
                                 "AND state = 'active' AND query = 'SELECT pg_sleep(30)'", role.name)[0][0],
                 10, "the sleep started on the server")
        c.cancel_safe(timeout=5)
        t.join(10)
        assert not t.is_alive()
        assert time.monotonic() - started < 5
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
        assert outcome[0].sqlstate == "57014"
        assert c.execute("SELECT 'usable'").fetchone() == ("usable",)
    finally:
        c.close()


@pytest.mark.timeout(60)
async def test_cancel_with_asyncpg_timeout(make_proxy, role):
    h = start(make_proxy, role, pool_size=2)
    conn = await asyncpg.connect(h.dsn(user=role.name, password=role.password), timeout=10)
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        assert await conn.fetchval("SELECT 'usable'") == "usable"
        assert time.monotonic() - started < 5
        # The server is not still sleeping for us.
        assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = current_user "
                                   "AND query = 'SELECT pg_sleep(30)' AND state = 'active'") == 0
    finally:
        await conn.close()



@pytest.mark.timeout(60)
def test_cancel_while_waiting_for_a_server_connection(su, make_proxy, role):
    """The pool is busy, so the client's query has not reached PostgreSQL: a cancel fails it
    at once with 57014 (as a canceled statement), it never runs later, and the client goes on."""
    h = start(make_proxy, role, pool_size=1)
    holder = psycopg.connect(h.dsn(user=role.name, password=role.password), autocommit=True)
    waiter = psycopg.connect(h.dsn(user=role.name, password=role.password), autocommit=True)
    outcome: list = []
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")      # holds the only server connection

        def wait():
            try:
                outcome.append(waiter.execute("INSERT INTO waited_for VALUES (1) RETURNING 1").fetchone())
            except BaseException as e:
                outcome.append(e)

        sql(su, "CREATE TABLE IF NOT EXISTS waited_for (x int)")
        sql(su, "TRUNCATE waited_for")
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.5)
        assert not outcome, "the waiter got a server connection the holder has"
        started = time.monotonic()
        waiter.cancel_safe(timeout=5)
        t.join(5)
        assert not t.is_alive() and time.monotonic() - started < 3
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
        holder.execute("COMMIT")
        assert waiter.execute("SELECT 'usable'").fetchone() == ("usable",)
        assert sql(su, "SELECT count(*) FROM waited_for")[0][0] == 0   # it never ran
    finally:
        holder.close()
        waiter.close()


@pytest.mark.timeout(60)
def test_a_pinned_client_that_leaves_has_its_server_connection_reset_and_reused(su, make_proxy, role):
    """Advisory lock, LISTEN, a hold cursor and a setting pin the client; when it hangs up,
    DISCARD ALL clears all of that and the same backend serves the next client. (A temp table
    is different: see the next test.)"""
    h = start(make_proxy, role, pool_size=1)
    a = p2(h, role, autocommit=True)
    pid = one(a, "SELECT pg_backend_pid()")
    with a.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(4242)")
        cur.execute("LISTEN somewhere")
        cur.execute("BEGIN")
        cur.execute("DECLARE held CURSOR WITH HOLD FOR SELECT 1")
        cur.execute("COMMIT")
        cur.execute("SET work_mem = '7MB'")
    a.close()
    b = p2(h, role, autocommit=True)
    try:
        assert wait_for(lambda: one(b, "SELECT pg_backend_pid()") == pid, 10, "the backend was reused")
        assert one(b, "SELECT count(*) FROM pg_class WHERE relname = 'mine' AND relpersistence = 't'") == 0
        assert one(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()") == 0
        assert one(b, "SELECT count(*) FROM pg_listening_channels()") == 0
        assert one(b, "SELECT count(*) FROM pg_cursors") == 0
        assert one(b, "SHOW work_mem") == one(su, "SHOW work_mem")
        # (LISTEN is carried: the proxy listened on a connection of its own, closed once nobody listens.)
        assert wait_for(lambda: sql(su, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                    role.name)[0][0] == 1, 10, "one backend left")
    finally:
        b.close()


@pytest.mark.timeout(60)
def test_a_client_that_used_temp_tables_leaves_and_its_server_connection_is_closed(su, make_proxy, role):
    """DISCARD ALL drops the temp table, but the backend keeps its temp buffers: `SET
    temp_buffers` would fail for the next client. That server connection is closed instead."""
    h = start(make_proxy, role, pool_size=1)
    a = p2(h, role, autocommit=True)
    pid = one(a, "SELECT pg_backend_pid()")
    with a.cursor() as cur:
        cur.execute("CREATE TEMP TABLE mine (x int)")
        cur.execute("INSERT INTO mine VALUES (1)")
    a.close()
    b = p2(h, role, autocommit=True)
    try:
        assert one(b, "SELECT pg_backend_pid()") != pid
        with b.cursor() as cur:
            cur.execute("SET temp_buffers = 100")       # fails on a backend that used temp tables
        assert wait_for(lambda: sql(su, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid)[0][0] == 0,
                        10, "the old backend exited")
    finally:
        b.close()


@pytest.mark.timeout(60)
def test_a_client_that_loaded_a_library_leaves_and_its_server_connection_is_closed(su, make_proxy, role):
    """LOAD cannot be undone: that server connection is not given to anyone else."""
    sql(su, f"ALTER ROLE {role.name} SUPERUSER")     # LOAD of a library outside $libdir/plugins
    h = start(make_proxy, role, pool_size=1)
    a = p2(h, role, autocommit=True)
    pid = one(a, "SELECT pg_backend_pid()")
    with a.cursor() as cur:
        cur.execute("LOAD 'plpgsql'")
    a.close()
    b = p2(h, role, autocommit=True)
    try:
        assert one(b, "SELECT pg_backend_pid()") != pid
    finally:
        b.close()


@pytest.mark.timeout(60)
def test_a_borrower_an_idle_connection_fits_behind_waiters_gets_it_from_borrow(make_proxy, role):
    """Connections holding a custom placeholder, idle; a borrower whose session lacks it waits
    (the oldest idle one is closed to make room for a new one); a borrower whose session has it
    gets an idle one from borrow() itself, not a callback made inside borrow() before its
    client knows it waits (such a client waited for ever: a takeover never finished)."""
    h = start(make_proxy, role, pool_size=2)
    p2(h, role).close()         # the pool exists once a client logged in
    pool = h.pool(user=role.name)

    class Waiter(Borrower):
        def __init__(self, customs):
            self.customs = customs
            self.conn = None

        def borrowed(self, conn):
            self.conn = conn

        def borrow_failed(self, exc):
            raise AssertionError(exc)

    async def scenario():
        held = [await pool.acquire(), await pool.acquire()]
        for conn in held:
            conn.state.placeholders.add("myapp.tenant")
            pool.release(conn)
        plain, tenant = Waiter(frozenset()), Waiter(frozenset({"myapp.tenant"}))
        assert pool.borrow(plain) is None
        conn = pool.borrow(tenant)
        assert conn is not None and conn.state.placeholders == {"myapp.tenant"} and tenant.conn is None
        async with asyncio.timeout(10):
            while plain.conn is None:
                await asyncio.sleep(0.01)
        assert not plain.conn.state.placeholders and pool.retired == 1
        pool.release(conn)
        pool.release(plain.conn)

    h.call(scenario)


@pytest.mark.timeout(60)
def test_a_client_with_a_temp_table_per_transaction_keeps_its_server_connection(su, make_proxy, role):
    """A temp table in every transaction (ON COMMIT DROP, an ETL habit): the server connection,
    whose temp buffers stay allocated, is kept for that client as its own session would be (not
    closed and opened again each time), and no other client gets it; when the client leaves,
    it is closed."""
    h = start(make_proxy, role, pool_size=2)
    a = p2(h, role)
    b = p2(h, role, autocommit=True)
    try:
        a_pids, b_pids = set(), set()
        for _ in range(5):
            with a.cursor() as cur:
                cur.execute("CREATE TEMP TABLE etl (x int) ON COMMIT DROP")
                cur.execute("INSERT INTO etl VALUES (1)")
                cur.execute("SELECT pg_backend_pid()")
                a_pids.add(cur.fetchone()[0])
            a.commit()
            b_pids.add(one(b, "SELECT pg_backend_pid()"))
        assert len(a_pids) == 1 and not a_pids & b_pids
        assert h.call(lambda: h.pool(user=role.name).retired) == 0
    finally:
        a.close()
    pid = a_pids.pop()
    assert wait_for(lambda: sql(su, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid)[0][0] == 0,
                    10, "the kept backend exited with its client")
    assert one(b, "SELECT pg_backend_pid()") != pid
    b.close()
