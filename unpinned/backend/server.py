"""One connection from the proxy to PostgreSQL: connect, log in, move bytes.

While a client holds it, every byte the server sends goes straight to that client's
relay. While it sits in the pool, the proxy may talk to it itself (`simple_query`):
health checks, the init query, rolling back after a client vanished.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Callable

from unpinned.config import Config, Upstream
from unpinned.wire.auth import AuthFailed, ServerAuth
from unpinned.wire import messages as m
from unpinned.state.server_state import ServerPrepared, ServerState

log = logging.getLogger("unpinned.backend.server")


class ServerError(Exception):
    """PostgreSQL refused something the proxy asked (login, init query, check)."""

    unreachable = False     # nothing answered (refused, timed out): an outage, worth retrying

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        super().__init__(fields.get("M", "server error"))

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "08006")


class ServerConnection(asyncio.Protocol):
    def __init__(self, on_lost: Callable[["ServerConnection"], None], prepared_limit: int = 1000):
        self._on_lost = on_lost           # the pool forgets it
        self.state = ServerState(prepared=ServerPrepared(limit=prepared_limit))
        self.transport: asyncio.Transport | None = None
        self.client = None                # the ClientConnection holding it, if any
        self.host = None                  # the upstream Host it was opened to (None: config.upstream)
        self.closed = False
        self.tls = False
        self.last_used = time.monotonic()
        self.created = self.last_used
        self._buf = bytearray()
        self._waiter: asyncio.Future | None = None
        self._lost = asyncio.get_running_loop().create_future()

    @property
    def id(self) -> int:
        return self.state.id

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            client.server_data(data)
            return
        self._buf += data
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        elif self._waiter is None:
            self._idle_data()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self._lost.done():
            self._lost.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("server closed the connection"))
        client, self.client = self.client, None
        self._on_lost(self)
        if client is not None:
            client.server_lost(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    def _idle_data(self) -> None:
        # A server talking while nobody holds it: a shutdown notice or a FATAL before it hangs up.
        for t, body in self._drain():
            if t == b"E":
                fields = m.parse_error_fields(body)
                log.info("server connection %d said while idle: %s", self.id, fields.get("M"))

    # ------------------------------------------------------------------ the proxy's own conversation

    def _drain(self):
        # Each message leaves the buffer before it is yielded: a consumer that stops early
        # (login returns at ReadyForQuery) must not see it again.
        buf = self._buf
        while len(buf) >= 5:
            ln = m.unpack_i32(buf, 1)[0]
            if len(buf) < 1 + ln:
                break
            t, body = bytes(buf[:1]), bytes(buf[5:1 + ln])
            del buf[:1 + ln]
            yield t, body

    async def _messages(self):
        while True:
            got = False
            for msg in self._drain():
                got = True
                yield msg
            if not got:
                await self._more()

    async def _more(self) -> None:
        """Wait for the server's next bytes (they land in `_buf`)."""
        if self.closed:
            raise ConnectionError("server closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def start_tls(self, up, hostname: str | None = None) -> None:
        """SSLRequest; on 'S' the TLS handshake (verified as `up.sslmode` says), on 'N' plain
        text unless the mode requires TLS."""
        self.transport.write(m.pack_i32(8) + m.pack_i32(m.SSL_REQUEST))
        while not self._buf:
            await self._more()
        answer = bytes(self._buf[:1])
        if len(self._buf) > 1:
            # Bytes after the answer would be read as if they came under TLS (CVE-2021-23222).
            raise ServerError({"S": "FATAL", "C": "08P01", "M": "server sent unencrypted data after its SSL answer"})
        self._buf.clear()
        if answer == b"N":
            if up.sslmode in ("require", "verify-ca", "verify-full"):
                raise ServerError({"S": "FATAL", "C": "08006",
                                   "M": f"the server does not support TLS, and upstream sslmode is {up.sslmode}"})
            return
        if answer != b"S":
            raise ServerError({"S": "FATAL", "C": "08P01", "M": f"unexpected answer {answer!r} to an SSL request"})
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(
                self.transport, self, up.tls_context(),
                server_hostname=(hostname or up.host) if up.sslmode == "verify-full" else None)
        except ssl.SSLError as e:
            raise ServerError({"S": "FATAL", "C": "08006", "M": f"TLS with the server failed: {e}"}) from None
        self.tls = True

    async def login(self, user: str, password: str | None, database: str) -> None:
        self.transport.write(m.startup_message({"user": user, "database": database}))
        auth = ServerAuth(user, password)
        async for t, body in self._messages():
            if t == b"R":
                reply = auth.step(body)
                if reply:
                    self.transport.write(reply)
            elif t == b"E":
                raise ServerError(m.parse_error_fields(body))
            elif t == b"S":
                name, value = m.split_parameter_status(body)
                self.state.reported[name] = value
            elif t == b"K":
                self.state.pid, self.state.secret = m.unpack_i32(body, 0)[0], m.unpack_i32(body, 4)[0]
            elif t == b"Z":
                return

    async def simple_query(self, sql: str) -> tuple[list[tuple[bytes, bytes]], dict[str, str] | None]:
        """Run SQL as the proxy; returns (messages before ReadyForQuery, error fields or None)."""
        if self.closed:
            raise ConnectionError("server connection is closed")
        self.transport.write(m.query(sql))
        out: list[tuple[bytes, bytes]] = []
        error = None
        async for t, body in self._messages():
            if t == b"Z":
                self.state.status = body[:1]
                return out, error
            if t == b"E":
                error = m.parse_error_fields(body)
            elif t == b"S":
                name, value = m.split_parameter_status(body)
                self.state.reported[name] = value
            out.append((t, body))

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            try:
                if not self.transport.is_closing():
                    self.transport.write(m.TERMINATE_MSG)
            except RuntimeError:    # the transport went away under us (a failed TLS handshake)
                pass
            finally:
                self.transport.close()

    async def wait_closed(self) -> None:
        await self._lost


async def open_stream(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain connection to PostgreSQL at host:port; a host that is a directory is its unix socket."""
    if host.startswith("/"):
        return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
    return await asyncio.open_connection(host, port)


async def send_cancel(up: Upstream, conn: ServerConnection) -> None:
    """Ask PostgreSQL to cancel whatever `conn` is running (a CancelRequest on a new socket)."""
    host, port = (conn.host.host, conn.host.port) if conn.host is not None else (up.host, up.port)
    try:
        _, w = await open_stream(host, port)
        w.write(m.cancel_request(conn.state.pid, conn.state.secret))
        await w.drain()
        w.close()
    except OSError as e:
        log.warning("could not forward a cancel request: %s", e)


async def connect(cfg: Config, user: str, password: str | None, database: str,
                  on_lost: Callable[[ServerConnection], None], host=None) -> ServerConnection:
    """Open, authenticate and prepare a new server connection (for a pool, which `on_lost` tells
    when it closes), to `host` (a hosts.Host of a cluster) or else the configured upstream."""
    up = cfg.upstream
    addr, port = (host.host, host.port) if host is not None else (up.host, up.port)
    loop = asyncio.get_running_loop()
    conn = ServerConnection(on_lost, cfg.max_prepared_statements)
    conn.host = host
    try:
        async with asyncio.timeout(cfg.connect_timeout or None):
            if addr.startswith("/"):
                await loop.create_unix_connection(lambda: conn, f"{addr}/.s.PGSQL.{port}")
            else:
                await loop.create_connection(lambda: conn, addr, port)
                if up.sslmode != "disable":
                    await conn.start_tls(up, addr)
            await conn.login(user, password, database)
            if cfg.init_query:
                _, error = await conn.simple_query(cfg.init_query)
                if error:
                    raise ServerError(error)
    except (OSError, TimeoutError) as e:
        conn.close()
        err = ServerError({"S": "FATAL", "C": "08006",
                           "M": f"could not connect to the database server at {addr}:{port}: {e or 'timeout'}"})
        err.unreachable = True
        raise err from None
    except AuthFailed as e:
        conn.close()
        raise ServerError({"S": "FATAL", "C": e.sqlstate, "M": str(e)}) from None
    except BaseException:
        # ServerError, ConnectionError, or the borrow waiting for it gave up (borrow timeout
        # cancels this coroutine): never leave a half-open connection outside the pool's books.
        conn.close()
        raise
    return conn
