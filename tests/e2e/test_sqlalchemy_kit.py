"""unpinned.sqlalchemy: make_pin_safe against real PostgreSQL, through a real proxy in rds mode
(the RDS Proxy stand-in) and directly (the RDS Proxy user's setup)."""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
import warnings
from pathlib import Path

import asyncpg
import psycopg
import psycopg2
import psycopg2.errors
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine

from unpinned.kit.sqla import (
    PinSafeWarning,
    SessionSetError,
    SessionSetWarning,
    check_statement,
    make_pin_safe,
    pin_safe_connect_args,
)

from conftest import APP_PASSWORD, APP_USER

metadata = sa.MetaData()
kit_enum = sa.Table("kit_enum", metadata, sa.Column("id", sa.Integer),
                    sa.Column("m", postgresql.ENUM("happy", "sad", name="kit_mood", create_type=False)))


@pytest.fixture(scope="module")
def enum_table(pg):
    conn = psycopg2.connect(pg.dsn())
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS kit_enum; DROP TYPE IF EXISTS kit_mood")
    cur.execute("CREATE TYPE kit_mood AS ENUM ('happy', 'sad')")
    cur.execute("CREATE TABLE kit_enum (id int, m kit_mood)")
    cur.execute("INSERT INTO kit_enum VALUES (1, 'happy'), (2, 'sad')")
    conn.close()
    return kit_enum


@pytest.fixture
def rds(make_proxy):
    # One server connection: consecutive transactions of one client land on the same
    # backend, so "the setting is gone in the next transaction" is checked on that backend.
    return make_proxy(mode="rds", pool_size=1)


def url(h_or_pg, driver: str) -> str:
    base = h_or_pg.dsn() if hasattr(h_or_pg, "proxy") else h_or_pg.dsn(APP_USER, APP_PASSWORD)
    return base.replace("postgresql://", f"postgresql+{driver}://", 1)


def pins(h) -> list:
    return h.call(lambda: [e for e in h.proxy.pinlog.recent if e.event == "pin"])


def pinned(h) -> int:
    return h.call(lambda: sum(1 for c in h.proxy.clients if c.relay is not None and c.relay.pinned))


def wait_unpinned(h) -> None:
    for _ in range(250):
        if pinned(h) == 0:
            return
        time.sleep(0.02)
    assert pinned(h) == 0


def show(conn, name: str) -> str:
    return conn.exec_driver_sql(f"SHOW {name}").scalar()


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------- asyncpg JIT toggle

async def test_asyncpg_enum_pins_without_kit_and_not_with_it(rds, enum_table):
    u = url(rds, "asyncpg")
    select = sa.select(enum_table.c.m).order_by(enum_table.c.id)

    plain = create_async_engine(u)
    try:
        async with plain.connect() as conn:
            assert (await conn.execute(select)).scalars().all() == ["happy", "sad"]
            assert pinned(rds) == 1
    finally:
        await plain.dispose()
    jit = [e for e in pins(rds) if "set_config('jit'" in e.sql]
    assert jit and jit[0].reason == "set_config" and "set_config('jit', 'off', false)" in jit[0].sql
    wait_unpinned(rds)

    before = len(pins(rds))
    safe = make_pin_safe(create_async_engine(u))     # created first, made pin-safe after
    try:
        async with safe.connect() as conn:
            assert (await conn.execute(select)).scalars().all() == ["happy", "sad"]
            # A bound enum parameter round-trips too.
            q = sa.select(enum_table.c.id).where(enum_table.c.m == "sad")
            assert (await conn.execute(q)).scalar() == 2
            assert pinned(rds) == 0
    finally:
        await safe.dispose()
    assert len(pins(rds)) == before

    # The connect_args helper alone (no make_pin_safe) carries the same fix.
    helper = create_async_engine(u, connect_args=pin_safe_connect_args(u))
    try:
        async with helper.connect() as conn:
            assert (await conn.execute(select)).scalars().all() == ["happy", "sad"]
            assert pinned(rds) == 0
    finally:
        await helper.dispose()
    assert len(pins(rds)) == before


def backend_log(pg, pid: int) -> str:
    """Everything the server logged for backend `pid` (multi-line entries kept whole)."""
    entries: list[list[str]] = []
    for line in Path(pg.log_file).read_text(errors="replace").splitlines():
        if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line):
            entries.append([line])
        elif entries:
            entries[-1].append(line)
    return "\n".join("\n".join(e) for e in entries if f" [{pid}] " in e[0])


async def read_enum_logged(pg, engine, marker: str) -> tuple[str, object]:
    """Read the enum column on one connection and return that backend's statement log."""
    async with engine.connect() as conn:
        pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
        values = (await conn.execute(sa.text(f"SELECT m FROM kit_enum /* {marker} */ ORDER BY id"))).scalars().all()
        assert values == ["happy", "sad"]
        driver_conn = (await conn.get_raw_connection()).driver_connection
    for _ in range(250):   # the server writes its log asynchronously to us
        text = backend_log(pg, pid)
        if marker in text:
            return text, driver_conn
        await asyncio.sleep(0.02)
    raise AssertionError(f"statement {marker} not in the server log for backend {pid}")


class AppConnection(asyncpg.Connection):
    """An application's own connection_class, which the kit must keep."""


async def test_direct_to_postgres_no_jit_toggle_in_server_log(pg, enum_table):
    # No proxy at all: the RDS Proxy user's setup. The server logs every statement of
    # these connections only (log_statement as a startup parameter), so the check is
    # on what PostgreSQL actually received.
    u = url(pg, "asyncpg")
    logged = {"server_settings": {"log_statement": "all"}}

    plain = create_async_engine(u, connect_args=logged)
    try:
        text, _ = await read_enum_logged(pg, plain, "kit-plain")
        assert "set_config('jit', 'off', false)" in text     # the negative control
    finally:
        await plain.dispose()

    engine = create_async_engine(u, connect_args={**logged, "connection_class": AppConnection})
    try:
        async with engine.connect() as conn:                   # pooled before make_pin_safe
            await conn.execute(sa.text("SELECT 1"))
        make_pin_safe(engine)
        text, dc = await read_enum_logged(pg, engine, "kit-pooled")
        assert "kit-pooled" in text and "set_config('jit'" not in text
        await engine.dispose()                                  # new connection: connection_class path
        text, dc = await read_enum_logged(pg, engine, "kit-new")
        assert "kit-new" in text and "set_config('jit'" not in text
        assert isinstance(dc, AppConnection) and type(dc) is not AppConnection
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- per-transaction timeouts

CANCELED = {"psycopg2": psycopg2.errors.QueryCanceled, "psycopg": psycopg.errors.QueryCanceled}


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_timeouts_are_set_local_and_do_not_pin(rds, driver):
    engine = make_pin_safe(sa.create_engine(url(rds, driver)))
    try:
        before = len(pins(rds))
        with engine.execution_options(lock_timeout="3s").connect() as conn:
            conn.execution_options(statement_timeout="2s")
            with conn.begin():
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                assert show(conn, "statement_timeout") == "2s"
                assert show(conn, "lock_timeout") == "3s"
            with conn.begin():
                with pytest.raises(sa.exc.OperationalError) as err:
                    conn.exec_driver_sql("SELECT pg_sleep(3)")
                assert isinstance(err.value.orig, CANCELED[driver])
        with engine.connect() as conn:                 # no options: the next transaction
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid
            assert show(conn, "statement_timeout") == "0"
            assert show(conn, "lock_timeout") == "0"
        assert pinned(rds) == 0 and len(pins(rds)) == before
    finally:
        engine.dispose()


async def test_timeouts_asyncpg(rds):
    engine = make_pin_safe(create_async_engine(url(rds, "asyncpg")))
    try:
        before = len(pins(rds))
        async with engine.execution_options(lock_timeout="3s").connect() as conn:
            await conn.execution_options(statement_timeout="2s")
            async with conn.begin():
                pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
                assert (await conn.exec_driver_sql("SHOW statement_timeout")).scalar() == "2s"
                assert (await conn.exec_driver_sql("SHOW lock_timeout")).scalar() == "3s"
            async with conn.begin():
                with pytest.raises(sa.exc.DBAPIError) as err:
                    await conn.exec_driver_sql("SELECT pg_sleep(3)")
                assert isinstance(err.value.orig.__cause__, asyncpg.exceptions.QueryCanceledError)
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar() == pid
            assert (await conn.exec_driver_sql("SHOW statement_timeout")).scalar() == "0"
            assert (await conn.exec_driver_sql("SHOW lock_timeout")).scalar() == "0"
        assert pinned(rds) == 0 and len(pins(rds)) == before
    finally:
        await engine.dispose()


def test_set_local_follows_statement_options_savepoints_and_autocommit(pg):
    """Finer points, straight against PostgreSQL (fast): per-statement options, set_local,
    ROLLBACK TO SAVEPOINT, and AUTOCOMMIT (no transaction, so nothing is set)."""
    engine = make_pin_safe(sa.create_engine(url(pg, "psycopg2")), on_session_set="error")
    try:
        with engine.connect() as conn:
            with conn.begin():
                one = conn.execute(sa.text("SHOW statement_timeout"),
                                   execution_options={"statement_timeout": 1500}).scalar()
                assert one == "1500ms"
                assert show(conn, "statement_timeout") == "0"       # back to the session value
                conn.execution_options(lock_timeout="4s", set_local={"work_mem": "7MB"})
                assert show(conn, "lock_timeout") == "4s" and show(conn, "work_mem") == "7MB"
                sp = conn.begin_nested()
                conn.execution_options(lock_timeout="9s")
                assert show(conn, "lock_timeout") == "9s"
                sp.rollback()                                          # server reverts to 4s...
                conn.execution_options(lock_timeout="9s")
                assert show(conn, "lock_timeout") == "9s"             # ...and the kit re-applies
            conn.execution_options(lock_timeout=None, set_local=None)
            assert show(conn, "lock_timeout") == "0" and show(conn, "work_mem") == "4MB"
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT", statement_timeout="1s")
            with pytest.warns(PinSafeWarning, match="AUTOCOMMIT"):
                assert show(conn, "statement_timeout") == "0"
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- session SET

SESSION_SETS = [
    "SET lock_timeout = '1s'",
    "SELECT set_config('work_mem', '8MB', false)",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "RESET work_mem",
]


@pytest.mark.parametrize("sql", SESSION_SETS)
def test_session_set_warns_and_pins(rds, sql):
    engine = make_pin_safe(sa.create_engine(url(rds, "psycopg2")))
    try:
        with engine.connect() as conn:
            with pytest.warns(SessionSetWarning, match=re.escape(repr(sql))) as rec:
                conn.exec_driver_sql(sql)
            assert "SET LOCAL" in str(rec[0].message)
            assert rec[0].filename == __file__            # points at the application's line
            assert pinned(rds) == 1 and pins(rds)[-1].sql == sql   # the warning was right
    finally:
        engine.dispose()


@pytest.mark.parametrize("sql", SESSION_SETS)
def test_session_set_error_is_raised_before_sending(rds, sql):
    engine = make_pin_safe(sa.create_engine(url(rds, "psycopg2")), on_session_set="error")
    try:
        before = len(pins(rds))
        with engine.connect() as conn:
            with pytest.raises(SessionSetError, match=re.escape(repr(sql))):
                conn.exec_driver_sql(sql)
            conn.rollback()
            assert show(conn, "lock_timeout") == "0" and show(conn, "work_mem") == "4MB"
            assert show(conn, "transaction_isolation") == "read committed"
        assert pinned(rds) == 0 and len(pins(rds)) == before
    finally:
        engine.dispose()


async def test_session_set_warns_through_asyncpg(rds):
    engine = make_pin_safe(create_async_engine(url(rds, "asyncpg")))
    try:
        async with engine.connect() as conn:
            with pytest.warns(SessionSetWarning, match="SET statement_timeout") as rec:
                await conn.exec_driver_sql("SET statement_timeout = 5000")
            assert "execution_options(statement_timeout=" in str(rec[0].message)
            assert rec[0].filename == __file__            # across the greenlet, at the await
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_set_local_and_kit_statements_never_flagged(rds, driver):
    engine = make_pin_safe(sa.create_engine(url(rds, driver)), on_session_set="error")
    try:
        before = len(pins(rds))
        with no_warnings(), engine.connect() as conn:
            conn.execution_options(statement_timeout="3s", lock_timeout="2s")
            with conn.begin():
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                conn.exec_driver_sql("SET LOCAL work_mem = '16MB'")
                assert show(conn, "work_mem") == "16MB" and show(conn, "statement_timeout") == "3s"
                assert show(conn, "transaction_isolation") == "repeatable read"
        assert pinned(rds) == 0 and len(pins(rds)) == before
    finally:
        engine.dispose()


def test_psycopg2_own_sets_detected_and_ping_fixed(rds):
    # Engine isolation_level + pool_pre_ping: SQLAlchemy's ping toggles autocommit, and
    # psycopg2 then sends SET default_transaction_isolation TO DEFAULT by itself.
    u = url(rds, "psycopg2")
    engine = make_pin_safe(sa.create_engine(u, isolation_level="REPEATABLE READ", pool_pre_ping=True),
                           psycopg2_ping="keep")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        with pytest.warns(SessionSetWarning, match="SET default_transaction_isolation TO DEFAULT"):
            with engine.connect() as conn:                        # the pre-ping
                conn.exec_driver_sql("SELECT 1")
        assert pins(rds)[-1].sql == "SET default_transaction_isolation TO DEFAULT"
    finally:
        engine.dispose()
    wait_unpinned(rds)

    before = len(pins(rds))
    engine = make_pin_safe(sa.create_engine(u, isolation_level="REPEATABLE READ", pool_pre_ping=True))
    try:
        with no_warnings():
            for _ in range(3):
                with engine.connect() as conn:
                    assert show(conn, "transaction_isolation") == "repeatable read"
        assert pinned(rds) == 0 and len(pins(rds)) == before
    finally:
        engine.dispose()
    wait_unpinned(rds)

    # postgresql_readonly with AUTOCOMMIT: in autocommit there is no BEGIN to carry it, so
    # psycopg2 sets session defaults (here when SQLAlchemy resets the connection at checkin).
    engine = make_pin_safe(sa.create_engine(u))
    try:
        with pytest.warns(SessionSetWarning, match="default_transaction_read_only") as rec:
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT", postgresql_readonly=True)
                conn.exec_driver_sql("SELECT 1")
        warned = [w.message.sql for w in rec if isinstance(w.message, SessionSetWarning)]
        assert pins(rds)[-1].sql == warned[0]           # the first one is the statement that pinned
        assert "SET default_transaction_read_only TO DEFAULT" in warned
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- psycopg 3 prepare_threshold

def run_and_roll_back(engine) -> None:
    with engine.connect() as conn:
        for i in range(6):
            assert conn.execute(sa.text("SELECT CAST(:x AS int) + 1"), {"x": i}).scalar() == i + 1
            conn.rollback()


def test_psycopg_prepare_threshold(rds):
    u = url(rds, "psycopg")
    plain = sa.create_engine(u, connect_args={"prepare_threshold": 0})
    try:
        run_and_roll_back(plain)
        assert pinned(rds) == 1
        assert pins(rds)[-1].sql == "DEALLOCATE ALL" and pins(rds)[-1].reason == "sql_prepare"
    finally:
        plain.dispose()
    wait_unpinned(rds)

    before = len(pins(rds))
    safe = make_pin_safe(sa.create_engine(u, connect_args={"prepare_threshold": 0}))
    try:
        run_and_roll_back(safe)
        with safe.connect() as conn:
            assert conn.connection.driver_connection.prepare_threshold is None
        assert pinned(rds) == 0 and len(pins(rds)) == before
    finally:
        safe.dispose()


# --------------------------------------------------------------------------- API details

@pytest.mark.parametrize("sql, paramstyle, flagged", [
    ("SET lock_timeout = 1000", None, ["set"]),
    ("SET LOCAL lock_timeout = 1000", None, None),
    ("SET TRANSACTION READ ONLY", None, None),
    ("SELECT set_config('a.b', 'x', true)", None, ["set_config"]),     # RDS pins on set_config in any form
    ("SELECT set_config(%(name)s, %(value)s, false)", "pyformat", ["set_config"]),
    ("SELECT set_config($1, $2, false)", "numeric_dollar", ["set_config"]),
    ("SET ROLE app", None, ["role"]),
    ("SELECT 1; SET search_path = x", None, ["set"]),
    ("SELECT nextval('s')", None, None),       # pins on RDS, but it is not a SET
    ("SELECT '100%%' LIKE %s", "format", None),
])
def test_check_statement(sql, paramstyle, flagged):
    found = check_statement(sql, paramstyle)
    assert (found[0] if found else None) == flagged


def test_api_validation_and_reconfigure(pg):
    engine = sa.create_engine(url(pg, "psycopg2"))
    with pytest.raises(ValueError):
        make_pin_safe(engine, on_session_set="loud")
    with pytest.raises(ValueError):
        make_pin_safe(engine, psycopg_prepare_threshold=3)
    with pytest.raises(ValueError):
        make_pin_safe(sa.create_engine("sqlite://"))
    assert make_pin_safe(engine) is engine
    make_pin_safe(engine, on_session_set="error")       # replaces, does not stack
    try:
        with engine.connect() as conn:
            with pytest.raises(SessionSetError) as err:
                conn.exec_driver_sql("SET work_mem = '8MB'")
            assert err.value.sql == "SET work_mem = '8MB'" and err.value.reasons == ["set"]
        make_pin_safe(engine, on_session_set="ignore")
        with no_warnings():
            with engine.connect() as conn:
                conn.exec_driver_sql("SET work_mem = '8MB'")   # direct to PostgreSQL: harmless
                conn.rollback()
                # psycopg2's own SETs (at checkin, here) on the already-open connection
                # follow the new mode too.
                conn.execution_options(isolation_level="AUTOCOMMIT", postgresql_readonly=True)
                conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


def test_psycopg2_client_encoding_set_is_reported(pg):
    # create_engine(client_encoding=...) makes psycopg2 send SET client_encoding on connect.
    engine = make_pin_safe(sa.create_engine(url(pg, "psycopg2"), client_encoding="latin1"))
    try:
        with pytest.warns(SessionSetWarning, match="SET client_encoding TO 'LATIN1'"):
            with engine.connect() as conn:
                assert show(conn, "client_encoding") == "LATIN1"
    finally:
        engine.dispose()


def test_pin_safe_connect_args():
    assert pin_safe_connect_args("postgresql+psycopg://u@h/db") == {"prepare_threshold": None}
    assert pin_safe_connect_args("postgresql+psycopg://u@h/db", {"a": 1}, psycopg_prepare_threshold="keep") \
        == {"a": 1}
    assert pin_safe_connect_args("postgresql+psycopg2://u@h/db", {"a": 1}) == {"a": 1}
    assert pin_safe_connect_args("sqlite://") == {}
    cls = pin_safe_connect_args("postgresql+asyncpg://u@h/db", {"connection_class": AppConnection})["connection_class"]
    assert issubclass(cls, AppConnection) and cls is not AppConnection
    assert pin_safe_connect_args("postgresql+asyncpg://u@h/db", {"connection_class": cls})["connection_class"] is cls
