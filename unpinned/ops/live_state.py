"""The proxy's live state as the operator sees it, computed in one place for the admin
console, the HTTP API, the metrics and the live page's history."""
from __future__ import annotations

import time
from typing import Any, Protocol


class ProxyView(Protocol):
    """What ops/ reads of the running proxy (unpinned/proxy.py's Proxy)."""
    config: Any
    total_config: Any
    stats: Any
    pinlog: Any
    pools: dict
    notify_listeners: dict     # (database, user) -> backend.listener.Listener (LISTEN carried)
    clients: set
    history: Any
    started: float
    worker: Any
    peers: Any
    metrics_registry: Any

    def reload(self) -> None: ...
    def spawn(self, coro) -> Any: ...
    async def cancel(self, pid: int, secret: int, forward: bool = True) -> None: ...


def logged_in(proxy: ProxyView) -> list:
    return [c for c in proxy.clients if c.active]


def is_pinned(client) -> bool:
    return client.relay is not None and client.relay.pinned


def server_connections(pool) -> list:
    return list(pool.busy) + list(pool.idle)


def event_totals(pinlog) -> dict[str, int]:
    """Pin-log events counted by kind (pin, unpin, would_pin_rds, carried, currval_guard)."""
    out = {"pin": 0, "unpin": 0, "would_pin_rds": 0, "carried": 0, "currval_guard": 0}
    for (event, _), n in pinlog.counts.items():
        out[event] = out.get(event, 0) + n
    return out


def history_sample(proxy: ProxyView) -> dict:
    """One second of the live page's chart."""
    active = logged_in(proxy)
    pools = proxy.pools.values()
    return {"t": round(time.time(), 1), "clients": len(active),
            "servers": sum(p.size for p in pools),
            "borrowed": sum(len(p.busy) for p in pools),
            "pinned": sum(1 for c in active if is_pinned(c)),
            "waiting": sum(len(p.waiters) for p in pools),
            "queries": proxy.stats.query_requests}
