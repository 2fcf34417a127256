"""A logged-in client on the data path: it borrows a server connection for each
transaction and moves bytes through its relay (relay/relay.py decides everything
protocol-shaped; this class only moves bytes, waits for the pool, and cleans up)."""
from __future__ import annotations

import asyncio
import struct
import time

from unpinned.backend.pool import BorrowTimeout
from unpinned.backend.server import ServerConnection, ServerError, send_cancel
from unpinned.frontend.connection import Staged
from unpinned.frontend.listening import ListeningClient
from unpinned.frontend.shared import Shared
from unpinned.sql.effects import Reason
from unpinned.telemetry.buckets import bucket
from unpinned.wire import messages as m


class PooledClient(ListeningClient, Staged):
    """Made by a Login that is done (`Login._become_pooled`: the same object, its class
    changed) or, for a handed-over client, directly (frontend/handover.py)."""

    __slots__ = ()      # (frontend/connection.py: Staged)

    active = True

    def __init__(self, shared: Shared):
        super().__init__(shared)
        self._start_pooled()

    def _start_pooled(self) -> None:
        self.pending: list[bytes] = []  # client bytes waiting for a server connection
        self.acquiring = False
        self._t_req = 0.0              # when the oldest unanswered request arrived
        self._t_sent = 0.0             # when it went to the server
        self._paused_server = False
        self._paused_self = False      # reading stopped: pending holds the buffer limit already
        # What the pool reads at each borrow (backend/pool.py Borrower), kept as plain attributes:
        # the server connection to give it when idle ("last owner"), its previous one when that
        # holds sequence values this client's statements set (so currval()/lastval() answer as
        # on a connection of its own), set at release; the custom parameter placeholders its
        # session would have (the session's own set, set with the relay).
        self.preferred: ServerConnection | None = None
        self.customs: set | frozenset = frozenset()

    def data_received(self, data: bytes) -> None:
        self.last_active = now = time.monotonic()
        if not self._t_req:
            self._t_req = now
        if self.server is not None:
            self._to_server(data, now)
        elif self.pending or self.acquiring:
            self.pending.append(data)
            self._bound_pending()
            if not self.acquiring:
                self._acquire()
        elif data[:1] == b"X":
            self.shutdown(None)
        else:
            # The common case: a request with no server connection yet, and one idle.
            conn = self.pool.borrow(self, now)
            if conn is None:
                self.pending.append(data)
                self.acquiring = True
                if len(data) > self.relay.buffer_limit:     # (pending holds only this read)
                    self._bound_pending()
            else:
                self._attach(conn, data, now)

    def connection_lost(self, exc) -> None:
        Staged.connection_lost(self, exc)      # (not super(): an object less per connection)
        self.shared.stats.clients_closed += 1
        if self.relay is not None:
            session = self.relay.session
            if session.listening is not None:
                session.listening.close()
            # A client's cycle (client -> relay -> session -> this bound method), broken: its
            # objects and its transport go with their last reference, not at a garbage collection
            # that first walks them all (a connection per transaction makes many).
            session.subscribe = None
        conn = self.server
        if conn is not None:
            self.server = None
            self._give_back(conn)
        kept = self.preferred
        if kept is not None and kept.state.reserved_for is self:
            kept.state.reserved_for = None
            if kept is not conn and not isinstance(self.pool, _Lost):
                self.pool.discard(kept)     # idle, and no one else may have it

    def pause_writing(self) -> None:
        if self.server is not None and not self._paused_server:
            self._paused_server = True
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._paused_server:
            self._paused_server = False
            if self.server is not None:
                self.server.transport.resume_reading()

    def _acquire(self) -> None:
        conn = self.pool.borrow(self)
        if conn is not None:
            self._attach(conn)
        else:
            self.acquiring = True

    def borrowed(self, conn: ServerConnection) -> None:
        self.acquiring = False
        self._attach(conn, None, conn.last_used)    # (the time the pool handed it: backend/pool.py _hand)

    def borrow_failed(self, exc: Exception) -> None:
        self.acquiring = False
        if isinstance(exc, ServerError):
            self._fatal(exc.sqlstate, exc.fields.get("M", "could not connect to the server"))
        elif isinstance(exc, BorrowTimeout):
            self.shutdown(m.fatal("53300", str(exc), detail=exc.detail))
        else:
            self._fatal("08006", f"could not connect to the server: {exc}")

    def cancel(self) -> None:
        """A CancelRequest with this client's key reaches the server connection it uses now."""
        if self.server is None:
            self.cancel_waiting()
        else:
            self.shared.spawn(send_cancel(self.config.upstream, self.server))

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

    def _bound_pending(self) -> None:
        """Waiting for a server connection, the client's bytes are held here: no more than the
        relay would hold of one message (reading resumes once a server connection is there)."""
        if not self._paused_self and sum(map(len, self.pending)) > self.relay.buffer_limit:
            self._paused_self = True
            self.transport.pause_reading()

    def _attach(self, conn: ServerConnection, data: bytes | None = None, now: float = 0.0) -> None:
        conn.client = self
        self.server = conn
        if self._paused_self:
            self._paused_self = False
            self.transport.resume_reading()
        prelude = self.relay.attach(conn.state)
        if data is None:
            data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
            self.pending.clear()
        self._to_server(data, now, prelude)

    def _to_server(self, data: bytes, now: float = 0.0, prelude: bytes = b"") -> None:
        relay = self.relay
        subs = relay.session.listening
        if subs is not None:
            data = self._from_listening_client(subs, data)      # (frontend/listening.py)
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
        if subs is not None and subs.queue and not subs.holding and self.notify_idle():
            self.transport.write(subs.take())
        if relay.terminated:
            self.shutdown(None)
        elif not out and relay.can_release:
            # Nothing reached the server (e.g. only a Close the proxy answered): give it back.
            self._release()

    def server_data(self, data: bytes) -> None:
        relay = self.relay
        out = relay.from_server(data)
        subs = relay.session.listening
        if subs is not None:
            out = self._notifications(subs, out)
        if out:
            self.transport.write(out)
        if relay.to_server:
            self.server.transport.write(b"".join(relay.to_server))
            relay.to_server.clear()
        now = 0.0
        if not relay.queue and self._t_req:
            now = time.monotonic()
            st = self.shared.stats
            # Histogram.observe inlined (telemetry/counters.py): once or twice every transaction.
            d = now - self._t_req
            h = st.query_latency
            h.counts[bucket(d)] += 1
            h.sum += d
            h.count += 1
            if self._t_sent:
                d = now - self._t_sent
                h = st.db_latency
                h.counts[bucket(d)] += 1
                h.sum += d
                h.count += 1
            self._t_req = self._t_sent = 0.0
        if relay.fatal is not None:
            self.shutdown(relay.fatal)
        elif relay.releasable:
            self._release(now)

    def _release(self, now: float = 0.0) -> None:
        conn = self.server
        self.server = None
        self.relay.detach()
        if self._paused_server:
            self._paused_server = False
            conn.transport.resume_reading()
        state = conn.state
        if state.retire is not None:
            # What this client did there no other client may see (temp buffers, PL/pgSQL): it is
            # kept for this client alone, as its own session would be, while the pool has room.
            state.reserved_for = self
            self.preferred = conn
        else:
            self.preferred = conn if state.seq_owner is self.relay.session else None
        self.pool.release(conn, now)

    def server_lost(self, conn: ServerConnection) -> None:
        if self.server is conn:
            self.server = None
            pins = ", ".join(self.relay.session.pins) if self.relay.pinned else ""
            waiting = bool(self.relay.queue)
            self.relay.detach()
            self.relay.queue.clear()
            final = m.fatal("08006", "the server connection was lost; the transaction, if any, is gone" +
                            (f"; this session was pinned to it ({pins}) and its state there is gone: "
                             "reconnect" if pins else ""),
                            detail=f"server connection {conn.id} closed unexpectedly")
            if waiting:
                self.shutdown(final)
            else:
                # Between requests (idle in a transaction, or pinned and idle) a client would
                # only see "server closed the connection": it hears why at its next request.
                self.pool = _Lost(final)

    def _give_back(self, conn: ServerConnection) -> None:
        """The client is gone: return its server connection clean, or close it."""
        relay = self.relay
        conn.client = None
        conn.state.reserved_for = None      # (its client is gone: closed if retire says so)
        if relay is not None and relay.queue:
            # A request is still running on the server: stop it, and keep counting the
            # connection against the pool until its backend has really gone.
            self.shared.spawn(_cancel_and_close(self.config, conn))
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
            self.shared.spawn(_rollback_and_release(self.pool, conn))


class _Lost:
    """The pool of a client whose transaction or pinned session died with its server
    connection: its next request is answered with why, and the connection closed."""

    def __init__(self, final: bytes):
        self.final = final
        self.waiters = ()

    def borrow(self, client, now: float = 0.0) -> None:
        client.shutdown(self.final)

    def withdraw(self, client) -> None:
        pass


async def _cancel_and_close(config, conn: ServerConnection) -> None:
    """Cancel what `conn` runs and ask its backend to exit; it stays in the pool's books (busy)
    until the server hangs up, when `connection_lost` forgets it and wakes a waiter."""
    try:
        await send_cancel(config.upstream, conn)
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


async def _rollback_and_release(pool, conn: ServerConnection) -> None:
    try:
        async with asyncio.timeout(5):
            _, error = await conn.simple_query("ROLLBACK")
            if error is None:
                _, error = await conn.simple_query("DISCARD ALL")
        if error is None and conn.state.status == b"I":
            conn.state.params = {}
            conn.state.prepared.clear()
            conn.state.seq_owner = None
            pool.release(conn)
            return
    except (ConnectionError, TimeoutError, OSError):
        pass
    pool.discard(conn)
