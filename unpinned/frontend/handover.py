"""A client at rest between transactions: when it may be closed (graceful shutdown) or
moved to another process (takeover restart), and what of it moves.

A pooled client owns no server connection between transactions: all it is, is its socket
and its session as the proxy keeps it (startup parameters, the parameters it SET since,
its named prepared statements as their Parse messages, its cancel key). That snapshot is
plain JSON; the socket travels beside it (ops/takeover.py passes it with SCM_RIGHTS) and
`restore` makes a PooledClient of both in the new process.

What cannot move: a client mid-transaction (it moves once its transaction ends), a pinned
one (its state lives in its server connection), a TLS one (the TLS session lives in this
process's memory), the admin console and logins in progress.
"""
from __future__ import annotations

import asyncio
import time

from unpinned.frontend.client import PooledClient
from unpinned.frontend.shared import Shared
from unpinned.relay.carried import SqlPrepared
from unpinned.relay.relay import Relay
from unpinned.relay.statements import ServerStatement
from unpinned.state.session import Session
from unpinned.telemetry.pinlog import ClientInfo
from unpinned.wire import messages as m

VERSION = 1      # of the snapshot: a new process refuses one it does not know

# What a client closed by the proxy's shutdown hears, in PostgreSQL's words (57P01 is what
# a server shut down with pg_ctl -m fast sends its clients).
SHUTDOWN_TEXT = "terminating connection due to administrator command"


def shutdown_error(detail: str | None = None) -> bytes:
    return m.fatal("57P01", SHUTDOWN_TEXT, detail=detail)


LINGER = 2.0    # seconds a closed client's socket keeps reading, so its last error is not lost


def close_gently(client, final: bytes) -> None:
    """Close a client at rest with `final`, so that it reads it even if it sent a request at
    the same moment: write, half-close, and discard what arrives until the client closes (or
    LINGER seconds). Closing with unread bytes makes the kernel send a reset, and a reset can
    destroy the error before the client reads it ("server closed the connection unexpectedly")."""
    transport = client.transport
    if transport is None or transport.is_closing():
        return
    transport.write(final)
    if not transport.can_write_eof():      # TLS: no half-close
        transport.close()
        return
    client.closing = True
    transport.write_eof()
    transport.set_protocol(_Lingering(client))
    transport.resume_reading()
    asyncio.get_running_loop().call_later(LINGER, transport.close)


class _Lingering(asyncio.Protocol):
    """A closed client's socket until the client hangs up: its bytes are dropped, its end is
    the client's own (so the books are kept as for any closed client)."""

    def __init__(self, client):
        self.client = client

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self):
        return False        # close

    def connection_lost(self, exc) -> None:
        self.client.connection_lost(exc)


class Watched(PooledClient):
    """A PooledClient that reports each moment it comes to rest to `shared.on_idle`.

    Swapped in place (`client.__class__ = Watched`, same slots) while the proxy drains, so the
    data path of normal operation carries no check for it."""

    __slots__ = ()

    def server_data(self, data: bytes) -> None:
        super().server_data(data)
        self._maybe_idle()

    def data_received(self, data: bytes) -> None:
        hook = self.shared.on_request
        if hook is not None and at_rest(self) and hook(self):
            return
        super().data_received(data)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        hook = self.shared.on_idle
        if hook is not None and at_rest(self):
            hook(self)


def watch(client) -> None:
    if isinstance(client, PooledClient) and not isinstance(client, Watched):
        client.__class__ = Watched
        if client.transport is not None:
            # The loop keeps the protocol's bound methods (uvloop caches data_received): set
            # it again so that they are Watched's.
            client.transport.set_protocol(client)


def at_rest(client) -> bool:
    """Between transactions with nothing in flight: closing it now loses no work, and the
    client is waiting for nothing from us (a pinned client may hold its server connection)."""
    if not client.active or client.admin or client.closing:
        return False
    relay = client.relay
    return (not client.acquiring and not client.pending and relay is not None and not relay.queue
            and relay.status == b"I" and not relay.batch_open and relay.cin is None and not relay.to_client
            and client.transport is not None and not client.transport.is_closing())


def why_not_movable(client) -> str | None:
    """None when the client can be handed to another process now, else why not (yet)."""
    if not at_rest(client):
        return "busy"
    if client.tls:
        return "tls"
    if client.server is not None or client.relay.session.pins:
        return "pinned"
    session = client.relay.session
    # State the session engine is still settling with a server connection.
    if session._w_params is not None or session._awaiting_check is not None or session._unknown_done:
        return "busy"
    # Carried state that lives in this process (relay/carried.py): moves with nothing, kept here.
    if session.listening is not None and (session.listening.channels or session.listening.pending):
        return "listening"
    if client.relay.carried is not None and not client.relay.carried.settled():
        return "busy"      # a PREPARE or DEALLOCATE whose outcome is not known yet
    if client.transport.get_write_buffer_size():
        return "busy"      # our last answer is not out yet: the next writer must come after it
    return None


def snapshot(client) -> dict:
    """The client's session as JSON-able data (bytes as latin-1 text: lossless)."""
    relay = client.relay
    session = relay.session
    return {
        "version": VERSION,
        "user": client.user, "database": client.database, "application_name": client.application_name,
        "addr": client.addr, "key": list(client.key), "connected_at": client.connected_at,
        "endpoint": client.endpoint.name if client.endpoint is not None else None,
        "startup": session.startup, "params": session.params, "customs": sorted(session.customs),
        "statements": {name.decode("latin-1"): st.parse_msg.decode("latin-1")
                       for name, st in relay.statements.items()},
        "sql_prepared": relay.carried.export() if relay.carried is not None else [],
    }


def restore(shared: Shared, snap: dict) -> "Restored":
    """A PooledClient for a handed-over socket, with the session it had (no transport yet:
    it arrives in connection_made)."""
    if snap.get("version") != VERSION:
        raise ValueError(f"client snapshot version {snap.get('version')!r}, this proxy reads {VERSION}")
    client = Restored(shared)
    client.id = shared.new_client_id()
    client.user, client.database = snap["user"], snap["database"]
    client.application_name = snap["application_name"]
    client.addr = snap["addr"]
    client.connected_at = snap["connected_at"]
    client.endpoint = _endpoint(shared, snap.get("endpoint"))
    client.pool = shared.pool_for(client.database, client.user, client.endpoint)
    info = ClientInfo(client.id, client.addr, client.user, client.database, client.application_name)
    session = Session(snap["startup"], info, shared.pinlog, shared.session_options)
    session.params = dict(snap["params"])
    # The custom placeholders its session has (the pool gives it only server connections whose
    # placeholders it would have too): a snapshot from before they were kept says what it set.
    session.customs.update(snap.get("customs", (n for n in session.params if "." in n)))
    relay = client.relay = Relay(shared.registry, session, shared.stats)
    client.customs = session.customs
    session.subscribe = client._subscriptions      # LISTEN carried here too (frontend/listening.py)
    for name, parse in snap["statements"].items():
        relay.statements[name.encode("latin-1")] = _statement(shared, parse.encode("latin-1"))
    if snap.get("sql_prepared"):
        relay.carried = SqlPrepared.imported(shared.registry, snap["sql_prepared"])
    key = tuple(snap["key"])
    if key not in shared.by_key:     # a cancel request with the old key still reaches it
        client.key = key
        shared.by_key[key] = client
    return client


def _endpoint(shared: Shared, name: str | None):
    """The endpoint a client came through, by name, in this process's configuration: a reader
    endpoint's client stays on the readers."""
    if name is None:
        return None
    for ep in shared.config.all_endpoints()[1:]:
        if ep.name == name:
            return ep
    raise ValueError(f"the client came through endpoint {name!r}, which this configuration does not have")


def _statement(shared: Shared, parse_msg: bytes) -> ServerStatement:
    """The old process's server-side statement, re-registered here: the same query text and
    types get this process's name for them (shared with every client that prepares the same),
    or a private one when the old one was private (text lexed with backslashes)."""
    body = parse_msg[5:]
    after_name = body[body.index(b"\x00") + 1:]
    query = after_name[:after_name.index(b"\x00")]
    registry = shared.registry
    return registry.private(after_name) if b"\\" in query else registry.get(after_name)


class Restored(PooledClient):
    """A handed-over client: logged in already, its socket wrapped by this process's loop."""

    __slots__ = ()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.last_active = time.monotonic()
        shared = self.shared
        shared.clients.add(self)
        shared.count_changed()


class Released(asyncio.Protocol):
    """What an old process's transport holds once its socket went to the new process: it
    must neither read nor answer any more."""

    def data_received(self, data: bytes) -> None:    # pragma: no cover - reading is paused
        pass


def let_go(client) -> None:
    """Forget a client whose socket another process now serves, without a word to it: the
    socket stays open there (closing this process's descriptor sends nothing)."""
    shared = client.shared
    client.closing = True
    shared.clients.discard(client)
    shared.count_changed()
    if shared.by_key.get(client.key) is client:
        del shared.by_key[client.key]
    transport = client.transport
    transport.set_protocol(Released())
    transport.close()
