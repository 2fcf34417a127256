"""Large client messages through `unpinned serve` (a process of its own, so its memory is its
own): a big Query costs about what it costs direct, other clients do not wait for it, and the
proxy's memory does not grow with what clients send (the full sizes: bench/large.py)."""
from __future__ import annotations

import signal
import struct
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import SUPERUSER_PASSWORD
from support.large import big_sql, concurrent_big_queries, one_big_query
from test_cli import UNPINNED, _free_port, _wait_port
from test_robustness import Raw

pytestmark = pytest.mark.timeout(120)

MB = 1_000_000


@pytest.fixture(scope="module")
def served(pg):
    port = _free_port()
    proc = subprocess.Popen(UNPINNED + ["serve", "--listen", f"127.0.0.1:{port}", "--auth", "trust",
                                        "--upstream", pg.dsn("postgres", SUPERUSER_PASSWORD), "--pool-size", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(port, proc)
        yield proc, f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


def test_a_20_mb_query_costs_about_its_direct_time_and_others_do_not_wait(pg, served):
    proc, dsn = served
    # Timing on a shared machine: the best of three tries must meet the goals. The quadratic
    # reassembly this guards against took 5x the direct time at this size, and stalled every
    # other client for about as long, every time. The goal of a p99 under 50 ms is
    # for a 100 MB query (bench/large.py, docs/benchmarks.md); in a window this short, one
    # descheduling of the proxy by a busy machine is the p99, so the bound here is looser.
    tries = []
    for _ in range(3):
        figures = one_big_query(pg.dsn("postgres", SUPERUSER_PASSWORD), dsn, 20 * MB, bystanders=4, rounds=1)
        assert figures["bystander_samples"] > 0, figures
        tries.append(figures)
        if figures["ratio"] <= 1.5 and figures["bystander_p99_ms"] < 250:
            return
    pytest.fail(f"no try met the goals: {tries}")


def test_four_clients_sending_20_mb_each_leave_the_proxys_memory_flat(served):
    proc, dsn = served
    figures = concurrent_big_queries(dsn, proc.pid, 20 * MB, clients=4)
    # Held whole, the four messages alone would be 80 MB (and more, copied while framed).
    assert figures["rss_growth_mb"] < 24, figures


def test_a_sync_declaring_more_than_10000_bytes_is_fatal_at_once(served):
    # PostgreSQL closes such a connection at once (a small message type, over 10,000 bytes);
    # so does the proxy, without waiting for a body that may never come.
    proc, dsn = served
    raw = Raw(int(dsn.rsplit(":", 1)[1].split("/")[0]))
    raw.login()
    start = time.monotonic()
    raw.send(b"S" + struct.pack("!I", 34_000))
    raw.expect_fatal("08P01")
    assert time.monotonic() - start < 3


def test_a_client_waiting_for_a_server_connection_is_not_read_past_the_limit(pg, make_proxy):
    # Pool of one, held by a transaction: the second client's 8 MB query waits in the proxy,
    # which stops reading it at the buffer limit instead of taking all of it in.
    h = make_proxy(pool_size=1, max_client_message_buffer=65536)
    holder = psycopg.connect(h.dsn(), autocommit=False)
    holder.execute("SELECT 1")            # in a transaction: keeps the only server connection
    waiter = psycopg.connect(h.dsn(), autocommit=True)
    result: dict = {}

    def send():
        result["n"] = waiter.execute(big_sql(8 * MB).decode()).fetchone()[0]

    t = threading.Thread(target=send)
    t.start()
    try:
        deadline = time.monotonic() + 10
        held = None
        while time.monotonic() < deadline:
            held = h.call(lambda: [(sum(map(len, c.pending)), c._paused_self) for c in h.proxy.shared.clients
                                   if getattr(c, "pending", None)])
            if held and held[0][1]:
                break
            time.sleep(0.05)
        assert held and held[0][1], held
        time.sleep(0.3)
        assert h.call(lambda: [sum(map(len, c.pending)) for c in h.proxy.shared.clients
                               if getattr(c, "pending", None)])[0] <= 65536 + 256 * 1024
    finally:
        holder.commit()
        t.join(30)
        holder.close()
        waiter.close()
    assert result["n"] == 8 * MB


def test_real_drivers_stream_large_binds_parses_and_copy_data(pg, make_proxy):
    """Messages over the limit from real drivers, each kind: asyncpg's Bind of a named
    statement (renamed on the way), psycopg 3's unnamed Parse and prepared Bind, COPY data;
    the answers are right and the session is not pinned by any of them."""
    import asyncio

    import asyncpg

    h = make_proxy(pool_size=2, max_client_message_buffer=65536)
    blob = bytes(range(256)) * 8000          # 2 MB, every byte value

    async def with_asyncpg():
        conn = await asyncpg.connect(h.dsn())
        try:
            assert await conn.fetchval("SELECT length($1::bytea)", blob) == len(blob)
            assert await conn.fetchval("SELECT md5($1::bytea)", blob) == await conn.fetchval(
                "SELECT md5(decode($1, 'hex'))", blob.hex())
            assert await conn.fetchval("SELECT 40 + 2") == 42
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())
    with psycopg.connect(h.dsn(), autocommit=True) as conn:
        text = "y" * 3_000_000
        assert conn.execute(f"SELECT length('{text}')").fetchone() == (3_000_000,)          # unnamed Parse
        for _ in range(3):
            assert conn.execute("SELECT length(%s::text)", (text,), prepare=True).fetchone() == (3_000_000,)
        conn.execute("CREATE TABLE IF NOT EXISTS big_copy (b text)")
        conn.execute("TRUNCATE big_copy")
        with conn.cursor().copy("COPY big_copy FROM STDIN") as copy:
            copy.write(("z" * 2_000_000 + "\n") * 2)
        assert conn.execute("SELECT count(*), sum(length(b)) FROM big_copy").fetchone() == (2, 4_000_000)
        conn.execute("DROP TABLE big_copy")
        pinned = h.call(lambda: [c.relay.session.pins for c in h.proxy.shared.clients if c.relay is not None])
        assert pinned == [{}], pinned
