"""`--mode rds`: behave like RDS Proxy for PostgreSQL, through real drivers, and say why (SPEC 2, 5)."""
from __future__ import annotations

import json

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from support.scrape import metric

RDS_OPTIONS = "Feature not supported: RDS Proxy currently doesn't support command-line options."


@pytest.fixture
def rds(make_proxy, tmp_path):
    log = tmp_path / "pins.jsonl"
    h = make_proxy(mode="rds", pool_size=4, pin_log=str(log), http_listen="127.0.0.1:0")
    h.log = log
    return h


def pinned(h) -> int:
    return h.call(lambda: sum(1 for c in h.proxy.clients if c.relay is not None and c.relay.pinned))


def log_lines(h) -> list[dict]:
    return [json.loads(line) for line in h.log.read_text().splitlines() if line.startswith("{")]



def connect(h, **kw):
    conn = psycopg2.connect(**h.kwargs(), **kw)
    conn.autocommit = True
    return conn


def test_options_rejected_exactly_like_rds(rds):
    with pytest.raises(psycopg2.OperationalError) as err:
        psycopg2.connect(**rds.kwargs(), options="-c statement_timeout=5000")
    assert RDS_OPTIONS in str(err.value)
    assert str(err.value).count("FATAL") == 1


@pytest.mark.parametrize("sql, reason", [
    ("SET lock_timeout=3000", "set"),
    ("SELECT nextval('rds_seq')", "sequence"),
    ("SELECT pg_advisory_lock(77)", "advisory_lock"),
    ("SELECT set_config('work_mem', '8MB', true)", "set_config"),
    ("CREATE TEMP TABLE rds_tmp (x int)", "temp_object"),
    ("PREPARE rds_p AS SELECT 1", "sql_prepare"),
    ("LISTEN rds_channel", "listen"),
])
def test_pins_with_reason_and_sql(rds, sql, reason):
    admin = connect(rds)
    admin.cursor().execute("CREATE SEQUENCE IF NOT EXISTS rds_seq")
    admin.close()
    conn = connect(rds)
    try:
        conn.cursor().execute(sql)
        assert pinned(rds) == 1
        pins = [e for e in log_lines(rds) if e["event"] == "pin"]
        assert pins[-1]["reason"] == reason and pins[-1]["sql"] == sql
        assert pins[-1]["client_addr"].startswith("127.0.0.1:") and pins[-1]["user"] == "app"
        assert pins[-1]["protocol"] == "simple" and pins[-1]["fingerprint"]
        text = rds.log.read_text()
        assert "[WARN] [proxyEndpoint=default] [clientConnection=" in text
        assert "The client session was pinned to the database connection [dbConnection=" in text
        # Pinned for the rest of the session, even when the state is gone.
        conn.cursor().execute("SELECT 1")
        assert pinned(rds) == 1
    finally:
        conn.close()
    # The gauge goes back to 0 when the pinned client leaves.
    for _ in range(100):
        if pinned(rds) == 0:
            break
        import time; time.sleep(0.02)
    assert pinned(rds) == 0


@pytest.mark.parametrize("sql", [
    "SET LOCAL lock_timeout=3000",
    "SELECT pg_advisory_xact_lock(5)",
    "SELECT 1",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
])
def test_does_not_pin(rds, sql):
    conn = psycopg2.connect(**rds.kwargs())
    try:
        conn.cursor().execute(sql)
        conn.commit()
        assert pinned(rds) == 0
    finally:
        conn.close()


def test_long_statement_pins_and_log_has_full_text(rds):
    values = ",".join(str(i) for i in range(4000))
    sql = f"SELECT count(*) FROM generate_series(1, 10) g WHERE g IN ({values})"
    assert len(sql) > 16384
    conn = connect(rds)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        assert cur.fetchone() == (10,)
        assert pinned(rds) == 1
        pin = [e for e in log_lines(rds) if e["event"] == "pin"][-1]
        assert pin["reason"] == "statement_too_long"
        assert pin["sql"] == sql and pin["sql_length"] == len(sql)
        assert "The statement text exceeded the 16384-byte limit." in rds.log.read_text()
    finally:
        conn.close()


async def test_asyncpg_enum_pins_on_jit_toggle(rds):
    engine = create_async_engine(rds.dsn().replace("postgresql", "postgresql+asyncpg", 1))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("DROP TYPE IF EXISTS rds_mood CASCADE"))
            await conn.execute(sa.text("CREATE TYPE rds_mood AS ENUM ('a', 'b')"))
            await conn.execute(sa.text("CREATE TABLE rds_enum (m rds_mood)"))
            await conn.execute(sa.text("INSERT INTO rds_enum VALUES ('a')"))
        await engine.dispose()
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT m FROM rds_enum"))).scalar() == "a"
            assert pinned(rds) == 1
        pins = [e for e in log_lines(rds) if e["event"] == "pin"]
        assert any("set_config('jit', 'off', false)" in e["sql"] for e in pins)
        assert any(e["reason"] == "set_config" and e["protocol"] == "extended" for e in pins)
    finally:
        await engine.dispose()


def test_gauge_show_pins_and_metrics_track_sessions(rds):
    admin = psycopg2.connect(**rds.kwargs(user="postgres", password="postgres-pw", dbname="unpinned"))
    admin.autocommit = True
    acur = admin.cursor()

    def show_pins() -> int:
        acur.execute("SHOW PINS")
        return len(acur.fetchall())

    conns = []
    try:
        for i in range(3):
            c = connect(rds)
            c.cursor().execute(f"SET application_name = 'pinner{i}'")
            conns.append(c)
            assert pinned(rds) == show_pins() == metric(rds, "unpinned_clients_pinned") == i + 1
            assert metric(rds, "unpinned_database_connections_session_pinned") == i + 1
        unpinned_client = connect(rds)
        unpinned_client.cursor().execute("SELECT 1")
        assert show_pins() == 3
        for i, c in enumerate(conns):
            c.close()
            import time
            for _ in range(100):
                if pinned(rds) == 2 - i:
                    break
                time.sleep(0.02)
            assert pinned(rds) == show_pins() == metric(rds, "unpinned_clients_pinned") == 2 - i
        assert metric(rds, 'unpinned_pins_total') >= 3
        acur.execute("SHOW PIN_REASONS")
        rows = acur.fetchall()
        cols = [d[0] for d in acur.description]
        assert any(dict(zip(cols, r))["reason"] == "set" and "application_name" in dict(zip(cols, r))["sample"]
                   for r in rows)
        unpinned_client.close()
    finally:
        for c in conns:
            c.close()
        admin.close()
