"""/health and /ready for load balancers and Kubernetes probes.

/health: the process answers (liveness). /ready: send it clients (readiness): it accepts
them, it is not draining (shutdown or takeover), and the server is reachable: a pool holds
a live server connection, or a TCP (or unix socket) connect to the upstream succeeds within a
second, remembered for a moment so a probe every second does not become a connect every second.
"""
from __future__ import annotations

import asyncio
import time

from unpinned.backend.server import open_stream

CHECK_TIMEOUT = 1.0
REMEMBER = 2.0      # seconds a successful connect check counts


async def readiness(proxy) -> tuple[int, dict]:
    shared = proxy.shared
    if shared.draining:
        return 503, {"ready": False, "reason": "draining: the proxy is shutting down or handing over"}
    if not proxy.listeners or not any(srv.is_serving() for srv in proxy.listeners):
        return 503, {"ready": False, "reason": "not accepting clients"}
    if any(pool.idle or pool.busy for pool in shared.pools.values()):
        return 200, {"ready": True}
    now = time.monotonic()
    if now - proxy.upstream_seen < REMEMBER:
        return 200, {"ready": True}
    error = await _connect_check(proxy.config.upstream)
    if error is not None:
        return 503, {"ready": False, "reason": f"upstream unreachable: {error}"}
    proxy.upstream_seen = time.monotonic()
    return 200, {"ready": True}


async def _connect_check(up) -> str | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            _, writer = await open_stream(up.host, up.port)
    except TimeoutError:
        return f"no answer from {up.host}:{up.port} within {CHECK_TIMEOUT:.0f} s"
    except OSError as e:
        return f"{up.host}:{up.port}: {e.strerror or e}"
    writer.close()
    return None
