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
    the connections of all of them added up. A switchover shows "waiting" only once every
    worker waits (all drained); while they differ, "draining"."""
    merged: dict[str, dict] = {}
    phases: dict[str, set[str]] = {}
    for rows in per_worker:
        for r in rows:
            m_ = merged.get(r["host"])
            phases.setdefault(r["host"], set()).add(r.get("switchover", ""))
            if m_ is None:
                merged[r["host"]] = dict(r)
            else:
                m_["connections"] += r["connections"]
                m_["busy"] += r["busy"]
    for host, seen in phases.items():
        if len(seen) > 1:
            merged[host]["switchover"] = "draining"
    return list(merged.values())


def is_switchover(sql: str) -> bool:
    return sql.lstrip()[:10].upper() == "SWITCHOVER"


async def switchover(proxy: ProxyView, sql: str) -> bytes:
    """`SWITCHOVER host:port [timeout_seconds]`: returns when the writer endpoint serves from
    the target (someone promotes it meanwhile), or with the reason it could not. With several
    workers every one of them pauses, drains and waits for the target at once (each has its
    own pools), and the answer comes when all have resumed."""
    words = sql.strip().rstrip(";").split()
    cluster = getattr(proxy, "cluster", None)
    if cluster is None:
        return m.error_response("55000", "SWITCHOVER needs several upstream hosts (a multi-host --upstream URL "
                                         "or [upstream] hosts)")
    if len(words) not in (2, 3):
        return m.error_response("42601", "usage: SWITCHOVER host:port [timeout_seconds]")
    try:
        target = parse_host(words[1])
        timeout = float(words[2]) if len(words) == 3 else None
    except ValueError as e:
        return m.error_response("22023", str(e))
    peers = getattr(proxy, "peers", None)
    if peers is None:
        outcomes = [await switch_here(cluster, str(target), timeout)]
    else:
        wait = (timeout or proxy.config.borrow_timeout or 120.0) + 10.0
        outcomes = await peers.ask_all({"op": "switchover", "target": str(target), "timeout": timeout}, wait)
        if len(outcomes) < peers.info.count:
            outcomes.append({"code": "58000", "message": f"{peers.info.count - len(outcomes)} worker(s) did not "
                                                         "answer; see the log"})
    for o in outcomes:
        if "code" in o:
            return m.error_response(o["code"], o["message"])
    text = outcomes[0]["ok"] if len(outcomes) == 1 else \
        f"{len(outcomes)} workers: " + "; ".join(o["ok"] for o in outcomes)
    return m.notice_response(text, code="00000", severity="NOTICE") + m.command_complete("SWITCHOVER")


async def switch_here(cluster, target: str, timeout: float | None) -> dict:
    """This process's part of a switchover, as JSON-able data (a worker answers it to a peer):
    {"ok": text} or {"code": SQLSTATE, "message": text}."""
    try:
        return {"ok": await cluster.switchover(parse_host(target), timeout)}
    except ValueError as e:
        return {"code": "22023", "message": str(e)}
    except TimeoutError as e:
        return {"code": "57014", "message": f"switchover canceled: {e}"}


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
