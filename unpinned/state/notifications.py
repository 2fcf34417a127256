"""LISTEN without a pin: one client's channels, as PostgreSQL would keep them. Pure.

The proxy listens on a server connection of its own (backend/listener.py, the hub);
a client's `LISTEN`/`UNLISTEN` are answered by the proxy and recorded here with
PostgreSQL's rules: inside a transaction block they take effect at COMMIT (a rollback,
or a rollback to a savepoint taken before them, undoes them); `UNLISTEN *` and
`DISCARD ALL` drop every channel. Notifications reach the client between its
transactions only: while it is inside one (or in the middle of an answer) they wait
in a queue, flushed when it is idle again, in the order the server sent them.

The queue is bounded (PostgreSQL's own is 8 GB for the whole server and makes NOTIFY
fail when full; here a client that does not read cannot hold the others back): past
`QUEUE_LIMIT` bytes, counting what the socket still buffers, the client is closed with
a FATAL error and a log line.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Protocol

LISTEN, UNLISTEN = "listen", "unlisten"
QUEUE_LIMIT = 8 * 1024 * 1024      # bytes of notifications one client may have waiting
log = logging.getLogger("unpinned.state.notifications")


class Hub(Protocol):
    """The pool's listening connection, as a client's subscriptions see it."""

    def update(self, sub: "Subscriptions", interest: frozenset, committed: frozenset) -> None: ...

    def ready(self, channel: str) -> bool: ...

    def when_ready(self, channel: str, callback) -> None: ...

    def barrier(self, callback) -> None: ...


class Receiver(Protocol):
    """The client connection the notifications go to."""

    def notify_idle(self) -> bool: ...          # between transactions, nothing in flight

    def notify_write(self, data: bytes) -> None: ...

    def notify_buffered(self) -> int: ...       # bytes its socket has not sent yet

    def notify_server_pid(self) -> int: ...     # the backend pid of the server connection it holds, or 0

    def notify_overflow(self, text: str, code: str = "54000") -> None: ...


class Subscriptions:
    """One client's channels: committed, pending in its transaction, and what waits for it."""

    __slots__ = ("hub", "client", "channels", "pending", "queue", "queued", "limit", "closed", "removing",
                 "barrier_due", "holding")

    def __init__(self, hub: Hub, client: Receiver, limit: int | None = None):
        self.hub = hub
        self.client = client
        self.channels: set[str] = set()          # what PostgreSQL would list in pg_listening_channels()
        self.pending: list[tuple[str, str | None]] = []   # (op, channel) of the open transaction
        self.queue: deque[bytes] = deque()        # NotificationResponse messages waiting for idle
        self.queued = 0
        self.limit = QUEUE_LIMIT if limit is None else limit
        self.closed = False
        # Channels given up but still delivered until the hub has read everything committed
        # before (a barrier: a round trip on the listening connection).
        self.removing: set[str] = set()
        self.barrier_due = False    # a barrier is due before the client's next ReadyForQuery
        self.holding = False        # the client's ReadyForQuery waits for that barrier

    # ------------------------------------------------------------------ LISTEN / UNLISTEN

    def op(self, op: str, channel: str | None, now: bool) -> None:
        """Record LISTEN `channel` / UNLISTEN `channel` (None: `*`). `now`: outside a
        transaction block (takes effect at once); else at commit."""
        if now:
            self._settle([(op, channel)], grace=True)
        else:
            self.pending.append((op, channel))
        self._tell()

    def ready(self, channel: str) -> bool:
        """Does the hub listen on `channel` already (so a NOTIFY from now on reaches us)?"""
        return self.hub.ready(channel)

    def commit(self) -> None:
        if self.pending:
            self._settle(self.pending, grace=False)
            self.pending.clear()
            self._tell()

    def _settle(self, ops, grace: bool) -> None:
        """Apply ops. `grace`: the client was idle, so PostgreSQL would have read what was
        committed before the UNLISTEN: a channel given up stays delivered until a barrier.
        Otherwise (a commit) PostgreSQL reads what came during the transaction with the new
        channels only: what waits for a channel given up is dropped."""
        new = set(self.channels)
        for op, channel in ops:
            if op == LISTEN:
                new.add(channel)
            elif channel is None:
                new.clear()
            else:
                new.discard(channel)
        gone = self.channels - new
        if gone and grace:
            self.removing |= gone
            self.barrier_due = True
        self.removing -= new
        self.channels = new
        if not grace:
            self._purge(new | self.removing)

    def _purge(self, keep: set) -> None:
        """Drop what waits for channels not in `keep` (given up, or a LISTEN rolled back)."""
        if self.queue:
            kept = [msg for msg in self.queue if _channel(msg) in keep]
            if len(kept) != len(self.queue):
                self.queue = deque(kept)
                self.queued = sum(len(msg) for msg in kept)

    def barrier_passed(self) -> None:
        """The hub has read everything committed before the barrier was asked for."""
        if self.removing:
            self.removing.clear()
            self._tell()

    def discard(self) -> None:
        if self.pending:
            self.pending.clear()
            self._purge(self.channels | self.removing)
            self._tell()

    def mark(self) -> int:
        """A savepoint: how far to roll back to."""
        return len(self.pending)

    def rollback_to(self, mark: int) -> None:
        if len(self.pending) > mark:
            del self.pending[mark:]
            self._purge(self.interest())
            self._tell()

    def unlisten_all(self) -> None:
        """DISCARD ALL (outside a transaction block, as it must be)."""
        self.pending.clear()
        self._settle([(UNLISTEN, None)], grace=True)
        self._tell()

    def close(self) -> None:
        """The client is gone."""
        self.closed = True
        self.channels.clear()
        self.pending.clear()
        self.queue.clear()
        self.queued = 0
        self.removing.clear()
        self.hub.update(self, frozenset(), frozenset())

    def interest(self) -> frozenset:
        """Channels the hub must listen on for us: committed, and those a commit may add."""
        return frozenset(self.channels).union(self.removing, (ch for op, ch in self.pending if op == LISTEN))

    def _tell(self) -> None:
        # Delivered also for a LISTEN still pending in the open transaction: what the hub reads
        # meanwhile waits in the queue (the client is in a transaction), kept if it commits; the
        # commit and the notifications it sends reach the proxy on different connections.
        if not self.closed:
            interest = self.interest()
            self.hub.update(self, interest, interest)

    # ------------------------------------------------------------------ delivery

    def deliver(self, msg: bytes) -> None:
        """A NotificationResponse on one of our channels, from the hub, in commit order."""
        if self.closed:
            return
        client = self.client
        if not self.channels and not self.removing and \
                int.from_bytes(msg[5:9], "big", signed=True) != client.notify_server_pid():
            # For a LISTEN pending in the open transaction of a session that listens on nothing
            # yet: PostgreSQL registers it at its commit and skips what others committed before,
            # but its own transaction's notifications reach it.
            return
        if not self.queue and not self.holding and client.notify_idle():
            client.notify_write(msg)
        else:
            self.queue.append(msg)
            self.queued += len(msg)
        if self.queued + client.notify_buffered() > self.limit:
            text = (f"terminating connection: {self.limit} bytes of notifications are waiting for this client, "
                    "which does not read them")
            log.warning("%s (%d queued)", text, len(self.queue))
            self.close()
            client.notify_overflow(text)

    def take(self) -> bytes:
        """Everything queued, for a client that is idle again."""
        out = b"".join(self.queue)
        self.queue.clear()
        self.queued = 0
        return out


def _channel(msg: bytes) -> str:
    """The channel of a NotificationResponse (after its pid)."""
    return msg[9:msg.index(b"\x00", 9)].decode("utf-8", "replace")
