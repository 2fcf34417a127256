"""Counters and latency histograms bumped on the hot path (plain attributes: an integer
increment, not a metrics-library call); ops/metrics.py exports them to Prometheus."""
from __future__ import annotations

from unpinned.telemetry.buckets import BUCKETS, bucket


class Histogram:
    """A cheap fixed-bucket histogram (observe is a compiled bucket lookup and two additions)."""
    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bucket(seconds)] += 1
        self.sum += seconds
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, n in zip(BUCKETS, self.counts):
            acc += n
            out.append((repr(bound), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out

    def quantile(self, q: float) -> float | None:
        return quantile(self.counts, q)


def quantile(counts: list[int], q: float) -> float | None:
    """Upper bound of the bucket holding quantile q of a histogram's bucket counts (which
    may be several processes' counts added up)."""
    total = sum(counts)
    if not total:
        return None
    target, acc = q * total, 0
    for bound, n in zip(BUCKETS + (float("inf"),), counts):
        acc += n
        if acc >= target:
            return bound
    return None


class Stats:
    """Counters shared by the proxy's parts."""
    __slots__ = ("clients_received", "clients_closed", "clients_setup_ok", "clients_failed_auth",
                 "clients_failed", "query_requests", "reprepares", "param_syncs",
                 "borrow_latency", "query_latency", "db_latency")

    def __init__(self) -> None:
        self.clients_received = 0
        self.clients_closed = 0
        self.clients_setup_ok = 0
        self.clients_failed_auth = 0
        self.clients_failed = 0
        self.query_requests = 0
        self.reprepares = 0
        self.param_syncs = 0
        self.borrow_latency = Histogram()
        self.query_latency = Histogram()
        self.db_latency = Histogram()
