"""Large client messages through a proxy, measured: one big Query through the proxy against
the same Query direct, other clients' latency while it runs, and the proxy's memory while
several clients send big queries at once. Used by tests/e2e/test_large_messages.py (small
sizes, in `make test`) and bench/large.py (the full sizes, figures for docs/benchmarks.md).

The big statement is `SELECT length('xxx...')`, sent with libpq's PQexec (psycopg's
pgconn), so the client's own cost is one copy of the text and the time measured is the
message's way through the proxy and PostgreSQL's work on it.
"""
from __future__ import annotations

import statistics
import threading
import time

import psycopg


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class RssPeak:
    """The highest VmRSS of a process, sampled every 5 ms in a thread while inside `with`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.before = rss_kb(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_kb(self.pid))

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kb(self.pid))

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 1024


def big_sql(size: int) -> bytes:
    return b"SELECT length('" + b"x" * size + b"')"


def run_big(dsn: str, sql: bytes, expect: int | None = None) -> float:
    """Seconds for one big simple Query on a connection already open (login not counted)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        start = time.perf_counter()
        res = conn.pgconn.exec_(sql)
        elapsed = time.perf_counter() - start
        if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
            raise AssertionError(res.error_message.decode(errors="replace"))
        if expect is not None:
            assert int(res.get_value(0, 0)) == expect
    return elapsed


class Bystanders:
    """`n` clients running `SELECT 1` in a loop through the proxy, latencies recorded."""

    def __init__(self, dsn: str, n: int):
        self.dsn = dsn
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._recording = False
        self._stop = threading.Event()
        self._ready = threading.Barrier(n + 1)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("SELECT 1")
                self._ready.wait(30)
                while not self._stop.is_set():
                    t0 = time.perf_counter()
                    conn.execute("SELECT 1").fetchone()
                    if self._recording:
                        self.latencies.append(time.perf_counter() - t0)
                    time.sleep(0.002)
        except BaseException as e:   # reported by the caller
            self.errors.append(e)
            try:
                self._ready.abort()
            except threading.BrokenBarrierError:
                pass

    def __enter__(self) -> "Bystanders":
        for t in self._threads:
            t.start()
        self._ready.wait(30)
        return self

    def record(self, on: bool) -> None:
        self._recording = on

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def p99_ms(self) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")


def one_big_query(direct_dsn: str, proxy_dsn: str, size: int, bystanders: int = 4, rounds: int = 1) -> dict:
    """The big Query direct and through the proxy (best of `rounds` each), and the
    bystanders' latency through the proxy while it ran there."""
    sql = big_sql(size)
    direct = min(run_big(direct_dsn, sql, size) for _ in range(rounds))
    times = []
    with Bystanders(proxy_dsn, bystanders) as by:
        for _ in range(rounds):
            by.record(True)
            times.append(run_big(proxy_dsn, sql, size))
            by.record(False)
    if by.errors:
        raise by.errors[0]
    proxied = min(times)
    return {"size_mb": size / 1e6, "direct_s": direct, "proxy_s": proxied, "ratio": proxied / direct,
            "bystander_p99_ms": by.p99_ms(), "bystander_median_ms": statistics.median(by.latencies) * 1000,
            "bystander_samples": len(by.latencies)}


def concurrent_big_queries(proxy_dsn: str, proxy_pid: int, size: int, clients: int = 4) -> dict:
    """`clients` clients each sending a `size`-byte Query at once; the proxy's VmRSS growth."""
    sql = big_sql(size)
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)
    conns = [psycopg.connect(proxy_dsn, autocommit=True) for _ in range(clients)]

    def send(conn) -> None:
        try:
            barrier.wait(30)
            res = conn.pgconn.exec_(sql)
            if res.status != psycopg.pq.ExecStatus.TUPLES_OK or int(res.get_value(0, 0)) != size:
                raise AssertionError(res.error_message.decode(errors="replace"))
        except BaseException as e:
            errors.append(e)

    try:
        for c in conns:
            c.execute("SELECT 1")
        start = time.perf_counter()
        with RssPeak(proxy_pid) as rss:
            threads = [threading.Thread(target=send, args=(c,)) for c in conns]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        elapsed = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
    if errors:
        raise errors[0]
    return {"clients": clients, "size_mb": size / 1e6, "seconds": elapsed,
            "rss_before_mb": rss.before / 1024, "rss_peak_mb": rss.peak / 1024, "rss_growth_mb": rss.growth_mb}
