"""Logging a client in: startup packet, TLS, authentication, its startup parameters.

Login runs from data_received, step by step, with no task of its own: a connection per
transaction (pgbench -C, serverless clients) must cost as little as a query. Only a
first-seen set of startup parameters waits for the server (see _server_parameters).
When it is done the connection becomes a `PooledClient` (or an `AdminClient`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import struct

from unpinned.backend.pool import BorrowTimeout
from unpinned.backend.server import ServerError
from unpinned.frontend.admin_console import AdminClient
from unpinned.frontend.client import PooledClient
from unpinned.frontend.connection import ClientConnection, Staged
from unpinned.frontend.shared import Shared
from unpinned.relay.relay import Relay
from unpinned.sql.text import param_sync_sql
from unpinned.state.session import Session
from unpinned.telemetry.pinlog import ClientInfo
from unpinned.wire import messages as m
from unpinned.wire.auth import AuthFailed, ClientAuth

log = logging.getLogger("unpinned")

RDS_OPTIONS_TEXT = "Feature not supported: RDS Proxy currently doesn't support command-line options."
RDS_REPLICATION_TEXT = "Feature not supported: RDS Proxy currently doesn't support streaming replication mode."
RDS_VERSION_TEXT = "Feature not supported: RDS Proxy supports only version 3.0 of the PostgreSQL messaging protocol."
# Startup keys that are not session parameters.
_NOT_GUCS = {"user", "database", "options", "replication"}
_ENCRYPTION_REQUESTS = frozenset((m.SSL_REQUEST, m.GSSENC_REQUEST))
TLS_HANDSHAKE = object()    # Login._auth while the TLS handshake runs
MAX_STARTUP_PACKET = 10000  # PostgreSQL's own limit (MAX_STARTUP_PACKET_LENGTH)
MAX_AUTH_MESSAGE = 65536
MAX_BEFORE_LOGIN = 1 << 20  # bytes a client may send ahead of the end of its login
# BackendKeyData (pid, secret) and ReadyForQuery(idle), the end of every login, in one pack.
_KEY_AND_READY = struct.Struct("!5sII6s")
_KEY_HEAD = b"K\x00\x00\x00\x0c"
_tuple_new = tuple.__new__     # (a ClientInfo made without a Python call)

# StartupMessage packet (with its length) -> what _startup makes of it: (user, database,
# application_name, session parameters, their frozenset). The same packet (a pooled
# application's, pgbench's) comes back at every connection: parsed once. Only packets that
# need nothing else (protocol 3.0, no _pq_ extension, no options, no replication) are kept;
# nothing in an entry is ever changed (Session copies the parameters it changes).
_STARTUPS: dict[bytes, tuple[str, str, str, dict[str, str], frozenset]] = {}
MAX_STARTUPS = 256


# Cancel keys come from the operating system's CSPRNG, drawn in blocks (one system call per
# 512 keys instead of one per login). A forked worker must not reuse its parent's block.
_entropy: list[int] = []
os.register_at_fork(after_in_child=_entropy.clear)
_BLOCK = struct.Struct("=512Q")


def _random64() -> int:
    if not _entropy:
        _entropy.extend(_BLOCK.unpack(os.urandom(_BLOCK.size)))
    return _entropy.pop()


# Trust: the exchange is over before it starts, the same for everyone.
_TRUSTED = ClientAuth("trust", "", None)
_TRUSTED.start()


class Login(Staged):
    """A client from its first byte until it is logged in; then the same object goes on as a
    PooledClient (`_become_pooled`)."""

    __slots__ = ()      # (frontend/connection.py: Staged)

    def __init__(self, shared: Shared, endpoint=None):
        ClientConnection.__init__(self, shared)     # (not super(): an object less per login)
        self.endpoint = endpoint
        self.id = shared.new_client_id()
        self._buf = bytearray()          # bytes before login completes
        self._auth: ClientAuth | None = None
        self._authenticated = False
        self._secret = None
        self._wanted: dict[str, str] | None = None     # (set by the startup packet)
        self._wanted_key: frozenset | None = None    # frozenset(_wanted.items()), made once
        self.acquiring = False           # (a slot here: PooledClient's)

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        shared = self.shared
        shared.clients.add(self)
        if shared.worker is not None:   # (several processes: the shared count; a call less otherwise)
            shared.count_changed()
        shared.stats.clients_received += 1

    def data_received(self, data: bytes) -> None:
        if self._auth is None and not self._buf and type(data) is bytes:     # (TLS may hand a bytearray)
            known = _STARTUPS.get(data)
            if known is not None and not self.transport.is_closing():
                # The usual first read: a startup packet seen before, whole and alone.
                try:
                    self._known_startup(known)
                    if self._auth is _TRUSTED:      # (what _login_step does next, without its loop)
                        self._authenticated = True
                        self._after_auth()
                    else:
                        self._login_step()
                except Exception as e:
                    self._login_failed(e)
                return
        buf = self._buf
        buf += data
        if len(buf) > MAX_BEFORE_LOGIN:
            self.shutdown(m.fatal("08P01", "too much data before login"))
            return
        if self.transport.is_closing():
            return
        try:    # (_login_data, inlined: a connection per transaction pays for every call)
            self._login_step()
        except Exception as e:
            self._login_failed(e)

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
                if ln < 8 or ln > MAX_STARTUP_PACKET:
                    raise m.ProtocolError("invalid length of startup packet")
                if len(buf) < ln:
                    return
                packet = bytes(buf[:ln])
                del buf[:ln]
                known = _STARTUPS.get(packet)
                if known is not None:
                    self._known_startup(known)
                    continue
                body = packet[4:]
                code, params = m.parse_startup(body)
                if code == m.SSL_REQUEST and self.shared.tls_context is not None and not self.tls:
                    if buf:
                        raise m.ProtocolError("received unencrypted data after SSL request")
                    self.transport.write(m.SSL_ACCEPTED)
                    self.transport.pause_reading()      # the next bytes are the TLS handshake
                    self._auth = TLS_HANDSHAKE
                    self.shared.spawn(self._start_tls())
                    return
                if code in _ENCRYPTION_REQUESTS:
                    self.transport.write(m.SSL_REFUSED)
                    continue
                if code == m.CANCEL_REQUEST:
                    if len(body) >= 12:
                        pid, secret = struct.unpack_from("!II", body, 4)
                        self.shared.spawn(self.shared.cancel(pid, secret))
                    self.shutdown(None)
                    return
                self._startup(code, params, packet)
            elif self._auth is TLS_HANDSHAKE:
                return      # bytes wait in the TLS layer until the handshake is done
            elif not self._auth.done:
                if len(buf) < 5:
                    return
                ln = m.unpack_i32(buf, 1)[0]
                if buf[0] != 112:  # 'p'
                    raise m.ProtocolError(f"expected message b'p', got {bytes(buf[:1])!r}")
                if ln < 4 or ln > MAX_AUTH_MESSAGE:
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
                loop.start_tls(self.transport, self, self.shared.tls_context, server_side=True),
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
            self.shared.stats.clients_failed_auth += 1
            log.info("client %d (%s) failed authentication as %r: %s", self.id, self.addr, self.user, e)
            self.shutdown(m.fatal(e.sqlstate, str(e), detail=e.detail))
        elif isinstance(e, ServerError):
            self._fatal(e.sqlstate, e.fields.get("M", "server error"))
        elif isinstance(e, BorrowTimeout):
            self.shutdown(m.fatal("53300", str(e), detail=e.detail))
        elif isinstance(e, TimeoutError):
            self._fatal("08P01", "timeout during login")
        elif isinstance(e, (ConnectionError, asyncio.CancelledError)):
            self.shutdown(None)
        else:
            log.exception("client %d (%s): login failed", self.id, self.addr, exc_info=e)
            self._fatal("XX000", "internal error during login")

    def login_timed_out(self) -> None:
        self._login_failed(TimeoutError())

    def _startup(self, code: int, params: dict[str, str], packet: bytes = b"") -> None:
        """The StartupMessage: check it, then start authentication."""
        cfg = self.config
        rds = cfg.mode == "rds"
        if code >> 16 != 3:
            raise m.ProtocolError(RDS_VERSION_TEXT if rds else
                                  f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                                  "server supports 3.0 to 3.0", "0A000")
        # Protocol extensions (_pq_.*) are refused; the other parameters that are not user,
        # database, options or replication are session parameters (options' come first).
        extensions: list[str] = []
        gucs: dict[str, str] = {}
        for k, v in params.items():
            if k.startswith("_pq_."):
                extensions.append(k)
            elif k not in _NOT_GUCS:
                gucs[k.lower()] = v
        if code & 0xFFFF or extensions:
            self.transport.write(m.negotiate_protocol_version(0, extensions))
        self.user = params.get("user", "")
        if not self.user:
            raise AuthFailed("no PostgreSQL user name specified in startup packet", "28000")
        self.database = params.get("database") or self.user
        self.application_name = params.get("application_name", "")
        self._admit()
        replication = params.get("replication", "").lower()
        if replication and replication not in ("false", "0", "off", "no"):
            raise m.ProtocolError(RDS_REPLICATION_TEXT if rds else
                                  "replication connections are not supported by this proxy", "0A000")
        options = params.get("options")
        if options and options.strip():
            if rds:
                raise m.ProtocolError(RDS_OPTIONS_TEXT, "0A000")
            try:
                gucs = {**m.parse_options(options), **gucs}
            except ValueError as e:
                raise m.ProtocolError(str(e), "22023") from None
        elif packet and not (code & 0xFFFF or extensions or replication) and len(_STARTUPS) < MAX_STARTUPS:
            # (what the next login with this packet skips: see _known_startup)
            _STARTUPS[packet] = (self.user, self.database, self.application_name, gucs, frozenset(gucs.items()))
        self._wanted = gucs
        self._start_auth()

    def _known_startup(self, known: tuple[str, str, str, dict[str, str], frozenset]) -> None:
        """A StartupMessage seen before (_STARTUPS): _startup's checks that depend on more than
        the packet, in its order."""
        self.user, self.database, self.application_name, self._wanted, self._wanted_key = known
        self._admit()
        self._start_auth()

    def _admit(self) -> None:
        """What a startup packet is checked against besides itself: TLS, the proxy's client limit."""
        cfg = self.config
        if cfg.require_tls and not self.tls:
            raise AuthFailed(f'connection for user "{self.user}" requires TLS (sslmode=require)', "28000")
        if self.shared.client_count() > cfg.max_client_connections:
            raise m.ProtocolError(f"The maximum number of client connections to the proxy exceeded "
                                  f"{cfg.max_client_connections}.", "53300")

    def _start_auth(self) -> None:
        # Authenticate before any server connection is opened for this user.
        cfg = self.config
        if cfg.auth == "trust":
            self._secret = cfg.users.get(self.user)     # (read for whether it may use the admin console)
            self._auth = _TRUSTED
            return
        secret = cfg.secret_for(self.user)
        self._secret = secret
        if secret is None:
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
        self.pool = pool = self.shared.pool_for(self.database, self.user, self.endpoint)
        if self._wanted_key is None:
            self._wanted_key = frozenset(self._wanted.items())
        head = pool.login_messages.get(self._wanted_key)
        if head is not None:    # (most logins: these startup parameters were seen before)
            self._logged_in(head)
            return
        reported = self._known_parameters(self._wanted)
        if reported is not None:
            self._logged_in(self._login_head(reported))
        else:
            self.shared.spawn(self._check_parameters_then_log_in())

    async def _check_parameters_then_log_in(self) -> None:
        try:
            reported = await self._server_parameters(self._wanted)
        except Exception as e:
            self._login_failed(e)
            return
        if not self.closing:
            self._logged_in(self._login_head(reported))

    def _login_head(self, reported: dict[str, str]) -> bytes:
        """AuthenticationOk and the ParameterStatus block: the same for every client with these
        startup parameters, so encoded once per pool (login cost matters for connect-per-request
        clients). `reported` for a key never changes: the pool's first report plus what the
        server answered the first time these parameters were tried."""
        head = m.AUTH_OK + b"".join(m.parameter_status(k, v) for k, v in reported.items())
        cache = self.pool.login_messages
        if len(cache) < 1000:
            cache[self._wanted_key] = head
        return head

    def _logged_in(self, head: bytes) -> None:
        info = _tuple_new(ClientInfo, (self.id, self.addr, self.user, self.database, self.application_name))
        shared = self.shared
        # (Positional arguments: a keyword makes calling a class build a dict.)
        self.relay = Relay(shared.registry, Session(self._wanted, info, shared.pinlog, shared.session_options),
                           shared.stats, self.config.max_client_message_buffer)
        pid, secret_key = self._new_key()
        self.transport.write(head + _KEY_AND_READY.pack(_KEY_HEAD, pid, secret_key, m.READY_IDLE))
        shared.stats.clients_setup_ok += 1
        if log.isEnabledFor(logging.DEBUG):     # (log.debug itself costs a login over 1% more, even when off)
            log.debug("client %d (%s) logged in as %s to %s", self.id, self.addr, self.user, self.database)
        self._become_pooled()

    def _become_pooled(self) -> None:
        """Logged in: this object goes on as a PooledClient (the same slots, see Staged in
        frontend/connection.py), with any bytes the client sent ahead."""
        buf = self._buf
        self.__class__ = PooledClient
        self._buf = self._auth = self._secret = self._wanted = self._wanted_key = None  # the login's, done with
        self._start_pooled()
        self.relay.session.subscribe = self._subscriptions
        self.customs = self.relay.session.customs       # the pool matches placeholders by it
        # The loop keeps the protocol's bound methods (uvloop caches data_received): Login's
        # until it is set again.
        self.transport.set_protocol(self)
        if buf:
            self.data_received(bytes(buf))

    def _start_admin(self) -> None:
        pid, secret_key = self._new_key()
        reported = {"server_version": "17.0 (unpinned admin console)", "server_encoding": "UTF8",
                    "client_encoding": "UTF8", "DateStyle": "ISO, MDY", "integer_datetimes": "on",
                    "standard_conforming_strings": "on", "TimeZone": "UTC", "application_name": self.application_name}
        self.transport.write(m.AUTH_OK + b"".join(m.parameter_status(k, v) for k, v in reported.items()) +
                             m.backend_key_data(pid, secret_key) + m.ready_for_query(b"I"))
        self._hand_over(AdminClient(self.shared))

    def _hand_over(self, successor: ClientConnection) -> None:
        """Logged in to the admin console: the next stage takes the socket, with any bytes sent ahead."""
        successor.take_over(self)
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            successor.data_received(data)

    def _new_key(self) -> tuple[int, int]:
        worker = self.shared.worker
        while True:
            raw = _random64()
            key = (raw >> 33, raw & 0xFFFFFFFF)
            if worker is not None:   # the pid names the worker, so any worker can route a cancel
                pid = key[0] - key[0] % worker.count + worker.index
                key = (pid if pid < 1 << 31 else pid - worker.count, key[1])
            if key not in self.shared.by_key:
                break
        self.key = key
        self.shared.by_key[key] = self
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
                conn.state.placeholders.update(n for n in wanted if "." in n)
                for t, body in msgs:
                    if t == b"S":
                        name, value = m.split_parameter_status(body)
                        overrides[name] = value
                pool.checked_params[key] = overrides
            return {**pool.reported, **overrides}
        finally:
            if conn is not None:
                pool.release(conn)
