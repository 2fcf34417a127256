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


def close_at_rest(client) -> bool:
    close_gently(client, shutdown_error("the proxy is shutting down; reconnect"))
    return True


# A client is closed when it starts its next request (the FATAL is then the answer to it), or
# after this long at rest. Not at once behind the ReadyForQuery that ended its transaction:
# a driver that reads both in one go may report only "server closed the connection
# unexpectedly" when it next sends something (libpq sees the end of the stream first).
QUIET = 0.1


async def drain(proxy, timeout: float) -> bool:
    """Close every client as soon as it is between transactions; True when all are gone
    within `timeout`."""
    shared = proxy.shared
    stop_accepting(proxy)
    at_rest_since: dict = {}

    def came_to_rest(client) -> None:
        at_rest_since[client] = time.monotonic()

    shared.on_idle = came_to_rest
    shared.on_request = close_at_rest
    deadline = time.monotonic() + timeout
    started = len(shared.clients)
    log.info("draining: %d client(s), up to %.0f s for their transactions", started, timeout)
    while True:
        now = time.monotonic()
        for client in list(shared.clients):
            if not client.active or client.admin:
                # A login in progress or the admin console: no transaction to wait for.
                close_at_rest(client)
            elif at_rest(client):
                watch(client)
                if now - at_rest_since.get(client, 0.0) >= QUIET:
                    close_at_rest(client)
            else:
                watch(client)       # told when its transaction ends, and closed at its next request
        if not shared.clients:
            log.info("drained: %d client(s) closed between transactions", started)
            return True
        if now >= deadline:
            log.warning("shutdown_timeout (%.0f s) reached with %d client(s) still in a transaction; closing them",
                        timeout, len(shared.clients))
            return False
        await asyncio.sleep(POLL)
