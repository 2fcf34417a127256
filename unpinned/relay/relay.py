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
"""
from __future__ import annotations

import re
from collections import deque
from typing import TYPE_CHECKING

from unpinned.relay import large
from unpinned.sql.classifier import classify, unheld
from unpinned.sql.effects import Kind
from unpinned.state.policy import STATEMENT_LIMIT
from unpinned.wire import messages as m
from unpinned.wire.framing import FRONTEND_LIMITS
from unpinned.relay.statements import ServerStatement, StatementRegistry
from unpinned.sql.text import param_sync_sql, quote_literal, raise_sql
from unpinned.state.server_state import ServerState

if TYPE_CHECKING:
    from unpinned.state.session import Session

unpack_i32 = m.unpack_i32

# Request kinds in the response queue, and the backend message types that end each.
R_PARSE, R_BIND, R_DESC_STMT, R_DESC_PORTAL, R_EXEC, R_CLOSE, R_SYNC, R_QUERY, R_FUNC, R_SYNTH = range(10)
TERMINALS = (b"1", b"2", b"Tn", b"Tn", b"CIs", b"3", b"Z", b"Z", b"Z", b"")
EXTENDED = frozenset((R_PARSE, R_BIND, R_DESC_STMT, R_DESC_PORTAL, R_EXEC, R_CLOSE))

# How a queued request's response is treated.
FORWARD, SWALLOW, PRELUDE, CHECK, HIDE, QUIET = 0, 1, 2, 3, 4, 5
# SWALLOW: the proxy's own Parse/Bind/Execute/Close, only errors reach the client.
# PRELUDE: the proxy's parameter sync; an error there is fatal for the client.
# CHECK:   the proxy asking the server about session state; the row goes to the session engine.
# HIDE:    a client's simple Query while the server answers a statement the proxy put into
#          its text (see _restore_query); back to FORWARD at that statement's CommandComplete.
# QUIET:   the proxy's own simple Query right behind a client's; nothing of it reaches the
#          client but ParameterStatus, and the client's ReadyForQuery waits for it.
READY_NOW = None   # a made-up response that is ReadyForQuery with the status of the moment

_E, _Z, _C, _S, _N, _A = b"EZCSNA"
_READY_HEAD = b"Z\x00\x00\x00\x05"
_LIMITS = FRONTEND_LIMITS     # PostgreSQL's longest message of each type
# What the answer to a simple Query without effects may hold besides CommandComplete, for the
# fast walk: RowDescription, DataRow, EmptyQueryResponse, NoticeResponse, NotificationResponse.
_PLAIN_ANSWER = frozenset(b"TDINA")
# Requests whose answers the fast walk of a batch can settle (see _plain_batch).
_PLAIN_KINDS = frozenset((R_PARSE, R_BIND, R_DESC_PORTAL, R_EXEC))
_SERVER_NAME = re.compile(rb"U_\d+")   # the names StatementRegistry gives server-side statements
_OWN = b"U_0"     # the proxy's own statement and portal (StatementRegistry starts at U_1)
class Relay:
    """One client's view of the protocol across server connections."""

    __slots__ = ("registry", "session", "statements", "server", "queue", "releasable", "fatal",
                 "skip_to_sync", "cin", "buffer_limit", "sbuf", "_need", "unnamed_c", "portal_c", "status",
                 "to_client", "to_server", "terminated", "_row", "stats", "batch_open")

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

    # ------------------------------------------------------------------ attach / detach

    def attach(self, server: ServerState) -> bytes:
        """Bind to a server connection; return the parameter sync to send ahead of the client's bytes."""
        self.server = server
        self.releasable = False
        if server.last_client is not self:
            server.last_client = self
            server.epoch += 1
        want = self.session.params
        if server.params == want:
            return b""
        sql = param_sync_sql(server.params, want)
        server.params = dict(want)
        self.queue.append([R_QUERY, PRELUDE, None])
        self.stats.param_syncs += 1
        return m.query(sql)

    def detach(self) -> ServerState | None:
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
            and (self.cin is None or not self.cin.streaming)    # half a message is on the server

    # ------------------------------------------------------------------ client -> server

    def from_client(self, data: bytes) -> bytes:
        if self.cin is not None:
            # The rest of a message begun in an earlier read (relay/large.py).
            head, data = self.cin.feed(self, data)
            if not data:
                return head
            if head:
                return head + self.from_client(data)
        if len(data) > 5 and data[0] == 81 and not self.skip_to_sync \
                and len(data) == 1 + unpack_i32(data, 1)[0]:
            # One whole simple Query, alone in this read (most requests of most clients):
            # without session effects it goes as it is, with no walk.
            c = classify(data[5:-1])
            if not c.effects and c.byte_length <= STATEMENT_LIMIT:
                self.stats.query_requests += 1
                self.queue.append([R_QUERY, FORWARD, [c, 0, "simple"]])
                return data
        n = len(data)
        pos = 0
        out: list[bytes] = []
        fwd_start = 0          # start of a run of bytes forwarded unchanged
        queue = self.queue
        while n - pos >= 5:
            t = data[pos]
            ln = unpack_i32(data, pos + 1)[0]
            if ln < 4 or ln > _LIMITS[t]:
                raise m.ProtocolError("invalid message length")
            end = pos + 1 + ln
            if end > n:
                break
            if self.skip_to_sync and t != 81 and t != 83 and t != 100 and t != 99 and t != 102:
                # After an error the proxy made up, the server must not see the rest of the batch.
                out.append(data[fwd_start:pos])
                fwd_start = end
            elif t == 66 and ln > 5 and data[pos + 5] == 0 and data[pos + 6] == 0:
                # Bind of the unnamed portal to the unnamed statement (most drivers' every query):
                # nothing to rename, so no call into _extended.
                self.batch_open = True
                self.portal_c[b""] = self.unnamed_c
                queue.append([R_BIND, FORWARD, None])
            elif t == 69:  # 'E' Execute
                self.batch_open = True
                portal = data[pos + 5:data.index(b"\x00", pos + 5)]
                c = self.portal_c.get(portal)
                refusal = None if c is None or not c.effects and c.byte_length <= STATEMENT_LIMIT else \
                    self.session.statement(c, "extended", self.server)
                if refusal is None:
                    queue.append([R_EXEC, FORWARD, [c, 0, "extended"] if c is not None else None])
                    if c is not None and c.groups and self.session.startup:
                        sql = self.session.restore_sql(c.groups[0])
                        if sql is not None:
                            # Right behind it, before anything else of the batch runs.
                            queue[-1][2].append((0,))
                            out.append(data[fwd_start:end])
                            out.append(self._run_own(sql))
                            fwd_start = end
                else:
                    fields = m.parse_error_fields(refusal[5:])
                    out.append(data[fwd_start:pos])
                    out.append(self._fail(fields.get("C", "XX000").encode(), fields.get("M", ""), fields.get("H")))
                    fwd_start = end
            elif t == 68 and ln > 4 and data[pos + 5] == 80:  # Describe of a portal: nothing to rename
                self.batch_open = True
                queue.append([R_DESC_PORTAL, FORWARD, None])
            elif t == 80 and ln > 4 and data[pos + 5] == 0 and (qend := data.find(b"\x00", pos + 6, end)) > 0 \
                    and not (c := classify(data[pos + 6:qend])).effects:
                # Parse of the unnamed statement, without session effects: nothing to rewrite.
                self.batch_open = True
                self.unnamed_c = c
                queue.append([R_PARSE, FORWARD, None])
            elif t == 83:  # 'S' Sync
                self.stats.query_requests += 1
                self.skip_to_sync = False
                self.batch_open = False
                queue.append([R_SYNC, FORWARD, None])
            elif t == 81:  # 'Q'
                self.stats.query_requests += 1
                if self.skip_to_sync:
                    # PostgreSQL ignores it too while it discards messages up to Sync.
                    out.append(data[fwd_start:pos])
                    fwd_start = pos = end
                    continue
                c = classify(data[pos + 5:end - 1])
                answer = self._simple_query(c) if c.effects or c.byte_length > STATEMENT_LIMIT else None
                if answer is None:
                    if not (c.groups and self.session.startup):
                        queue.append([R_QUERY, FORWARD, [c, 0, "simple"]])
                    else:
                        stmt = [c, 0, "simple"]
                        text, after = self._restore_query(c, data[pos + 5:end - 1], stmt)
                        if text is not None:
                            out.append(data[fwd_start:pos])
                            out.append(m.query(text))
                            fwd_start = end
                        queue.append([R_QUERY, FORWARD, stmt])
                        if after is not None:
                            out.append(data[fwd_start:end])
                            out.append(m.query(after))
                            fwd_start = end
                            queue.append([R_QUERY, QUIET, None])
                elif answer[:1] == b"E":
                    # Refused: the server raises it, so the transaction fails as it would have.
                    fields = m.parse_error_fields(answer[5:])
                    out.append(data[fwd_start:pos])
                    out.append(m.query(raise_sql(fields.get("C", "XX000"), fields.get("M", ""), fields.get("H"))))
                    fwd_start = end
                    queue.append([R_QUERY, FORWARD, None])
                else:
                    out.append(data[fwd_start:pos])
                    fwd_start = end
                    self._synth(answer)
                    self._synth(READY_NOW)
            elif t in (80, 66, 68, 67):  # Parse, Bind, Describe, Close: names may need rewriting
                self.batch_open = True
                repl = self._extended(t, data, pos + 5, end)
                if repl is not None:
                    out.append(data[fwd_start:pos])
                    out.append(repl)
                    fwd_start = end
            elif t == 70:  # 'F' FunctionCall
                queue.append([R_FUNC, FORWARD, None])
            elif t == 88:  # 'X' Terminate: nothing after it counts; the shell closes
                self.terminated = True
                out.append(data[fwd_start:pos])
                fwd_start = pos = n
                break
            elif t not in m.FRONTEND_TYPES:
                raise m.ProtocolError(f"invalid frontend message type {t}")
            pos = end
        more = b"" if pos == n else large.partial(self, data, pos)   # held, or streamed from here
        if not out:
            return data if pos == n else data[:pos] + more
        out.append(data[fwd_start:pos])
        out.append(more)
        return b"".join(out)

    def stream_start(self, t: int, data: bytes, pos: int, total: int) -> bytes | None:
        """A message longer than the relay holds starts at `pos` (`data` has its first
        large.HEAD bytes): queue what it asks for and stream it. None: hold it whole."""
        queue = self.queue
        if self.skip_to_sync and t != 100:
            return large.start(self, data, pos, total, None, True, None)    # skipped, as in the walk
        if t == 81:     # Query: judged by the pre-check over all of it, when its last byte is through
            self.stats.query_requests += 1
            entry = [R_QUERY, FORWARD, None]
            queue.append(entry)

            def query_done(big) -> None:
                c = unheld(big.prefix, big.length - 1, big.scan)
                self.session.statement(c, "simple", self.server)    # (rds: pins, too long)
                entry[2] = [c, 0, "simple"]
            return large.start(self, data, pos, total, pos + 5, False, query_done)
        if t == 80:     # Parse: only of the unnamed statement (a named one's text is kept)
            if data[pos + 5] != 0:
                return None
            self.batch_open = True
            queue.append([R_PARSE, FORWARD, None])

            def parse_done(big) -> None:
                self.unnamed_c = unheld(big.prefix, big.length, big.scan)
            return large.start(self, data, pos, total, pos + 6, False, parse_done)
        if t == 66:     # Bind: large parameters; the statement name may need renaming
            nul = data.find(b"\x00", pos + 5)
            nul2 = data.find(b"\x00", nul + 1) if nul >= 0 else -1
            if nul2 < 0:
                return None
            self.batch_open = True
            portal = data[pos + 5:nul]
            name = data[nul + 1:nul2]
            if not name:
                self.portal_c[portal] = self.unnamed_c
                queue.append([R_BIND, FORWARD, None])
                return large.start(self, data, pos, total, None, False, None)
            st = self.statements.get(name)
            if st is None:
                failed = self._unknown_statement(name, R_BIND)
                if failed is None:
                    return large.start(self, data, pos, total, None, False, None)
                return failed + large.start(self, data, pos, total, None, True, None)
            if st.classification is None:
                st.classification = classify(_statement_text(st))
            self.portal_c[portal] = st.classification
            pre = self._ensure_prepared(st)
            queue.append([R_BIND, FORWARD, None])
            head = b"B" + m.pack_i32(total - 1 - len(name) + len(st.name)) + data[pos + 5:nul + 1] + st.name
            return pre + head + large.start(self, data, nul2, total - (nul2 - pos), None, False, None)
        if t == 70:     # FunctionCall
            queue.append([R_FUNC, FORWARD, None])
        return large.start(self, data, pos, total, None, False, None)     # CopyData, FunctionCall

    def _extended(self, t: int, data: bytes, start: int, end: int) -> bytes | None:
        """Handle Parse/Bind/Describe/Close. Returns replacement bytes, or None to forward as is."""
        queue = self.queue
        server = self.server
        if t == 80:  # Parse: name \0 query \0 types
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
                queue.append([R_PARSE, FORWARD, None])
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
            queue.append([R_PARSE, FORWARD, (st.name, name)])
            return self._prepare_bytes(st)
        if t == 66:  # Bind: portal \0 statement \0 rest
            nul = data.index(b"\x00", start)
            portal = data[start:nul]
            nul2 = data.index(b"\x00", nul + 1)
            name = data[nul + 1:nul2]
            if not name:
                self.portal_c[portal] = self.unnamed_c
                queue.append([R_BIND, FORWARD, None])
                return None
            st = self.statements.get(name)
            if st is None:
                return self._unknown_statement(name, R_BIND)
            if st.classification is None:
                st.classification = classify(_statement_text(st))
            self.portal_c[portal] = st.classification
            pre = self._ensure_prepared(st)
            body = data[start:nul + 1] + st.name + data[nul2:end]
            queue.append([R_BIND, FORWARD, None])
            return pre + b"B" + m.pack_i32(len(body) + 4) + body
        if t == 68:  # Describe: 'S'|'P' name \0
            kind = data[start]
            name = data[start + 1:end - 1]
            if kind == 80 or not name:  # portal, or unnamed statement
                queue.append([R_DESC_PORTAL if kind == 80 else R_DESC_STMT, FORWARD, None])
                return None
            st = self.statements.get(name)
            if st is None:
                return self._unknown_statement(name, R_DESC_STMT)
            pre = self._ensure_prepared(st)
            queue.append([R_DESC_STMT, FORWARD, None])
            return pre + m.message(b"D", b"S" + st.name + b"\x00")
        # Close: 'S'|'P' name \0
        kind = data[start]
        name = data[start + 1:end - 1]
        if kind == 83 and name:
            # The server keeps the statement for other clients; this client forgets its name.
            st = self.statements.pop(name, None)
            self._synth(m.CLOSE_COMPLETE, undo=(name, st) if st is not None else None)
            return b""
        queue.append([R_CLOSE, FORWARD, None])
        return None

    def _unknown_statement(self, name: bytes, kind: int) -> bytes | None:
        """A Bind/Describe of a name this client never prepared. Forwarded as is, PostgreSQL
        answers 26000 itself and fails the transaction, exactly as without the proxy; but a
        name shaped like the proxy's own (U_<n>) could be another client's statement on this
        server connection, so that one is raised on the server instead."""
        if _SERVER_NAME.fullmatch(name):
            return self._fail(b"26000", f'prepared statement "{name.decode(errors="replace")}" does not exist')
        self.queue.append([kind, FORWARD, None])
        return None

    def _ensure_prepared(self, st: ServerStatement) -> bytes:
        if self.server.prepared.has(st.name):
            return b""
        self.stats.reprepares += 1
        self.queue.append([R_PARSE, SWALLOW, (st.name, None)])
        return self._prepare_bytes(st)

    def _prepare_bytes(self, st: ServerStatement) -> bytes:
        evicted = self.server.prepared.add(st.name)
        if evicted is None:
            return st.parse_msg
        # Make room on the server too; the Close's answer is the proxy's business.
        q = self.queue
        entry = q.pop()
        q.append([R_CLOSE, SWALLOW, None])
        q.append(entry)
        return m.close_statement(evicted) + st.parse_msg

    def _synth(self, msg: bytes | None, undo: tuple | None = None) -> None:
        """A response the proxy makes up, in its place among the server's. `undo` is
        (client name, statement or None) to restore if the server ends up skipping it."""
        if self.queue:
            self.queue.append([R_SYNTH, FORWARD, msg, undo])
        else:
            self.to_client.append(msg if msg is not None else m.ready_for_query(self.status))

    def _simple_query(self, c) -> bytes | None:
        """A simple query the proxy answers itself (refused, or about names only it knows)."""
        refusal = self.session.statement(c, "simple", self.server)
        if refusal is not None:
            return refusal
        # DEALLOCATE of protocol-level statement names (psycopg 3 does this): the server
        # knows them under other names, so the proxy forgets them itself.
        effects = c.effects
        if effects and all(e.kind is Kind.DEALLOCATE and e.name is not None and e.name.encode() in self.statements
               for e in effects):
            for e in effects:
                self.statements.pop(e.name.encode(), None)
            return m.command_complete("DEALLOCATE")
        return None

    def _run_own(self, sql: str) -> bytes:
        """The proxy's own statement in the middle of an extended batch, answers swallowed.
        Its own statement and portal name, so that the client's unnamed ones are left alone;
        closed first in case an error once skipped the closing."""
        q = self.queue
        for kind in (R_CLOSE, R_PARSE, R_BIND, R_EXEC, R_CLOSE, R_CLOSE):
            q.append([kind, SWALLOW, None])
        return (m.close_statement(_OWN)
                + m.message(b"P", _OWN + b"\x00" + m.cstr(sql) + b"\x00\x00")
                + m.message(b"B", _OWN + b"\x00" + _OWN + b"\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
                + m.message(b"E", _OWN + b"\x00" + m.pack_i32(0))
                + m.message(b"C", b"P" + _OWN + b"\x00")
                + m.close_statement(_OWN))

    def _restore_query(self, c, raw: bytes, stmt: list) -> tuple[bytes | None, str | None]:
        """The client's startup values where a statement of this simple Query resets them (a
        server connection's reset values are its own): a literal NULL given to set_config
        becomes the startup value, and after a RESET / RESET ALL / SET ... TO DEFAULT the
        proxy's own set_config statement joins the string. A DISCARD ALL must be alone in its
        string: the proxy's statement follows as a Query of its own. Returns the new text (or
        None) and that Query's SQL (or None).

        Fills `stmt` (the queue entry's statement state) with the indexes of statements
        restored, those followed by the proxy's statement (whose answers are hidden), and the
        edits (character offset, old length, new length) to map error positions back."""
        session = self.session
        startup = session.startup
        edits: list[tuple[int, int, bytes]] = []
        restored: set[int] = set()
        hidden: set[int] = set()
        single = len(c.groups) == 1
        for i, group in enumerate(c.groups):
            for edit in _value_edits(group, startup, raw):
                edits.append(edit)
                restored.add(i)
            if any(e.kind is Kind.DISCARD and e.name == "ALL" for e in group):
                if single and not edits:
                    sql = session.restore_sql(group)
                    if sql is not None:
                        stmt += [{0}, set(), []]
                        return None, sql
                continue    # in a string of several it fails
            # Alone and outside a transaction, a SET LOCAL ends with the statement (and warns;
            # a second statement would make the string a transaction block, without the warning).
            sql = session.restore_sql(group, local=not (single and self.status == b"I"))
            if sql is None:
                continue
            at = c.ends[i] if i < len(c.ends) else -1
            if at < 0:
                edits.append((len(raw), len(raw), b"\n;" + sql.encode()))
            else:
                edits.append((at, at, b";" + sql.encode()))
            restored.add(i)
            hidden.add(i)
        if not edits:
            return None, None
        edits.sort(key=lambda x: x[0])
        parts = []
        prev = 0
        shifts = []
        for start, stop, new in edits:
            parts.append(raw[prev:start])
            parts.append(new)
            prev = stop
            shifts.append((len(raw[:start].decode("utf-8", "replace")),
                           len(raw[start:stop].decode("utf-8", "replace")),
                           len(new.decode("utf-8", "replace"))))
        parts.append(raw[prev:])
        stmt += [restored, hidden, shifts]
        return b"".join(parts), None

    def _restore_parse(self, c, data: bytes, start: int, qstart: int, qend: int, end: int) -> bytes | None:
        """A Parse whose text gives set_config a value that may be NULL (a reset) for a
        parameter the client set at startup: see _value_edits. Returns the new Parse body
        (name, text, types), or None."""
        raw = data[qstart:qend]
        edits = sorted(_value_edits(c.effects, self.session.startup, raw))
        if not edits:
            return None
        parts = [data[start:qstart]]
        prev = 0
        for at, stop, new in edits:
            parts += [raw[prev:at], new]
            prev = stop
        parts += [raw[prev:], data[qend:end]]
        return b"".join(parts)

    def _fail(self, code: bytes, text: str, hint: str | None = None) -> bytes:
        """An error PostgreSQL would raise for this message, raised on the server itself so that
        the transaction fails and the rest of the batch is skipped exactly as PostgreSQL does."""
        q = self.queue
        q.append([R_PARSE, SWALLOW, None])
        q.append([R_BIND, SWALLOW, None])
        q.append([R_EXEC, FORWARD, None])
        return (m.message(b"P", b"\x00" + m.cstr(raise_sql(code.decode(), text, hint)) + b"\x00\x00")
                + m.message(b"B", b"\x00\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
                + m.message(b"E", b"\x00" + m.pack_i32(0)))

    # ------------------------------------------------------------------ server -> client

    def from_server(self, data: bytes) -> bytes:
        queue = self.queue
        if len(queue) == 1 and not self.sbuf and data[-6:-1] == _READY_HEAD:
            # The whole answer to one simple Query with no session effects, in one read (most
            # transactions of most clients): walked for its message types only.
            head = queue[0]
            stmt = head[2]
            if head[0] == R_QUERY and head[1] == FORWARD and stmt is not None and not stmt[0].groups \
                    and stmt[0].parsed and self.session.seen is None:
                out = self._plain_answer(data, stmt)
                if out is not None:
                    return out
        elif len(queue) > 1 and queue[-1][0] == R_SYNC and not self.sbuf and data[-6:-1] == _READY_HEAD \
                and self.session.seen is None:
            # The same for the answer to a whole extended-protocol batch up to its Sync.
            out = self._plain_batch(data)
            if out is not None:
                return out
        if self.sbuf:
            self.sbuf += data
            if len(self.sbuf) < self._need:
                return b""
            data = bytes(self.sbuf)
            self.sbuf = b""
        n = len(data)
        pos = 0
        out: list[bytes] | None = None
        fwd_start = 0
        while n - pos >= 5:
            t = data[pos]
            end = pos + 1 + unpack_i32(data, pos + 1)[0]
            if end > n:
                break
            if not queue:
                # Nothing asked for it: notices, notifications, parameter changes. Forward.
                if t == _E and _is_fatal(data, pos, end):
                    self.fatal = b""    # the server's own FATAL ends the client: nothing to add
                pos = end
                continue
            head = queue[0]
            action = head[1]
            if (t == 68 or t == 100) and action == FORWARD:
                # DataRow, CopyData: the bulk of traffic, never looked into.
                pos = end
                continue
            kind = head[0]
            drop = action != FORWARD
            if t == _E:
                if action == PRELUDE:
                    self.fatal = m.message(b"E", _as_fatal(data[pos + 5:end]))
                    self.server.dirty = True
                elif action != CHECK and action != QUIET:
                    self.session.failed()
                    if kind == R_QUERY and head[2] is not None and len(head[2]) > 3:
                        # The proxy's edits to the text must not move the error's position.
                        if action == HIDE:
                            head[1] = FORWARD
                        if out is None:
                            out = []
                        out.append(data[fwd_start:pos])
                        out.append(_unshift_position(data[pos:end], head[2][5]))
                        fwd_start = end
                drop = action == PRELUDE or action == CHECK or action == QUIET
                if not drop and _is_fatal(data, pos, end):
                    self.fatal = b""    # the server's own FATAL reaches the client: it is the one error
                if kind in EXTENDED:
                    # The server skips everything up to the next Sync; so do the queued requests,
                    # and so must whatever the client sends before its Sync.
                    while queue and queue[0][0] != R_SYNC:
                        self._abandon(queue.popleft())
                    if not queue:
                        self.skip_to_sync = True
            elif t == _S:
                # Kept even from the proxy's own parameter sync: it reports the client's values.
                name, value = m.split_parameter_status(data[pos + 5:end])
                self.server.reported[name] = value
                drop = action == CHECK
            elif t == _N or t == _A:
                # A notice from parsing the text again (a re-prepare) was the client's at its own Parse.
                drop = t == _N and action == SWALLOW and kind == R_PARSE
            elif t == 68:   # a row answering the proxy's own question
                if action == CHECK:
                    self._row = _data_row(data[pos + 5:end])
            elif t in TERMINALS[kind]:
                queue.popleft()
                if t == _Z and (self._ready(data[pos + 5:pos + 6], action) or queue and queue[0][1] == QUIET) \
                        and all(e[1] == CHECK or e[1] == QUIET for e in queue):
                    # Hold the client's ReadyForQuery until the check is answered, so the
                    # pin state is settled by the time the client's statement returns (and
                    # until the proxy's own Query behind it is done).
                    queue.append([R_SYNTH, FORWARD, data[pos:end]])
                    drop = True
                elif t == _C and action == FORWARD:
                    self._complete(head[2], data[pos + 5:end - 1])
            elif t == _C and action == HIDE:
                head[1] = FORWARD       # the proxy's own statement is done; the client's go on
            elif t == _Z:
                # Out of step (should not happen): resynchronise on ReadyForQuery.
                while queue and queue[0][0] not in (R_SYNC, R_QUERY, R_FUNC):
                    self._abandon(queue.popleft())
                if queue:
                    queue.popleft()
                self.status = self.server.status = data[pos + 5:pos + 6]
            elif t == _C and action == FORWARD:
                if self._complete(head[2], data[pos + 5:end - 1]):
                    head[1] = HIDE
            if drop:
                if out is None:
                    out = []
                out.append(data[fwd_start:pos])
                fwd_start = end
            pos = end
            # Responses the proxy made up go out once everything ahead of them has.
            while queue and queue[0][0] == R_SYNTH:
                if out is None:
                    out = []
                out.append(data[fwd_start:pos])
                msg = queue.popleft()[2]
                out.append(msg if msg is not None else m.ready_for_query(self.status))
                fwd_start = pos
        if pos < n:
            rest = data[pos:]
            self.sbuf = bytearray(rest)
            self._need = 1 + unpack_i32(rest, 1)[0] if len(rest) >= 5 else 5
            data = data[:pos]
            n = pos
        self.releasable = self.can_release
        if out is None:
            return data
        out.append(data[fwd_start:n])
        return b"".join(out)

    def _plain_answer(self, data: bytes, stmt: list) -> bytes | None:
        """from_server for `data` that ends with a ReadyForQuery, when the one request in flight
        is a simple Query without session effects. None: not that case (an error, a parameter
        report, COPY, ...), the general walk decides."""
        last = len(data) - 6
        pos = 0
        completes = 0
        while pos < last:
            t = data[pos]
            if t == 67:     # CommandComplete
                completes += 1
            elif t not in _PLAIN_ANSWER:
                return None
            pos += 1 + unpack_i32(data, pos + 1)[0]
        if pos != last:
            return None     # the tail only looked like a ReadyForQuery
        self.queue.popleft()
        stmt[1] += completes
        return self._settled(data, last)

    def _plain_batch(self, data: bytes) -> bytes | None:
        """from_server for `data` ending with the ReadyForQuery of a batch whose every request
        is forwarded as is, and whose Executes have no session effects: each answer message is
        matched to its request without changing anything, and only if all match are the
        requests settled. None: the general walk decides."""
        queue = self.queue
        last = len(data) - 6
        nq = len(queue) - 1     # requests before the Sync
        k = 0
        execs = None
        pos = 0
        while pos < last:
            t = data[pos]
            if t != 68 and t != 78 and t != 65:     # DataRow, notices ride along
                if k == nq:
                    return None
                entry = queue[k]
                kind = entry[0]
                if entry[1] != FORWARD or kind not in _PLAIN_KINDS or t not in TERMINALS[kind]:
                    return None
                if kind == R_EXEC:
                    stmt = entry[2]
                    if stmt is None or stmt[0].groups or not stmt[0].parsed:
                        return None
                    if t == 67:
                        if execs is None:
                            execs = []
                        execs.append(stmt)
                k += 1
            pos += 1 + unpack_i32(data, pos + 1)[0]
        if pos != last or k != nq or queue[nq][1] != FORWARD:
            return None
        queue.clear()
        if execs is not None:
            for stmt in execs:
                stmt[1] += 1
        return self._settled(data, last)

    def _settled(self, data: bytes, last: int) -> bytes:
        """The end of a fast walk: the ReadyForQuery at `last` settles the session. As in the
        general walk, the client's ReadyForQuery waits while a check of the server runs."""
        if self._ready(data[-1:], FORWARD):
            self.queue.append([R_SYNTH, FORWARD, data[last:]])
            data = data[:last]
        self.releasable = self.can_release
        return data

    def _complete(self, stmt: list | None, tag: bytes) -> bool:
        """CommandComplete for the client: the session engine applies that statement's effects.
        True if the proxy's own statement follows it in the string (see _restore_query)."""
        if tag.startswith(b"DEALLOCATE ALL") or tag == b"DISCARD ALL":
            # The server dropped every prepared statement on this connection, other clients' too.
            self.server.prepared.clear()
            self.statements.clear()
        if stmt is None:
            return False
        c = stmt[0]
        i = stmt[1]
        stmt[1] = i + 1
        if self.session.seen is not None and i == 0:
            self.session.seen.append(c.text)      # verify mode: what ran since the last check
        if c.groups or not c.parsed:
            if len(stmt) > 3:
                self.session.completed(c, i, tag, stmt[2], self.server, restored=i in stmt[3])
                return len(stmt) > 4 and i in stmt[4]
            self.session.completed(c, i, tag, stmt[2], self.server)
        return False

    def _ready(self, status: bytes, action: int) -> bool:
        """ReadyForQuery: settle the session. True if a check of the server's state was queued."""
        self.status = self.server.status = status
        session = self.session
        if action == CHECK:
            row, self._row = self._row, None
            if row is not None:
                session.checked(row, self.server)
        elif action != FORWARD:
            return False
        else:
            sql = session.ready(status, self.server)
            if sql is not None:
                self.queue.append([R_QUERY, CHECK, None])
                self.to_server.append(m.query(sql))
                return True
        # The client keeps this connection (pinned, or in a transaction) and a RESET sent the
        # server back to its own defaults where the client has startup values: set them again.
        if status == b"I" and not session.pins and (not session.startup or self.server.params == session.params):
            return False        # (resync_sql's own first test, without the call)
        sql = session.resync_sql(self.server, status)
        if sql:
            self.queue.append([R_QUERY, PRELUDE, None])
            self.to_server.append(m.query(sql))
        return False

    def _abandon(self, entry: list) -> None:
        """A request that failed or that the server skipped after an error.

        A Parse that did not happen leaves nothing prepared on the server, and a client
        name it would have created does not exist (PostgreSQL would say so too).
        """
        if entry[0] == R_PARSE and entry[2]:
            server_name, client_name = entry[2]
            self.server.prepared.discard(server_name)
            if client_name is not None:
                self.statements.pop(client_name, None)
        elif entry[0] == R_SYNTH and len(entry) > 3 and entry[3] is not None:
            name, st = entry[3]
            if st is None:
                self.statements.pop(name, None)     # a Parse that never happened
            else:
                self.statements[name] = st          # a Close that never happened

def _statement_text(st: ServerStatement) -> bytes:
    body = st.parse_msg
    start = body.index(b"\x00", 5) + 1
    return body[start:body.index(b"\x00", start)]


def _value_edits(effects, startup: dict, raw: bytes) -> list[tuple[int, int, bytes]]:
    """set_config(name, NULL, ...) resets to the server connection's own startup value: for a
    parameter the client gave at startup, its value argument becomes the client's startup
    value when it is a literal NULL, and COALESCE(argument, startup value) when it is a bound
    parameter or an expression (NULL there is a reset too). As (start, end, new bytes)."""
    out = []
    for e in effects:
        if e.kind is Kind.SET_CONFIG and e.span[0] >= 0 and isinstance(e.name, str) and e.name in startup:
            start, stop = e.span
            value = quote_literal(startup[e.name]).encode()
            if e.value is None:
                if raw[start:stop].lower() == b"null":
                    out.append((start, stop, value))
            else:
                out.append((start, stop, b"COALESCE(" + raw[start:stop] + b", " + value + b")"))
    return out


def _unshift_position(msg: bytes, shifts: list[tuple[int, int, int]]) -> bytes:
    """An ErrorResponse about a query text the proxy edited, with its cursor position (field
    P, characters from 1) moved back to the client's text; dropped if it points into the
    proxy's own addition. `shifts`: (character offset, old length, new length), in order."""
    fields = msg[5:].split(b"\x00")
    for k, f in enumerate(fields):
        if f[:1] == b"P" and f[1:].isdigit():
            at = int(f[1:]) - 1      # in the edited text
            delta = 0
            for start, old, new in shifts:
                if at < start + delta:
                    break
                if at < start + delta + new:
                    if old == 0:
                        del fields[k]
                        return m.message(b"E", b"\x00".join(fields))
                    at, delta = start, 0    # inside a replaced value: its start
                    break
                delta += new - old
            fields[k] = b"P" + str(at - delta + 1).encode()
            return m.message(b"E", b"\x00".join(fields))
    return msg


def _is_fatal(data: bytes, pos: int, end: int) -> bool:
    """The ErrorResponse at `pos` ends the server's session (severity FATAL or PANIC, field V,
    which is never translated)."""
    body = data[pos + 5:end]
    return b"\x00VFATAL\x00" in body or b"\x00VPANIC\x00" in body or body.startswith((b"VFATAL\x00", b"VPANIC\x00"))


def _as_fatal(fields: bytes) -> bytes:
    out = []
    for part in fields.split(b"\x00"):
        if part[:1] in (b"S", b"V"):
            part = part[:1] + b"FATAL"
        out.append(part)
    return b"\x00".join(out)


class _NoStats:
    """Counters nobody reads (unit tests of the relay alone)."""
    query_requests = param_syncs = reprepares = 0


def _data_row(body: bytes) -> list[str | None]:
    count = int.from_bytes(body[:2], "big")
    pos = 2
    row: list[str | None] = []
    for _ in range(count):
        ln = int.from_bytes(body[pos:pos + 4], "big", signed=True)
        pos += 4
        if ln < 0:
            row.append(None)
        else:
            row.append(body[pos:pos + ln].decode("utf-8", "replace"))
            pos += ln
    return row
