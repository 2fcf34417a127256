"""Protocol-level prepared statements shared across server connections. Pure.

A client's statement name means nothing on another server connection, so each
distinct (query text, parameter types) gets one server-side name, `U_<n>`. Each
server connection remembers which of those it has prepared (an LRU with a limit);
a Bind or Describe that needs a statement the current server connection lacks
gets the stored Parse injected in front of it.

Schema changes (ALTER TABLE, a type dropped and created again), through the proxy or
directly on the server, change what a Parse of the same text gives. So a client's Parse
always reaches the server, which parses the text now (the only thing shared is the name),
and the proxy asks the server to describe each statement it prepares: its *shape*, the
parameter types and result columns (names, types, typmods, what PostgreSQL compares
before it says "cached plan must not change result type"). When a fresh Parse has
another shape than the statement's, the text gets a new generation under a new name
(`renew`), and the old one is *superseded*: a client still holding it gets 0A000 from the
proxy where the server connection lacks it, as PostgreSQL would answer on its own
connection, and the driver's own recovery (asyncpg, psycopg 3 drop the statement and
prepare it again) lands on the new generation.
"""
from __future__ import annotations

from dataclasses import dataclass

from unpinned.wire.messages import pack_i32


@dataclass(slots=True)
class ServerStatement:
    name: bytes          # server-side name, e.g. b"U_12"
    parse_msg: bytes     # a complete Parse message using that name
    classification: object = None   # what its text does to session state, filled on first use
    key: bytes | None = None        # its body in the registry (None: private)
    shape: bytes | None = None      # parameter types and result columns, once the server said
    superseded: bool = False        # a fresh Parse of its text has another shape now


def shape_of(param_desc: bytes | None, row_desc: bytes | None) -> bytes:
    """A statement's shape from the bodies of ParameterDescription and RowDescription (None:
    NoData): parameter type OIDs, and per column its name, type OID and typmod. Not the
    table OID and column number, which PostgreSQL does not compare either."""
    out = [param_desc or b"", b"|"]
    if row_desc is not None:
        count = int.from_bytes(row_desc[:2], "big")
        pos = 2
        for _ in range(count):
            nul = row_desc.index(b"\x00", pos)
            out.append(row_desc[pos:nul + 1])        # name
            pos = nul + 1
            out.append(row_desc[pos + 6:pos + 10])   # type OID (after table OID, attnum)
            out.append(row_desc[pos + 12:pos + 16])  # typmod (after typlen)
            pos += 18
    return b"".join(out)


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
        self.renewals = 0

    def get(self, body_after_name: bytes) -> ServerStatement:
        st = self._by_body.get(body_after_name)
        if st is None:
            if len(self._by_body) >= self.limit:
                # Forget the oldest; clients holding it keep their own reference.
                self._by_body.pop(next(iter(self._by_body)))
            st = self._new(body_after_name)
            st.key = body_after_name
            self._by_body[body_after_name] = st
        return st

    def private(self, body_after_name: bytes) -> ServerStatement:
        """A server-side statement of its own for one Parse, shared with no one."""
        return self._new(body_after_name)

    def renew(self, st: ServerStatement, shape: bytes) -> ServerStatement:
        """`st`'s text has `shape` now, not st's: st is superseded, and the text's statement
        from now on is a new one under a new name."""
        st.superseded = True
        self.renewals += 1
        body = st.parse_msg[5 + len(st.name) + 1:]
        new = self._new(body)
        new.shape = shape
        new.classification = st.classification
        if st.key is not None and self._by_body.get(st.key) is st:
            new.key = st.key
            self._by_body[st.key] = new
        return new

    def _new(self, body_after_name: bytes) -> ServerStatement:
        self._next += 1
        name = b"U_%d" % self._next
        body = name + b"\x00" + body_after_name
        return ServerStatement(name, b"P" + pack_i32(len(body) + 4) + body)

    def __len__(self) -> int:
        return len(self._by_body)
