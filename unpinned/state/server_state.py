"""What the proxy knows about one server connection's session (pure data)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import count
from typing import Any

_server_ids = count(1)


def number_servers_from(start: int, step: int) -> None:
    """Server connection ids as start, start+step, ...: several workers' ids never collide."""
    global _server_ids
    _server_ids = count(start, step)


@dataclass(slots=True)
class ServerPrepared:
    """Which server-side statements one server connection holds, least recently used first."""
    limit: int = 1000
    names: OrderedDict = field(default_factory=OrderedDict)

    def has(self, name: bytes) -> bool:
        if name in self.names:
            self.names.move_to_end(name)
            return True
        return False

    def add(self, name: bytes) -> bytes | None:
        """Record `name`; return a name evicted to stay within the limit, if any."""
        self.names[name] = None
        self.names.move_to_end(name)
        if len(self.names) > self.limit:
            return self.names.popitem(last=False)[0]
        return None

    def discard(self, name: bytes) -> None:
        self.names.pop(name, None)

    def clear(self) -> None:
        self.names.clear()


@dataclass(slots=True)
class ServerState:
    """What the proxy knows about one server connection's session."""
    id: int = field(default_factory=lambda: next(_server_ids))
    pid: int = 0
    secret: int = 0
    # Session parameters this connection has been given beyond its own defaults: name -> value text.
    params: dict = field(default_factory=dict)
    prepared: ServerPrepared = field(default_factory=ServerPrepared)
    status: bytes = b"I"
    # ParameterStatus values reported at login (server_version, TimeZone, ...).
    reported: dict = field(default_factory=dict)
    # Bumped whenever a different client borrows it (currval guard: "no other client since").
    epoch: int = 0
    last_client: Any = None
    # The proxy's own parameter sync failed on it: `params` is not what it has. Never pool it.
    dirty: bool = False
    # The client session (state.session.Session) whose statements may have set this connection's
    # sequence state (what currval()/lastval() read), or None when it has none: another client
    # gets it only after a DISCARD SEQUENCES (relay.attach).
    seq_owner: object = None
    # Server-side statements to close before the next Parse here (stale copies, see relay._drop_copy).
    to_close: list = field(default_factory=list)
    # Custom (dotted) parameters it has a placeholder for: once set (even then RESET), PostgreSQL
    # keeps the variable for the session's life, so current_setting(name, true) says '' and not
    # NULL. Only a client whose own session would have them all gets it (backend.pool).
    placeholders: set = field(default_factory=set)
    # Why no other client may have it (temp buffers allocated, PL/pgSQL loaded), or None: it is
    # kept for the client that did it (`reserved_for`, its connection as on a server of its
    # own) while that client lives, and closed rather than given to anyone else.
    retire: str | None = None
    reserved_for: Any = None
