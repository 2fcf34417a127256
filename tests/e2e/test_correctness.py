"""Behaviour a suite written without the proxy in mind relies on (issue 12): every case runs
directly against PostgreSQL and through the proxy, and the answers must be the same.

- sequences: currval()/lastval() after a nextval() the text does not show (serial defaults);
  a client never reads another client's value, and gets PostgreSQL's own 55000 text;
- prepared statements after DDL: a driver's statement cache behaves as on its own connection;
- hand-off hygiene: what one client's session leaves in a server connection is not seen by
  the next (custom parameter placeholders, PL/pgSQL's reserved prefix, temp_buffers).
"""
from __future__ import annotations

import asyncio
import itertools

import asyncpg
import psycopg
import psycopg2
import pytest

from conftest import APP_PASSWORD, APP_USER

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_names)}"


@pytest.fixture
def direct_kwargs(pg):
    return dict(host=pg.host, port=pg.port, user=APP_USER, password=APP_PASSWORD, dbname="postgres")


def sides(pg, handle):
    """(name, connect kwargs) for the server itself and for the proxy."""
    return [("direct", dict(host=pg.host, port=pg.port, user=APP_USER, password=APP_PASSWORD, dbname="postgres")),
            ("proxy", handle.kwargs())]


def outcome(cur, sql):
    """What a statement returns, or its SQLSTATE and message: comparable across sides."""
    try:
        cur.execute(sql)
        return ("rows", cur.fetchall() if cur.description else cur.statusmessage)
    except psycopg2.Error as e:
        return ("error", e.pgcode, e.diag.message_primary, e.diag.context)


# ---------------------------------------------------------------------------------------- sequences


def _serial_table(kwargs) -> str:
    table = unique("ts")
    conn = psycopg2.connect(**kwargs)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE TABLE {table} (id serial, v int)")
    conn.close()
    return table


@pytest.mark.parametrize("in_transaction", [False, True])
def test_currval_after_a_serial_default_as_direct(pg, make_proxy, in_transaction):
    handle = make_proxy(pool_size=1)
    results = {}
    for side, kwargs in sides(pg, handle):
        table = _serial_table(kwargs)
        conn = psycopg2.connect(**kwargs)
        conn.autocommit = not in_transaction
        cur = conn.cursor()
        steps = [outcome(cur, f"INSERT INTO {table}(v) VALUES (1)"),
                 outcome(cur, f"SELECT currval('{table}_id_seq')"),
                 outcome(cur, "SELECT lastval()"),
                 outcome(cur, f"INSERT INTO {table}(v) VALUES (2)"),
                 outcome(cur, "SELECT lastval()")]
        if in_transaction:
            conn.commit()
        cur.execute(f"SELECT count(*) FROM {table}")
        steps.append(cur.fetchone())        # the transaction was not failed by the proxy
        conn.close()
        results[side] = steps
    assert results["proxy"] == results["direct"]
    assert results["direct"][1] == ("rows", [(1,)]) and results["direct"][-1] == (2,)


def test_currval_before_any_nextval_is_postgresqls_own_error(pg, make_proxy):
    handle = make_proxy(pool_size=1)
    results = {}
    for side, kwargs in sides(pg, handle):
        table = _serial_table(kwargs)
        conn = psycopg2.connect(**kwargs)
        cur = conn.cursor()
        # In a transaction block: the error fails it (25P02 next) exactly as PostgreSQL does.
        results[side] = [outcome(cur, f"SELECT currval('{table}_id_seq')"), outcome(cur, "SELECT 1"),
                         outcome(cur, "SELECT lastval()")]
        conn.rollback()
        results[side].append(outcome(cur, "SELECT lastval()"))
        conn.close()
        results[side] = [(r[0], r[1], r[2].replace(table, "T"), r[3]) if r[0] == "error" else r
                         for r in results[side]]
    assert results["proxy"] == results["direct"]
    assert results["direct"][0][:2] == ("error", "55000") and results["direct"][1][1] == "25P02"
    assert results["direct"][0][3] is None        # no CONTEXT line (the proxy raises nothing itself)


def test_interleaved_clients_never_read_each_others_values(pg, make_proxy):
    handle = make_proxy(pool_size=1)
    kwargs = handle.kwargs()
    table = _serial_table(kwargs)
    a, b = psycopg2.connect(**kwargs), psycopg2.connect(**kwargs)
    a.autocommit = b.autocommit = True
    ca, cb = a.cursor(), b.cursor()
    fresh = psycopg2.connect(**sides(pg, handle)[0][1])
    expected = outcome(fresh.cursor(), f"SELECT currval('{table}_id_seq')")
    fresh.close()
    try:
        ca.execute(f"INSERT INTO {table}(v) VALUES (1) RETURNING id")
        a_id = ca.fetchone()[0]
        assert outcome(ca, f"SELECT currval('{table}_id_seq')") == ("rows", [(a_id,)])  # still its own connection
        # B takes the only server connection: it must not see A's value.
        assert outcome(cb, f"SELECT currval('{table}_id_seq')") == expected
        assert outcome(cb, "SELECT lastval()")[:2] == ("error", "55000")
        cb.execute(f"INSERT INTO {table}(v) VALUES (2) RETURNING id")
        b_id = cb.fetchone()[0]
        assert outcome(cb, "SELECT lastval()") == ("rows", [(b_id,)])
        # A's value went with its turn on the connection: PostgreSQL's own text, never B's value.
        got = outcome(ca, f"SELECT currval('{table}_id_seq')")
        assert got == expected and "another" not in got[2]
        assert outcome(ca, "SELECT lastval()")[:3] == ("error", "55000", "lastval is not yet defined in this session")
    finally:
        a.close()
        b.close()


def test_last_owner_gets_its_connection_back(pg, make_proxy):
    """With a pool of several, a client whose connection is idle gets it back, so its values
    are still there in the next transaction, as on its own connection."""
    handle = make_proxy(pool_size=3)
    kwargs = handle.kwargs()
    table = _serial_table(kwargs)
    conns = [psycopg2.connect(**kwargs) for _ in range(3)]
    try:
        for c in conns:         # all three in a transaction at once: the pool opens three
            c.cursor().execute(f"INSERT INTO {table}(v) VALUES (0)")
        for c in conns:
            c.commit()
            c.autocommit = True
        assert handle.server_count() == 3
        for round_ in range(3):
            ids = []
            for c in conns:
                cur = c.cursor()
                cur.execute(f"INSERT INTO {table}(v) VALUES ({round_}) RETURNING id")
                ids.append(cur.fetchone()[0])
            for c, want in zip(conns, ids):
                assert outcome(c.cursor(), "SELECT lastval()") == ("rows", [(want,)])
    finally:
        for c in conns:
            c.close()


# ------------------------------------------------------------------ prepared statements after DDL

# (setup, the DDL between the two clients, the query): what a migration does while the
# application runs. Each name is made unique per run.
DDL_CASES = {
    "add column": ("CREATE TABLE {t} (a int); INSERT INTO {t} VALUES (1)",
                   "ALTER TABLE {t} ADD COLUMN b int",
                   "SELECT * FROM {t}"),
    "enum made again": ("CREATE TYPE {t}_e AS ENUM ('x', 'y'); CREATE TABLE {t} (a {t}_e); INSERT INTO {t} VALUES ('x')",
                        "DROP TABLE {t}; DROP TYPE {t}_e; CREATE TYPE {t}_e AS ENUM ('y', 'x', 'z'); "
                        "CREATE TABLE {t} (a {t}_e); INSERT INTO {t} VALUES ('z')",
                        "SELECT * FROM {t}"),
    "array of enums made again": ("CREATE TYPE {t}_e AS ENUM ('x'); CREATE TABLE {t} (a {t}_e[]); "
                                  "INSERT INTO {t} VALUES ('{{x}}')",
                                  "DROP TABLE {t}; DROP TYPE {t}_e; CREATE TYPE {t}_e AS ENUM ('x', 'w'); "
                                  "CREATE TABLE {t} (a {t}_e[]); INSERT INTO {t} VALUES ('{{w,x}}')",
                                  "SELECT * FROM {t}"),
    "domain made again": ("CREATE DOMAIN {t}_d AS int; CREATE TABLE {t} (a {t}_d); INSERT INTO {t} VALUES (1)",
                          "DROP TABLE {t}; DROP DOMAIN {t}_d; CREATE DOMAIN {t}_d AS text; "
                          "CREATE TABLE {t} (a {t}_d); INSERT INTO {t} VALUES ('one')",
                          "SELECT * FROM {t}"),
    "column type changed": ("CREATE TABLE {t} (a int, b int); INSERT INTO {t} VALUES (1, 2)",
                            "ALTER TABLE {t} ALTER COLUMN b TYPE text",
                            "SELECT a, b FROM {t} WHERE a = $1"),
}


async def _asyncpg_run(kwargs, case: str, ddl_directly_on: dict | None) -> list:
    """Client A prepares the query, the DDL runs (through A, or on a direct connection), A
    leaves; client B runs the query three times. Returns B's results (or errors)."""
    t = unique("r6")
    setup, ddl, query = (x.format(t=t) for x in DDL_CASES[case])
    args = (1,) if "$1" in query else ()
    a = await asyncpg.connect(**kwargs)
    await a.execute(setup)
    await a.fetch(query, *args)
    if ddl_directly_on is None:
        await a.execute(ddl)
    else:
        d = await asyncpg.connect(**ddl_directly_on)
        await d.execute(ddl)
        await d.close()
    await a.close()
    b = await asyncpg.connect(**kwargs)
    out = []
    for _ in range(3):
        try:
            out.append([tuple(r.items()) for r in await b.fetch(query, *args)])
        except Exception as e:      # what the driver would raise
            out.append(f"{type(e).__name__}: {e}")
    await b.close()
    return out


def _asyncpg_kwargs(side_kwargs: dict) -> dict:
    k = dict(side_kwargs)
    k["database"] = k.pop("dbname")
    return k


@pytest.mark.parametrize("pool_size", [1, 5])
@pytest.mark.parametrize("case", sorted(DDL_CASES))
@pytest.mark.parametrize("where", ["through the proxy", "directly on the server"])
def test_asyncpg_after_ddl_as_direct(pg, make_proxy, pool_size, case, where):
    handle = make_proxy(pool_size=pool_size)
    direct = _asyncpg_kwargs(sides(pg, handle)[0][1])
    results = {}
    for side, kwargs in sides(pg, handle):
        kwargs = _asyncpg_kwargs(kwargs)
        ddl_on = direct if where == "directly on the server" else None
        results[side] = asyncio.run(_asyncpg_run(kwargs, case, ddl_on))
    assert results["proxy"] == results["direct"]
    assert all(isinstance(r, list) for r in results["direct"])     # direct: the new shape every time


def test_asyncpg_old_client_gets_postgresqls_answer_and_recovers(pg, make_proxy):
    """A client that prepared before the DDL: PostgreSQL answers 0A000 on its own connection,
    asyncpg drops its statement and prepares again (outside a transaction it retries)."""
    handle = make_proxy(pool_size=2)

    async def run(kwargs):
        t = unique("r8")
        a = await asyncpg.connect(**kwargs)
        b = await asyncpg.connect(**kwargs)
        await a.execute(f"CREATE TABLE {t} (a int); INSERT INTO {t} VALUES (1)")
        await a.fetch(f"SELECT * FROM {t}")
        await b.fetch(f"SELECT * FROM {t}")
        await b.execute(f"ALTER TABLE {t} ADD COLUMN b int")
        out = []
        for conn in (a, b, a):
            try:
                out.append([tuple(r.items()) for r in await conn.fetch(f"SELECT * FROM {t}")])
            except Exception as e:
                out.append(type(e).__name__)
        async with a.transaction():     # inside a transaction asyncpg cannot retry: the error shows
            try:
                await a.execute(f"ALTER TABLE {t} ADD COLUMN c int")
                out.append([tuple(r.items()) for r in await a.fetch(f"SELECT * FROM {t}")])
            except Exception as e:
                out.append(type(e).__name__)
        await a.close()
        await b.close()
        return out

    results = {side: asyncio.run(run(_asyncpg_kwargs(kwargs))) for side, kwargs in sides(pg, handle)}
    assert results["proxy"] == results["direct"]


@pytest.mark.parametrize("pool_size", [1, 5])
@pytest.mark.parametrize("case", ["add column", "enum made again", "domain made again"])
def test_psycopg3_prepared_after_ddl_as_direct(pg, make_proxy, pool_size, case):
    handle = make_proxy(pool_size=pool_size)
    results = {}
    for side, kwargs in sides(pg, handle):
        t = unique("r9")
        setup, ddl, query = (x.format(t=t) for x in DDL_CASES[case])
        with psycopg.connect(**kwargs, autocommit=True, prepare_threshold=0) as a:
            a.execute(setup, prepare=False)
            a.execute(query, (1,) if "$1" in query else None).fetchall()
            a.execute(ddl, prepare=False)
        out = []
        with psycopg.connect(**kwargs, autocommit=True, prepare_threshold=0) as b:
            for _ in range(3):
                try:
                    out.append(b.execute(query, (1,) if "$1" in query else None).fetchall())
                except psycopg.Error as e:
                    out.append(e.sqlstate)
        results[side] = out
    assert results["proxy"] == results["direct"]


# ---------------------------------------------------------------------------- hand-off hygiene

HANDOFF_CASES = {
    # what the first client does, what the next one runs (compared with a fresh direct session)
    "custom parameter set then reset": (["SET myapp.tenant = '7'", "RESET myapp.tenant"],
                                        ["SELECT current_setting('myapp.tenant', true)", "SHOW myapp.tenant"]),
    "custom parameter set, session ends": (["SET myapp.region = 'eu'"],
                                           ["SELECT current_setting('myapp.region', true) IS NULL",
                                            "SHOW myapp.region"]),
    "custom parameter set locally": (["BEGIN", "SELECT set_config('myapp.user', 'u1', true)", "COMMIT"],
                                     ["SELECT current_setting('myapp.user', true)"]),
    "PL/pgSQL ran": (["DO $$BEGIN PERFORM 1; END$$"],
                     ["SET plpgsql.extra_foo_warnings = true", "SHOW plpgsql.extra_foo_warnings"]),
    "temporary table used": (["CREATE TEMP TABLE handoff_tmp (a int)", "INSERT INTO handoff_tmp VALUES (1)",
                              "DROP TABLE handoff_tmp"],
                             ["SET temp_buffers = 100", "SHOW temp_buffers"]),
    "temporary table left behind": (["CREATE TEMP TABLE handoff_tmp2 (a int)", "INSERT INTO handoff_tmp2 VALUES (1)"],
                                    ["SET temp_buffers = 200", "SHOW temp_buffers"]),
}


@pytest.mark.parametrize("case", sorted(HANDOFF_CASES))
def test_next_client_sees_a_fresh_session(pg, make_proxy, case):
    first, then = HANDOFF_CASES[case]
    handle = make_proxy(pool_size=1)
    results = {}
    for side, kwargs in sides(pg, handle):
        a = psycopg2.connect(**kwargs)
        a.autocommit = True
        for sql in first:
            a.cursor().execute(sql)
        a.close()
        b = psycopg2.connect(**kwargs)
        b.autocommit = True
        results[side] = [outcome(b.cursor(), sql) for sql in then]
        b.close()
    assert results["proxy"] == results["direct"]


def test_clients_that_set_the_same_custom_parameter_share_connections(pg, make_proxy):
    """The row-level-security pattern (every transaction sets myapp.tenant): connections are
    matched to clients whose sessions have the same placeholders, not closed; a client that
    never set it gets a connection without it."""
    handle = make_proxy(pool_size=2)
    tenants = [psycopg2.connect(**handle.kwargs()) for _ in range(4)]
    plain = psycopg2.connect(**handle.kwargs())
    plain.autocommit = True
    try:
        for round_ in range(20):
            for i, conn in enumerate(tenants):
                cur = conn.cursor()
                cur.execute("SELECT set_config('myapp.tenant', %s, true)", (str(i),))
                cur.execute("SELECT current_setting('myapp.tenant')")
                assert cur.fetchone() == (str(i),)
                conn.commit()
            if round_ % 5 == 0:
                assert outcome(plain.cursor(), "SELECT current_setting('myapp.tenant', true)") == ("rows", [(None,)])
        retired = handle.call(lambda: handle.pool().retired)
        # The cost: a session that does not have the placeholder yet (each tenant's first
        # transaction, and the plain client each time it comes back) needs a connection without
        # it, one retired when the pool is full; after that, 80 transactions share two.
        assert retired <= len(tenants) + 4, retired
        assert handle.server_count() <= 2
    finally:
        for c in tenants + [plain]:
            c.close()
