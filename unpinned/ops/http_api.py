"""The HTTP listener: /metrics (Prometheus), /api/* (JSON), / (the live page).

GET only; a small HTTP/1.1 server on asyncio (h11 parses the protocol) so it shares the
proxy's loop and sees its state without locks.

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

import h11
from pathlib import Path

from unpinned.ops import admin
from unpinned.ops.health import readiness
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
        """One HTTP/1.1 connection, parsed by h11 (keep-alive, pipelining, limits on what a
        request may hold); requests answered one after the other."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    conn.receive_data(data)     # b"": the peer closed its side
                    continue
                if isinstance(event, h11.Request):
                    writer.write(await self._answer(conn, event))
                    await writer.drain()
                elif isinstance(event, h11.ConnectionClosed) or conn.our_state is h11.MUST_CLOSE:
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
        except h11.RemoteProtocolError as e:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                writer.write(_response(conn, e.error_status_hint, "text/plain", b"bad request", head_only=False))
        except (ConnectionError, OSError, TimeoutError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()

    async def _answer(self, conn: h11.Connection, request: h11.Request) -> bytes:
        method = request.method
        target = request.target.decode("latin-1")
        extra: list[tuple[bytes, bytes]] = []
        if method not in (b"GET", b"HEAD"):
            status, ctype, body = 405, "text/plain", b"GET only"
            extra.append((b"Allow", b"GET, HEAD"))
        elif not self._allowed(target, [v for k, v in request.headers if k == b"authorization"]):
            status, ctype, body = 401, "text/plain", b"a token is needed: Authorization: Bearer TOKEN"
            extra.append((b"WWW-Authenticate", b'Bearer realm="unpinned"'))
        else:
            try:
                status, ctype, body = await self.route(target)
            except Exception:   # a broken view must not take the listener down
                log.exception("HTTP %s failed", target)
                status, ctype, body = 500, "text/plain", b"internal error"
        return _response(conn, status, ctype, body, head_only=method == b"HEAD", extra=extra)

    def _allowed(self, target: str, authorization: list[bytes]) -> bool:
        """The token, when one is set, for everything but /metrics (unless that is asked for too)."""
        cfg = self.proxy.config
        token = cfg.http_token
        if not token:
            return True
        url = urlsplit(target)
        if url.path == "/metrics" and not cfg.http_metrics_auth:
            return True
        given = list(parse_qs(url.query).get("token", []))
        for value in authorization:
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


_MAX_HEAD = 16384       # bytes of request line and headers; more is a 431 from h11


def _response(conn: h11.Connection, status: int, ctype: str, body: bytes, head_only: bool,
              extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    headers = [(b"Content-Type", ctype.encode()), (b"Content-Length", str(len(body)).encode()),
               (b"Cache-Control", b"no-store"), *extra]
    out = conn.send(h11.Response(status_code=status, headers=headers))
    if not head_only:
        out += conn.send(h11.Data(data=body))
    return out + conn.send(h11.EndOfMessage())

_SQL_KEYS = ("sql", "sample", "digest")


def _redacted(body):
    """The same JSON with every statement's literals replaced by $n."""
    if isinstance(body, list):
        return [_redacted(x) for x in body]
    if isinstance(body, dict):
        return {k: (redact_sql(v) if k in _SQL_KEYS and isinstance(v, str) else _redacted(v))
                for k, v in body.items()}
    return body
