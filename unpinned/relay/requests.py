"""The client -> server half of the relay: each client message is forwarded as it is, rewritten,
or answered by the proxy itself, and each request that gets a response is queued (relay/pending.py).
Also the requests and responses the proxy makes up in the client's place."""
from __future__ import annotations

from unpinned.relay import carried, carried_extended, large, prepared_view
from unpinned.relay.extended import _statement_text
from unpinned.relay.pending import (
    BIND_FORWARD, BIND_SWALLOW, CLOSE_SWALLOW, DESC_PORTAL_FORWARD, EXEC_FORWARD, EXEC_SWALLOW, FORWARD,
    FUNC_FORWARD, PARSE_FORWARD, PARSE_SWALLOW, QUERY_QUIET, QUERY_SWALLOW, R_BIND, R_EXEC, R_PARSE,
    R_QUERY, R_SYNTH, READY_NOW, SWALLOW, SYNC_FORWARD, Pending, StatementRun, statement_run)
from unpinned.sql.classifier import classify, unheld
from unpinned.sql import kinds as K
from unpinned.sql.sequences import SEQUENCES
from unpinned.sql.text import raise_sql
from unpinned.state.policy import STATEMENT_LIMIT
from unpinned.wire import messages as m
from unpinned.wire.framing import FRONTEND_LIMITS, query_text, unnamed_batch
from unpinned.wire.messages import (
    BIND, CLOSE, COPY_DATA, COPY_DONE, COPY_FAIL, DESCRIBE, EXECUTE, FUNCTION_CALL, PARSE, QUERY, SYNC, TERMINATE)

unpack_i32 = m.unpack_i32

_LIMITS = FRONTEND_LIMITS     # PostgreSQL's longest message of each type
# Parse, Bind, Describe, Close: names may need rewriting (see _extended).
_NAMED = frozenset((PARSE, BIND, DESCRIBE, CLOSE))
# What still reaches the server while the rest of a batch is skipped up to its Sync.
_PAST_SKIP = frozenset((QUERY, SYNC, COPY_DATA, COPY_DONE, COPY_FAIL))
_OWN = b"U_0"
# Refusals about prepared statement names (duplicate, unknown), which PostgreSQL raises without
# a CONTEXT line: the one of the DO block that raises them on the server is dropped.


class RequestWalk:
    """Relay's client -> server side (a part of Relay: its state is Relay's)."""

    __slots__ = ()

    def from_client(self, data: bytes) -> bytes:
        if self.held is not None:
            # After a LISTEN still waiting for the listening connection: kept, walked once it listens.
            if data:
                if self.cin is None:
                    self.cin = large.Held(data, 0)
                else:
                    self.cin.chunks.append(data)
            return b""
        if self.cin is None and not self.skip_to_sync and (text := query_text(data)) is not None:
            # One whole simple Query, alone in this read (most requests of most clients):
            # without session effects it goes as it is, with no walk. So does a lone BEGIN,
            # COMMIT, ROLLBACK...: nothing is refused, rewritten or carried for it (the session
            # engine has it at its CommandComplete), and TPC-B-like clients send two of each
            # transaction.
            c = classify(text)
            if (not c.effects or c.control_only) and c.byte_length <= STATEMENT_LIMIT:
                self.stats.query_requests += 1
                seq = c._seq    # (no call once its client owns the connection's sequence state)
                if seq != 0 and (seq != SEQUENCES or self.server.seq_owner is not self.session):
                    self._handoff(c)
                # The queue entry made here rather than by statement_run: no call on the hot path.
                run = StatementRun()
                run.kind = R_QUERY
                run.action = FORWARD
                run.payload = c
                run.count = 0
                run.protocol = "simple"
                run.restored = run.own_after = run.shifts = None
                self.queue.append(run)
                return data
        if len(data) > 5 and data[0] == PARSE and self.cin is None and not self.skip_to_sync:
            out = self._unnamed_batch(data)
            if out is not None:
                return out
        if self.cin is not None:
            # The rest of a message begun in an earlier read (relay/large.py); checked after the
            # fast path above, which a whole Query alone in its read never needs to wait for.
            head, data = self.cin.feed(self, data)
            if not data:
                return head
            return head + self.from_client(data)
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
            if self.skip_to_sync and t not in _PAST_SKIP:
                # After an error the proxy made up, the server must not see the rest of the batch.
                out.append(data[fwd_start:pos])
                fwd_start = end
            elif t == BIND and ln > 5 and data[pos + 5] == 0 and data[pos + 6] == 0:
                # Bind of the unnamed portal to the unnamed statement (most drivers' every query):
                # nothing to rename, so no call into _extended.
                self.batch_open = True
                self.portal_c[b""] = self.unnamed_c
                queue.append(BIND_FORWARD)
            elif t == EXECUTE:
                self.batch_open = True
                portal = data[pos + 5:data.index(b"\x00", pos + 5)]
                c = self.portal_c.get(portal)
                refusal = None if c is None or not c.effects and c.byte_length <= STATEMENT_LIMIT else \
                    self.session.statement(c, "extended", self.server)
                answer = None if refusal is not None or c is None or not c.effects else carried.listen_execute(self, c)
                if answer is not None:
                    out.append(data[fwd_start:pos])
                    fwd_start = end
                    self._synth(answer)
                    if self.held is not None:
                        pos = end
                        break
                elif refusal is None:
                    if c is None or (seq := c._seq) != 0 and \
                            (seq != SEQUENCES or self.server.seq_owner is not self.session):
                        self._handoff(c)
                    if c is None:
                        queue.append(EXEC_FORWARD)
                    else:
                        run = StatementRun()    # made here as in the fast path above: no call
                        run.kind = R_EXEC
                        run.action = FORWARD
                        run.payload = c
                        run.count = 0
                        run.protocol = "extended"
                        run.restored = run.own_after = run.shifts = None
                        queue.append(run)
                        if c.effects and self.carried is not None and self.carried.parsed:
                            # SQL PREPARE/DEALLOCATE through the extended protocol (carried_extended.py).
                            own = carried_extended.record_execute(self, run, c)
                            if own:
                                out.append(data[fwd_start:end])
                                out.append(own)
                                fwd_start = end
                    if c is not None and c.groups and self.session.startup:
                        sql = self.session.restore_sql(c.groups[0])
                        if sql is not None:
                            # Right behind it, before anything else of the batch runs.
                            queue[-1].restored = (0,)
                            out.append(data[fwd_start:end])
                            out.append(self._run_own(sql))
                            fwd_start = end
                else:
                    fields = m.parse_error_fields(refusal[5:])
                    out.append(data[fwd_start:pos])
                    out.append(self._fail(fields.get("C", "XX000").encode(), fields.get("M", ""), fields.get("H")))
                    fwd_start = end
            elif t == DESCRIBE and ln > 4 and data[pos + 5] == 80:  # of a portal: nothing to rename
                self.batch_open = True
                queue.append(DESC_PORTAL_FORWARD)
            elif t == PARSE and ln > 4 and data[pos + 5] == 0 and (qend := data.find(b"\x00", pos + 6, end)) > 0 \
                    and not (c := classify(data[pos + 6:qend])).effects:
                # Parse of the unnamed statement, without session effects: nothing to rewrite.
                self.batch_open = True
                self.unnamed_c = c
                queue.append(PARSE_FORWARD)
            elif t == SYNC:
                self.stats.query_requests += 1
                self.skip_to_sync = False
                self.batch_open = False
                queue.append(SYNC_FORWARD)
            elif t == QUERY:
                self.stats.query_requests += 1
                if self.skip_to_sync:
                    # PostgreSQL ignores it too while it discards messages up to Sync.
                    out.append(data[fwd_start:pos])
                    fwd_start = pos = end
                    continue
                c = classify(data[pos + 5:end - 1])
                answer = self._simple_query(c, data[pos + 5:end - 1]) \
                    if c.effects or c.byte_length > STATEMENT_LIMIT else None
                if answer.__class__ is tuple:
                    # SQL PREPARE/EXECUTE carried: forwarded with the server-side names (relay/carried.py).
                    pre, text, run, ops = answer
                    out.append(data[fwd_start:pos])
                    if pre:
                        queue.append(QUERY_SWALLOW)
                    out.append(pre + m.query(text))
                    fwd_start = end
                    queue.append(run)
                    carried.record(self, run, ops)
                elif answer is None:
                    if (seq := c._seq) != 0 and (seq != SEQUENCES or self.server.seq_owner is not self.session):
                        self._handoff(c)
                    if not (c.groups and self.session.startup):
                        queue.append(statement_run(R_QUERY, c, "simple"))
                    else:
                        stmt = statement_run(R_QUERY, c, "simple")
                        text, after = self._restore_query(c, data[pos + 5:end - 1], stmt)
                        if text is not None:
                            out.append(data[fwd_start:pos])
                            out.append(m.query(text))
                            fwd_start = end
                        queue.append(stmt)
                        if after is not None:
                            out.append(data[fwd_start:end])
                            out.append(m.query(after))
                            fwd_start = end
                            queue.append(QUERY_QUIET)
                elif answer[:1] == b"E":
                    # Refused: the server raises it, so the transaction fails as it would have.
                    fields = m.parse_error_fields(answer[5:])
                    out.append(data[fwd_start:pos])
                    out.append(m.query(raise_sql(fields.get("C", "XX000"), fields.get("M", ""))))
                    fwd_start = end
                    queue.append(Pending(R_QUERY, FORWARD, None, answer))
                else:
                    out.append(data[fwd_start:pos])
                    fwd_start = end
                    if self.held is not None:
                        pos = end
                        break
                    self._synth(answer)
                    self._synth(READY_NOW)
            elif t in _NAMED:
                self.batch_open = True
                carry = None
                if t == PARSE:
                    carry = carried.parse_rewrite(self, data, pos + 5, end)
                    if carry is None:
                        carry = carried_extended.parse_prepare(self, data, pos + 5, end)
                if carry is None:
                    repl = self._extended(t, data, pos + 5, end)
                elif len(carry) == 2 and isinstance(carry[1], bytes):
                    # EXECUTE of SQL-prepared statements, renamed (relay/carried.py).
                    pre, msg = carry
                    repl = self._extended(t, msg, 5, len(msg))
                    repl = pre + (msg if repl is None else repl)
                else:
                    repl = self._fail(carry[0].encode(), carry[1])
                if repl is not None:
                    out.append(data[fwd_start:pos])
                    out.append(repl)
                    fwd_start = end
            elif t == FUNCTION_CALL:
                self._handoff(None)
                queue.append(FUNC_FORWARD)
            elif t == TERMINATE:  # nothing after it counts; the shell closes
                self.terminated = True
                out.append(data[fwd_start:pos])
                fwd_start = pos = n
                break
            elif t not in m.FRONTEND_TYPES:
                raise m.ProtocolError(f"invalid frontend message type {t}")
            pos = end
        if self.held is not None:
            more = b""
            if pos < n:
                self.cin = large.Held(data[pos:], 0)    # after the held LISTEN (see the top)
        else:
            more = b"" if pos == n else large.partial(self, data, pos)   # held, or streamed from here
        if not out:
            return data if pos == n else data[:pos] + more
        out.append(data[fwd_start:pos])
        out.append(more)
        return b"".join(out)

    def _unnamed_batch(self, data: bytes) -> bytes | None:
        """from_client for `data` that is one whole batch on the unnamed statement and portal
        (Parse, Bind, Describe, Execute, Sync: most drivers' every query; framing.unnamed_batch)
        whose statement has no session effects, or is one transaction control statement: the
        queue entries the message loop below would make, without the loop. None: not that
        case, the loop decides."""
        batch = unnamed_batch(data)
        if batch is None:
            return None
        c = classify(batch[0])
        if c.effects and not c.control_only or c.byte_length > STATEMENT_LIMIT:
            return None     # (transaction control alone: nothing to refuse, rewrite or carry, as in from_client)
        self.unnamed_c = c
        self.portal_c[b""] = c
        seq = c._seq    # sequence values or PL/pgSQL left for the next client (see from_client)
        if seq != 0 and (seq != SEQUENCES or self.server.seq_owner is not self.session):
            self._handoff(c)
        queue = self.queue
        queue.append(PARSE_FORWARD)
        queue.append(BIND_FORWARD)
        if batch[1]:
            queue.append(DESC_PORTAL_FORWARD)
        run = StatementRun()    # made here as in from_client's fast path: no call
        run.kind = R_EXEC
        run.action = FORWARD
        run.payload = c
        run.count = 0
        run.protocol = "extended"
        run.restored = run.own_after = run.shifts = None
        queue.append(run)
        queue.append(SYNC_FORWARD)
        self.stats.query_requests += 1
        self.batch_open = False
        return data

    def stream_start(self, t: int, data: bytes, pos: int, total: int) -> bytes | None:
        """A message longer than the relay holds starts at `pos` (`data` has its first
        large.HEAD bytes): queue what it asks for and stream it. None: hold it whole."""
        queue = self.queue
        if self.skip_to_sync and t != COPY_DATA:
            return large.start(self, data, pos, total, None, True, None)    # skipped, as in the walk
        if t == QUERY:  # judged by the pre-check over all of it, when its last byte is through
            self.stats.query_requests += 1
            run = statement_run(R_QUERY, None, "simple")
            queue.append(run)

            def query_done(big) -> None:
                c = unheld(big.prefix, big.length - 1, big.scan)
                self.session.statement(c, "simple", self.server)    # (rds: pins, too long)
                if c is None or c._seq != 0:
                    self._handoff(c)
                run.payload = c
            return large.start(self, data, pos, total, pos + 5, False, query_done)
        if t == PARSE:  # only of the unnamed statement (a named one's text is kept)
            if data[pos + 5] != 0:
                return None
            self.batch_open = True
            queue.append(PARSE_FORWARD)

            def parse_done(big) -> None:
                self.unnamed_c = unheld(big.prefix, big.length, big.scan)
            return large.start(self, data, pos, total, pos + 6, False, parse_done)
        if t == BIND:   # large parameters; the statement name may need renaming
            nul = data.find(b"\x00", pos + 5)
            nul2 = data.find(b"\x00", nul + 1) if nul >= 0 else -1
            if nul2 < 0:
                return None
            self.batch_open = True
            portal = data[pos + 5:nul]
            name = data[nul + 1:nul2]
            if not name:
                self.portal_c[portal] = self.unnamed_c
                queue.append(BIND_FORWARD)
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
            queue.append(Pending(R_BIND, FORWARD, st))
            head = b"B" + m.pack_i32(total - 1 - len(name) + len(st.name)) + data[pos + 5:nul + 1] + st.name
            return pre + head + large.start(self, data, nul2, total - (nul2 - pos), None, False, None)
        if t == FUNCTION_CALL:
            self._handoff(None)
            queue.append(FUNC_FORWARD)
        return large.start(self, data, pos, total, None, False, None)     # CopyData, FunctionCall

    def _simple_query(self, c, raw: bytes) -> bytes | tuple | None:
        """A simple query the proxy answers itself (refused, or about names only it knows), or
        forwards rewritten (a tuple, see carried.sql_prepare_query)."""
        refusal = self.session.statement(c, "simple", self.server)
        if refusal is not None:
            return refusal
        answer = carried.listen_query(self, c)
        if answer is None:
            answer = carried.sql_prepare_query(self, c, raw)
        if answer is None and any(e.kind is K.PREPARED_VIEW for e in c.effects):
            answer = prepared_view.view_query(self, c, raw)
        if answer is None:
            answer = carried.listen_mixed(self, c, raw)
        if answer is not None:
            return answer
        # DEALLOCATE of protocol-level statement names (psycopg 3 does this): the server
        # knows them under other names, so the proxy forgets them itself.
        effects = c.effects
        if effects and all(e.kind is K.DEALLOCATE and e.name is not None and e.name.encode() in self.statements
               for e in effects):
            for e in effects:
                self.statements.pop(e.name.encode(), None)
            return m.command_complete("DEALLOCATE")
        return None

    def _synth(self, msg: bytes | None, undo: tuple | None = None) -> None:
        """A response the proxy makes up, in its place among the server's. `undo` is
        (client name, statement or None) to restore if the server ends up skipping it."""
        if self.queue:
            self.queue.append(Pending(R_SYNTH, FORWARD, msg, undo))
        else:
            self.to_client.append(msg if msg is not None else m.ready_for_query(self.status))

    def _run_own(self, sql: str) -> bytes:
        """The proxy's own statement in the middle of an extended batch, answers swallowed.
        Its own statement and portal name, so that the client's unnamed ones are left alone;
        closed first in case an error once skipped the closing."""
        q = self.queue
        for entry in (CLOSE_SWALLOW, PARSE_SWALLOW, BIND_SWALLOW, EXEC_SWALLOW, CLOSE_SWALLOW, CLOSE_SWALLOW):
            q.append(entry)
        return (m.close_statement(_OWN)
                + m.message(b"P", _OWN + b"\x00" + m.cstr(sql) + b"\x00\x00")
                + m.message(b"B", _OWN + b"\x00" + _OWN + b"\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
                + m.message(b"E", _OWN + b"\x00" + m.pack_i32(0))
                + m.message(b"C", b"P" + _OWN + b"\x00")
                + m.close_statement(_OWN))

    def _fail(self, code: bytes, text: str, hint: str | None = None, error: bytes | None = None) -> bytes:
        """An error PostgreSQL would raise for this message. A statement that fails is run on the
        server (raise_sql), so that the transaction fails and the rest of the batch is skipped
        exactly as PostgreSQL does, and the client gets this error in its place. The proxy's
        own statement and portal names leave the client's unnamed ones alone."""
        q = self.queue
        refusal = error or m.error_response(code.decode(), text, hint=hint)
        q.append(CLOSE_SWALLOW)
        q.append(Pending(R_PARSE, SWALLOW, None, refusal))     # (the cast fails in parse analysis)
        q.append(Pending(R_BIND, SWALLOW, None, refusal))
        q.append(Pending(R_EXEC, FORWARD, None, refusal))
        return (m.close_statement(_OWN)
                + m.message(b"P", _OWN + b"\x00" + m.cstr(raise_sql(code.decode(), text)) + b"\x00\x00")
                + m.message(b"B", _OWN + b"\x00" + _OWN + b"\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
                + m.message(b"E", _OWN + b"\x00" + m.pack_i32(0)))
