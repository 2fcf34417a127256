"""Prometheus metrics: RDS Proxy's CloudWatch set under Prometheus names, plus pins.

Gauges are computed from the proxy's live state at scrape time (never a separately
maintained number that could drift); counters and histograms are plain attributes
bumped on the hot path and exported by a custom collector, so the hot path pays an
integer increment, not a metrics-library call. docs/metrics.md maps each name to
its CloudWatch metric.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from .proxy import Proxy

# Seconds; from 50 µs to 10 s.
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
           2.5, 5.0, 10.0)


class Histogram:
    """A cheap fixed-bucket histogram (observe is a bisect and two additions)."""
    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
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



def _hist(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc)
    fam.add_metric([], h.buckets(), h.sum)
    return fam


class ProxyCollector:
    def __init__(self, proxy: "Proxy"):
        self.proxy = proxy

    def collect(self):
        p = self.proxy
        st = p.stats
        clients = [c for c in p.clients if c.active]
        yield GaugeMetricFamily("unpinned_client_connections", "Current client connections (ClientConnections).",
                                value=len(clients))
        yield GaugeMetricFamily("unpinned_client_connections_tls", "Current client connections with TLS.",
                                value=sum(1 for c in clients if c.tls))
        yield GaugeMetricFamily("unpinned_client_connections_no_tls", "Current client connections without TLS.",
                                value=sum(1 for c in clients if not c.tls))
        yield CounterMetricFamily("unpinned_client_connections_received", "Client connection requests received.",
                                  value=st.clients_received)
        yield CounterMetricFamily("unpinned_client_connections_closed", "Client connections closed.",
                                  value=st.clients_closed)
        yield CounterMetricFamily("unpinned_client_connections_setup_succeeded", "Client logins that succeeded.",
                                  value=st.clients_setup_ok)
        yield CounterMetricFamily("unpinned_client_connections_setup_failed_auth",
                                  "Client logins that failed authentication.", value=st.clients_failed_auth)
        yield CounterMetricFamily("unpinned_query_requests", "Queries received (a multi-statement query or an "
                                  "extended-protocol batch up to Sync counts as one).", value=st.query_requests)
        yield _hist("unpinned_database_connections_borrow_latency_seconds",
                    "Time to get a server connection from the pool.", st.borrow_latency)
        yield _hist("unpinned_query_response_latency_seconds",
                    "From a client's request to the proxy's complete answer.", st.query_latency)
        yield _hist("unpinned_query_database_response_latency_seconds",
                    "From sending a request to the server to its complete answer.", st.db_latency)
        labels = ["database", "user"]
        fams = {name: GaugeMetricFamily(name, doc, labels=labels) for name, doc in (
            ("unpinned_database_connections", "Current server connections (DatabaseConnections)."),
            ("unpinned_database_connections_borrowed", "Server connections lent to clients now."),
            ("unpinned_database_connections_in_transaction", "Server connections inside a transaction now."),
            ("unpinned_database_connections_session_pinned", "Server connections pinned to a client now."),
            ("unpinned_database_connections_idle", "Idle server connections in the pool."),
            ("unpinned_max_database_connections_allowed", "Maximum server connections of the pool."),
            ("unpinned_clients_waiting", "Clients waiting for a server connection."),
        )}
        counters = {name: CounterMetricFamily(name, doc, labels=labels) for name, doc in (
            ("unpinned_database_connection_requests", "Server connections borrowed from the pool."),
            ("unpinned_database_connections_setup_succeeded", "Server connections opened."),
            ("unpinned_database_connections_setup_failed", "Server connections that failed to open."),
        )}
        pinned_by_pool: dict[tuple, int] = {}
        for c in clients:
            if c.relay is not None and c.relay.pinned and c.server is not None:
                key = (c.database, c.user)
                pinned_by_pool[key] = pinned_by_pool.get(key, 0) + 1
        for (db, user), pool in p.pools.items():
            lv = [db, user]
            fams["unpinned_database_connections"].add_metric(lv, pool.size)
            fams["unpinned_database_connections_borrowed"].add_metric(lv, len(pool.busy))
            fams["unpinned_database_connections_in_transaction"].add_metric(
                lv, sum(1 for s in pool.busy if s.state.status != b"I"))
            fams["unpinned_database_connections_session_pinned"].add_metric(lv, pinned_by_pool.get((db, user), 0))
            fams["unpinned_database_connections_idle"].add_metric(lv, len(pool.idle))
            fams["unpinned_max_database_connections_allowed"].add_metric(lv, p.config.pool_size)
            fams["unpinned_clients_waiting"].add_metric(lv, len(pool.waiters))
            counters["unpinned_database_connection_requests"].add_metric(lv, pool.borrows)
            counters["unpinned_database_connections_setup_succeeded"].add_metric(lv, pool.connects)
            counters["unpinned_database_connections_setup_failed"].add_metric(lv, pool.connect_failures)
        yield from fams.values()
        yield from counters.values()
        yield GaugeMetricFamily("unpinned_clients_pinned", "Clients pinned to a server connection now.",
                                value=sum(1 for c in clients if c.relay is not None and c.relay.pinned))
        by_event = {ev: CounterMetricFamily(name, doc, labels=["reason"]) for ev, name, doc in (
            ("pin", "unpinned_pins", "Pins, by reason."),
            ("unpin", "unpinned_unpins", "Unpins (the state that pinned is gone), by reason."),
            ("would_pin_rds", "unpinned_would_pin_rds", "Statements that would have pinned on RDS Proxy, by reason."),
        )}
        guard = 0
        for (event, reason), n in p.pinlog.counts.items():
            if event in by_event:
                by_event[event].add_metric([reason], n)
            elif event == "currval_guard":
                guard += n
        yield from by_event.values()
        yield CounterMetricFamily("unpinned_currval_guard", "currval()/lastval() refused to avoid another "
                                  "client's value.", value=guard)
        yield GaugeMetricFamily("unpinned_prepared_statements_client", "Protocol-level prepared statements "
                                "clients hold.", value=sum(len(c.relay.statements) for c in clients if c.relay))
        yield GaugeMetricFamily("unpinned_prepared_statements_server", "Prepared statements on server connections.",
                                value=sum(len(s.state.prepared.names) for pool in p.pools.values()
                                          for s in list(pool.idle) + list(pool.busy)))
        yield CounterMetricFamily("unpinned_prepared_statements_reprepared", "Parse messages injected because a "
                                  "server connection lacked a client's statement.", value=st.reprepares)
        yield CounterMetricFamily("unpinned_parameter_syncs", "Parameter syncs sent ahead of a client's "
                                  "messages.", value=st.param_syncs)


def make_registry(proxy: "Proxy") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
