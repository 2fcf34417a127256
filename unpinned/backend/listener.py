"""The proxy's own listening server connection, one per pool (LISTEN without a pin).

It runs LISTEN/UNLISTEN for the union of the channels its clients want and hands each
NotificationResponse, as the server sent it (sender pid, channel, payload), to every
client subscribed to that channel, in the order the server sent them: commit order.
Clients' subscriptions (state/notifications.py) tell it what they want; a client's
LISTEN is answered only once this connection listens on the channel, so a NOTIFY
committed after the client's LISTEN returned is never missed.

The connection is opened on the first LISTEN, closed when no client listens any more, and
counts outside `pool_size`. If it is
lost, the clients that listen through it are closed with a FATAL error, as their own
server connection's loss would close them on PostgreSQL: their notifications from then
on would be lost without a word otherwise.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

from unpinned.backend import server as server_mod
from unpinned.backend.server import ServerConnection
from unpinned.config import Config
from unpinned.sql.text import quote_ident
from unpinned.wire import messages as m

log = logging.getLogger("unpinned.backend.listener")
_EMPTY_QUERY = m.query("")


class _NoTransport:
    """What a server connection pauses when its writes back up: nothing to pause here."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Listener:
    def __init__(self, config: Config, database: str, server_user: str, password: str | None, pool=None):
        self.config = config
        # The writer pool whose host it connects to (it moves at a cluster's failover); None: the upstream.
        self.pool = pool
        self.database = database
        self.server_user = server_user
        self.password = password
        self.transport = _NoTransport()          # for ServerConnection, which sees us as its client
        self.conn: ServerConnection | None = None
        self._opening: asyncio.Task | None = None
        self.subs: dict = {}                     # subscriptions -> (interest, committed)
        self.interest: dict[str, set] = {}       # channel -> subscriptions that may need it
        self.targets: dict[str, set] = {}        # channel -> subscriptions it is delivered to
        self.listening: set[str] = set()         # channels the server has confirmed
        self.sent: dict[str, str] = {}           # channel -> the last op sent for it
        self.inflight: deque[tuple[str, str]] = deque()   # (op, channel), answered in order
        self.waiters: dict[str, list] = {}       # channel -> callbacks once it is listened on
        self.buf = bytearray()
        self.delivered = 0
        self.closed = False

    # ------------------------------------------------------------------ what clients want

    def update(self, sub, interest: frozenset, committed: frozenset) -> None:
        old_interest, old_committed = self.subs.get(sub, (frozenset(), frozenset()))
        if interest or committed:
            self.subs[sub] = (interest, committed)
        else:
            self.subs.pop(sub, None)
        for ch in committed - old_committed:
            self.targets.setdefault(ch, set()).add(sub)
        for ch in old_committed - committed:
            s = self.targets.get(ch)
            if s is not None:
                s.discard(sub)
                if not s:
                    del self.targets[ch]
        changed = []
        for ch in interest - old_interest:
            s = self.interest.setdefault(ch, set())
            if not s:
                changed.append(ch)
            s.add(sub)
        for ch in old_interest - interest:
            s = self.interest.get(ch)
            if s is not None:
                s.discard(sub)
                if not s:
                    del self.interest[ch]
                    changed.append(ch)
        if changed:
            self._sync(changed)

    def ready(self, channel: str) -> bool:
        return channel in self.listening and self.sent.get(channel) == "LISTEN" and \
            not any(op != "BARRIER" and ch == channel for op, ch in self.inflight)

    def when_ready(self, channel: str, callback) -> None:
        """Call `callback()` once the server listens on `channel` (or the listener failed)."""
        if self.ready(channel):
            callback()
        else:
            self.waiters.setdefault(channel, []).append(callback)
            self._sync([channel])

    def barrier(self, callback) -> None:
        """Call `callback()` once every notification committed before now has been read: a
        round trip on the listening connection (PostgreSQL sends a listener's pending
        notifications before its ReadyForQuery)."""
        if self.conn is None:
            if self._opening is None:
                callback()      # nothing listened on: nothing to wait for
            else:
                self.waiters.setdefault(None, []).append(lambda: self.barrier(callback))
            return
        self.inflight.append(("BARRIER", callback))
        self.conn.transport.write(_EMPTY_QUERY)

    # ------------------------------------------------------------------ talking to the server

    def _sync(self, channels) -> None:
        if self.closed:
            return
        if self.conn is None:
            if self._opening is None and self.interest:
                self._opening = asyncio.get_running_loop().create_task(self._open())
            return
        out = []
        for ch in channels:
            op = "LISTEN" if ch in self.interest else "UNLISTEN"
            if self.sent.get(ch, "UNLISTEN") == op:
                continue
            self.sent[ch] = op
            self.inflight.append((op, ch))
            out.append(m.query(f"{op} {quote_ident(ch)}"))
        if out:
            self.conn.transport.write(b"".join(out))

    async def _open(self) -> None:
        try:
            conn = await server_mod.connect(self.config, self.server_user, self.password, self.database,
                                            self._forget, self.pool.host if self.pool is not None else None)
        except Exception as e:
            self._opening = None
            log.warning("could not open the listening connection for %s: %s", self.database, e)
            self._fail(f"could not open the proxy's listening connection: {e}")
            return
        self._opening = None
        if self.closed:
            conn.close()
            return
        self.conn = conn
        conn.client = self
        log.info("listening connection %d open for database %s", conn.id, self.database)
        self._sync(list(self.interest))
        for cb in self.waiters.pop(None, ()):
            cb()

    def _forget(self, conn) -> None:
        pass

    def server_data(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            end = pos + 1 + m.unpack_i32(buf, pos + 1)[0]
            if end > n:
                break
            t = buf[pos]
            if t == 65:     # 'A' NotificationResponse: pid, channel, payload
                msg = bytes(buf[pos:end])
                nul = msg.index(b"\x00", 9)
                channel = msg[9:nul].decode("utf-8", "replace")
                targets = self.targets.get(channel)
                if targets:
                    self.delivered += 1
                    for sub in list(targets):
                        sub.deliver(msg)
            elif t == 90:   # 'Z': the answer to the oldest LISTEN/UNLISTEN is complete
                if self.inflight:
                    op, ch = self.inflight.popleft()
                    if op == "BARRIER":
                        ch()
                    elif op == "LISTEN":
                        self.listening.add(ch)
                    else:
                        self.listening.discard(ch)
                    self._wake(ch)
            elif t == 69:   # 'E'
                fields = m.parse_error_fields(bytes(buf[pos + 5:end]))
                log.warning("listening connection: %s", fields.get("M"))
            pos = end
        del buf[:pos]
        if not self.inflight and not self.interest and not self.waiters and self.conn is not None:
            # Nobody listens any more: the connection goes (opened again by the next LISTEN).
            conn, self.conn = self.conn, None
            conn.client = None
            conn.close()
            self.listening.clear()
            self.sent.clear()

    def _wake(self, channel) -> None:
        if self.ready(channel) or channel not in self.interest:
            for cb in self.waiters.pop(channel, ()):
                cb()

    def server_lost(self, conn) -> None:
        if conn is not self.conn:
            return
        log.warning("the listening connection %d for %s was lost", conn.id, self.database)
        self.conn = None
        self.listening.clear()
        self.sent.clear()
        barriers = [cb for op, cb in self.inflight if op == "BARRIER"]
        self.inflight.clear()
        self.buf.clear()
        for cb in barriers:
            cb()
        self._fail("the server connection the proxy listened on for this client was lost; "
                   "notifications may have been missed")

    def _fail(self, text: str) -> None:
        """Every client that listens (or waits to) is closed: they would miss notifications."""
        subs = list(self.subs)
        waiters = [cb for cbs in self.waiters.values() for cb in cbs]
        self.waiters.clear()
        for sub in subs:
            sub.close()
            sub.client.notify_overflow(text, "08006")
        for cb in waiters:
            cb()

    def close(self) -> None:
        self.closed = True
        if self._opening is not None:
            self._opening.cancel()
        if self.conn is not None:
            self.conn.client = None
            self.conn.close()
            self.conn = None
