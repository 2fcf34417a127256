"""SQL PREPARE/EXECUTE/DEALLOCATE carried in smart mode (SPEC 2, issue 14): each client's
statements follow it to whichever server connection it gets, under the proxy's own names,
with PostgreSQL's errors; rds mode still pins."""
from __future__ import annotations

import threading

import asyncpg
import psycopg
import psycopg2
import pytest


def pinned(h) -> int:
    return h.call(lambda: sum(1 for c in h.proxy.clients if c.relay is not None and c.relay.pinned))


def p2(h):
    conn = psycopg2.connect(**h.kwargs())
    conn.autocommit = True
    return conn


@pytest.fixture
def small(make_proxy):
    return make_proxy(pool_size=2, sql_prepare="carry")


def test_twenty_clients_prepare_and_execute_across_transactions(small):
    errors: list[BaseException] = []
    max_pinned = [0]
    start = threading.Barrier(20)

    def client(i: int) -> None:
        try:
            conn = psycopg2.connect(**small.kwargs())
            cur = conn.cursor()
            start.wait()
            # Same name in every client, different text: names must not collide on a server connection.
            cur.execute(f"PREPARE q (int) AS SELECT $1 * {i + 1}, {i}")
            cur.execute("PREPARE shared_text AS SELECT 'same text for all'")
            conn.commit()
            for k in range(15):
                cur.execute("EXECUTE q(%s)", (k,))
                assert cur.fetchone() == (k * (i + 1), i)
                if k % 3 == 0:
                    cur.execute("EXECUTE shared_text")
                    assert cur.fetchone() == ("same text for all",)
                conn.commit()
            # Inside one transaction, with other work around it.
            cur.execute("SELECT 1")
            cur.execute("EXECUTE q(2)")
            assert cur.fetchone() == (2 * (i + 1), i)
            conn.rollback()
            # A rollback does not undo a PREPARE (PostgreSQL's prepared statements are not transactional).
            cur.execute("BEGIN")
            cur.execute(f"PREPARE in_tx AS SELECT {i} + 1000")
            conn.rollback()
            cur.execute("EXECUTE in_tx")
            assert cur.fetchone() == (i + 1000,)
            conn.commit()
            cur.execute("DEALLOCATE q")
            conn.commit()
            with pytest.raises(psycopg2.errors.InvalidSqlStatementName, match='prepared statement "q" does not exist'):
                cur.execute("EXECUTE q(1)")
            conn.rollback()
            # The name is free again.
            cur.execute("PREPARE q AS SELECT 'again'")
            cur.execute("EXECUTE q")
            assert cur.fetchone() == ("again",)
            conn.commit()
            max_pinned[0] = max(max_pinned[0], pinned(small))
            conn.close()
        except BaseException as e:     # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert max_pinned[0] == 0
    assert small.server_count() <= 2


def test_errors_as_postgresql_words_them(small):
    a, b = p2(small), p2(small)
    try:
        ca, cb = a.cursor(), b.cursor()
        ca.execute("PREPARE dup AS SELECT 1")
        with pytest.raises(psycopg2.errors.DuplicatePreparedStatement, match='prepared statement "dup" already exists'):
            ca.execute("PREPARE dup AS SELECT 2")
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName, match='prepared statement "nope" does not exist'):
            ca.execute("EXECUTE nope")
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName, match='prepared statement "nope" does not exist'):
            ca.execute("DEALLOCATE nope")
        # Another client does not see this client's statements, even on the same server connection.
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName, match='prepared statement "dup" does not exist'):
            cb.execute("EXECUTE dup")
        # Nor the proxy's own server-side names.
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
            cb.execute("EXECUTE U_1")
        # A PREPARE the server refuses leaves no name behind.
        with pytest.raises(psycopg2.errors.UndefinedTable):
            ca.execute("PREPARE bad AS SELECT * FROM no_such_table")
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName, match='"bad" does not exist'):
            ca.execute("EXECUTE bad")
        ca.execute("PREPARE bad AS SELECT 'fine now'")
        ca.execute("EXECUTE bad")
        assert ca.fetchone() == ("fine now",)
        # Inside a failed transaction, PostgreSQL refuses everything until the rollback.
        ca.execute("BEGIN")
        with pytest.raises(psycopg2.errors.DivisionByZero):
            ca.execute("SELECT 1/0")
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            ca.execute("EXECUTE dup")
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            ca.execute("DEALLOCATE dup")
        ca.execute("ROLLBACK")
        ca.execute("EXECUTE dup")
        assert ca.fetchone() == (1,)
        assert pinned(small) == 0
    finally:
        a.close()
        b.close()


def test_several_statements_in_one_string_and_deallocate_all(small):
    a, b = p2(small), p2(small)
    try:
        ca, cb = a.cursor(), b.cursor()
        ca.execute("PREPARE s1 AS SELECT 1; PREPARE s2 (text) AS SELECT $1 || '!'; EXECUTE s2('hi')")
        assert ca.fetchone() == ("hi!",)
        cb.execute("BEGIN")      # holds one server connection, so the next query moves
        ca.execute("EXECUTE s1; DEALLOCATE s1; EXECUTE s2('x')")
        assert ca.fetchone() == ("x!",)
        cb.execute("COMMIT")
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
            ca.execute("EXECUTE s1")
        ca.execute("DEALLOCATE ALL")
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
            ca.execute("EXECUTE s2('y')")
        ca.execute("PREPARE s2 AS SELECT 'new'")
        ca.execute("EXECUTE s2")
        assert ca.fetchone() == ("new",)
        ca.execute("DISCARD ALL")
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
            ca.execute("EXECUTE s2")
        assert pinned(small) == 0
    finally:
        a.close()
        b.close()


async def test_psycopg3_and_asyncpg(small):
    with psycopg.connect(small.dsn(), autocommit=True) as conn:
        conn.execute("PREPARE p3 (int, int) AS SELECT $1 + $2")
        for k in range(5):
            assert conn.execute(f"EXECUTE p3({k}, 1)").fetchone() == (k + 1,)
        conn.execute("DEALLOCATE PREPARE p3")
    conns = [await asyncpg.connect(small.dsn()) for _ in range(4)]
    try:
        for i, c in enumerate(conns):
            await c.execute(f"PREPARE ap AS SELECT {i}::int AS v")
        for _ in range(3):
            for i, c in enumerate(conns):
                async with c.transaction():
                    assert await c.fetchval("EXECUTE ap") == i
        assert pinned(small) == 0
    finally:
        for c in conns:
            await c.close()


def test_carried_is_logged_and_counted(make_proxy, tmp_path):
    log = tmp_path / "pins.jsonl"
    h = make_proxy(pool_size=2, pin_log=str(log), sql_prepare="carry")
    a = p2(h)
    try:
        a.cursor().execute("PREPARE logged AS SELECT 1")
        a.cursor().execute("EXECUTE logged")
        a.cursor().execute("LISTEN logged_ch")
        events = h.call(lambda: [(e.event, e.reason) for e in h.proxy.pinlog.recent])
        assert ("carried", "sql_prepare") in events and ("carried", "listen") in events
        assert ("would_pin_rds", "sql_prepare") in events
        assert not any(e == "pin" for e, _ in events)
        admin = psycopg2.connect(**h.kwargs(user="postgres", password="postgres-pw", dbname="unpinned"))
        admin.autocommit = True
        cur = admin.cursor()
        cur.execute("SHOW CLIENTS")
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        mine = [r for r in rows if r["listening"] == "logged_ch"]
        assert len(mine) == 1 and int(mine[0]["sql_prepared"]) == 1
        admin.close()
    finally:
        a.close()


@pytest.mark.parametrize("sql", ["PREPARE r AS SELECT 1", "LISTEN rch"])
def test_rds_mode_still_pins(make_proxy, sql):
    h = make_proxy(mode="rds", pool_size=2)
    a = p2(h)
    try:
        a.cursor().execute(sql)
        assert pinned(h) == 1
        reason = h.call(lambda: [e.reason for e in h.proxy.pinlog.recent if e.event == "pin"])
        assert reason == ["sql_prepare" if sql.startswith("PREPARE") else "listen"]
    finally:
        a.close()
