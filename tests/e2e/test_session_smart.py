"""Smart mode end to end: session state carried across server connections, pins only
for what cannot be carried, unpinned when it is gone (SPEC 2, 4)."""
from __future__ import annotations

import subprocess

import asyncpg
import psycopg
import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import pg_tool_env


def pinned_clients(handle) -> int:
    return handle.call(lambda: sum(1 for c in handle.proxy.clients if c.relay is not None and c.relay.pinned))


def pin_events(handle, event=None):
    return handle.call(lambda: [e for e in handle.proxy.pinlog.recent if event is None or e.event == event])


@pytest.fixture
def small(make_proxy):
    """Smart proxy with a pool of 2, so connections rotate among clients."""
    return make_proxy(pool_size=2)


def test_startup_options_apply_in_every_transaction(small):
    conns = [psycopg2.connect(**small.kwargs(), options="-c statement_timeout=300") for _ in range(3)]
    plain = psycopg2.connect(**small.kwargs())
    try:
        for _ in range(3):
            for conn in conns:
                cur = conn.cursor()
                with pytest.raises(psycopg2.errors.QueryCanceled):
                    cur.execute("SELECT pg_sleep(1)")
                conn.rollback()
                cur.execute("SHOW statement_timeout")
                assert cur.fetchone() == ("300ms",)
                conn.rollback()
            # A client without the option shares those server connections and never sees it.
            cur = plain.cursor()
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone() == ("0",)
            plain.rollback()
        assert pinned_clients(small) == 0
    finally:
        for c in conns + [plain]:
            c.close()


def test_bad_startup_option_fails_at_login(small):
    with pytest.raises(psycopg2.OperationalError, match="statement_timeout"):
        psycopg2.connect(**small.kwargs(), options="-c statement_timeout=banana")


def test_session_set_is_carried_not_pinned(small):
    a = psycopg2.connect(**small.kwargs())
    a.autocommit = True
    others = [psycopg2.connect(**small.kwargs()) for _ in range(3)]
    for o in others:
        o.autocommit = True
    try:
        a.cursor().execute("SET lock_timeout = 3000")
        assert pinned_clients(small) == 0
        a_pids, other_pids = set(), set()
        for _ in range(5):
            cur = a.cursor()
            cur.execute("SELECT current_setting('lock_timeout'), pg_backend_pid()")
            value, pid = cur.fetchone()
            assert value == "3s"
            a_pids.add(pid)
            for o in others:
                oc = o.cursor()
                oc.execute("SELECT current_setting('lock_timeout'), pg_backend_pid()")
                ovalue, opid = oc.fetchone()
                assert ovalue == "0", "another client's SET leaked"
                other_pids.add(opid)
        assert a_pids & other_pids, "the server connection A used was shared with the others"
        cur = a.cursor()
        cur.execute("RESET lock_timeout")
        cur.execute("SHOW lock_timeout")
        assert cur.fetchone() == ("0",)
    finally:
        for c in [a] + others:
            c.close()


def test_set_in_rolled_back_transaction_is_undone(small):
    conn = psycopg2.connect(**small.kwargs())
    try:
        cur = conn.cursor()
        cur.execute("SET work_mem = '8MB'")
        conn.commit()
        cur.execute("SET work_mem = '16MB'")
        cur.execute("SAVEPOINT s1")
        cur.execute("SET work_mem = '32MB'")
        cur.execute("ROLLBACK TO SAVEPOINT s1")
        cur.execute("SHOW work_mem")
        assert cur.fetchone() == ("16MB",)
        conn.rollback()
        cur.execute("SHOW work_mem")
        assert cur.fetchone() == ("8MB",)
        conn.rollback()
        cur.execute("SET LOCAL work_mem = '64MB'")
        conn.commit()
        cur.execute("SHOW work_mem")
        assert cur.fetchone() == ("8MB",)
        conn.commit()
        cur.execute("SELECT set_config('work_mem', '12MB', false)")
        conn.commit()
        cur.execute("SHOW work_mem")
        assert cur.fetchone() == ("12MB",)
        conn.commit()
        assert pinned_clients(small) == 0
    finally:
        conn.close()


async def test_asyncpg_enum_through_sqlalchemy_does_not_pin(small):
    engine = create_async_engine(small.dsn().replace("postgresql", "postgresql+asyncpg", 1))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("DROP TYPE IF EXISTS ss_mood CASCADE"))
            await conn.execute(sa.text("CREATE TYPE ss_mood AS ENUM ('sad', 'happy')"))
            await conn.execute(sa.text("CREATE TABLE ss_enum (mood ss_mood)"))
            await conn.execute(sa.text("INSERT INTO ss_enum VALUES ('happy')"))
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT mood FROM ss_enum"))).scalar() == "happy"
            assert (await conn.execute(sa.text("SHOW jit"))).scalar() == "on"
            assert pinned_clients(small) == 0
        would = [e for e in pin_events(small, "would_pin_rds") if "set_config('jit'" in e.sql]
        assert would, "the JIT toggle is recorded as a would-pin-on-RDS statement"
    finally:
        await engine.dispose()


async def test_asyncpg_pool_reset_and_cache_do_not_pin(small):
    pool = await asyncpg.create_pool(small.dsn(), min_size=3, max_size=3)
    try:
        for i in range(10):
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT $1::int", i) == i
        assert pinned_clients(small) == 0
    finally:
        await pool.close()


def test_psycopg3_prepared_with_rollbacks_no_pin(small):
    with psycopg.connect(small.dsn(), prepare_threshold=0) as conn:
        for i in range(10):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            conn.rollback()
        assert pinned_clients(small) == 0


def test_pgbench_prepared_50_clients_pool_5(pg, make_proxy):
    h = make_proxy(pool_size=5)
    r = subprocess.run([pg.tool("pgbench"), "-S", "-n", "-c", "50", "-j", "2", "-t", "40", "-M", "prepared"],
                       env=pg_tool_env(pg, h), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "number of failed transactions: 0" in r.stdout
    assert pin_events(h, "pin") == []


def test_temp_table_pins_until_dropped(small):
    conn = psycopg2.connect(**small.kwargs())
    conn.autocommit = True
    try:
        cur = conn.cursor()
        cur.execute("CREATE TEMP TABLE ss_tmp (x int)")
        assert pinned_clients(small) == 1
        cur.execute("INSERT INTO ss_tmp VALUES (1)")
        cur.execute("SELECT count(*) FROM ss_tmp")
        assert cur.fetchone() == (1,)
        cur.execute("DROP TABLE ss_tmp")
        assert pinned_clients(small) == 0
        events = [(e.event, e.reason) for e in pin_events(small) if e.client.id == _client_id(small)]
        assert ("pin", "temp_object") in events and ("unpin", "temp_object") in events
        cur.execute("BEGIN; CREATE TEMP TABLE ss_tmp2 (x int) ON COMMIT DROP; COMMIT")
        assert pinned_clients(small) == 0
    finally:
        conn.close()


def _client_id(handle) -> int:
    return handle.call(lambda: max(c.id for c in handle.proxy.clients if c.relay is not None))


def test_advisory_lock_pins_until_unlocked(small):
    a = psycopg2.connect(**small.kwargs())
    b = psycopg2.connect(**small.kwargs())
    a.autocommit = b.autocommit = True
    try:
        ca, cb = a.cursor(), b.cursor()
        ca.execute("SELECT pg_advisory_lock(4242)")
        assert pinned_clients(small) == 1
        cb.execute("SELECT pg_try_advisory_lock(4242)")   # fails to acquire: no pin
        assert cb.fetchone() == (False,)
        assert pinned_clients(small) == 1
        ca.execute("SELECT pg_advisory_unlock(4242)")
        assert pinned_clients(small) == 0
        ca.execute("SELECT pg_advisory_xact_lock(1)")
        assert pinned_clients(small) == 0
    finally:
        a.close()
        b.close()


def test_currval_guard(small):
    a = psycopg2.connect(**small.kwargs())
    b = psycopg2.connect(**small.kwargs())
    c = psycopg2.connect(**small.kwargs())
    for conn in (a, b, c):
        conn.autocommit = True
    try:
        a.cursor().execute("CREATE SEQUENCE IF NOT EXISTS ss_seq")
        ca = a.cursor()
        ca.execute("BEGIN")
        ca.execute("SELECT nextval('ss_seq')")
        n = ca.fetchone()[0]
        ca.execute("SELECT currval('ss_seq')")            # same transaction: fine
        assert ca.fetchone() == (n,)
        ca.execute("COMMIT")
        # Other clients use both server connections in the meantime.
        for _ in range(3):
            for other in (b, c):
                oc = other.cursor()
                oc.execute("SELECT nextval('ss_seq')")
        with pytest.raises(psycopg2.Error) as err:
            ca.execute("SELECT currval('ss_seq')")
        # A's value went with its turn on those connections: PostgreSQL's own words for a
        # session without it (never B's or C's value, and no blame on anyone).
        assert err.value.pgcode == "55000"
        assert err.value.diag.message_primary == 'currval of sequence "ss_seq" is not yet defined in this session'
        ca.execute("SELECT 1")                            # the client carries on
        assert small.call(lambda: small.proxy.pinlog.counts.get(("currval_guard", "sequence"), 0)) >= 1
    finally:
        for conn in (a, b, c):
            conn.close()


def test_verify_mode_catches_a_setting_changed_inside_a_function(pg, make_proxy):
    """SPEC 4.7: a function changes a session parameter where no parser can see it. With
    verify on, the proxy notices after the transaction, pins the client (its connection now
    has state the proxy cannot carry) and names the statement; no other client ever sees
    the value. Without verify, the same function would leak it."""
    pg.psql("CREATE OR REPLACE FUNCTION sneaky_work_mem() RETURNS text LANGUAGE sql AS "
            "$$ SELECT set_config('work_mem', '3MB', false) $$")
    handle = make_proxy(pool_size=1, verify=True)
    a = psycopg2.connect(**handle.kwargs())
    a.autocommit = True
    b = psycopg2.connect(**handle.kwargs())
    b.autocommit = True
    try:
        with a.cursor() as cur:
            cur.execute("SELECT sneaky_work_mem()")
        events = pin_events(handle, "pin")
        assert [e.reason for e in events] == ["session_state"]
        assert "sneaky_work_mem" in events[0].sql
        assert pinned_clients(handle) == 1
        with a.cursor() as cur:          # the client keeps its connection and its value
            cur.execute("SHOW work_mem")
            assert cur.fetchone() == ("3MB",)
        import threading
        seen: list = []
        t = threading.Thread(target=lambda: seen.append(_show_work_mem(b)))
        t.start()
        t.join(1.0)
        assert t.is_alive() and not seen      # b waits: the only server connection is a's
        a.close()                             # a leaves: its connection is reset, then b's
        t.join(10)
        with psycopg2.connect(pg.dsn()) as direct, direct.cursor() as cur:
            cur.execute("SHOW work_mem")
            default = cur.fetchone()[0]
        assert seen == [default]
    finally:
        a.close()
        b.close()


def _show_work_mem(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW work_mem")
        return cur.fetchone()[0]
