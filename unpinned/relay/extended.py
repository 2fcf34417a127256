"""Extended-protocol requests whose statement names the relay maps: a client's prepared
statements are shared server-side statements (relay/statements.py) under the proxy's names,
prepared again on whichever server connection the client holds."""
from __future__ import annotations

import re

from unpinned.relay.pending import (
    BIND_FORWARD, CLOSE_FORWARD, CLOSE_SWALLOW, DESC_PORTAL_FORWARD, DESC_STMT_FORWARD, FORWARD, PARSE_FORWARD,
    R_BIND, R_DESC_STMT, R_PARSE, SWALLOW, Pending)
from unpinned.relay.statements import ServerStatement
from unpinned.sql.classifier import classify
from unpinned.wire import messages as m
from unpinned.wire.messages import BIND, DESCRIBE, PARSE

_SERVER_NAME = re.compile(rb"U_\d+")   # the names StatementRegistry gives server-side statements


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
            if server.prepared.has(st.name):
                self._synth(m.PARSE_COMPLETE, undo=(name, None))
                return b""
            queue.append(Pending(R_PARSE, FORWARD, (st.name, name)))
            return self._prepare_bytes(st)
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
            if st.classification is None:
                st.classification = classify(_statement_text(st))
            self.portal_c[portal] = st.classification
            pre = self._ensure_prepared(st)
            body = data[start:nul + 1] + st.name + data[nul2:end]
            queue.append(BIND_FORWARD)
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
            pre = self._ensure_prepared(st)
            queue.append(DESC_STMT_FORWARD)
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
        if self.server.prepared.has(st.name):
            return b""
        self.stats.reprepares += 1
        self.queue.append(Pending(R_PARSE, SWALLOW, (st.name, None)))
        return self._prepare_bytes(st)

    def _prepare_bytes(self, st: ServerStatement) -> bytes:
        evicted = self.server.prepared.add(st.name)
        if evicted is None:
            return st.parse_msg
        # Make room on the server too; the Close's answer is the proxy's business.
        q = self.queue
        entry = q.pop()
        q.append(CLOSE_SWALLOW)
        q.append(entry)
        return m.close_statement(evicted) + st.parse_msg


def _statement_text(st: ServerStatement) -> bytes:
    body = st.parse_msg
    start = body.index(b"\x00", 5) + 1
    return body[start:body.index(b"\x00", start)]
