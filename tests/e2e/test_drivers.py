"""Real drivers through the proxy with no driver setting changed: psql, psycopg2,
psycopg 3, asyncpg, SQLAlchemy (sync and asyncio), pgbench."""
from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import psycopg
import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import APP_USER, pg_tool_env


def test_psql(pg, proxy):
    r = subprocess.run([pg.tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                        "-c", "SELECT 40 + 2", "-c", "SELECT current_user"],
                       env=pg_tool_env(pg, proxy), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["42", APP_USER]


def test_psql_reports_server_errors_and_keeps_going(pg, proxy):
    r = subprocess.run([pg.tool("psql"), "-X", "-A", "-t", "-c", "SELECT 1/0", "-c", "SELECT 'after'"],
                       env=pg_tool_env(pg, proxy), capture_output=True, text=True, timeout=30)
    assert "division by zero" in r.stderr
    assert r.stdout.strip() == "after"


def test_psycopg2_transactions_and_errors(proxy):
    conn = psycopg2.connect(**proxy.kwargs())
    try:
        cur = conn.cursor()
        cur.execute("CREATE TABLE IF NOT EXISTS drv_p2 (id int primary key, v text)")
        cur.execute("TRUNCATE drv_p2")
        conn.commit()
        cur.executemany("INSERT INTO drv_p2 VALUES (%s, %s)", [(i, f"v{i}") for i in range(100)])
        conn.commit()
        cur.execute("SELECT count(*), max(v) FROM drv_p2")
        assert cur.fetchone() == (100, "v99")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute("INSERT INTO drv_p2 VALUES (1, 'dup')")
        conn.rollback()
        cur.execute("SELECT v FROM drv_p2 WHERE id = %s", (7,))
        assert cur.fetchone() == ("v7",)
        conn.commit()
    finally:
        conn.close()


def test_psycopg3_prepared_statements_across_server_connections(proxy):
    # prepare_threshold=0 makes psycopg prepare (named statements) from the first execution.
    conns = [psycopg.connect(proxy.dsn(), prepare_threshold=0, autocommit=True) for _ in range(12)]
    try:
        for round_ in range(5):
            for i, conn in enumerate(conns):
                row = conn.execute("SELECT %s::int * 2, %s::text", (i + round_, "x")).fetchone()
                assert row == ((i + round_) * 2, "x")
    finally:
        for c in conns:
            c.close()


def test_psycopg3_default_settings_with_rollbacks(proxy):
    with psycopg.connect(proxy.dsn()) as conn:
        for i in range(20):  # beyond prepare_threshold=5: statements get prepared
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
            conn.rollback()  # psycopg sends DEALLOCATE ALL after preparing, on rollback
        assert conn.execute("SELECT 'still fine'").fetchone() == ("still fine",)


def test_psycopg3_pipeline_mode(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int", (i,)) for i in range(50)]
        assert [c.fetchone()[0] for c in curs] == list(range(50))


async def test_asyncpg_default_statement_cache(proxy):
    conns = [await asyncpg.connect(proxy.dsn()) for _ in range(15)]
    try:
        for round_ in range(4):
            results = await asyncio.gather(*(c.fetchval("SELECT $1::int + $2::int", i, round_)
                                             for i, c in enumerate(conns)))
            assert results == [i + round_ for i in range(len(conns))]
        stmt = await conns[0].prepare("SELECT generate_series(1, $1::int)")
        assert [r[0] for r in await stmt.fetch(5)] == [1, 2, 3, 4, 5]
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def test_asyncpg_transactions_and_errors(proxy):
    conn = await asyncpg.connect(proxy.dsn())
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS drv_apg (id int primary key)")
        await conn.execute("TRUNCATE drv_apg")
        async with conn.transaction():
            await conn.executemany("INSERT INTO drv_apg VALUES ($1)", [(i,) for i in range(50)])
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute("INSERT INTO drv_apg VALUES (1)")
        assert await conn.fetchval("SELECT count(*) FROM drv_apg") == 50
    finally:
        await conn.close()


async def test_asyncpg_pool_reset(proxy):
    pool = await asyncpg.create_pool(proxy.dsn(), min_size=2, max_size=4)
    try:
        for i in range(10):
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT $1::int", i) == i
    finally:
        await pool.close()


def test_sqlalchemy_sync_psycopg2_and_psycopg(proxy):
    for driver in ("postgresql+psycopg2", "postgresql+psycopg"):
        engine = sa.create_engine(proxy.dsn().replace("postgresql", driver, 1), pool_pre_ping=True)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE IF NOT EXISTS drv_sa (id int, name text)"))
                conn.execute(sa.text("DELETE FROM drv_sa"))
                conn.execute(sa.text("INSERT INTO drv_sa VALUES (:i, :n)"), [{"i": i, "n": f"n{i}"} for i in range(10)])
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM drv_sa")).scalar() == 10
                assert conn.execute(sa.text("SELECT name FROM drv_sa WHERE id = :i"), {"i": 3}).scalar() == "n3"
        finally:
            engine.dispose()


async def test_sqlalchemy_asyncio_asyncpg(proxy):
    engine = create_async_engine(proxy.dsn().replace("postgresql", "postgresql+asyncpg", 1), pool_pre_ping=True)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("DROP TYPE IF EXISTS drv_mood CASCADE"))
            await conn.execute(sa.text("CREATE TYPE drv_mood AS ENUM ('sad', 'ok', 'happy')"))
            await conn.execute(sa.text("CREATE TABLE drv_enum (id int, mood drv_mood)"))
            await conn.execute(sa.text("INSERT INTO drv_enum VALUES (1, 'happy'), (2, 'sad')"))
        async with engine.connect() as conn:
            # An enum column makes asyncpg introspect types (and toggle jit) on first sight.
            rows = (await conn.execute(sa.text("SELECT id, mood FROM drv_enum ORDER BY id"))).all()
            assert [tuple(r) for r in rows] == [(1, "happy"), (2, "sad")]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("protocol", ["simple", "extended", "prepared"])
def test_pgbench_select_only(pg, proxy, protocol):
    r = subprocess.run([pg.tool("pgbench"), "-S", "-n", "-c", "20", "-j", "2", "-t", "200", "-M", protocol],
                       env=pg_tool_env(pg, proxy), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "number of transactions actually processed: 4000/4000" in r.stdout
    assert "number of failed transactions: 0" in r.stdout
    # Twenty clients shared the pool of ten.
    assert proxy.server_count() <= 10


def test_pgbench_tpcb_writes(pg, proxy):
    r = subprocess.run([pg.tool("pgbench"), "-n", "-c", "10", "-j", "2", "-t", "100"],
                       env=pg_tool_env(pg, proxy), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "number of failed transactions: 0" in r.stdout
