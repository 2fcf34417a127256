"""The HTTP listener: /metrics (Prometheus), /api/* (JSON), / (the live page).

GET only; a tiny HTTP/1.1 server on asyncio so it shares the proxy's loop and sees
its state without locks.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from unpinned.ops import admin
from unpinned.ops.health import readiness
from unpinned.ops.metrics import make_registry, render
from unpinned.ops.workers import merge_history, merge_metrics
from unpinned.ops.live_state import ProxyView


log = logging.getLogger("unpinned.ops.http_api")
PAGE = Path(__file__).with_name("live.html")


class HttpServer:
    def __init__(self, proxy: ProxyView):
        self.proxy = proxy
        self.registry = proxy.metrics_registry = make_registry(proxy)
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False, sock=None) -> None:
        if sock is not None:    # handed over by the process this one replaces (ops/takeover.py)
            self.server = await asyncio.start_server(self._serve, sock=sock)
            return
        self.server = await asyncio.start_server(self._serve, host, port, reuse_port=reuse_port or None)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def route(self, path: str) -> tuple[int, str, bytes]:
        """With several workers, whichever one a request reaches answers for all of them."""
        path = path.split("?", 1)[0]
        peers = self.proxy.peers
        if path in ("/health", "/ready"):
            status, body = (200, {"status": "alive"}) if path == "/health" else await readiness(self.proxy)
            return status, "application/json", json.dumps(body).encode()
        if path == "/metrics":
            text = render(self.registry) if peers is None else merge_metrics(await peers.ask_all({"op": "metrics"}))
            return 200, "text/plain; version=0.0.4; charset=utf-8", text
        if path.startswith("/api/"):
            name = path[5:].strip("/").upper()
            if name == "SUMMARY":
                history = (list(self.proxy.history) if peers is None else
                           merge_history(await peers.ask_all({"op": "history"})))
                view = admin.gather_view
                body = {"mode": self.proxy.config.mode, "pools": await view(self.proxy, "POOLS"),
                        "stats": (await view(self.proxy, "STATS"))[0], "pins": await view(self.proxy, "PINS"),
                        "pin_reasons": (await view(self.proxy, "PIN_REASONS"))[:50],
                        "history": history, "hosts": await view(self.proxy, "HOSTS")}
            elif name in admin.VIEWS:
                body = await admin.gather_view(self.proxy, name)
            else:
                return 404, "application/json", b'{"error": "not found"}'
            return 200, "application/json", json.dumps(body, default=str).encode()
        if path in ("/", "/index.html"):
            try:
                return 200, "text/html; charset=utf-8", PAGE.read_bytes()
            except OSError:
                return 404, "text/plain", b"live page missing"
        return 404, "text/plain", b"not found"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                line = request.split(b"\r\n", 1)[0].decode("latin-1")
                parts = line.split()
                if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                    status, ctype, body = 405, "text/plain", b"GET only"
                else:
                    try:
                        status, ctype, body = await self.route(parts[1])
                    except Exception:   # a broken view must not take the listener down
                        log.exception("HTTP %s failed", parts[1])
                        status, ctype, body = 500, "text/plain", b"internal error"
                keep = b"connection: close" not in request.lower()
                head = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                        f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
                writer.write(head + (body if parts and parts[0] != "HEAD" else b""))
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
