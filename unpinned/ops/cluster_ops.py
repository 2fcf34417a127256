"""The operator's side of a cluster (SPEC 3.4): SHOW HOSTS / /api/hosts, and SWITCHOVER."""
from __future__ import annotations

from unpinned.hosts import parse_host
from unpinned.ops.live_state import ProxyView
from unpinned.wire import messages as m


def hosts(proxy: ProxyView) -> list[dict]:
    """Each upstream host: role, health, lag, connections. One host without a reader
    endpoint is not checked (it runs as before): its row says so."""
    cluster = getattr(proxy, "cluster", None)
    if cluster is not None:
        return cluster.hosts_view()
    up = proxy.config.upstream
    pools = list(proxy.pools.values())
    return [{"host": f"{up.host}:{up.port}", "role": "unknown", "writer": True, "healthy": None,
             "lag_s": None, "lag_bytes": None, "ejected_for_lag": False, "lsn": None, "timeline": None,
             "connections": sum(len(p.idle) + len(p.busy) for p in pools),
             "busy": sum(len(p.busy) for p in pools), "checked_ago_s": None,
             "last_error": "not checked: a single upstream host", "switchover": ""}]


def merge_hosts(per_worker: list[list[dict]]) -> list[dict]:
    """Several workers check the hosts each: the first worker's view of each host, with
    the connections of all of them added up."""
    merged: dict[str, dict] = {}
    for rows in per_worker:
        for r in rows:
            m_ = merged.get(r["host"])
            if m_ is None:
                merged[r["host"]] = dict(r)
            else:
                m_["connections"] += r["connections"]
                m_["busy"] += r["busy"]
    return list(merged.values())


def is_switchover(sql: str) -> bool:
    return sql.lstrip()[:10].upper() == "SWITCHOVER"


async def switchover(proxy: ProxyView, sql: str) -> bytes:
    """`SWITCHOVER host:port [timeout_seconds]`: returns when the writer endpoint serves from
    the target (someone promotes it meanwhile), or with the reason it could not."""
    words = sql.strip().rstrip(";").split()
    cluster = getattr(proxy, "cluster", None)
    if getattr(proxy, "peers", None) is not None:
        # Every worker would have to drain before any resumes: not built yet.
        return m.error_response("0A000", "SWITCHOVER is not supported with several worker processes yet; "
                                         "run it with workers = 1")
    if cluster is None:
        return m.error_response("55000", "SWITCHOVER needs several upstream hosts (a multi-host --upstream URL "
                                         "or [upstream] hosts)")
    if len(words) not in (2, 3):
        return m.error_response("42601", "usage: SWITCHOVER host:port [timeout_seconds]")
    try:
        target = parse_host(words[1])
        timeout = float(words[2]) if len(words) == 3 else None
        text = await cluster.switchover(target, timeout)
    except ValueError as e:
        return m.error_response("22023", str(e))
    except TimeoutError as e:
        return m.error_response("57014", f"switchover canceled: {e}")
    return m.notice_response(text, code="00000", severity="NOTICE") + m.command_complete("SWITCHOVER")


def cluster_metrics(cluster, gauge, counter):
    """Prometheus families of the hosts and of what happened to them (role changes,
    ejections, failovers, switchovers). `gauge`/`counter`: the client library's families."""
    rows = cluster.hosts_view()
    up = gauge("unpinned_host_healthy", "1 when the host's last check succeeded.", labels=["host", "role"])
    writer = gauge("unpinned_host_writer", "1 for the host the writer endpoint uses.", labels=["host"])
    lag = gauge("unpinned_host_replica_lag_seconds", "How far a replica's replay trails.", labels=["host"])
    conns = gauge("unpinned_host_connections", "Server connections to the host.", labels=["host"])
    ejected = gauge("unpinned_host_ejected_for_lag", "1 while the replica is out of rotation for lag.",
                    labels=["host"])
    for r in rows:
        up.add_metric([r["host"], r["role"]], 1 if r["healthy"] else 0)
        writer.add_metric([r["host"]], 1 if r["writer"] else 0)
        if r["lag_s"] is not None:
            lag.add_metric([r["host"]], r["lag_s"])
        conns.add_metric([r["host"]], r["connections"])
        ejected.add_metric([r["host"]], 1 if r["ejected_for_lag"] else 0)
    events = counter("unpinned_cluster_events", "Role changes, health changes, lag ejections and "
                     "readmissions, writer changes, failovers and switchovers, by kind.", labels=["kind"])
    for kind in ("role", "healthy", "unhealthy", "ejected", "readmitted", "writer", "writer_conflict",
                 "failover", "switchover"):
        events.add_metric([kind], cluster.counts.get(kind, 0))
    last = cluster.last_failover
    took = gauge("unpinned_last_failover_seconds", "Seconds without a writer in the latest failover.")
    if last is not None:
        took.add_metric([], last["seconds"])
    return [up, writer, lag, conns, ejected, events, took]
