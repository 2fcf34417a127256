"""The asyncio shell: accept clients, log them in, lend them server connections.

Everything protocol-shaped is decided in `relay` (pure); this module only moves
bytes between sockets, waits for the pool, and cleans up.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import struct
import time

from collections import deque

from . import __version__, admin
from .auth import AuthFailed, ClientAuth
from .config import Config, load
from .effects import Reason
from .metrics import Stats
from .pool import BorrowTimeout, Pool
from .protocol import messages as m
from .pinlog import ClientInfo, PinLog, open_stream
from .relay import Relay, param_sync_sql
from .server import ServerConnection, ServerError
from .session import Session, SessionOptions
from .statements import StatementRegistry
from .workers import Peers, WorkerInfo, share

log = logging.getLogger("unpinned")

RDS_OPTIONS_TEXT = "Feature not supported: RDS Proxy currently doesn't support command-line options."
RDS_REPLICATION_TEXT = "Feature not supported: RDS Proxy currently doesn't support streaming replication mode."
RDS_VERSION_TEXT = "Feature not supported: RDS Proxy supports only version 3.0 of the PostgreSQL messaging protocol."
# Startup keys that are not session parameters.
_NOT_GUCS = {"user", "database", "options", "replication"}
TLS_HANDSHAKE = object()    # ClientConnection._auth while the TLS handshake runs


# Cancel keys come from the operating system's CSPRNG, drawn in blocks (one system call per
# 512 keys instead of one per login). A forked worker must not reuse its parent's block.
_entropy = bytearray()
os.register_at_fork(after_in_child=_entropy.clear)


def _random64() -> int:
    if not _entropy:
        _entropy.extend(os.urandom(4096))
    raw = int.from_bytes(_entropy[-8:], "big")
    del _entropy[-8:]
    return raw


class Proxy:
    def __init__(self, config: Config, config_path: str | None = None, overrides: dict | None = None,
                 worker: WorkerInfo | None = None):
        self.worker = worker                    # one of several processes (workers.py), or None
        self.total_config = config
        self.config = share(config, worker) if worker else config
        config = self.config
        self.peers: Peers | None = None
        self.metrics_registry = None
        self.tls_context = config.tls_context()
        self.config_path = config_path          # for RELOAD / SIGHUP
        self.overrides = overrides or {}        # command-line flags, kept across reloads
        self.stats = Stats()
        self.history: deque = deque(maxlen=600)   # one sample a second for the live page
        self.http = None
        self.pools: dict[tuple[str, str], Pool] = {}
        self.registry = StatementRegistry()
        self.pinlog = PinLog(open_stream(config.pin_log), mode=config.mode, max_sql=config.pin_log_max_sql,
                             redact=config.pin_log_redact)
        self.session_options = SessionOptions(mode=config.mode, set_local_pins=config.set_local_pins,
                                              sequences=config.sequences, verify=config.verify)
        self.clients: set[ClientConnection] = set()
        self.by_key: dict[tuple[int, int], ClientConnection] = {}
        self.servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._housekeeper: asyncio.Task | None = None
        self.started = time.time()
        self._next_client = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.listen_address()
        if self.worker is not None:
            self.peers = Peers(self, self.worker)
            await self.peers.start()
        srv = await loop.create_server(lambda: ClientConnection(self), host, port, reuse_address=True,
                                       reuse_port=self.worker is not None, backlog=4096)
        self.servers.append(srv)
        if self.config.http_listen:
            from .config import parse_hostport
            from .http import HttpServer
            self.http = HttpServer(self)
            await self.http.start(*parse_hostport(self.config.http_listen, "http_listen"),
                                  reuse_port=self.worker is not None)
            log.info("metrics and live page on http://%s:%d/", parse_hostport(self.config.http_listen, "")[0],
                     self.http.port)
        self._housekeeper = loop.create_task(self._housekeeping())
        if self.config.auth == "trust":
            log.warning("client authentication is 'trust': anyone who can reach %s logs in. Development only.",
                        self.config.listen)
        log.info("unpinned %s listening on %s, mode %s, upstream %s:%s%s", __version__, self.config.listen,
                 self.config.mode, self.config.upstream.host, self.config.upstream.port,
                 f" (worker {self.worker.index + 1} of {self.worker.count}, pid {os.getpid()})"
                 if self.worker else "")

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for srv in self.servers:
            srv.close()
        if self.http is not None:
            self.http.close()
        if self.peers is not None:
            self.peers.close()
        if self._housekeeper:
            self._housekeeper.cancel()
        for client in list(self.clients):
            client.shutdown(m.fatal("57P01", "terminating connection because the proxy is shutting down"))
        for pool in self.pools.values():
            pool.close_all()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.sleep(0)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for pool in self.pools.values():
                pool.reap(now)
            limit = self.config.client_idle_timeout
            login_limit = self.config.login_timeout
            for client in list(self.clients):
                if not client.active:
                    # Logins are timed here, not with a timer each: connect-per-request clients.
                    if not client.admin and now - client.last_active > login_limit:
                        client.login_timed_out()
                elif limit and client.server is None and now - client.last_active > limit:
                    client.shutdown(m.fatal("57P05", "terminating connection due to idle-session timeout"))
            active = [c for c in self.clients if c.active]
            self.history.append({
                "t": round(time.time(), 1), "clients": len(active),
                "servers": sum(p.size for p in self.pools.values()),
                "borrowed": sum(len(p.busy) for p in self.pools.values()),
                "pinned": sum(1 for c in active if c.relay is not None and c.relay.pinned),
                "waiting": sum(len(p.waiters) for p in self.pools.values()),
                "queries": self.stats.query_requests})

    def pool_for(self, database: str, user: str) -> Pool:
        key = (database, user)
        pool = self.pools.get(key)
        if pool is None:
            server_user, password = self.config.server_credentials(user)
            pool = self.pools[key] = Pool(self.config, database, user, server_user, password, self.stats)
        return pool

    def reload(self) -> None:
        """Re-read the config file; new settings apply to new borrows and logins, nobody is dropped."""
        new = load(self.config_path, **self.overrides)
        self.total_config = new
        if self.worker is not None:
            new = share(new, self.worker)
        if new.listen != self.config.listen:
            log.warning("listen address changes need a restart; keeping %s", self.config.listen)
            new.listen = self.config.listen
        self.config = new
        self.tls_context = new.tls_context()     # a renewed certificate applies to new clients
        for client in self.clients:
            client.config = new
        for pool in self.pools.values():
            pool.config = new
            pool.server_user, pool.server_password = new.server_credentials(pool.user)
        log.info("configuration reloaded")

    def new_client_id(self) -> int:
        self._next_client += 1
        if self.worker is None:
            return self._next_client
        return self._next_client * self.worker.count + self.worker.index   # unique across workers

    async def cancel(self, pid: int, secret: int, forward: bool = True) -> None:
        if self.peers is not None and forward and self.peers.owner(pid) != self.worker.index:
            # The client is another worker's (the kernel chose a worker for this connection).
            try:
                await self.peers.ask(self.peers.owner(pid), {"op": "cancel", "pid": pid, "secret": secret})
            except (OSError, ConnectionError, TimeoutError, ValueError) as e:
                log.warning("could not pass a cancel request to worker %d: %s", self.peers.owner(pid), e)
            return
        client = self.by_key.get((pid, secret))
        if client is None:
            return
        if client.server is None:
            client.cancel_waiting()
            return
        await self.cancel_server(client.server)

    async def cancel_server(self, conn: ServerConnection) -> None:
        """Ask PostgreSQL to cancel whatever `conn` is running."""
        up = self.config.upstream
        try:
            if up.is_unix:
                _, w = await asyncio.open_unix_connection(f"{up.host}/.s.PGSQL.{up.port}")
            else:
                _, w = await asyncio.open_connection(up.host, up.port)
            w.write(m.cancel_request(conn.state.pid, conn.state.secret))
            await w.drain()
            w.close()
        except OSError as e:
            log.warning("could not forward a cancel request: %s", e)


class ClientConnection(asyncio.Protocol):
    """One client of the proxy."""

    # Slots: 10,000 idle clients must stay small, and the hot path reads these on every message.
    __slots__ = ("proxy", "config", "transport", "id", "addr", "user", "database", "application_name", "pool",
                 "relay", "server", "active", "closing", "pending", "acquiring", "last_active", "connected_at",
                 "key", "tls", "admin", "_t_req", "_t_sent", "_buf", "_paused_server", "_auth", "_authenticated",
                 "_secret", "_wanted", "_admin_buf", "_admin_failed", "_admin_pending")

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.config = proxy.config
        self.transport: asyncio.Transport | None = None
        self.id = proxy.new_client_id()
        self.addr = ""
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.pool: Pool | None = None
        self.relay: Relay | None = None
        self.server: ServerConnection | None = None
        self.active = False            # logged in; bytes go through the relay
        self.closing = False
        self.pending: list[bytes] = []  # client bytes waiting for a server connection
        self.acquiring = False
        self.last_active = time.monotonic()
        self.connected_at = time.time()
        self.key = (0, 0)
        self.tls = False
        self.admin = False
        self._t_req = 0.0              # when the oldest unanswered request arrived
        self._t_sent = 0.0             # when it went to the server
        self._buf = bytearray()          # bytes before login completes
        self._paused_server = False
        # Login state (see _login_step).
        self._auth: ClientAuth | None = None
        self._authenticated = False
        self._secret = None
        self._wanted: dict[str, str] = {}

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.proxy.clients.add(self)
        if self.proxy.worker is not None:
            self.proxy.worker.clients[self.proxy.worker.index] = len(self.proxy.clients)
        self.proxy.stats.clients_received += 1

    def data_received(self, data: bytes) -> None:
        if self.active:
            self.last_active = now = time.monotonic()
            if not self._t_req:
                self._t_req = now
            if self.server is not None:
                self._to_server(data, now)
            elif self.admin:
                self._admin_data(data)
            elif self.pending or self.acquiring:
                self.pending.append(data)
                if not self.acquiring:
                    self._acquire()
            elif data[:1] == b"X":
                self.shutdown(None)
            else:
                # The common case: a request with no server connection yet, and one idle.
                conn = self.pool.borrow(self)
                if conn is None:
                    self.pending.append(data)
                    self.acquiring = True
                else:
                    self._attach(conn, data, now)
            return
        self._buf += data
        if len(self._buf) > 1 << 20:
            self.shutdown(m.fatal("08P01", "too much data before login"))
            return
        self._login_data()

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.active:
            self.proxy.stats.clients_closed += 1
        self.active = False
        self.proxy.clients.discard(self)
        if self.proxy.worker is not None:
            self.proxy.worker.clients[self.proxy.worker.index] = len(self.proxy.clients)
        self.proxy.by_key.pop(self.key, None)
        conn = self.server
        if conn is not None:
            self.server = None
            self._give_back(conn)

    def pause_writing(self) -> None:
        if self.server is not None and not self._paused_server:
            self._paused_server = True
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._paused_server:
            self._paused_server = False
            if self.server is not None:
                self.server.transport.resume_reading()

    # ------------------------------------------------------------------ login

    # Login runs from data_received, step by step, with no task of its own: a connection per
    # transaction (pgbench -C, serverless clients) must cost as little as a query. Only a
    # first-seen set of startup parameters waits for the server (see _server_parameters).

    def _login_data(self) -> None:
        if self.transport.is_closing():
            return
        try:
            self._login_step()
        except Exception as e:   # every way a login can fail, answered as PostgreSQL would
            self._login_failed(e)

    def _login_step(self) -> None:
        buf = self._buf
        while not self.closing:
            if self._auth is None:
                if len(buf) < 4:
                    return
                ln = m.unpack_i32(buf, 0)[0]
                if ln < 8 or ln > 10000:
                    raise m.ProtocolError("invalid length of startup packet")
                if len(buf) < ln:
                    return
                body = bytes(buf[4:ln])
                del buf[:ln]
                code, params = m.parse_startup(body)
                if code == m.SSL_REQUEST and self.proxy.tls_context is not None and not self.tls:
                    if buf:
                        raise m.ProtocolError("received unencrypted data after SSL request")
                    self.transport.write(m.SSL_ACCEPTED)
                    self.transport.pause_reading()      # the next bytes are the TLS handshake
                    self._auth = TLS_HANDSHAKE
                    self.proxy.spawn(self._start_tls())
                    return
                if code in (m.SSL_REQUEST, m.GSSENC_REQUEST):
                    self.transport.write(m.SSL_REFUSED)
                    continue
                if code == m.CANCEL_REQUEST:
                    if len(body) >= 12:
                        pid, secret = struct.unpack_from("!II", body, 4)
                        self.proxy.spawn(self.proxy.cancel(pid, secret))
                    self.shutdown(None)
                    return
                self._startup(code, params)
            elif self._auth is TLS_HANDSHAKE:
                return      # bytes wait in the TLS layer until the handshake is done
            elif not self._auth.done:
                if len(buf) < 5:
                    return
                ln = m.unpack_i32(buf, 1)[0]
                if buf[0] != 112:  # 'p'
                    raise m.ProtocolError(f"expected message b'p', got {bytes(buf[:1])!r}")
                if ln < 4 or ln > 65536:
                    raise m.ProtocolError("invalid message length")
                if len(buf) < 1 + ln:
                    return
                body = bytes(buf[5:1 + ln])
                del buf[:1 + ln]
                reply = self._auth.step(body)
                if reply:
                    self.transport.write(reply)
            elif not self._authenticated:
                self._authenticated = True
                self._after_auth()
                return
            else:
                return      # waiting for the server's answer about startup parameters

    async def _start_tls(self) -> None:
        """Answered 'S' to an SSLRequest: the handshake, then the startup packet, under TLS."""
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(self.transport, self, self.proxy.tls_context, server_side=True),
                self.config.login_timeout)
        except (OSError, TimeoutError, ConnectionError) as e:   # ssl.SSLError is an OSError
            log.info("client %d (%s): TLS handshake failed: %s", self.id, self.addr, e)
            if self.transport is not None:
                self.transport.abort()
            return
        if transport is None or self.closing:
            return
        self.transport = transport
        self.tls = True
        self._auth = None
        self._login_data()

    def _login_failed(self, e: BaseException) -> None:
        if isinstance(e, m.ProtocolError):
            self._fatal(e.sqlstate, str(e))
        elif isinstance(e, AuthFailed):
            self.proxy.stats.clients_failed_auth += 1
            log.info("client %d (%s) failed authentication as %r: %s", self.id, self.addr, self.user, e)
            self.shutdown(m.fatal(e.sqlstate, str(e), detail=e.detail))
        elif isinstance(e, ServerError):
            self._fatal(e.sqlstate, e.fields.get("M", "server error"))
        elif isinstance(e, BorrowTimeout):
            self._fatal("53300", str(e))
        elif isinstance(e, TimeoutError):
            self._fatal("08P01", "timeout during login")
        elif isinstance(e, (ConnectionError, asyncio.CancelledError)):
            self.shutdown(None)
        else:
            log.exception("client %d (%s): login failed", self.id, self.addr, exc_info=e)
            self._fatal("XX000", "internal error during login")

    def login_timed_out(self) -> None:
        self._login_failed(TimeoutError())

    def _fatal(self, code: str, text: str) -> None:
        self.shutdown(m.fatal(code, text))

    def _startup(self, code: int, params: dict[str, str]) -> None:
        """The StartupMessage: check it, then start authentication."""
        cfg = self.config
        rds = cfg.mode == "rds"
        if code >> 16 != 3:
            raise m.ProtocolError(RDS_VERSION_TEXT if rds else
                                  f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                                  "server supports 3.0 to 3.0", "0A000")
        extensions = [k for k in params if k.startswith("_pq_.")]
        if code & 0xFFFF or extensions:
            self.transport.write(m.negotiate_protocol_version(0, extensions))
        self.user = params.get("user", "")
        if not self.user:
            raise AuthFailed("no PostgreSQL user name specified in startup packet", "28000")
        if cfg.require_tls and not self.tls:
            raise AuthFailed(f'connection for user "{self.user}" requires TLS (sslmode=require)', "28000")
        self.database = params.get("database") or self.user
        self.application_name = params.get("application_name", "")
        worker = self.proxy.worker
        if (worker.total_clients() if worker else len(self.proxy.clients)) > cfg.max_client_connections:
            raise m.ProtocolError(f"The maximum number of client connections to the proxy exceeded "
                                  f"{cfg.max_client_connections}.", "53300")
        replication = params.get("replication", "").lower()
        if replication and replication not in ("false", "0", "off", "no"):
            raise m.ProtocolError(RDS_REPLICATION_TEXT if rds else
                                  "replication connections are not supported by this proxy", "0A000")
        wanted: dict[str, str] = {}
        if params.get("options", "").strip():
            if rds:
                raise m.ProtocolError(RDS_OPTIONS_TEXT, "0A000")
            try:
                wanted.update(m.parse_options(params["options"]))
            except ValueError as e:
                raise m.ProtocolError(str(e), "22023") from None
        for k, v in params.items():
            if k not in _NOT_GUCS and not k.startswith("_pq_."):
                wanted[k.lower()] = v
        self._wanted = wanted

        # Authenticate before any server connection is opened for this user.
        secret = cfg.secret_for(self.user)
        self._secret = secret
        if secret is None and cfg.auth != "trust":
            # Unknown: the same exchange as a wrong password, failing at its end (PostgreSQL's mock).
            self._auth = ClientAuth.mock(cfg.auth, self.user, cfg.users)
        else:
            self._auth = ClientAuth(cfg.auth, self.user, secret)
        first = self._auth.start()
        if first:
            self.transport.write(first)

    def _after_auth(self) -> None:
        cfg = self.config
        secret = self._secret
        if self.database == cfg.admin_database:
            if not ((secret is not None and secret.admin) or
                    (cfg.auth == "trust" and self.user == cfg.upstream.user)):
                raise AuthFailed(f'user "{self.user}" may not use the admin console', "42501")
            self._start_admin()
            return
        self.pool = self.proxy.pool_for(self.database, self.user)
        reported = self._known_parameters(self._wanted)
        if reported is not None:
            self._logged_in(reported)
        else:
            self.proxy.spawn(self._check_parameters_then_log_in())

    async def _check_parameters_then_log_in(self) -> None:
        try:
            reported = await self._server_parameters(self._wanted)
        except Exception as e:
            self._login_failed(e)
            return
        if not self.closing:
            self._logged_in(reported)

    def _logged_in(self, reported: dict[str, str]) -> None:
        info = ClientInfo(self.id, self.addr, self.user, self.database, self.application_name)
        self.relay = Relay(self.proxy.registry, Session(self._wanted, info, self.proxy.pinlog,
                                                        self.proxy.session_options), self.proxy.stats)
        pid, secret_key = self._new_key()
        # The ParameterStatus block is the same for every client with these startup
        # parameters: encoded once per pool (login cost matters for connect-per-request clients).
        cache = self.pool.login_messages
        key = frozenset(self._wanted.items())
        head = cache.get(key)
        if head is None:
            # `reported` for a key never changes: the pool's first report plus what the server
            # answered the first time these parameters were tried.
            head = m.AUTH_OK + b"".join(m.parameter_status(k, v) for k, v in reported.items())
            if len(cache) < 1000:
                cache[key] = head
        self.transport.write(head + m.backend_key_data(pid, secret_key) + m.READY_IDLE)
        self.active = True
        self.proxy.stats.clients_setup_ok += 1
        log.debug("client %d (%s) logged in as %s to %s", self.id, self.addr, self.user, self.database)
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self.data_received(data)

    def _start_admin(self) -> None:
        self.admin = True
        pid, secret_key = self._new_key()
        reported = {"server_version": "17.0 (unpinned admin console)", "server_encoding": "UTF8",
                    "client_encoding": "UTF8", "DateStyle": "ISO, MDY", "integer_datetimes": "on",
                    "standard_conforming_strings": "on", "TimeZone": "UTC", "application_name": self.application_name}
        self.transport.write(m.AUTH_OK + b"".join(m.parameter_status(k, v) for k, v in reported.items()) +
                             m.backend_key_data(pid, secret_key) + m.ready_for_query(b"I"))
        self.active = True
        self._admin_buf = b""
        self._admin_failed = False
        self._admin_pending: asyncio.Task | None = None
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self._admin_data(data)

    def _admin_data(self, data: bytes) -> None:
        """The admin console speaks the simple query protocol only, like PgBouncer's."""
        buf = self._admin_buf + data
        pos, out, close = 0, [], False
        while len(buf) - pos >= 5:
            t = buf[pos:pos + 1]
            ln = m.unpack_i32(buf, pos + 1)[0]
            if ln < 4 or ln > 1 << 20:
                self._fatal("08P01", "invalid message length")
                return
            if len(buf) - pos < 1 + ln:
                break
            body = buf[pos + 5:pos + 1 + ln]
            pos += 1 + ln
            if t == b"Q":
                sql = body.rstrip(b"\x00").decode("utf-8", "replace")
                if self.proxy.peers is not None:
                    # Several workers: the answer is gathered from all of them, in order.
                    out.append(self._admin_gather(sql))
                else:
                    out.append(admin.execute(self.proxy, sql, self))
                out.append(m.ready_for_query(b"I"))
            elif t == b"X":
                close = True
                break
            elif t == b"S":
                self._admin_failed = False
                out.append(m.ready_for_query(b"I"))
            elif not self._admin_failed:
                self._admin_failed = True
                out.append(m.error_response("0A000", "the admin console supports only the simple query protocol"))
        self._admin_buf = buf[pos:]
        if any(isinstance(o, asyncio.Future) for o in out) or self._admin_pending is not None:
            self._admin_pending = self.proxy.spawn(self._admin_write(self._admin_pending, out, close))
            return
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.shutdown(None)

    def _admin_gather(self, sql: str) -> asyncio.Future:
        return self.proxy.spawn(admin.execute_everywhere(self.proxy, sql, self))

    async def _admin_write(self, prev, out: list, close: bool) -> None:
        """Write answers in the order the queries came, after any earlier batch."""
        if prev is not None:
            await prev
        parts = []
        for o in out:
            if isinstance(o, asyncio.Future):
                try:
                    o = await o
                except Exception as e:   # never leave the console without an answer
                    log.exception("admin command failed")
                    o = m.error_response("XX000", f"admin command failed: {e}")
            parts.append(o)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(parts))
        if close:
            self.shutdown(None)

    def _new_key(self) -> tuple[int, int]:
        worker = self.proxy.worker
        while True:
            raw = _random64()
            key = (raw >> 33, raw & 0xFFFFFFFF)
            if worker is not None:   # the pid names the worker, so any worker can route a cancel
                pid = key[0] - key[0] % worker.count + worker.index
                key = (pid if pid < 1 << 31 else pid - worker.count, key[1])
            if key not in self.proxy.by_key:
                break
        self.key = key
        self.proxy.by_key[key] = self
        return key

    def _known_parameters(self, wanted: dict[str, str]) -> dict[str, str] | None:
        """The answer of _server_parameters when the pool already has it, else None."""
        pool = self.pool
        if pool.reported is None:
            return None
        if not wanted:
            return dict(pool.reported)
        checked = pool.checked_params.get(frozenset(wanted.items()))
        return None if checked is None else {**pool.reported, **checked}

    async def _server_parameters(self, wanted: dict[str, str]) -> dict[str, str]:
        """What ParameterStatus the client should see, validating its startup parameters.

        A fresh server connection's report, with the client's own values applied. The first
        client with a given set of parameters has them tried on a server connection, so a
        bad value fails at login as it would on PostgreSQL; later ones reuse that answer.
        """
        known = self._known_parameters(wanted)
        if known is not None:
            return known
        pool = self.pool
        key = frozenset(wanted.items())
        conn = await pool.acquire()
        try:
            overrides: dict[str, str] = {}
            if wanted:
                sql = param_sync_sql(conn.state.params, wanted)
                msgs, error = await conn.simple_query(sql)
                if error:
                    conn.state.params = {}
                    pool.discard(conn)
                    conn = None
                    raise ServerError({**error, "S": "FATAL"})
                conn.state.params = dict(wanted)
                for t, body in msgs:
                    if t == b"S":
                        name, value = m.split_parameter_status(body)
                        overrides[name] = value
                pool.checked_params[key] = overrides
            return {**pool.reported, **overrides}
        finally:
            if conn is not None:
                pool.release(conn)

    # ------------------------------------------------------------------ transaction pooling

    def _acquire(self) -> None:
        conn = self.pool.borrow(self)
        if conn is not None:
            self._attach(conn)
        else:
            self.acquiring = True

    # The pool calls these when a waiting client's turn comes (see pool.Borrower).
    def borrowed(self, conn: ServerConnection) -> None:
        self.acquiring = False
        self._attach(conn)

    def borrow_failed(self, exc: Exception) -> None:
        self.acquiring = False
        if isinstance(exc, ServerError):
            self._fatal(exc.sqlstate, exc.fields.get("M", "could not connect to the server"))
        elif isinstance(exc, BorrowTimeout):
            self._fatal("53300", str(exc))
        else:
            self._fatal("08006", f"could not connect to the server: {exc}")

    def cancel_waiting(self) -> None:
        """A cancel for a client still waiting for a server connection: its first request never
        reached PostgreSQL, so it fails here as a canceled statement would, and the client
        leaves the queue unless more requests wait behind it."""
        if not self.acquiring or not self.pending:
            return
        data = b"".join(self.pending)
        end = m.first_request_end(data)
        if end is None:         # an extended batch still without its Sync: nothing to answer yet
            return
        rest = data[end:]
        self.pending = [rest] if rest else []
        self.transport.write(m.error_response("57014", "canceling statement due to user request") +
                             m.ready_for_query(self.relay.status))
        if not self.pending:
            self.acquiring = False
            self.pool.withdraw(self)

    def _attach(self, conn: ServerConnection, data: bytes | None = None, now: float = 0.0) -> None:
        conn.client = self
        self.server = conn
        prelude = self.relay.attach(conn.state)
        if data is None:
            data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
            self.pending.clear()
        self._to_server(data, now, prelude)

    def _to_server(self, data: bytes, now: float = 0.0, prelude: bytes = b"") -> None:
        relay = self.relay
        try:
            out = relay.from_client(data)
        except m.ProtocolError as e:
            self._fatal(e.sqlstate, str(e))
            return
        except (ValueError, IndexError, struct.error):
            # A message whose body does not hold what its type needs (a name without its
            # terminating zero byte, ...): PostgreSQL's answer to it.
            self._fatal("08P01", "invalid message format")
            return
        if prelude:
            out = prelude + out     # the parameter sync goes in the same write as the request
        if out:
            self.server.transport.write(out)
            if not self._t_sent:
                self._t_sent = now or time.monotonic()
        if relay.to_client:
            self.transport.write(b"".join(relay.to_client))
            relay.to_client.clear()
        if relay.terminated:
            self.shutdown(None)
        elif not out and relay.can_release:
            # Nothing reached the server (e.g. only a Close the proxy answered): give it back.
            self._release()

    def server_data(self, data: bytes) -> None:
        relay = self.relay
        out = relay.from_server(data)
        if out:
            self.transport.write(out)
        if relay.to_server:
            self.server.transport.write(b"".join(relay.to_server))
            relay.to_server.clear()
        if not relay.queue and self._t_req:
            now = time.monotonic()
            st = self.proxy.stats
            st.query_latency.observe(now - self._t_req)
            if self._t_sent:
                st.db_latency.observe(now - self._t_sent)
            self._t_req = self._t_sent = 0.0
        if relay.fatal is not None:
            self.shutdown(relay.fatal)
        elif relay.releasable:
            self._release()

    def _release(self) -> None:
        conn = self.server
        self.server = None
        self.relay.detach()
        if self._paused_server:
            self._paused_server = False
            conn.transport.resume_reading()
        self.pool.release(conn)

    def server_lost(self, conn: ServerConnection) -> None:
        if self.server is conn:
            self.server = None
            self.relay.detach()
            self.relay.queue.clear()
            self.shutdown(m.fatal("08006", "the server connection was lost; the transaction, if any, is gone",
                                  detail=f"server connection {conn.id} closed unexpectedly"))

    def _give_back(self, conn: ServerConnection) -> None:
        """The client is gone: return its server connection clean, or close it."""
        relay = self.relay
        conn.client = None
        if relay is not None and relay.queue:
            # A request is still running on the server: stop it, and keep counting the
            # connection against the pool until its backend has really gone.
            self.proxy.spawn(_cancel_and_close(self.proxy, conn))
            return
        if relay is None or relay.batch_open or conn.state.dirty or \
                (relay.pinned and not _DISCARDABLE.issuperset(relay.session.pins)):
            # Session state we cannot vouch for (a LOADed library, a statement we could not
            # read), or an extended batch left without its Sync.
            self.pool.discard(conn)
            return
        relay.detach()
        if relay.status == b"I" and not relay.pinned:
            self.pool.release(conn)
        else:
            # Mid-transaction, or pinned: a rollback leaves session advisory locks and SQL
            # PREPAREs made in it, and the pinned state outlives any transaction, so the
            # connection is reset (DISCARD ALL) before anyone else gets it; cheaper than a new one.
            self.proxy.spawn(_rollback_and_release(self.pool, conn))

    def shutdown(self, final: bytes | None) -> None:
        """Close the client, after `final` (an ErrorResponse) if given."""
        if self.transport is None or self.transport.is_closing():
            return
        if final:
            self.transport.write(final)
        self.transport.close()


async def _cancel_and_close(proxy: Proxy, conn: ServerConnection) -> None:
    """Cancel what `conn` runs and ask its backend to exit; it stays in the pool's books (busy)
    until the server hangs up, when `connection_lost` forgets it and wakes a waiter."""
    try:
        await proxy.cancel_server(conn)
        if not conn.closed:
            conn.transport.write(m.TERMINATE_MSG)
            async with asyncio.timeout(10):
                await conn.wait_closed()
    except (ConnectionError, TimeoutError, OSError):
        pass
    finally:
        if not conn.closed:
            conn.transport.abort()


# Pins whose state DISCARD ALL removes (temp objects, cursors, LISTEN, advisory locks,
# SQL PREPAREs, sequence values, settings, role): the server connection is reset and reused.
_DISCARDABLE = frozenset(r for r in Reason if r not in (Reason.LOAD, Reason.UNPARSED, Reason.STATEMENT_TOO_LONG))


async def _rollback_and_release(pool: Pool, conn: ServerConnection) -> None:
    try:
        async with asyncio.timeout(5):
            _, error = await conn.simple_query("ROLLBACK")
            if error is None:
                _, error = await conn.simple_query("DISCARD ALL")
        if error is None and conn.state.status == b"I":
            conn.state.params = {}
            conn.state.prepared.clear()
            pool.release(conn)
            return
    except (ConnectionError, TimeoutError, OSError):
        pass
    pool.discard(conn)


async def run(config: Config, config_path: str | None = None, overrides: dict | None = None,
              ready: asyncio.Event | None = None, worker: WorkerInfo | None = None) -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the configuration."""
    proxy = Proxy(config, config_path, overrides, worker)
    await proxy.start()
    # Latency: what was built at start-up (modules, pglast's tables) is never garbage, so keep
    # the collector from walking it again, and collect the young generation less often (the
    # hot path's short-lived lists would otherwise trigger it every few hundred requests).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            proxy.reload()
        except Exception as e:   # keep serving with the old configuration
            log.error("reload failed, old configuration kept: %s", e)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError):
        pass
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await proxy.stop()
    log.info("unpinned stopped (pid %d)", os.getpid())
