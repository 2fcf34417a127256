"""Reading an in-process proxy's /metrics the way Prometheus would, for tests."""
from __future__ import annotations

import urllib.request


def metric(h, name: str) -> float:
    """The sum of every sample of `name` (all label sets) on the proxy's /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{h.proxy.http.port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
