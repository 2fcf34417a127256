"""Prometheus metrics: RDS Proxy's CloudWatch set under Prometheus names, plus pins.

Gauges are computed from the proxy's live state at scrape time (never a separately
maintained number that could drift); counters and histograms are plain attributes
bumped on the hot path and exported by a custom collector, so the hot path pays an
integer increment, not a metrics-library call. docs/metrics.md maps each name to
its CloudWatch metric.
"""
from __future__ import annotations


from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from unpinned.telemetry.counters import Histogram
from unpinned.ops.live_state import ProxyView, is_pinned, logged_in, server_connections
from unpinned.ops.cluster_ops import cluster_metrics


def _hist(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc)
    fam.add_metric([], h.buckets(), h.sum)
    return fam


class ProxyCollector:
    def __init__(self, proxy: ProxyView):
        self.proxy = proxy

    def collect(self):
        p = self.proxy
        st = p.stats
        clients = logged_in(p)
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
            if is_pinned(c) and c.server is not None:
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
        if getattr(p, "cluster", None) is not None:
            yield from cluster_metrics(p.cluster, GaugeMetricFamily, CounterMetricFamily)
        yield GaugeMetricFamily("unpinned_clients_pinned", "Clients pinned to a server connection now.",
                                value=sum(1 for c in clients if is_pinned(c)))
        by_event = {ev: CounterMetricFamily(name, doc, labels=["reason"]) for ev, name, doc in (
            ("pin", "unpinned_pins", "Pins, by reason."),
            ("unpin", "unpinned_unpins", "Unpins (the state that pinned is gone), by reason."),
            ("would_pin_rds", "unpinned_would_pin_rds", "Statements that would have pinned on RDS Proxy, by reason."),
            ("carried", "unpinned_carried", "Statements whose state smart mode carried instead of pinning "
             "(LISTEN, SQL PREPARE/EXECUTE/DEALLOCATE), by reason."),
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
                                          for s in server_connections(pool)))
        yield CounterMetricFamily("unpinned_prepared_statements_reprepared", "Parse messages injected because a "
                                  "server connection lacked a client's statement.", value=st.reprepares)
        listening = [c.relay.session.listening for c in clients if c.relay and c.relay.session.listening]
        yield GaugeMetricFamily("unpinned_listen_clients", "Clients listening on at least one channel (LISTEN "
                                "carried: no pin).", value=sum(1 for s in listening if s.channels))
        yield GaugeMetricFamily("unpinned_listen_channels", "Channels the proxy's listening connections listen on.",
                                value=sum(len(lst.listening) for lst in p.notify_listeners.values()))
        yield GaugeMetricFamily("unpinned_notifications_queued", "Notifications waiting for their client to "
                                "finish a transaction.", value=sum(len(s.queue) for s in listening))
        yield CounterMetricFamily("unpinned_notifications_received", "Notifications the listening connections "
                                  "received for at least one client.",
                                  value=sum(lst.delivered for lst in p.notify_listeners.values()))
        yield GaugeMetricFamily("unpinned_sql_prepared_statements_client", "SQL-level prepared statements clients "
                                "hold (PREPARE carried: no pin).",
                                value=sum(len(c.relay.carried.names) for c in clients if c.relay and c.relay.carried))
        yield CounterMetricFamily("unpinned_parameter_syncs", "Parameter syncs sent ahead of a client's "
                                  "messages.", value=st.param_syncs)


def make_registry(proxy: ProxyView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
