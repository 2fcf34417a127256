"""A pooled client's side of LISTEN carried in smart mode (state/notifications.py,
backend/listener.py): what PooledClient (frontend/client.py) does for it, as a mixin."""
from __future__ import annotations

from unpinned.relay import carried
from unpinned.state.notifications import Subscriptions

_READY_HEAD = b"Z\x00\x00\x00\x05"


class ListeningClient:
    """The notification receiver of a PooledClient (which has the attributes used here)."""

    __slots__ = ()

    def _from_listening_client(self, subs: Subscriptions, data: bytes) -> bytes:
        """Client bytes of a client that has listened: a NOTIFY means its ReadyForQuery waits for
        its own notifications; pg_listening_channels() answers its own channels."""
        low = data.lower()
        if b"notify" in low:
            subs.barrier_due = True     # its own notifications reach it before its ReadyForQuery
        if b"pg_listening_channels" in low:
            data = carried.listening_query(data, subs.channels)
        return data

    def _subscriptions(self) -> Subscriptions:
        return Subscriptions(self.shared.listener_for(self.pool), self)

    def _notifications(self, subs: Subscriptions, out: bytes) -> bytes:
        """Server bytes for the client, with what LISTEN carried adds: the queued notifications
        once the client is between transactions; and after a transaction that may have notified
        a channel the client listens on, or given one up, its ReadyForQuery is held until the
        listening connection has read everything committed before (PostgreSQL sends a session's
        own notifications before its ReadyForQuery)."""
        relay = self.relay
        if subs.barrier_due and relay.status == b"I" and not relay.queue and out[-6:-1] == _READY_HEAD:
            subs.barrier_due = False
            subs.holding = True
            ready = out[-6:]
            if len(out) > 6:
                self.transport.write(out[:-6])      # first: the barrier may pass at once
            self.transport.pause_reading()
            subs.hub.barrier(lambda: self._barrier_passed(subs, ready))
            return b""
        if subs.queue and not subs.holding and self.notify_idle():
            return out + subs.take()    # between transactions
        return out

    def _barrier_passed(self, subs: Subscriptions, ready: bytes) -> None:
        subs.holding = False
        subs.barrier_passed()
        if self.closing:
            return
        self.transport.write(subs.take() + ready)
        self.transport.resume_reading()

    def notify_idle(self) -> bool:
        relay = self.relay
        return relay.status == b"I" and not relay.queue and relay.held is None and not relay.to_client \
            and not self.closing and not (relay.session.listening is not None and relay.session.listening.holding)

    def notify_write(self, data: bytes) -> None:
        self.transport.write(data)

    def notify_server_pid(self) -> int:
        return self.server.state.pid if self.server is not None else 0

    def notify_buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def notify_overflow(self, text: str, code: str = "54000") -> None:
        self._fatal(code, text)

    def notify_resume(self) -> None:
        """The listening connection listens on what this client's LISTEN asked for: its answer,
        and whatever the client sent after it, go on."""
        if self.closing or self.relay.held is None:
            return
        subs = self.relay.session.listening
        if subs.queue and not self.relay.queue and self.relay.status == b"I" and not subs.holding:
            # Committed before the client's LISTEN/UNLISTEN: PostgreSQL would have sent them first.
            self.transport.write(subs.take())
        carried.resume(self.relay)
        if self.server is not None:
            self._to_server(b"")
        elif self.relay.to_client:
            self.transport.write(b"".join(self.relay.to_client))
            self.relay.to_client.clear()
