"""The admin console's connection: the virtual database (`unpinned` by default) that
answers SHOW POOLS, SHOW PINS, PAUSE, ... over the simple query protocol only, like
PgBouncer's. What each command does is decided above the frontend (ops/admin.py),
plugged in as `Shared.admin_command`."""
from __future__ import annotations

import asyncio
import logging
import time

from unpinned.frontend.connection import ClientConnection
from unpinned.frontend.shared import Shared
from unpinned.wire import messages as m
from unpinned.wire.framing import FRONTEND_LIMITS, FramingError, message_end

log = logging.getLogger("unpinned")


class AdminClient(ClientConnection):
    __slots__ = ("_buf", "_failed", "_pending")

    active = True
    admin = True

    def __init__(self, shared: Shared):
        super().__init__(shared)
        self._buf = b""
        self._failed = False                            # in an extended batch, until its Sync
        self._pending: asyncio.Task | None = None       # answers still being gathered

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        buf = self._buf + data
        pos, out, close = 0, [], False
        try:
            while pos < len(buf) and (end := message_end(buf, pos, FRONTEND_LIMITS[buf[pos]])) is not None:
                t = buf[pos:pos + 1]
                body = buf[pos + 5:end]
                pos = end
                if t == b"Q":
                    out.append(self.shared.admin_command(body.rstrip(b"\x00").decode("utf-8", "replace"), self))
                    out.append(m.ready_for_query(b"I"))
                elif t == b"X":
                    close = True
                    break
                elif t == b"S":
                    self._failed = False
                    out.append(m.ready_for_query(b"I"))
                elif not self._failed:
                    self._failed = True
                    out.append(m.error_response("0A000", "the admin console supports only the simple query protocol"))
        except FramingError as e:
            self._fatal(e.sqlstate, str(e))
            return
        self._buf = buf[pos:]
        if any(isinstance(o, asyncio.Future) for o in out) or self._pending is not None:
            # Several workers answer: write in the order the queries came, after earlier batches.
            self._pending = self.shared.spawn(self._write_in_order(self._pending, out, close))
            return
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.shutdown(None)

    async def _write_in_order(self, prev, out: list, close: bool) -> None:
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
