"""The admin console: a virtual database (`unpinned` by default) that answers SHOW and
control commands in PgBouncer's style, over the simple query protocol (psql, psycopg2).

Also the data behind the HTTP JSON API, so both always say the same thing.
"""
from __future__ import annotations

import time
from dataclasses import fields

from unpinned import __version__
from unpinned.sql.effects import Reason
from unpinned.state.policy import describe
from unpinned.telemetry.counters import quantile
from unpinned.wire import messages as m
from unpinned.ops.live_state import ProxyView, event_totals, is_pinned, server_connections
from unpinned.ops.cluster_ops import hosts, is_switchover, merge_hosts, switchover  # noqa: F401 (proxy uses them)



def _ts(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else None


# ------------------------------------------------------------------ views (shared with the HTTP API)

def pools(proxy: ProxyView) -> list[dict]:
    rows = []
    for (db, user), pool in proxy.pools.items():
        clients = [c for c in proxy.clients if c.pool is pool and c.active]
        rows.append({
            "database": db, "user": user,
            "cl_active": sum(1 for c in clients if c.server is not None),
            "cl_waiting": len(pool.waiters),
            "cl_idle": sum(1 for c in clients if c.server is None),
            "cl_pinned": sum(1 for c in clients if is_pinned(c)),
            "sv_active": len(pool.busy), "sv_idle": len(pool.idle), "sv_opening": pool.opening,
            "pool_size": proxy.config.pool_size, "paused": pool.paused,
            "borrows": pool.borrows, "connects": pool.connects, "connect_failures": pool.connect_failures,
        })
    return rows


def clients(proxy: ProxyView) -> list[dict]:
    rows = []
    for c in sorted(proxy.clients, key=lambda c: c.id):
        if not c.active:
            continue
        session = c.relay.session if c.relay else None
        rows.append({
            "id": c.id, "user": c.user, "database": c.database, "address": c.addr,
            "application_name": c.application_name,
            "state": "active" if c.server is not None else ("waiting" if c.acquiring else "idle"),
            "server_id": c.server.id if c.server is not None else None,
            "pinned": bool(session and session.pinned),
            "pin_reasons": ",".join(session.pins) if session else "",
            "params": len(session.params) if session else 0,
            "prepared": len(c.relay.statements) if c.relay else 0,
            # Carried in smart mode (relay/carried.py): channels listened on, SQL-prepared statements.
            "listening": ",".join(sorted(session.listening.channels)) if session and session.listening else "",
            "sql_prepared": len(c.relay.carried.names) if c.relay and c.relay.carried else 0,
            "connected_at": _ts(c.connected_at),
        })
    return rows


def servers(proxy: ProxyView) -> list[dict]:
    rows = []
    for (db, user), pool in proxy.pools.items():
        for s in server_connections(pool):
            rows.append({
                "id": s.id, "database": db, "user": user, "backend_pid": s.state.pid,
                "state": "active" if s in pool.busy else "idle",
                "client_id": s.client.id if s.client is not None else None,
                "status": s.state.status.decode(), "params": len(s.state.params),
                "prepared": len(s.state.prepared.names), "connected_at": _ts(time.time() - (time.monotonic() - s.created)),
            })
    return rows


def pins(proxy: ProxyView) -> list[dict]:
    rows = []
    for c in sorted(proxy.clients, key=lambda c: c.id):
        if not is_pinned(c):
            continue
        for reason, sql in c.relay.session.pins.items():
            rows.append({"client_id": c.id, "user": c.user, "database": c.database, "address": c.addr,
                         "application_name": c.application_name,
                         "server_id": c.server.id if c.server is not None else None,
                         "reason": str(reason), "sql": sql})
    return rows


def pin_reasons(proxy: ProxyView) -> list[dict]:
    rows = []
    for s in proxy.pinlog.reason_rows():
        try:
            text = describe(Reason(s.reason))
        except ValueError:
            text = s.reason
        rows.append({"reason": s.reason, "reason_text": text, "fingerprint": s.fingerprint, "count": s.count,
                     "pins": s.events.get("pin", 0), "unpins": s.events.get("unpin", 0),
                     "would_pin_rds": s.events.get("would_pin_rds", 0),
                     "carried": s.events.get("carried", 0),
                     "currval_guard": s.events.get("currval_guard", 0),
                     "last_seen": _ts(s.last_seen), "digest": s.digest, "sample": s.sample})
    return rows


def stats(proxy: ProxyView, buckets: bool = False) -> list[dict]:
    """The STATS row. buckets: with the latency histogram's counts (a hidden column, for
    merge_view to add up several workers' and take the quantiles of the whole)."""
    st = proxy.stats
    q = st.query_latency
    row = {
        "uptime_s": round(time.time() - proxy.started, 1),
        "clients_received": st.clients_received, "clients_closed": st.clients_closed,
        "clients_setup_succeeded": st.clients_setup_ok, "clients_failed_auth": st.clients_failed_auth,
        "query_requests": st.query_requests,
        "query_latency_p50_s": q.quantile(0.5), "query_latency_p99_s": q.quantile(0.99),
        "reprepares": st.reprepares, "parameter_syncs": st.param_syncs,
        **{("pins" if ev == "pin" else "unpins" if ev == "unpin" else ev): n
           for ev, n in event_totals(proxy.pinlog).items()},
    }
    if buckets:
        row[_LATENCY_COUNTS] = list(q.counts)
    return [row]


_LATENCY_COUNTS = "_query_latency_counts"


def worker_view(proxy: ProxyView, name: str) -> list[dict]:
    """One view of this worker, as a peer asks for it to merge with the others'."""
    return stats(proxy, buckets=True) if name == "STATS" else VIEWS[name](proxy)


def config_rows(proxy: ProxyView) -> list[dict]:
    out = []
    cfg = proxy.total_config     # with several workers: the configured totals, not one worker's share
    for f in fields(cfg):
        if f.name in ("users",):
            continue
        value = getattr(cfg, f.name)
        if f.name == "http_token" and value:
            value = "***"       # a secret: shown as set, never shown
        out.append({"key": f.name, "value": repr(value) if f.name == "upstream" else str(value)})
    return out


VIEWS = {"POOLS": pools, "CLIENTS": clients, "SERVERS": servers, "PINS": pins, "PIN_REASONS": pin_reasons,
         "STATS": stats, "CONFIG": config_rows, "HOSTS": hosts}


# ------------------------------------------------------------------ the console

def _table(rows: list[dict], columns: list[str] | None = None) -> bytes:
    cols = columns or (list(rows[0]) if rows else ["(none)"])
    out = [m.row_description(cols)]
    for r in rows:
        out.append(m.data_row([r.get(c) for c in cols]))
    out.append(m.command_complete(f"SHOW {len(rows)}" if rows else "SHOW"))
    return b"".join(out)


_EMPTY_COLUMNS = {
    "PINS": ["client_id", "user", "database", "address", "application_name", "server_id", "reason", "sql"],
    "PIN_REASONS": ["reason", "reason_text", "fingerprint", "count", "pins", "unpins", "would_pin_rds",
                    "carried", "currval_guard", "last_seen", "digest", "sample"],
    "CLIENTS": ["id", "user", "database", "address", "application_name", "state", "server_id", "pinned",
                "pin_reasons", "params", "prepared", "listening", "sql_prepared", "connected_at"],
    "SERVERS": ["id", "database", "user", "backend_pid", "state", "client_id", "status", "params", "prepared",
                "connected_at"],
    "POOLS": ["database", "user", "cl_active", "cl_waiting", "cl_idle", "cl_pinned", "sv_active", "sv_idle",
              "sv_opening", "pool_size", "paused", "borrows", "connects", "connect_failures"],
}


def control(proxy: ProxyView, sql: str, client_id: int | None) -> dict:
    """PAUSE / RESUME / RELOAD / KILL on this process. {"ok": True, "tag": ...} or
    {"ok": False, "error": [sqlstate, text], "missing": whether the target was not found}."""
    verb, arg = _words(sql)
    if verb in ("PAUSE", "RESUME"):
        targets = [p for (db, _), p in proxy.pools.items() if not arg or db == arg]
        if arg and not targets:
            return {"ok": False, "missing": True, "error": ["3D000", f'no pool for database "{arg}"']}
        for p in targets:
            p.pause() if verb == "PAUSE" else p.resume()
        return {"ok": True, "tag": verb}
    if verb == "RELOAD":
        try:
            proxy.reload()
        except Exception as e:   # a bad file keeps the old config; say why
            return {"ok": False, "missing": False, "error": ["F0000", f"reload failed, old configuration kept: {e}"]}
        return {"ok": True, "tag": "RELOAD"}
    # KILL client_id | db
    if arg.isdigit():
        victims = [c for c in proxy.clients if c.id == int(arg)]
    else:
        victims = [c for c in proxy.clients if c.database == arg]
    if not victims:
        return {"ok": False, "missing": True, "error": ["42704", f"no client or database {arg!r}"]}
    for c in victims:
        if c.id != client_id:
            c.shutdown(m.fatal("57P01", "terminating connection due to administrator command"))
    return {"ok": True, "tag": "KILL"}


CONTROL = ("PAUSE", "RESUME", "RELOAD", "KILL")


def _words(sql: str) -> tuple[str, str]:
    words = sql.strip().rstrip(";").split()
    return (words[0].upper() if words else ""), (words[1] if len(words) > 1 else "")


def execute(proxy: ProxyView, sql: str, client) -> bytes:
    """One admin statement → response messages (without ReadyForQuery)."""
    verb, arg = _words(sql)
    if not verb:
        return m.message(b"I")   # EmptyQueryResponse
    if verb == "SHOW" and arg.upper() in VIEWS:
        rows = VIEWS[arg.upper()](proxy)
        return _table(rows, None if rows else _EMPTY_COLUMNS.get(arg.upper()))
    if verb in CONTROL and (arg or verb != "KILL"):
        return _control_result([control(proxy, sql, client.id if client is not None else None)])
    return _other(verb, arg, sql)


async def execute_everywhere(proxy: ProxyView, sql: str, client) -> bytes:
    """The same, when the proxy runs as several worker processes: views are gathered from
    every worker and merged, control commands reach every worker."""
    verb, arg = _words(sql)
    if verb == "SHOW" and arg.upper() in VIEWS:
        name = arg.upper()
        rows = await gather_view(proxy, name)
        return _table(rows, None if rows else _EMPTY_COLUMNS.get(name))
    if verb in CONTROL and (arg or verb != "KILL"):
        return _control_result(await proxy.peers.ask_all(
            {"op": "control", "sql": sql, "client_id": client.id if client is not None else None}))
    return execute(proxy, sql, client)


async def gather_view(proxy: ProxyView, name: str) -> list[dict]:
    """A view of the whole proxy: this process's, or every worker's merged."""
    if proxy.peers is None:
        return VIEWS[name](proxy)
    return merge_view(name, await proxy.peers.ask_all({"op": "view", "name": name}))


def _control_result(results: list[dict]) -> bytes:
    """One answer from every worker's: done if any worker found the target (and none failed
    otherwise); the error if every one missed it, or if one failed outright."""
    failed = [r for r in results if not r["ok"] and not r.get("missing")]
    if failed:
        return m.error_response(*failed[0]["error"])
    done = [r for r in results if r["ok"]]
    if not done:
        return m.error_response(*results[0]["error"])
    return m.command_complete(done[0]["tag"])


def _other(verb: str, arg: str, sql: str) -> bytes:
    if verb == "SHOW" and arg.upper() == "VERSION":
        return _table([{"version": f"unpinned {__version__}"}])
    if verb == "SHOW" and arg.upper() == "HELP" or verb == "HELP":
        return _table([{"command": c} for c in (
            "SHOW POOLS | CLIENTS | SERVERS | PINS | PIN_REASONS | STATS | CONFIG | HOSTS | VERSION",
            "SWITCHOVER host:port [timeout_seconds]", "PAUSE [db]", "RESUME [db]", "RELOAD", "KILL client_id | db")])
    return m.error_response("42601", f"unknown admin command {sql.strip()[:80]!r}; try SHOW HELP")


# ------------------------------------------------------------------ several workers: one view

_SUMMED_STATS_KEEP = {"uptime_s": max, "query_latency_p50_s": max, "query_latency_p99_s": max}


def merge_view(name: str, per_worker: list[list[dict]]) -> list[dict]:
    """Rows of one view from several worker processes → the rows one process would show."""
    rows = [r for rows in per_worker for r in rows]
    if name == "POOLS":
        return _merge_by(rows, ("database", "user"), {"paused": any})
    if name == "PIN_REASONS":
        merged = _merge_by(rows, ("reason", "fingerprint"), {"last_seen": _max_or_none, "reason_text": _first,
                                                              "digest": _first, "sample": _first})
        return sorted(merged, key=lambda r: -r["count"])
    if name == "STATS":
        merged = _merge_by(rows, (), {**_SUMMED_STATS_KEEP, "query_latency_p50_s": _max_or_none,
                                      "query_latency_p99_s": _max_or_none, _LATENCY_COUNTS: _add_lists})
        for row in merged:
            # Quantiles of the workers' histograms added up (without them: the slowest worker's).
            counts = row.pop(_LATENCY_COUNTS, None)
            if counts is not None:
                row["query_latency_p50_s"] = quantile(counts, 0.5)
                row["query_latency_p99_s"] = quantile(counts, 0.99)
        return merged
    if name == "CONFIG":
        return per_worker[0] if per_worker else []
    if name == "HOSTS":
        return merge_hosts(per_worker)
    key = "client_id" if name == "PINS" else "id"
    return sorted(rows, key=lambda r: (r.get(key) is None, r.get(key) or 0))


def _first(values: list):
    return values[0]


def _add_lists(values: list):
    lists = [v for v in values if v is not None]
    return [sum(col) for col in zip(*lists)] if lists else None


def _max_or_none(values: list):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _merge_by(rows: list[dict], key: tuple, special: dict) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in key), []).append(r)
    out = []
    for group in groups.values():
        merged = {}
        for col in group[0]:
            values = [r.get(col) for r in group]
            if col in key:
                merged[col] = values[0]
            elif col in special:
                merged[col] = special[col](values)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                merged[col] = sum(values)
            else:
                merged[col] = values[0]
        out.append(merged)
    return out
