"""The HTTP listener: /metrics (Prometheus), /api/* (JSON), / (the live page).

GET only; a tiny HTTP/1.1 server on asyncio so it shares the proxy's loop and sees
its state without locks.

Access: with `http_token` set, /api/* and the live page answer 401 without it (a Bearer
header, basic auth with it as the password, or ?token=); /metrics too with
`http_metrics_auth`. Statements in /api/* have their literals replaced by $n unless
`http_sql_literals` is on (the pin log's own redaction: PostgreSQL's normalization).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from urllib.parse import parse_qs, urlsplit
from pathlib import Path

from unpinned.ops import admin
from unpinned.ops.metrics import make_registry, render
from unpinned.ops.workers import merge_history, merge_metrics
from unpinned.ops.live_state import ProxyView
from unpinned.sql.classifier import redact_sql


log = logging.getLogger("unpinned.ops.http_api")
PAGE = Path(__file__).with_name("live.html")


class HttpServer:
    def __init__(self, proxy: ProxyView):
        self.proxy = proxy
        self.registry = proxy.metrics_registry = make_registry(proxy)
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
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
                        "history": history}
            elif name in admin.VIEWS:
                body = await admin.gather_view(self.proxy, name)
            else:
                return 404, "application/json", b'{"error": "not found"}'
            if not self.proxy.config.http_sql_literals:
                body = _redacted(body)
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
                extra = ""
                if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                    status, ctype, body = 405, "text/plain", b"GET only"
                elif not self._allowed(parts[1], request):
                    status, ctype, body = 401, "text/plain", b"a token is needed: Authorization: Bearer TOKEN"
                    extra = 'WWW-Authenticate: Bearer realm="unpinned"\r\n'
                else:
                    try:
                        status, ctype, body = await self.route(parts[1])
                    except Exception:   # a broken view must not take the listener down
                        log.exception("HTTP %s failed", parts[1])
                        status, ctype, body = 500, "text/plain", b"internal error"
                keep = b"connection: close" not in request.lower()
                head = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{extra}"
                        f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
                writer.write(head + (body if parts and parts[0] != "HEAD" else b""))
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _allowed(self, target: str, request: bytes) -> bool:
        """The token, when one is set, for everything but /metrics (unless that is asked for too)."""
        cfg = self.proxy.config
        token = cfg.http_token
        if not token:
            return True
        url = urlsplit(target)
        if url.path == "/metrics" and not cfg.http_metrics_auth:
            return True
        given = [v for v in parse_qs(url.query).get("token", [])]
        for raw in request.split(b"\r\n")[1:]:
            name, sep, value = raw.partition(b":")
            if sep and name.strip().lower() == b"authorization":
                scheme, _, cred = value.strip().decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    given.append(cred.strip())
                elif scheme.lower() == "basic":
                    try:
                        given.append(base64.b64decode(cred.strip(), validate=True).decode().partition(":")[2])
                    except (binascii.Error, UnicodeDecodeError):
                        pass
        want = token.encode()
        return any(hmac.compare_digest(g.encode(), want) for g in given)


_SQL_KEYS = ("sql", "sample", "digest")


def _redacted(body):
    """The same JSON with every statement's literals replaced by $n."""
    if isinstance(body, list):
        return [_redacted(x) for x in body]
    if isinstance(body, dict):
        return {k: (redact_sql(v) if k in _SQL_KEYS and isinstance(v, str) else _redacted(v))
                for k, v in body.items()}
    return body
