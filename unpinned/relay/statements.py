"""Protocol-level prepared statements shared across server connections. Pure.

A client's statement name means nothing on another server connection, so each
distinct (query text, parameter types) gets one server-side name, `U_<n>`. Each
server connection remembers which of those it has prepared (an LRU with a limit);
a Bind or Describe that needs a statement the current server connection lacks
gets the stored Parse injected in front of it.
"""
from __future__ import annotations

from dataclasses import dataclass

from unpinned.wire.messages import pack_i32


@dataclass(slots=True)
class ServerStatement:
    name: bytes          # server-side name, e.g. b"U_12"
    parse_msg: bytes     # a complete Parse message using that name
    classification: object = None   # what its text does to session state, filled on first use


class StatementRegistry:
    """Process-wide map from statement body (query + types) to its server-side statement."""

    def __init__(self, limit: int = 100_000):
        self._by_body: dict[bytes, ServerStatement] = {}
        self._next = 0
        self.limit = limit
        # SQL PREPARE carried (relay/carried.py): text after the name -> server-side name, and that
        # name -> the PREPARE that makes it.
        self.sql: dict[str, str] = {}
        self.sql_text: dict[str, str] = {}

    def get(self, body_after_name: bytes) -> ServerStatement:
        st = self._by_body.get(body_after_name)
        if st is None:
            if len(self._by_body) >= self.limit:
                # Forget the oldest; clients holding it keep their own reference.
                self._by_body.pop(next(iter(self._by_body)))
            self._next += 1
            name = b"U_%d" % self._next
            body = name + b"\x00" + body_after_name
            st = ServerStatement(name, b"P" + pack_i32(len(body) + 4) + body)
            self._by_body[body_after_name] = st
        return st

    def private(self, body_after_name: bytes) -> ServerStatement:
        """A server-side statement of its own for one Parse, shared with no one."""
        self._next += 1
        name = b"U_%d" % self._next
        body = name + b"\x00" + body_after_name
        return ServerStatement(name, b"P" + pack_i32(len(body) + 4) + body)

    def __len__(self) -> int:
        return len(self._by_body)
