"""The server -> client half of the relay: the walk of the server's answers against the queue
of pending requests (relay/pending.py), with fast walks for the common answers, and the session
settled at each ReadyForQuery."""
from __future__ import annotations

from unpinned.relay import carried
from unpinned.relay.pending import (
    BIND_FORWARD, CHECK, DESC_PORTAL_FORWARD, EXTENDED, FORWARD, HIDE, PARSE_FORWARD, PRELUDE, QUERY_CHECK,
    QUERY_DISCARD, QUERY_PRELUDE, QUIET, R_BIND, R_DESC_PORTAL, R_DESC_STMT, R_EXEC, R_FUNC, R_PARSE, R_QUERY, R_SYNC,
    R_SYNTH, SHAPE, SWALLOW, SYNC_FORWARD, TERMINALS, Pending, StatementRun)
from unpinned.relay.prepared_view import CarriedRun, carried_error
from unpinned.relay.restore import unshift_position
from unpinned.sql.text import RAISE_SQLSTATE
from unpinned.wire import messages as m
from unpinned.wire.framing import answer_types, query_answer_completes, unnamed_answer_completes
from unpinned.wire.messages import (
    COMMAND_COMPLETE, COPY_DATA, DATA_ROW, ERROR_RESPONSE, NOTICE_RESPONSE, NOTIFICATION_RESPONSE,
    PARAMETER_STATUS, READY_FOR_QUERY)

unpack_i32 = m.unpack_i32

_READY_HEAD = b"Z\x00\x00\x00\x05"
_DISCARDED = m.command_complete("DISCARD SEQUENCES") + m.ready_for_query(b"I")
# Requests whose answers the fast walk of a batch can settle (see _plain_batch).
_PLAIN_KINDS = frozenset((R_PARSE, R_BIND, R_DESC_PORTAL, R_EXEC))


class ResponseWalk:
    """Relay's server -> client side (a part of Relay: its state is Relay's)."""

    __slots__ = ()

    def from_server(self, data: bytes) -> bytes:
        queue = self.queue
        if len(queue) == 1 and not self.sbuf and data[-6:-1] == _READY_HEAD:
            # The whole answer to one simple Query with no session effects, or of one transaction
            # control statement alone, in one read (most transactions of most clients): walked
            # for its message types only.
            head = queue[0]
            c = head.payload
            if head.kind == R_QUERY and head.action == FORWARD and c is not None and c.parsed \
                    and self.session.seen is None and (not c.groups or c.control_only):
                out = self._plain_answer(data, head)
                if out is not None:
                    return out
        elif len(queue) > 1 and not self.sbuf:
            if queue[0] is QUERY_DISCARD and queue[1].kind != R_SYNTH and data.startswith(_DISCARDED):
                # The answer to the proxy's DISCARD SEQUENCES at hand-off (relay.attach), always the
                # same: taken off the front, so that the client's answer behind it gets the fast walks.
                # (Not when a made-up answer waits behind it, such as a held LISTEN's: the general
                # walk sends that out.)
                queue.popleft()
                self.status = self.server.status = b"I"
                return self.from_server(data[len(_DISCARDED):]) if len(data) > len(_DISCARDED) else b""
            if queue[-1].kind == R_SYNC and data[-6:-1] == _READY_HEAD and self.session.seen is None:
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
                if t == ERROR_RESPONSE and _is_fatal(data, pos, end):
                    self.fatal = b""    # the server's own FATAL ends the client: nothing to add
                pos = end
                continue
            head = queue[0]
            action = head.action
            if (t == DATA_ROW or t == COPY_DATA) and action == FORWARD:
                # DataRow, CopyData: the bulk of traffic, never looked into.
                pos = end
                continue
            kind = head.kind
            drop = action != FORWARD
            if t == ERROR_RESPONSE:
                if action == PRELUDE:
                    self.fatal = m.message(b"E", _as_fatal(data[pos + 5:end]))
                    self.server.dirty = True
                elif action != CHECK and action != QUIET:
                    self.session.failed()
                    if (kind == R_BIND or kind == R_DESC_STMT) and head.payload is not None and action != SHAPE:
                        self._stale_error(head.payload, data[pos + 5:end])
                    if head.__class__ is Pending and kind != R_SYNTH and head.undo is not None:
                        # The proxy's refusal (see _fail): its own words in place of the server's.
                        if out is None:
                            out = []
                        out.append(data[fwd_start:pos])
                        out.append(_refusal(data[pos:end], head.undo))
                        fwd_start = end
                    if kind == R_QUERY and head.payload is not None and head.restored is not None:
                        # The proxy's edits to the text must not move the error's position.
                        if action == HIDE:
                            head.action = FORWARD
                        if out is None:
                            out = []
                        out.append(data[fwd_start:pos])
                        out.append(unshift_position(data[pos:end], head.shifts) if head.__class__ is not CarriedRun
                                   else carried_error(data[pos:end], head))
                        fwd_start = end
                drop = action == PRELUDE or action == CHECK or action == QUIET
                if not drop and _is_fatal(data, pos, end):
                    self.fatal = b""    # the server's own FATAL reaches the client: it is the one error
                if kind in EXTENDED:
                    # The server skips everything up to the next Sync; so do the queued requests,
                    # and so must whatever the client sends before its Sync.
                    while queue and queue[0].kind != R_SYNC:
                        self._abandon(queue.popleft())
                    if not queue:
                        self.skip_to_sync = True
            elif t == PARAMETER_STATUS:
                # Kept even from the proxy's own parameter sync: it reports the client's values.
                name, value = m.split_parameter_status(data[pos + 5:end])
                self.server.reported[name] = value
                drop = action == CHECK
            elif t == NOTICE_RESPONSE or t == NOTIFICATION_RESPONSE:
                # A notice from parsing the text again (a re-prepare) was the client's at its own Parse.
                drop = t == NOTICE_RESPONSE and action == SWALLOW and kind == R_PARSE
            elif t == DATA_ROW:   # answering the proxy's own question
                if action == CHECK:
                    self._row = _data_row(data[pos + 5:end])
            elif action == SHAPE:
                if t == 116:        # ParameterDescription; RowDescription or NoData follows
                    head.payload[2] = data[pos + 5:end]
                else:
                    queue.popleft()
                    self._described(head.payload, data[pos + 5:end] if t == 84 else None)
            elif t in TERMINALS[kind]:
                queue.popleft()
                if t == READY_FOR_QUERY and (self._ready(data[pos + 5:pos + 6], action)
                                             or queue and queue[0].action == QUIET) \
                        and all(e.action == CHECK or e.action == QUIET for e in queue):
                    # Hold the client's ReadyForQuery until the check is answered, so the
                    # pin state is settled by the time the client's statement returns (and
                    # until the proxy's own Query behind it is done).
                    queue.append(Pending(R_SYNTH, FORWARD, data[pos:end]))
                    drop = True
                elif t == COMMAND_COMPLETE and action == FORWARD:
                    self._complete(head, data[pos + 5:end - 1])
            elif t == COMMAND_COMPLETE and action == HIDE:
                head.action = FORWARD       # the proxy's own statement is done; the client's go on
            elif t == READY_FOR_QUERY:
                # Out of step (should not happen): resynchronise on ReadyForQuery.
                while queue and queue[0].kind not in (R_SYNC, R_QUERY, R_FUNC):
                    self._abandon(queue.popleft())
                if queue:
                    queue.popleft()
                self.status = self.server.status = data[pos + 5:pos + 6]
            elif t == COMMAND_COMPLETE and action == FORWARD:
                if self._complete(head, data[pos + 5:end - 1]):
                    head.action = HIDE
            if drop:
                if out is None:
                    out = []
                out.append(data[fwd_start:pos])
                fwd_start = end
            pos = end
            # Responses the proxy made up go out once everything ahead of them has.
            while queue and queue[0].kind == R_SYNTH:
                if out is None:
                    out = []
                out.append(data[fwd_start:pos])
                msg = queue.popleft().payload
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

    def _plain_answer(self, data: bytes, stmt: StatementRun) -> bytes | None:
        """from_server for `data` that ends with a ReadyForQuery, when the one request in flight
        is a simple Query without session effects, or of one transaction control statement.
        None: not that case (an error, a parameter report, COPY, ...), the general walk decides."""
        last = len(data) - 6
        c = stmt.payload
        if c.groups:
            # BEGIN, COMMIT, ROLLBACK... alone: taken here only when answered by its CommandComplete
            # alone (a warning, a parameter report, an error: the general walk), which the session
            # engine applies as _complete would.
            if data[0] != COMMAND_COMPLETE or 1 + unpack_i32(data, 1)[0] != last:
                return None
            self.queue.popleft()
            stmt.count = 1
            self.session.transaction_completed(c.effects[0], data[5:last - 1], self.server)
            return self._settled(data, last)
        completes = query_answer_completes(data, last)  # (what such an answer may hold: see there)
        if completes < 0:
            return None     # the tail only looked like a ReadyForQuery, or an answer for the general walk
        self.queue.popleft()
        stmt.count += completes
        return self._settled(data, last)

    def _plain_batch(self, data: bytes) -> bytes | None:
        """from_server for `data` ending with the ReadyForQuery of a batch whose every request
        is forwarded as is, and whose Executes have no session effects: each answer message is
        matched to its request without changing anything, and only if all match are the
        requests settled. None: the general walk decides."""
        queue = self.queue
        last = len(data) - 6
        nq = len(queue) - 1     # requests before the Sync
        if (nq == 3 or nq == 4 and queue[2] is DESC_PORTAL_FORWARD) and queue[0] is PARSE_FORWARD \
                and queue[1] is BIND_FORWARD and queue[nq] is SYNC_FORWARD:
            # The queue of one batch on the unnamed statement (requests.py _unnamed_batch, most
            # drivers' every query): matched by one call, without the loop below.
            run = queue[nq - 1]
            c = run.payload
            if run.kind != R_EXEC or run.action != FORWARD or c is None or not c.parsed:
                return None
            completes = unnamed_answer_completes(data, last, nq == 4)
            if completes < 0:
                return None
            if c.groups:
                # Transaction control alone, as in _plain_answer: its CommandComplete right after
                # the ParseComplete, BindComplete and NoData (5 bytes each), nothing riding along.
                at = 5 * nq - 5
                if not c.control_only or run.restored is not None or data[at] != COMMAND_COMPLETE \
                        or at + 1 + unpack_i32(data, at + 1)[0] != last:
                    return None
                queue.clear()
                run.count = 1
                self.session.transaction_completed(c.effects[0], data[at + 5:last - 1], self.server)
                return self._settled(data, last)
            queue.clear()
            run.count += completes
            return self._settled(data, last)
        types = answer_types(data, last)    # DataRow, NoticeResponse, NotificationResponse ride along
        if types is None or len(types) != nq or queue[nq].action != FORWARD:
            return None
        execs = None
        for t, entry in zip(types, queue):
            kind = entry.kind
            if entry.action != FORWARD or kind not in _PLAIN_KINDS or t not in TERMINALS[kind]:
                return None
            if kind == R_EXEC:
                c = entry.payload
                if c is None or c.groups or not c.parsed:
                    return None
                if t == COMMAND_COMPLETE:
                    if execs is None:
                        execs = []
                    execs.append(entry)
        queue.clear()
        if execs is not None:
            for stmt in execs:
                stmt.count += 1
        return self._settled(data, last)

    def _settled(self, data: bytes, last: int) -> bytes:
        """The end of a fast walk: the ReadyForQuery at `last` settles the session. As in the
        general walk, the client's ReadyForQuery waits while a check of the server runs."""
        # (_ready's FORWARD case, without the call: once per statement)
        status = data[-1:]
        server = self.server
        self.status = server.status = status
        session = self.session
        sql = session.ready(status, server)
        if sql is not None:
            self.queue.append(QUERY_CHECK)
            self.to_server.append(m.query(sql))
            self.queue.append(Pending(R_SYNTH, FORWARD, data[last:]))
            self.releasable = False
            return data[:last]
        if status == b"I":
            if session.pins or session.startup and server.params != session.params:
                self._resync(status)
        elif status == b"T" and session._w_params is not None:
            self._resync(status)
        # Relay.can_release, without the property call.
        self.releasable = not self.queue and status == b"I" and not self.batch_open \
            and not session.pins and self.held is None and not (self.cin and self.cin.streaming)
        return data

    def _complete(self, stmt: Pending, tag: bytes) -> bool:
        """CommandComplete for the client: the session engine applies that statement's effects
        (when the entry is a StatementRun, with the classification as its payload).
        True if the proxy's own statement follows it in the string (see relay/restore.py)."""
        if tag.startswith(b"DEALLOCATE ALL") or tag == b"DISCARD ALL":
            # The server dropped every prepared statement on this connection, other clients' too.
            self.server.prepared.clear()
            self.statements.clear()
            carried.forget_all(self)
        c = stmt.payload
        if c is None:
            return False
        i = stmt.count
        stmt.count = i + 1
        if self.session.seen is not None and i == 0:
            self.session.seen.append(c.text)      # verify mode: what ran since the last check
        if c.groups or not c.parsed:
            if stmt.restored is not None:
                self.session.completed(c, i, tag, stmt.protocol, self.server, restored=i in stmt.restored)
                return stmt.own_after is not None and i in stmt.own_after
            self.session.completed(c, i, tag, stmt.protocol, self.server)
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
                self.queue.append(QUERY_CHECK)
                self.to_server.append(m.query(sql))
                return True
        # The client keeps this connection (pinned, or in a transaction) and a RESET sent the
        # server back to its own defaults where the client has startup values: set them again.
        if status == b"I":
            if not session.pins and (not session.startup or self.server.params == session.params):
                return False    # (resync_sql's own first tests, without the call)
        elif status == b"E" or session._w_params is None:
            return False        # (the same inside a transaction: nothing set in it so far)
        self._resync(status)
        return False

    def _resync(self, status: bytes) -> None:
        sql = self.session.resync_sql(self.server, status)
        if sql:
            self.queue.append(QUERY_PRELUDE)
            self.to_server.append(m.query(sql))

    def _abandon(self, entry: Pending) -> None:
        """A request that failed or that the server skipped after an error.

        A Parse that did not happen leaves nothing prepared on the server, and a client
        name it would have created does not exist (PostgreSQL would say so too).
        """
        if entry.kind == R_PARSE and entry.payload:
            server_name, client_name = entry.payload
            self.server.prepared.discard(server_name)
            if client_name is not None:
                self.statements.pop(client_name, None)
        elif entry.kind == R_SYNTH and entry.undo is not None:
            name, st = entry.undo
            if st is None:
                self.statements.pop(name, None)     # a Parse that never happened
            else:
                self.statements[name] = st          # a Close that never happened


def _is_fatal(data: bytes, pos: int, end: int) -> bool:
    """The ErrorResponse at `pos` ends the server's session (severity FATAL or PANIC, field V,
    which is never translated)."""
    body = data[pos + 5:end]
    return b"\x00VFATAL\x00" in body or b"\x00VPANIC\x00" in body or body.startswith((b"VFATAL\x00", b"VPANIC\x00"))


def _refusal(server_error: bytes, refusal: bytes) -> bytes:
    """The answer to the proxy's failing statement (raise_sql): its refusal, unless the server
    failed it for another reason first (25P02 in an aborted transaction block), which stands."""
    code = m.parse_error_fields(server_error[5:]).get("C")
    return refusal if code == RAISE_SQLSTATE else server_error


def _as_fatal(fields: bytes) -> bytes:
    out = []
    for part in fields.split(b"\x00"):
        if part[:1] in (b"S", b"V"):
            part = part[:1] + b"FATAL"
        out.append(part)
    return b"\x00".join(out)


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
