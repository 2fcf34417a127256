"""Graceful shutdown (SIGTERM): stop accepting, report not ready, let the transactions in
flight finish, close each client as it comes to rest between transactions, and give up
after `[proxy] shutdown_timeout` (what is left is then closed by Proxy.stop).

A client closed here gets FATAL 57P01 "terminating connection due to administrator
command", as from a PostgreSQL server being shut down, at a moment when it has no
transaction open: it reconnects (to another proxy of the fleet) and loses nothing it was
told was committed.
"""
from __future__ import annotations

import asyncio
import logging
import time

from unpinned.frontend.handover import at_rest, close_gently, shutdown_error, watch

log = logging.getLogger("unpinned")

POLL = 0.05     # seconds between looks at clients the idle hook cannot see (logins, admin)


def stop_accepting(proxy) -> None:
    """Close the client listeners: new connections are refused from now on. The HTTP listener
    stays, so the load balancer reads /ready (503) and Prometheus its last scrape."""
    shared = proxy.shared
    shared.draining = True
    for srv in proxy.listeners:
        srv.close()


def close_at_rest(client) -> None:
    close_gently(client, shutdown_error("the proxy is shutting down; reconnect"))


async def drain(proxy, timeout: float) -> bool:
    """Close every client as soon as it is between transactions; True when all are gone
    within `timeout`."""
    shared = proxy.shared
    stop_accepting(proxy)
    shared.on_idle = close_at_rest
    deadline = time.monotonic() + timeout
    started = len(shared.clients)
    log.info("draining: %d client(s), up to %.0f s for their transactions", started, timeout)
    while True:
        for client in list(shared.clients):
            if not client.active or client.admin:
                # A login in progress or the admin console: no transaction to wait for.
                close_at_rest(client)
            elif at_rest(client):
                close_at_rest(client)
            else:
                watch(client)       # closed by the hook the moment its transaction ends
        if not shared.clients:
            log.info("drained: %d client(s) closed between transactions", started)
            return True
        if time.monotonic() >= deadline:
            log.warning("shutdown_timeout (%.0f s) reached with %d client(s) still in a transaction; closing them",
                        timeout, len(shared.clients))
            return False
        await asyncio.sleep(POLL)
