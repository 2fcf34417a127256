"""The transaction-pooling relay between one client and whichever server connection
it holds at the moment. Pure: bytes in, bytes out, no sockets.

The shell (proxy.py) owns the sockets and the pool; it calls
  - `attach(server)` when the client gets a server connection (returns bytes to send first),
  - `from_client(data)` with client bytes (returns bytes for the server),
  - `from_server(data)` with server bytes (returns bytes for the client),
and reads `releasable` (hand the server connection back to the pool), `fatal` (send it
and close the client).

Transaction boundaries come only from ReadyForQuery. To know when every request has
been answered, and to slot in responses the proxy makes up (ParseComplete for a
statement the server connection already has, CloseComplete for a Close it keeps
from the server), each request that gets a response is queued with the message
types that end its response.

Relay is composed of one part per concern, each in its own module: requests.py (client ->
server), extended.py (statement names), restore.py (startup values kept across resets),
responses.py (server -> client); pending.py holds the queue's entries.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from unpinned.relay import large
from unpinned.relay.extended import ExtendedNames
from unpinned.relay.pending import QUERY_DISCARD, QUERY_PRELUDE
from unpinned.relay.requests import RequestWalk
from unpinned.relay.responses import ResponseWalk
from unpinned.relay.restore import Restore
from unpinned.relay.statements import ServerStatement, StatementRegistry
from unpinned.sql.sequences import PLPGSQL, SEQUENCES, handoff_flags
from unpinned.sql.text import param_sync_sql
from unpinned.state.policy import STATEMENT_LIMIT
from unpinned.state.server_state import ServerState
from unpinned.wire import messages as m

if TYPE_CHECKING:
    from unpinned.state.session import Session


_DISCARD_SEQUENCES = m.query("DISCARD SEQUENCES")


class Relay(RequestWalk, ResponseWalk, ExtendedNames, Restore):
    """One client's view of the protocol across server connections."""

    __slots__ = ("registry", "session", "statements", "server", "queue", "releasable", "fatal",
                 "skip_to_sync", "cin", "buffer_limit", "sbuf", "_need", "unnamed_c", "portal_c", "status",
                 "to_client", "to_server", "terminated", "_row", "stats", "batch_open", "held", "carried")

    def __init__(self, registry: StatementRegistry, session: "Session", stats=None,
                 buffer_limit: int = large.DEFAULT_BUFFER_LIMIT):
        self.registry = registry
        self.stats = stats if stats is not None else _NoStats()
        self.session = session                                   # the client's session state
        self.statements: dict[bytes, ServerStatement] = {}      # client name -> server statement
        self.server: ServerState | None = None
        self.queue: deque = deque()
        self.releasable = False
        self.fatal: bytes | None = None
        self.skip_to_sync = False
        self.cin = None            # an incomplete client message, held or streaming (large.py)
        self.buffer_limit = buffer_limit   # the longest client message held whole
        self.sbuf = b""            # incomplete server message
        self._need = 0             # bytes sbuf must reach before a message completes
        self.unnamed_c = None      # classification of the unnamed statement
        self.portal_c: dict[bytes, object] = {}
        self.status = b"I"
        self.to_client: list[bytes] = []   # responses the proxy makes up with nothing ahead of them
        self.to_server: list[bytes] = []   # the proxy's own requests decided while reading responses
        self.terminated = False
        self._row: list | None = None
        # Extended-protocol messages sent since the last Sync: the server holds unnamed
        # statements/portals (and maybe an implicit transaction) for us until that Sync.
        self.batch_open = False
        # A LISTEN's answer (and what the client sent after it) waiting for the proxy's own
        # listening connection (relay/carried.py); the client's SQL-prepared statements.
        self.held: list | None = None
        self.carried = None

    # ------------------------------------------------------------------ attach / detach

    def attach(self, server: ServerState) -> bytes:
        """Bind to a server connection; return the parameter sync to send ahead of the client's bytes."""
        self.server = server
        self.releasable = False
        if server.last_client is not self:
            server.last_client = self
            server.epoch += 1
        prelude = b"" if server.seq_owner is None or server.seq_owner is self.session else \
            self._discard_sequences(server)
        want = self.session.params
        if server.params == want:
            return prelude
        server.placeholders.update(n for n in want if "." in n)
        sql = param_sync_sql(server.params, want)
        server.params = dict(want)
        self.queue.append(QUERY_PRELUDE)
        self.stats.param_syncs += 1
        return prelude + m.query(sql)

    def _discard_sequences(self, server: ServerState) -> bytes:
        """Another client's statements may have set sequence values on this connection: they
        go before this client runs anything, so its currval()/lastval() read its own values
        or get PostgreSQL's own 55000 for a session without them, never someone else's."""
        server.seq_owner = None
        self.queue.append(QUERY_DISCARD)
        return _DISCARD_SEQUENCES

    def _handoff(self, c) -> None:
        """A statement (c None: unknown) that may leave something in this server connection for
        the next client runs: sequence values (the next client gets DISCARD SEQUENCES first), or
        PL/pgSQL loaded (the connection is closed when the client is done with it)."""
        # (A text past the statement limit is not scanned: taken as maybe setting sequences.)
        flags = SEQUENCES if c is None or c.byte_length > STATEMENT_LIMIT else handoff_flags(c)
        if flags & SEQUENCES and self.server.seq_owner is not self.session:
            self.server.seq_owner = self.session
            self.session.sequences_set(self.server)
        if flags & PLPGSQL:
            self.server.retire = "PL/pgSQL loaded"

    def detach(self) -> ServerState | None:
        if self.carried is not None:
            self.carried.settle(self.queue)
        server, self.server = self.server, None
        self.releasable = False
        self.portal_c.clear()
        return server

    @property
    def pinned(self) -> bool:
        return self.session.pinned

    @property
    def can_release(self) -> bool:
        return not self.queue and self.status == b"I" and not self.batch_open and not self.session.pins \
            and not (self.cin and self.cin.streaming) \
            and self.held is None       # (cin: half a message is on the server; held: a LISTEN waits)


class _NoStats:
    """Counters nobody reads (unit tests of the relay alone)."""
    query_requests = param_syncs = reprepares = 0
