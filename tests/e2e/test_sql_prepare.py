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
    return make_proxy(pool_size=2)    # sql_prepare = "carry", the default


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


# ---------------------------------------------------------------------- as PostgreSQL shows it

def _outcome(cur, sql: str):
    """What a client sees of one statement: its rows, or its error as psql would print it."""
    try:
        cur.execute(sql)
    except psycopg2.Error as e:
        d = e.diag
        cur.connection.rollback()
        return ("error", e.pgcode, d.message_primary, d.message_detail, d.statement_position, d.context)
    return ("ok", cur.statusmessage, cur.fetchall() if cur.description else None)


def _side_by_side(pg, proxy, script: list[str]) -> None:
    direct = psycopg2.connect(pg.dsn())
    through = psycopg2.connect(**proxy.kwargs())
    try:
        for conn in (direct, through):
            conn.autocommit = True
        dc, pc = direct.cursor(), through.cursor()
        for sql in script:
            want = _outcome(dc, sql)
            assert _outcome(pc, sql) == want, sql
    finally:
        direct.close()
        through.close()


def test_error_positions_and_names_are_the_clients(pg, small):
    """The proxy renames the statement in the text it forwards; the error's cursor position and
    the statement names in its message are still those of the client's text."""
    _side_by_side(pg, small, [
        "PREPARE a_rather_long_statement_name(int, text) AS SELECT $1 + 1, $2 || 'x'",
        "EXECUTE a_rather_long_statement_name(1)",                     # wrong number of parameters for "..."
        "EXECUTE a_rather_long_statement_name(1, 'a', 3)",
        "EXECUTE a_rather_long_statement_name(true, 'b')",             # cursor at `true`
        "EXECUTE a_rather_long_statement_name(2, 'c')",
        "PREPARE bad_type(no_such_type) AS SELECT $1",                  # cursor at the type
        "PREPARE bad_param AS SELECT $1a",                              # a syntax error after the name
        "PREPARE p_pos AS SELECT * FROM no_such_table_here",
        "PREPARE a_rather_long_statement_name AS SELECT 2",             # already exists, no CONTEXT line
        "SELECT 1; EXECUTE a_rather_long_statement_name(1, 'z', 2)",
        "DEALLOCATE nothing_by_that_name",
        "EXECUTE nothing_by_that_name",
        "DEALLOCATE a_rather_long_statement_name",
    ])


def test_explain_execute_and_create_table_as_execute(pg, small):
    _side_by_side(pg, small, [
        "PREPARE ex(int) AS SELECT relname FROM pg_catalog.pg_class WHERE oid = $1",
        "EXPLAIN (COSTS OFF) EXECUTE ex(1259)",
        "explain (costs off, verbose) execute ex(1259)",
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE ex(1259)",
        "EXPLAIN (COSTS OFF) CREATE TABLE ex_never AS EXECUTE ex(1259)",
        "BEGIN",
        "CREATE TEMP TABLE ex_made AS EXECUTE ex(1259)",     # (temp: both sides share one database)
        "SELECT * FROM ex_made",
        "ROLLBACK",
        "EXPLAIN EXECUTE ex",                   # wrong number of parameters, named as the client's
        "EXPLAIN EXECUTE ex_unknown(1)",
        "DEALLOCATE ex",
        "EXPLAIN (COSTS OFF) EXECUTE ex(1259)",
    ])


def test_pg_prepared_statements_shows_the_clients_own(pg, make_proxy):
    h = make_proxy(pool_size=1)     # one server connection: another client's statements are on it too
    other = p2(h)
    try:
        other.cursor().execute("PREPARE someone_elses AS SELECT 'not yours'")
        other.cursor().execute("PREPARE same_text AS SELECT 2 AS b")
        view = "SELECT name, statement, parameter_types, result_types, from_sql FROM pg_prepared_statements"
        _side_by_side(pg, h, [
            view,
            "select count(*) = 0 as ok from pg_prepared_statements",
            "PREPARE q1 AS SELECT 1 AS a;",
            "EXECUTE q1",
            view,
            "PREPARE same_text AS SELECT 2 AS b;",
            "PREPARE q3(text, int) AS\n\tSELECT $1 || $2",
            view + " ORDER BY name",
            "SELECT p.name, p.generic_plans, p.custom_plans FROM pg_catalog.pg_prepared_statements AS p "
            "WHERE p.name = 'q3'",
            "EXECUTE q3('a', 1)",
            "SELECT pg_prepared_statements.name FROM pg_prepared_statements JOIN (SELECT 'q3' AS n) x "
            "ON x.n = pg_prepared_statements.name",
            "DEALLOCATE PREPARE q1",
            view + " ORDER BY name",
            "DEALLOCATE ALL",
            view,
        ])
        # The other client's statements are still its own, and still work.
        cur = other.cursor()
        cur.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
        assert cur.fetchall() == [("same_text",), ("someone_elses",)]
        cur.execute("EXECUTE someone_elses")
        assert cur.fetchone() == ("not yours",)
    finally:
        other.close()


def test_protocol_level_statements_listed_under_the_clients_names(make_proxy):
    h = make_proxy(pool_size=1)
    with psycopg.connect(h.dsn(), autocommit=True) as conn:
        conn.execute("SELECT %s::int + 1", (1,), prepare=True)
        conn.execute("PREPARE mine AS SELECT 3")
        rows = conn.execute("SELECT name, statement, from_sql FROM pg_prepared_statements").fetchall()
    assert sorted(rows) == [("_pg3_0", "SELECT $1::int + 1", False), ("mine", "PREPARE mine AS SELECT 3", True)]


def test_pin_stays_selectable(make_proxy):
    h = make_proxy(pool_size=2, sql_prepare="pin")
    a = p2(h)
    try:
        a.cursor().execute("PREPARE pinned_one AS SELECT 1")
        assert pinned(h) == 1
        a.cursor().execute("DEALLOCATE pinned_one")
        assert pinned(h) == 0
    finally:
        a.close()


async def test_prepare_and_deallocate_through_the_extended_protocol(small):
    """asyncpg's fetch() sends every statement as Parse/Bind/Execute, PREPARE included: under a
    name of its own with its statement cache, as the unnamed statement without (the first)."""
    conns = [await asyncpg.connect(small.dsn(), statement_cache_size=0 if i == 0 else 100) for i in range(4)]
    try:
        for i, c in enumerate(conns):
            await c.fetch(f"PREPARE ext_p (int) AS SELECT $1 * {i + 2}")
        for k in range(3):
            for i, c in enumerate(conns):
                async with c.transaction():
                    assert await c.fetchval(f"EXECUTE ext_p({k})") == k * (i + 2)
        names = await conns[0].fetch("SELECT name, statement FROM pg_prepared_statements WHERE from_sql")
        assert [tuple(r) for r in names] == [("ext_p", "PREPARE ext_p (int) AS SELECT $1 * 2")]
        with pytest.raises(asyncpg.exceptions.DuplicatePreparedStatementError, match='"ext_p" already exists'):
            await conns[0].fetch("PREPARE ext_p AS SELECT 1")
        await conns[0].fetch("DEALLOCATE ext_p")
        with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError, match='"ext_p" does not exist'):
            await conns[0].fetch("EXECUTE ext_p(1)")
        assert await conns[1].fetchval("EXECUTE ext_p(5)") == 15     # the others keep theirs
        assert pinned(small) == 0
    finally:
        for c in conns:
            await c.close()
