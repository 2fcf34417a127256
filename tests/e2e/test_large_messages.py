"""Large client messages through `unpinned serve` (a process of its own, so its memory is its
own): a big Query costs about what it costs direct, other clients do not wait for it, and the
proxy's memory does not grow with what clients send (the full sizes: bench/large.py)."""
from __future__ import annotations

import signal
import struct
import subprocess
import time

import pytest

from conftest import SUPERUSER_PASSWORD
from support.large import concurrent_big_queries, one_big_query
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
