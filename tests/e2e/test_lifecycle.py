"""A proxy's life as a load balancer and an orchestrator see it: /health and /ready, the
connection budget of a fleet, the drain on SIGTERM, and the takeover restart."""
from __future__ import annotations

import re
import threading
import time
import urllib.request
import json

import psycopg
from psycopg import pq
import psycopg2
import pytest

from conftest import APP_PASSWORD, APP_USER, SUPERUSER_PASSWORD, backends
from support.serve import Served, accepting, free_port
from unpinned.config import ConfigError, load, per_process


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _connect(port: int, **kw):
    return psycopg2.connect(host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD, dbname="postgres",
                            connect_timeout=5, **kw)


def _connect3(port: int, **kw) -> psycopg.Connection:
    # psycopg 3 reads the FATAL a closed connection left behind (psycopg2 reports only the close).
    return psycopg.connect(host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD, dbname="postgres",
                           connect_timeout=5, **kw)


@pytest.fixture
def table(pg):
    name = f"lifecycle_{int(time.time() * 1000) % 10**9}"
    pg.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, who text)", user="postgres", password=SUPERUSER_PASSWORD)
    yield name
    pg.psql(f"DROP TABLE {name}", user="postgres", password=SUPERUSER_PASSWORD)


# ------------------------------------------------------------------ /health and /ready

def test_health_and_ready_answer_for_load_balancers(make_proxy):
    p = make_proxy(http_listen="127.0.0.1:0")
    port = p.proxy.http.port
    assert _get(port, "/health") == (200, {"status": "alive"})
    # No client yet, so no server connection: /ready reaches the server itself.
    assert _get(port, "/ready") == (200, {"ready": True})
    p.call(lambda: setattr(p.proxy.shared, "draining", True))
    status, body = _get(port, "/ready")
    assert status == 503 and body["ready"] is False and "draining" in body["reason"]
    assert _get(port, "/health")[0] == 200, "a draining proxy is still alive: no restart"


def test_ready_says_503_with_the_reason_when_the_server_is_unreachable(make_proxy):
    nobody = free_port()
    p = make_proxy(http_listen="127.0.0.1:0", upstream=f"postgresql://postgres:x@127.0.0.1:{nobody}/postgres")
    status, body = _get(p.proxy.http.port, "/ready")
    assert status == 503 and body["ready"] is False
    assert "upstream unreachable" in body["reason"] and str(nobody) in body["reason"], body
    assert _get(p.proxy.http.port, "/health")[0] == 200


# ------------------------------------------------------------------ fleet_size

def test_fleet_size_divides_the_budget_and_never_exceeds_it():
    for budget, fleet, workers in [(20, 3, 1), (9, 3, 1), (80, 4, 2), (7, 7, 1), (100, 6, 4)]:
        cfg = load(None, auth="trust", pool_size=budget, max_idle=budget, fleet_size=fleet, workers=workers)
        from unpinned.config import WorkerInfo
        per_worker = [per_process(cfg, WorkerInfo(i, workers, 0) if workers > 1 else None) for i in range(workers)]
        proxy_total = sum(c.pool_size for c in per_worker)
        assert proxy_total == budget // fleet, (budget, fleet, workers)
        assert proxy_total * fleet <= budget
        assert sum(c.max_idle for c in per_worker) * fleet <= budget
    with pytest.raises(ConfigError, match="fleet_size"):
        load(None, auth="trust", pool_size=2, fleet_size=3)
    with pytest.raises(ConfigError, match="fleet_size must be at least 1"):
        load(None, auth="trust", fleet_size=0)


def test_a_proxy_of_a_fleet_opens_only_its_share(pg, make_proxy):
    before = backends(pg)
    p = make_proxy(pool_size=9, fleet_size=3, borrow_timeout=1)
    assert p.proxy.config.pool_size == 3
    held = [_connect(p.port) for _ in range(3)]
    for c in held:
        c.cursor().execute("SELECT 1")      # a transaction open on each: three server connections
    assert backends(pg) - before == 3
    extra = psycopg.connect(**p.kwargs(), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="Timed-out waiting to acquire database connection"):
        extra.execute("SELECT 1")
    assert backends(pg) - before == 3, "the fourth transaction waited instead of opening a fourth"
    for c in held + [extra]:
        c.close()


# ------------------------------------------------------------------ graceful shutdown

def test_sigterm_lets_the_transaction_in_flight_commit_then_exits(pg, users_file, table):
    with Served(pg.dsn("postgres", SUPERUSER_PASSWORD), users_file, shutdown_timeout=20) as p:
        busy = _connect(p.port)
        idle = _connect3(p.port, autocommit=True)
        idle.execute("SELECT 1")
        cur = busy.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (1, 'before SIGTERM')")     # a transaction is open
        p.terminate()
        deadline = time.monotonic() + 5
        while accepting(p.port):
            assert time.monotonic() < deadline, "still accepting new connections while draining"
            time.sleep(0.05)
        with pytest.raises(psycopg2.OperationalError):
            _connect(p.port)
        status, body = p.get("/ready")
        assert status == 503 and "draining" in body["reason"]
        # The idle client was closed between transactions, with PostgreSQL's words.
        with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
            idle.execute("SELECT 1")
        assert p.process.poll() is None, "the proxy waits for the transaction in flight"
        time.sleep(0.5)
        cur.execute(f"INSERT INTO {table} VALUES (2, 'after SIGTERM')")
        busy.commit()
        assert p.wait(10) == 0, p.log()
        with pytest.raises(psycopg2.OperationalError):
            cur.execute("SELECT 1")
    rows = pg.psql(f"SELECT string_agg(who, ',' ORDER BY id) FROM {table}", user="postgres",
                   password=SUPERUSER_PASSWORD)
    assert rows == "before SIGTERM,after SIGTERM"
    assert "drained" in p.log()


def test_shutdown_timeout_bounds_the_drain(pg, users_file, table):
    with Served(pg.dsn("postgres", SUPERUSER_PASSWORD), users_file, shutdown_timeout=1) as p:
        stuck = _connect3(p.port)
        stuck.execute(f"INSERT INTO {table} VALUES (1, 'never committed')")
        t0 = time.monotonic()
        p.terminate()
        assert p.wait(10) == 0
        took = time.monotonic() - t0
        assert 0.9 < took < 5, took
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            stuck.commit()
    assert "shutdown_timeout (1 s) reached with 1 client(s)" in p.log()
    assert pg.psql(f"SELECT count(*) FROM {table}", user="postgres", password=SUPERUSER_PASSWORD) == "0"


def test_a_second_sigterm_stops_at_once(pg, users_file):
    with Served(pg.dsn("postgres", SUPERUSER_PASSWORD), users_file, shutdown_timeout=60) as p:
        stuck = _connect(p.port)
        stuck.cursor().execute("BEGIN; SELECT 1")
        p.terminate()
        time.sleep(0.3)
        assert p.process.poll() is None
        p.terminate()
        assert p.wait(5) == 0
        stuck.close()


# ------------------------------------------------------------------ takeover restart

def _takeover_worker(port: int, i: int, table: str, stop: threading.Event, moved: threading.Event, out: dict) -> None:
    """One client: a session SET and a protocol-level prepared statement, then short
    transactions in a loop, each checking that both are still there."""
    done = after = 0
    try:
        conn = _connect3(port)
        conn.execute(f"SET unpinned_test.who = 'client {i}'")
        conn.commit()
        check = "SELECT current_setting('unpinned_test.who'), %s::int + 1"
        conn.execute(check, (0,), prepare=True)
        conn.commit()
        # A named statement of our own, prepared once (Parse), then only bound by name.
        res = conn.pgconn.prepare(b"mine", b"SELECT current_setting('unpinned_test.who') || ' ' || $1::text")
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        while not stop.is_set():
            was_moved = moved.is_set()
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i * 1_000_000 + done, f"client {i}"))
            row = conn.execute(check, (done,), prepare=True).fetchone()
            conn.commit()
            assert row == (f"client {i}", done + 1), row
            res = conn.pgconn.exec_prepared(b"mine", [str(done).encode()])
            assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
            assert res.get_value(0, 0) == f"client {i} {done}".encode()
            done += 1
            after += was_moved
        conn.close()
    except Exception as e:      # every client error is reported, none may happen
        out.setdefault("errors", []).append(f"client {i}: {type(e).__name__}: {e}")
    out.setdefault("done", {})[i] = (done, after)


def test_takeover_under_100_clients_moves_every_session_without_an_error(pg, users_file, table, tmp_path):
    sock = str(tmp_path / "takeover.sock")
    upstream = pg.dsn("postgres", SUPERUSER_PASSWORD)
    old = Served(upstream, users_file, takeover=sock, pool_size=20).start()
    new = Served(upstream, users_file, port=old.port, http_port=old.http_port, takeover=sock, pool_size=20)
    stop, moved, out = threading.Event(), threading.Event(), {}
    threads = [threading.Thread(target=_takeover_worker, args=(old.port, i, table, stop, moved, out))
               for i in range(100)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        t0 = time.monotonic()
        new.start(wait=False)
        assert old.wait(30) == 0, old.log()
        took = time.monotonic() - t0
        moved.set()
        new.wait_ready()
        time.sleep(2)           # every client keeps working against the new process
        stop.set()
        for t in threads:
            t.join(60)
        assert not out.get("errors"), "\n".join(out["errors"][:10])
        assert len(out["done"]) == 100
        assert all(after > 0 for _, after in out["done"].values()), "every client ran transactions after the takeover"
        log = new.log()
        m = re.search(r"takeover: (\d+) client\(s\) moved in ([\d.]+) s", log)
        assert m and int(m.group(1)) == 100, log
        print(f"\ntakeover: 100 clients moved, new process up to old process gone {took:.2f} s, "
              f"transfer {m.group(2)} s, transactions {sum(d for d, _ in out['done'].values())}")
        assert re.search(r"takeover: 100 client\(s\) handed over, 0 closed", old.log()), old.log()
        assert new.get("/ready")[0] == 200
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        new.stop()
        old.stop()
    rows = pg.psql(f"SELECT count(*) FROM {table}", user="postgres", password=SUPERUSER_PASSWORD)
    assert int(rows) == sum(d for d, _ in out["done"].values()), "every committed transaction is there"


def test_takeover_keeps_a_pinned_session_on_the_old_process_and_closes_tls_clients(pg, users_file, tmp_path):
    """What cannot move: a pinned session stays with the old process (which keeps serving it)
    until it ends, then the old process exits; a TLS client is closed between transactions
    with 57P01 and the reason; the admin console likewise."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    sock = str(tmp_path / "takeover.sock")
    upstream = pg.dsn("postgres", SUPERUSER_PASSWORD)
    opts = dict(takeover=sock, pool_size=5, tls_cert_file=str(cert_file), tls_key_file=str(key_file))
    old = Served(upstream, users_file, **opts).start()
    new = Served(upstream, users_file, port=old.port, http_port=old.http_port, **opts)
    try:
        plain = _connect3(old.port, autocommit=True, sslmode="disable")
        plain.execute("SET unpinned_test.who = 'plain'")
        plain.execute("PREPARE doubled (int) AS SELECT $1 * 2")     # carried: moves with the client
        pinned = _connect3(old.port, autocommit=True, sslmode="disable")
        pinned.execute("SELECT pg_advisory_lock(4242)")     # a session lock: pinned to its server connection
        tls = _connect3(old.port, autocommit=True, sslmode="require")
        tls.execute("SELECT 1")
        admin = psycopg.connect(host="127.0.0.1", port=old.port, user="postgres", password=SUPERUSER_PASSWORD,
                                dbname="unpinned", autocommit=True, sslmode="disable")
        new.start(wait=False)
        new.wait_ready()
        deadline = time.monotonic() + 10
        while True:     # the new process lists the plain client once it has it
            status, clients = new.get("/api/clients")
            if status == 200 and len(clients) == 1:
                break
            assert time.monotonic() < deadline, (clients, old.log(), new.log())
            time.sleep(0.05)
        assert plain.execute("SHOW unpinned_test.who").fetchone() == ("plain",)
        assert plain.execute("EXECUTE doubled(21)").fetchone() == (42,)
        assert plain.execute("SELECT name, statement FROM pg_prepared_statements").fetchall() == \
            [("doubled", "PREPARE doubled (int) AS SELECT $1 * 2")]
        with pytest.raises(psycopg.OperationalError, match="TLS sessions cannot be handed over"):
            tls.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            admin.execute("SHOW POOLS")
        # The pinned session is still served by the old process, lock and all.
        time.sleep(0.5)
        assert old.process.poll() is None
        assert pinned.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 "
                              "AND pid = pg_backend_pid()").fetchone() == (1,)
        # New clients reach the new process; when the pinned session ends, the old one exits.
        fresh = _connect3(old.port, autocommit=True, sslmode="disable")
        assert fresh.execute("SELECT 1").fetchone() == (1,)
        pinned.close()
        assert old.wait(10) == 0, old.log()
        assert re.search(r"takeover: 1 client\(s\) handed over, 2 closed", old.log()), old.log()
        assert plain.execute("SELECT current_setting('unpinned_test.who')").fetchone() == ("plain",)
        plain.close()
        fresh.close()
    finally:
        new.stop()
        old.stop()


def test_sigterm_drains_every_worker(pg, users_file, table):
    """With workers, the supervisor passes SIGTERM on and each worker drains its own clients."""
    with Served(pg.dsn("postgres", SUPERUSER_PASSWORD), users_file, workers=2, pool_size=8, borrow_timeout=5,
                shutdown_timeout=20) as p:
        busy = [_connect3(p.port) for _ in range(4)]      # spread by the kernel over both workers
        for i, c in enumerate(busy):
            c.execute(f"INSERT INTO {table} VALUES ({i}, 'in flight')")
        p.terminate()
        deadline = time.monotonic() + 5
        while accepting(p.port):
            assert time.monotonic() < deadline, "still accepting new connections while draining"
            time.sleep(0.05)
        time.sleep(0.5)
        assert p.process.poll() is None, "the workers wait for the transactions in flight"
        for c in busy:
            c.commit()
        assert p.wait(15) == 0, p.log()
    assert pg.psql(f"SELECT count(*) FROM {table}", user="postgres", password=SUPERUSER_PASSWORD) == "4"


def test_the_old_process_serves_again_when_the_new_one_dies_during_the_takeover(pg, users_file, tmp_path):
    """A new version that crashes after taking the listeners must not take the service down:
    the old process takes its listeners back and carries on; a later takeover still works."""
    import socket as socket_module
    from unpinned.ops.takeover import FrameReader, send_frame
    sock = str(tmp_path / "takeover.sock")
    upstream = pg.dsn("postgres", SUPERUSER_PASSWORD)
    old = Served(upstream, users_file, takeover=sock, pool_size=5).start()
    new = Served(upstream, users_file, port=old.port, http_port=old.http_port, takeover=sock, pool_size=5)
    try:
        busy = _connect3(old.port)
        busy.execute("SET unpinned_test.who = 'busy'")
        busy.execute("SELECT 1")         # a transaction open: it does not move yet
        # A "new process" that takes the listeners and dies.
        with socket_module.socket(socket_module.AF_UNIX) as s:
            s.connect(sock)
            send_frame(s, {"op": "hello", "pid": 0})
            frame, fds = FrameReader(s).read()
            assert frame["op"] == "listeners" and frame["names"] == ["clients", "http"] and len(fds) == 2
            for fd in fds:
                __import__("os").close(fd)
        deadline = time.monotonic() + 10
        while "serving again" not in old.log():
            assert time.monotonic() < deadline, old.log()
            time.sleep(0.05)
        assert old.get("/ready")[0] == 200
        busy.commit()
        assert busy.execute("SHOW unpinned_test.who").fetchone() == ("busy",)
        busy.commit()
        other = _connect3(old.port, autocommit=True)
        assert other.execute("SELECT 2").fetchone() == (2,)
        # The real takeover afterwards.
        new.start(wait=False)
        assert old.wait(20) == 0, old.log()
        assert busy.execute("SHOW unpinned_test.who").fetchone() == ("busy",)
        assert other.execute("SELECT 3").fetchone() == (3,)
        deadline = time.monotonic() + 5
        while "2 client(s) moved" not in new.log():
            assert time.monotonic() < deadline, new.log()
            time.sleep(0.05)
    finally:
        new.stop()
        old.stop()


def test_takeover_keeps_asyncpg_statement_caches_working(pg, users_file, tmp_path):
    """asyncpg prepares every query under its own statement name and afterwards only binds
    it: after the takeover the new process must know each client's names."""
    import asyncio
    import asyncpg
    sock = str(tmp_path / "takeover.sock")
    upstream = pg.dsn("postgres", SUPERUSER_PASSWORD)
    old = Served(upstream, users_file, takeover=sock, pool_size=10).start()
    new = Served(upstream, users_file, port=old.port, http_port=old.http_port, takeover=sock, pool_size=10)
    errors: list[str] = []
    counts: dict[int, tuple[int, int]] = {}

    async def client(i: int, stop: asyncio.Event, moved: asyncio.Event) -> None:
        done = after = 0
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=old.port, user=APP_USER, password=APP_PASSWORD,
                                         database="postgres")
            await conn.execute(f"SET unpinned_test.who = 'asyncpg {i}'")
            while not stop.is_set():
                was_moved = moved.is_set()
                async with conn.transaction():
                    n = await conn.fetchval("SELECT $1::int + 1", done)
                    who = await conn.fetchval("SELECT current_setting('unpinned_test.who')")
                assert (n, who) == (done + 1, f"asyncpg {i}"), (n, who)
                done += 1
                after += was_moved
            await conn.close()
        except Exception as e:
            errors.append(f"client {i}: {type(e).__name__}: {e}")
        counts[i] = (done, after)

    async def main() -> None:
        stop, moved = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(client(i, stop, moved)) for i in range(100)]
        await asyncio.sleep(2)
        new.start(wait=False)
        await asyncio.to_thread(old.wait, 30)
        moved.set()
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
        assert old.process.returncode == 0, old.log()
        assert not errors, errors[:10]
        assert len(counts) == 100 and all(after > 0 for _, after in counts.values())
        deadline = time.monotonic() + 5
        while "takeover: 100 client(s) moved" not in new.log():
            assert time.monotonic() < deadline, new.log()
            time.sleep(0.05)
    finally:
        new.stop()
        old.stop()
