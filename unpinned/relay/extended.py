"""Extended-protocol requests whose statement names the relay maps: a client's prepared
statements are shared server-side statements (relay/statements.py) under the proxy's names,
prepared again on whichever server connection the client holds."""
from __future__ import annotations

import re

from unpinned.relay import carried
from unpinned.relay.pending import (
    BIND_FORWARD, CLOSE_FORWARD, CLOSE_SWALLOW, DESC_PORTAL_FORWARD, DESC_STMT_FORWARD, FORWARD, PARSE_FORWARD,
    R_BIND, R_DESC_STMT, R_PARSE, SHAPE, SWALLOW, Pending)
from unpinned.relay.statements import ServerStatement, shape_of
from unpinned.sql.classifier import classify
from unpinned.sql import kinds as K
from unpinned.wire import messages as m
from unpinned.wire.messages import BIND, DESCRIBE, PARSE

_SERVER_NAME = re.compile(rb"U_\d+")   # the names StatementRegistry gives server-side statements
# PostgreSQL's answer to a Bind of a statement whose result columns changed, with its source
# fields: drivers tell it by them (asyncpg: routine RevalidateCachedQuery -> re-prepare and retry).
_PLAN_CHANGED = m.message(b"E", b"SERROR\x00VERROR\x00C0A000\x00Mcached plan must not change result type\x00"
                                b"Fplancache.c\x00RRevalidateCachedQuery\x00\x00")


class ExtendedNames:
    """Relay's Parse, Bind, Describe and Close (a part of Relay: its state is Relay's)."""

    __slots__ = ()

    def _extended(self, t: int, data: bytes, start: int, end: int) -> bytes | None:
        """Handle Parse/Bind/Describe/Close. Returns replacement bytes, or None to forward as is."""
        queue = self.queue
        server = self.server
        if t == PARSE:  # name \0 query \0 types
            nul = data.index(b"\x00", start)
            name = data[start:nul]
            qend = data.index(b"\x00", nul + 1)
            body = None
            if not name:
                c = self.unnamed_c = classify(data[nul + 1:qend])
                if c.effects and self.session.startup:
                    body = self._restore_parse(c, data, start, nul + 1, qend, end)
                    if body is not None:
                        self.unnamed_c = classify(body[1:body.index(b"\x00", 1)])
                queue.append(PARSE_FORWARD)
                return None if body is None else m.message(b"P", body)
            if name in self.statements:
                return self._fail(b"42P05", f'prepared statement "{name.decode(errors="replace")}" already exists')
            if data.find(b"\\", nul + 1, qend) >= 0:
                # Lexed by the standard_conforming_strings of the moment (and warned about when it
                # is off): not shared, so this Parse reaches the server as the client's own.
                if self.session.startup:
                    c = classify(data[nul + 1:qend])
                    if c.effects:
                        body = self._restore_parse(c, data, start, nul + 1, qend, end)
                st = self.registry.private(data[nul + 1:end] if body is None else body[len(name) + 1:])
            else:
                st = self.registry.get(data[nul + 1:end])
                if self.session.startup:
                    if st.classification is None:
                        st.classification = classify(data[nul + 1:qend])
                    if st.classification.effects:
                        body = self._restore_parse(st.classification, data, start, nul + 1, qend, end)
                        if body is not None:
                            st = self.registry.get(body[len(name) + 1:])   # this client's own variant
            self.statements[name] = st
            return self._parse_now(st, name)
        if t == BIND:  # portal \0 statement \0 rest
            nul = data.index(b"\x00", start)
            portal = data[start:nul]
            nul2 = data.index(b"\x00", nul + 1)
            name = data[nul + 1:nul2]
            if not name:
                self.portal_c[portal] = self.unnamed_c
                queue.append(BIND_FORWARD)
                return None
            st = self.statements.get(name)
            if st is None:
                return self._unknown_statement(name, R_BIND)
            if st.superseded and not server.prepared.has(st.name):
                return self._fail(b"0A000", "cached plan must not change result type", error=_PLAN_CHANGED)
            if st.classification is None:
                st.classification = classify(_statement_text(st))
            self.portal_c[portal] = st.classification
            pre = self._ensure_prepared(st)
            body = data[start:nul + 1] + st.name + data[nul2:end]
            queue.append(Pending(R_BIND, FORWARD, st))
            return pre + b"B" + m.pack_i32(len(body) + 4) + body
        if t == DESCRIBE:  # 'S'|'P' name \0
            kind = data[start]
            name = data[start + 1:end - 1]
            if kind == 80 or not name:  # portal, or unnamed statement
                queue.append(DESC_PORTAL_FORWARD if kind == 80 else DESC_STMT_FORWARD)
                return None
            st = self.statements.get(name)
            if st is None:
                return self._unknown_statement(name, R_DESC_STMT)
            if st.superseded and not server.prepared.has(st.name):
                return self._fail(b"0A000", "cached plan must not change result type", error=_PLAN_CHANGED)
            pre = self._ensure_prepared(st)
            queue.append(Pending(R_DESC_STMT, FORWARD, st))
            return pre + m.message(b"D", b"S" + st.name + b"\x00")
        # Close: 'S'|'P' name \0
        kind = data[start]
        name = data[start + 1:end - 1]
        if kind == 83 and name:
            # The server keeps the statement for other clients; this client forgets its name.
            st = self.statements.pop(name, None)
            self._synth(m.CLOSE_COMPLETE, undo=(name, st) if st is not None else None)
            return b""
        queue.append(CLOSE_FORWARD)
        return None

    def _unknown_statement(self, name: bytes, kind: int) -> bytes | None:
        """A Bind/Describe of a name this client never prepared. Forwarded as is, PostgreSQL
        answers 26000 itself and fails the transaction, exactly as without the proxy; but a
        name shaped like the proxy's own (U_<n>) could be another client's statement on this
        server connection, so that one is raised on the server instead."""
        if _SERVER_NAME.fullmatch(name):
            return self._fail(b"26000", f'prepared statement "{name.decode(errors="replace")}" does not exist')
        self.queue.append(Pending(kind, FORWARD))
        return None

    def _ensure_prepared(self, st: ServerStatement) -> bytes:
        c = st.classification
        if c is not None and c.effects and c.effects[0].kind is K.EXECUTE:
            pre = carried.ensure_statement(self, st)    # the SQL-prepared statement it EXECUTEs
            if pre:
                return pre + self._ensure_prepared_protocol(st)
        return self._ensure_prepared_protocol(st)

    def _ensure_prepared_protocol(self, st: ServerStatement) -> bytes:
        if self.server.prepared.has(st.name):
            return b""
        self.stats.reprepares += 1
        self.queue.append(Pending(R_PARSE, SWALLOW, (st.name, None)))
        return self._prepare_bytes(st) + self._describe_shape(st, None)

    def _parse_now(self, st: ServerStatement, name: bytes) -> bytes:
        """A client's Parse of a name it does not have always reaches the server, which parses
        the text now: a schema change since the statement was shared (ALTER TABLE, a type made
        again; through the proxy or not) is seen as a fresh connection would see it. Where this
        connection holds the shared statement already, it is closed and prepared again in place.
        The proxy's Describe behind it tells whether the text still has the statement's shape."""
        self.queue.append(Pending(R_PARSE, FORWARD, (st.name, name)))
        return self._prepare_bytes(st) + self._describe_shape(st, name)

    def _describe_shape(self, st: ServerStatement, name: bytes | None) -> bytes:
        self.queue.append(Pending(R_DESC_STMT, SHAPE, [st, name, None]))
        return m.message(b"D", b"S" + st.name + b"\x00")

    def _described(self, info: list, row_desc: bytes | None) -> None:
        """The server described a statement the proxy just prepared (`info`: statement, client
        name or None, ParameterDescription body). Another shape than the statement's: the
        text has a new generation (statements.py); this copy, under the old name, is closed."""
        st, name, params = info
        shape = shape_of(params, row_desc)
        if st.shape is None:
            st.shape = shape
        elif shape != st.shape:
            new = self.registry.renew(st, shape)
            if name is not None and self.statements.get(name) is st:
                self.statements[name] = new
            self._drop_copy(st)

    def _stale_error(self, st: ServerStatement, error: bytes) -> None:
        """An error answering a Bind or Describe of a statement the proxy prepared earlier. The
        server connection's copy is stale where PostgreSQL says so (0A000 "cached plan must not
        change result type", XX000 "cache lookup failed for type", an object gone): the error
        stands, as on the client's own connection, but the next Parse of the text gets a new
        statement, and this copy is closed."""
        code = m.parse_error_fields(error).get("C", "")
        if code == "0A000" or code == "XX000" or code[:2] == "42":
            if not st.superseded:
                self.registry.renew(st, None)
            self._drop_copy(st)

    def _drop_copy(self, st: ServerStatement) -> None:
        """Forget this server connection's copy of `st`; it is closed before the next Parse here."""
        self.server.prepared.discard(st.name)
        self.server.to_close.append(st.name)

    def _prepare_bytes(self, st: ServerStatement) -> bytes:
        """The Parse of `st` (its queue entry is the last), behind a Close of the same name: the
        server may hold an older copy (prepared before a schema change, or one whose Close an
        error made the server skip), and a Close of a name it lacks is no error. Stale copies
        and the one the LRU evicts are closed in the same write; the Closes' answers are the
        proxy's business."""
        closes = self.server.to_close
        evicted = self.server.prepared.add(st.name)
        if evicted is not None:
            closes.append(evicted)
        closes.append(st.name)
        q = self.queue
        entry = q.pop()
        out = []
        for old in closes:
            q.append(CLOSE_SWALLOW)
            out.append(m.close_statement(old))
        closes.clear()
        q.append(entry)
        out.append(st.parse_msg)
        return b"".join(out)


def _statement_text(st: ServerStatement) -> bytes:
    body = st.parse_msg
    start = body.index(b"\x00", 5) + 1
    return body[start:body.index(b"\x00", start)]
