"""One client socket: who it is, and the bookkeeping every stage of its life shares.

A client's connection goes through stages, each its own asyncio protocol on the same
transport (`transport.set_protocol` hands over): `login.Login` (startup, TLS,
authentication), then `client.PooledClient` (the data path) or
`admin_console.AdminClient` (the virtual admin database).
"""
from __future__ import annotations

import asyncio
import time

from unpinned.frontend.shared import Shared
from unpinned.wire import messages as m


class ClientConnection(asyncio.Protocol):
    """The identity of one client and what all its stages do alike."""

    # Slots: 10,000 idle clients must stay small, and the hot path reads these on every message.
    __slots__ = ("shared", "config", "transport", "id", "addr", "user", "database", "application_name", "pool",
                 "relay", "server", "closing", "last_active", "connected_at", "key", "tls", "endpoint")

    active = False      # logged in
    admin = False       # the admin console
    acquiring = False   # waiting for a server connection

    def __init__(self, shared: Shared):
        self.shared = shared
        self.config = shared.config
        self.transport: asyncio.Transport | None = None
        self.id = 0
        self.addr = ""
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.pool = None
        self.relay = None
        self.server = None
        self.closing = False
        self.last_active = time.monotonic()
        self.connected_at = time.time()
        self.key = (0, 0)
        self.tls = False
        self.endpoint = None    # config.Endpoint it came through; None: `listen` (the writer)

    def take_over(self, old: "ClientConnection") -> None:
        """Become the next stage of `old`'s connection: same socket, same identity."""
        for name in ClientConnection.__slots__:
            setattr(self, name, getattr(old, name))
        shared = self.shared
        shared.clients.discard(old)
        shared.clients.add(self)
        if shared.by_key.get(self.key) is old:
            shared.by_key[self.key] = self
        self.transport.set_protocol(self)

    def connection_lost(self, exc) -> None:
        self.closing = True
        shared = self.shared
        shared.clients.discard(self)
        if shared.worker is not None:   # (several processes: the shared count; a call less otherwise)
            shared.count_changed()
        shared.by_key.pop(self.key, None)

    def shutdown(self, final: bytes | None) -> None:
        """Close the client, after `final` (an ErrorResponse) if given."""
        if self.transport is None or self.transport.is_closing():
            return
        if final:
            self.transport.write(final)
        self.transport.close()

    def _fatal(self, code: str, text: str) -> None:
        self.shutdown(m.fatal(code, text))


class Staged(ClientConnection):
    """The slots of a login (frontend/login.py) and of the pooled client it becomes
    (frontend/client.py), declared once. With one layout, a `Login` that is done becomes a
    `PooledClient` by changing its class: no second object, nothing copied, the same entry in
    the client sets (a connection per transaction, pgbench -C, pays for every step of a
    login). Neither subclass adds slots; `take_over` remains for the admin console."""

    __slots__ = ("_buf", "_auth", "_authenticated", "_secret", "_wanted", "_wanted_key",           # Login
                 "pending", "acquiring", "_t_req", "_t_sent", "_paused_server", "_paused_self",     # PooledClient
                 "preferred", "customs")
