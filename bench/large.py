"""Large client messages, full size (issue 16): a 100 MB Query through `unpinned serve` against
the same Query direct, other clients' p99 latency while it runs, and the proxy's memory while
four clients send 60 MB each. Prints the figures as a markdown block for docs/benchmarks.md.

    python bench/large.py [--size-mb 100] [--each-mb 60] [--clients 4] [--rounds 3]

`make bench-large` runs it. The smaller version of the same checks is in `make test`
(tests/e2e/test_large_messages.py); the measuring code is shared (tests/support/large.py).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.large import concurrent_big_queries, one_big_query  # noqa: E402
from unpinned.dev.embedded import EmbeddedPostgres  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(upstream: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unpinned.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--auth", "trust", "--upstream", upstream, "--pool-size", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"postgresql://postgres@127.0.0.1:{port}/postgres"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("unpinned serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, default=100)
    ap.add_argument("--each-mb", type=float, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--bystanders", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    pg = EmbeddedPostgres(auth="trust", name="bench-large", settings={"fsync": "off"}).start()
    proc = None
    try:
        proc, dsn = serve(pg.dsn())
        load = os.getloadavg()[0]
        one = one_big_query(pg.dsn(), dsn, int(args.size_mb * 1e6), args.bystanders, args.rounds)
        many = concurrent_big_queries(dsn, proc.pid, int(args.each_mb * 1e6), args.clients)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        pg.stop()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"""
### Large client messages ({now}, `make bench-large`, load average {load:.1f} on {os.cpu_count()} CPUs)

| measure | figure | goal |
|---|---|---|
| {one['size_mb']:.0f} MB Query direct (best of {args.rounds}) | {one['direct_s']:.2f} s | |
| {one['size_mb']:.0f} MB Query through unpinned (best of {args.rounds}) | {one['proxy_s']:.2f} s ({one['ratio']:.2f}x) | <= 1.5x |
| {args.bystanders} other clients' `SELECT 1` while it ran: p99 (median) | {one['bystander_p99_ms']:.1f} ms ({one['bystander_median_ms']:.1f} ms), {one['bystander_samples']} samples | p99 < 50 ms |
| {many['clients']} clients x {many['size_mb']:.0f} MB at once: proxy VmRSS before -> peak | {many['rss_before_mb']:.0f} -> {many['rss_peak_mb']:.0f} MB (+{many['rss_growth_mb']:.1f} MB), {many['seconds']:.1f} s | < +64 MB |
""")


if __name__ == "__main__":
    main()
