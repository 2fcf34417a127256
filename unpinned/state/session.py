"""The session-state engine: what one client's session would look like on a server of
its own, and what must pin it. Pure: the relay feeds it protocol events; it answers
with decisions (refuse this statement, run this check, pinned or not).

Parameters follow PostgreSQL's own rules: changes made inside a transaction count
only if it commits; ROLLBACK, ROLLBACK TO SAVEPOINT and a failed implicit transaction
undo them; SET LOCAL and set_config(..., true) never outlive the transaction. The
engine keeps two views, because they differ after RESET/DISCARD: what the client
should see (`params`) and what the server connection actually has (`ServerState.params`);
any difference is synced before the client's next statement runs there.

What the text cannot settle is settled by asking the server, once, at the end of the
transaction that could have changed it: temp objects, WITH HOLD cursors, LISTEN
channels, session advisory locks, SQL-prepared statements, and parameter values that
came from an expression or a bound parameter.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from unpinned.sql import kinds as K
from unpinned.sql.effects import Classification, Effect, Kind, Param, Reason, Unknown
from unpinned.telemetry.pinlog import CARRIED, CURRVAL_GUARD, PIN, UNPIN, WOULD_PIN, ClientInfo, PinLog
from unpinned.state.policy import STATEMENT_LIMIT, PolicyOptions, rds_reasons
from unpinned.sql.classifier import classify, keep_exact_texts
from unpinned.sql.text import param_sync_sql, quote_literal
from unpinned.state.checks import CHECKS, VERIFY_PARAMS
from unpinned.state.notifications import LISTEN, UNLISTEN, Subscriptions

# Effects after which a given check is due.
_CHECK_TRIGGERS: dict[Kind, Reason] = {
    Kind.CREATE_TEMP: Reason.TEMP_OBJECT, Kind.DROP: Reason.TEMP_OBJECT,
    Kind.DECLARE_CURSOR: Reason.CURSOR, Kind.CLOSE_CURSOR: Reason.CURSOR,
    Kind.LISTEN: Reason.LISTEN, Kind.UNLISTEN: Reason.LISTEN,
    Kind.ADVISORY_LOCK: Reason.ADVISORY_LOCK,
    Kind.PREPARE: Reason.SQL_PREPARE, Kind.DEALLOCATE: Reason.SQL_PREPARE,
}
# GUCs that only ever last for the transaction, whatever the SET says.
_TRANSACTION_GUCS = frozenset(("transaction_isolation", "transaction_read_only", "transaction_deferrable"))
# GUCs whose new value depends on the old one (SET DateStyle = ISO keeps the field order):
# the text alone does not tell, so the server is asked.
_READ_BACK_GUCS = frozenset(("datestyle",))
# Left alone by RESET ALL (PostgreSQL's GUC_NO_RESET_ALL).
_NO_RESET_ALL = ("role", "session_authorization")
CURRVAL_SQLSTATE = "55000"
log = logging.getLogger("unpinned.state.session")


@dataclass
class SessionOptions:
    mode: str = "smart"                  # "smart" | "rds"
    set_local_pins: bool = False         # rds: does SET LOCAL pin?
    sequences: str = "carry"             # smart: "carry" (guard currval) | "pin"
    verify: bool = False                 # check the server's state after every transaction
    sql_prepare: str = "carry"           # smart: "carry" (relay/carried.py) | "pin"

    def policy(self) -> PolicyOptions:
        # Made once, not at every login (a Session each): nothing changes either of them.
        made = self.__dict__.get("_policy")
        if made is None:
            made = self.__dict__["_policy"] = PolicyOptions(
                set_local_pins=self.set_local_pins, sequences=self.sequences, sql_prepare=self.sql_prepare)
        return made


class Session:
    """One client's session state across whatever server connections it borrows."""

    # Slots: one per client (10,000 idle clients), created at every login.
    __slots__ = ("options", "rds", "policy", "startup", "params", "client", "pinlog", "pins", "pinned_at",
                 "_w_params", "_w_server", "_savepoints", "_query_failed", "_in_txn", "_checks", "_unknown",
                 "_unknown_done", "_awaiting_check", "_seq_at", "currval_refusals", "_server_hint",
                 "_lex_conforming", "_restored", "seen", "listening", "subscribe", "customs")

    def __init__(self, startup: dict[str, str], client: ClientInfo, pinlog: PinLog | None,
                 options: SessionOptions | None = None):
        if options is None:
            options = SessionOptions()
        self.options = options
        self.rds = options.mode == "rds"
        self.policy = options.policy()
        self.startup = dict(startup)        # what RESET goes back to
        self.params = dict(startup)         # what the client's session has now (committed)
        self.client = client
        self.pinlog = pinlog
        self.pins: dict[str, str] = {}      # reason -> SQL that caused it
        self.pinned_at: float | None = None
        # The transaction in progress: working copies of both views, or None when untouched.
        self._w_params: dict | None = None
        self._w_server: dict | None = None
        self._savepoints: list[tuple[str, dict | None, dict | None, set, int]] = []
        self._query_failed = False
        self._in_txn = False
        # Due at the end of the transaction.
        self._checks: dict[Reason, tuple[Classification, str]] = {}
        self._unknown: set[str] = set()          # set in the open transaction, value only the server knows
        self._unknown_done: set[str] = set()     # the same, committed, still to be read back
        self._awaiting_check: list | None = None
        # Sequences: (server id, server epoch) of this session's last nextval/setval.
        self._seq_at: tuple[int, int] | None = None
        self.currval_refusals = 0
        self._server_hint = None   # the server connection of the statement being applied
        self._lex_conforming = True   # standard_conforming_strings surely on when the current string was lexed
        self._restored = False        # the statement being applied had its startup values restored
        # Verify mode: the statements since the last check, to name the one that changed state.
        self.seen: list[str] | None = [] if options.verify else None
        if options.verify:
            keep_exact_texts()      # so that `seen` has each statement's own text
        # Custom (dotted) parameters this session would have a placeholder for on a server of
        # its own: given at startup, or named by a SET, RESET or set_config (see
        # ServerState.placeholders; the pool matches the two).
        customs: set[str] = set()
        for n in startup:       # (a loop here, not a set comprehension: its own frame at every login)
            if "." in n:
                customs.add(n)
        self.customs = customs
        # LISTEN carried in smart mode (state/notifications.py): the client's channels, made on
        # first use by `subscribe` (plugged in by the client connection).
        self.listening: Subscriptions | None = None
        self.subscribe = None

    def subscriptions(self) -> Subscriptions:
        if self.listening is None:
            self.listening = self.subscribe()
        return self.listening

    # ------------------------------------------------------------------ queries

    @property
    def pinned(self) -> bool:
        return bool(self.pins)

    def statement(self, c: Classification, protocol: str, server) -> bytes | None:
        """A statement is about to run. Returns an ErrorResponse to answer instead, or None."""
        if not c.effects and c.byte_length <= STATEMENT_LIMIT:
            return None
        for e in c.effects:
            if (e.kind is K.SET or e.kind is K.RESET or e.kind is K.SET_CONFIG) and \
                    isinstance(e.name, str) and "." in e.name:
                # PostgreSQL makes the placeholder as the statement runs, whatever follows.
                self.customs.add(e.name)
                if server is not None:
                    server.placeholders.add(e.name)
        reasons = rds_reasons(c, self.policy)
        if self.rds:
            if reasons and not self.pins:
                self._pin(reasons[0], c, protocol, server)
            return None
        for reason in reasons:
            self._log(WOULD_PIN, reason, c, protocol, server)
        if self.options.sequences == "carry" and self._seq_at is not None:
            for e in c.effects:
                if e.kind is K.SEQUENCE and e.name in ("currval", "lastval") and \
                        (server is None or server.seq_owner is not self):
                    # This session's sequence values are on another server connection, or were
                    # discarded: the server answers as for a session without them (55000 in
                    # PostgreSQL's words), never with another client's value. Counted and logged.
                    self.currval_refusals += 1
                    self._log(CURRVAL_GUARD, Reason.SEQUENCE, c, protocol, server)
                    break
        return None

    def sequences_set(self, server) -> None:
        """A statement that may set sequence values (nextval, maybe implicitly) runs on `server`."""
        self._seq_at = (server.id, server.epoch)

    def restore_sql(self, effects: tuple[Effect, ...], local: bool = True) -> str | None:
        """SQL to run right after a statement with these effects, in the same query string or
        batch, that gives back the client's startup values of the parameters it reset.

        PostgreSQL resets a parameter to the value of the backend's own startup packet, and
        the server connection's startup packet is not this client's: RESET, RESET ALL,
        SET x TO DEFAULT and DISCARD ALL there reach the server connection's defaults. Run
        at once after the statement, the client's values are back before anything else in
        the string or batch can see the difference (errors before it skip both alike; a
        rollback undoes both together). `local`: also for SET LOCAL ... TO DEFAULT.
        (set_config(name, NULL, ...) is a reset too: the relay rewrites its value argument,
        see relay/restore.py, value_edits.)"""
        startup = self.startup
        if not startup:
            return None
        sets: dict[str, bool] = {}      # name -> is_local
        for e in effects:
            k = e.kind
            if k is K.RESET:
                names = [n for n in startup if n not in _NO_RESET_ALL] if e.name is None else [e.name]
                is_local = False
            elif k is K.SET and e.value is None:
                names, is_local = [e.name], e.scope == "local"
                if is_local and not local:
                    continue
            elif k is K.DISCARD and e.name == "ALL":
                names, is_local = [n for n in startup if n not in _NO_RESET_ALL], False
            else:
                continue
            for n in names:
                if n in startup and n not in _TRANSACTION_GUCS:
                    sets[n] = is_local and sets.get(n, True)
        if not sets:
            return None
        return "SELECT " + ", ".join(
            f"pg_catalog.set_config({quote_literal(n)}, {quote_literal(startup[n])}, "
            f"{'true' if is_local else 'false'})" for n, is_local in sets.items())

    def completed(self, c: Classification, index: int, tag: bytes, protocol: str, server,
                  restored: bool = False) -> None:
        """Statement `index` of `c` completed (CommandComplete). `restored`: the relay gave the
        server connection the client's startup values of what it reset (see restore_sql), or
        put them in place of a set_config NULL."""
        if not c.parsed:
            if not self.rds:
                self._pin(Reason.UNPARSED, c, protocol, server)
            return
        if index == 0:
            # PostgreSQL lexes the whole string before running any of it: literals follow the
            # standard_conforming_strings of that moment, even after a RESET ALL inside it.
            self._lex_conforming = self._conforming_strings()
        if index >= len(c.groups):
            return
        self._server_hint = server
        self._restored = restored
        for e in c.groups[index]:
            self._apply(e, c, tag, protocol, server)
        self._restored = False

    def transaction_completed(self, e: Effect, tag: bytes, server) -> None:
        """`completed` for a string of one transaction control statement (the relay's fast walk):
        only its effect, which needs neither the lexing state nor the server hint."""
        self._transaction(e, tag, server)

    def failed(self) -> None:
        self._query_failed = True

    def ready(self, status: bytes, server) -> str | None:
        """ReadyForQuery. Returns SQL the proxy must run now on this server connection (its
        answer goes to `checked`), or None."""
        in_txn = status != b"I"
        if not in_txn:
            if self._w_params is not None:
                if self._query_failed:
                    self._discard()
                else:
                    self._commit(server)
            self._savepoints.clear()
            if self.listening is not None and self.listening.pending:
                if self._query_failed:
                    self.listening.discard()
                else:
                    self.listening.commit()
        self._in_txn = in_txn
        self._query_failed = False
        if in_txn or self.rds or not self._checks and not self._unknown_done and not self.options.verify:
            return None     # (the common case of _check_sql, without the call)
        return self._check_sql(server)

    def checked(self, row: list[str | None], server, protocol: str = "simple") -> None:
        """The answer to the SQL `ready` asked for."""
        plan, self._awaiting_check = self._awaiting_check, None
        if plan is None:
            return
        values = iter(row)
        for reason in plan[0]:
            held = int(next(values) or 0) > 0
            cause = self._checks.pop(reason, None)
            c, proto = cause if cause else (None, protocol)
            if held and reason is Reason.TEMP_OBJECT and server is not None:
                server.retire = "temporary tables used"     # (made where the text does not show it)
            if held and reason not in self.pins:
                self._pin(reason, c, proto, server)
            elif not held and reason in self.pins:
                self._unpin(reason, c, proto, server)
        for name in plan[1]:
            current, default, source = next(values), next(values), next(values)
            self._readback(name, current, default, server, source)
        if plan[2]:
            self._verify(next(values), server)
        self._checks.clear()
        self._unknown_done.clear()

    def resync_sql(self, server, status: bytes = b"I") -> str | None:
        """Statements that bring a server connection this client keeps (pinned, or inside a
        transaction) to the client's parameters, e.g. after a RESET of a startup value."""
        if status == b"E":
            return None                      # nothing runs in a failed transaction
        if status == b"T":
            if self._w_params is None or self._w_server == self._w_params:
                return None
            # A value set in this transaction that only the server knows (read back at its end)
            # is left as the server has it.
            unknown = self._unknown
            have = {n: v for n, v in self._w_server.items() if n not in unknown}
            want = {n: v for n, v in self._w_params.items() if n not in unknown}
            if have == want:
                return None
            sql = param_sync_sql(have, want)
            for n in unknown:                       # undone with the transaction if it rolls back
                if n in self._w_server:
                    want[n] = self._w_server[n]
            self._w_server = want
            return sql
        if server.params == self.params:
            return None
        sql = param_sync_sql(server.params, self.params)
        server.params = dict(self.params)
        return sql

    # ------------------------------------------------------------------ effects

    def _apply(self, e: Effect, c: Classification, tag: bytes, protocol: str, server) -> None:
        k = e.kind
        if k is K.SET or k is K.ROLE:
            name = e.name   # for ROLE: "role" or "session_authorization", both GUCs
            if e.scope == "local" or name in _TRANSACTION_GUCS:
                return
            if name == "session_authorization":
                self._reset("role")     # SET SESSION AUTHORIZATION also resets the role
            if isinstance(e.value, (Param, Unknown)) or (name in _READ_BACK_GUCS and e.value is not None) or \
                    (isinstance(e.value, str) and "\\" in e.value and not self._lex_conforming):
                # Backslashes are escapes when standard_conforming_strings is off: ask the server.
                self._set_unknown(name)
            elif e.value is None:
                self._reset(name)
            else:
                self._set(name, e.value)
        elif k is K.SET_CONFIG:
            if not isinstance(e.name, str):
                # Which parameter it sets is only known at run time: nothing to carry it with.
                self._pin(Reason.SET_CONFIG, c, protocol, server)
            elif e.flag is True or e.name in _TRANSACTION_GUCS:
                return
            else:
                # Even with literal arguments the call may not run (WHERE false, CASE, an
                # error in another column...): the server says what the value is. A NULL value
                # is a RESET when it runs, which the read-back tells apart by its source.
                self._set_unknown(e.name.lower())
        elif k is K.RESET:
            if e.name is None:
                self._reset_all()
            else:
                self._reset(e.name)
        elif k is K.DISCARD:
            if e.name == "ALL":
                self._reset("session_authorization")
                self._reset("role")
                self._reset_all()
                self._seq_at = None
                self._due(Reason.TEMP_OBJECT, c, protocol)
                for reason in (Reason.CURSOR, Reason.LISTEN, Reason.ADVISORY_LOCK, Reason.SQL_PREPARE):
                    self._due(reason, c, protocol)
                if self.listening is not None:
                    self.listening.unlisten_all()
            elif e.name == "TEMP":
                self._due(Reason.TEMP_OBJECT, c, protocol)
            elif e.name == "SEQUENCES":
                self._seq_at = None
        elif k is K.SEQUENCE:
            if e.name in ("nextval", "setval"):
                if self.options.sequences == "pin":
                    self._pin(Reason.SEQUENCE, c, protocol, server)
                elif server is not None:
                    self._seq_at = (server.id, server.epoch)
                    server.seq_owner = self
        elif k is K.LOAD:
            self._pin(Reason.LOAD, c, protocol, server)
        elif k is K.TRANSACTION:
            self._transaction(e, tag, server)
        elif k is K.ADVISORY_LOCK:
            if not e.flag:   # _xact_ locks end with the transaction
                self._due(Reason.ADVISORY_LOCK, c, protocol)
        elif k is K.CREATE_TEMP:
            if server is not None:
                # Temp buffers are allocated for the session's life: `SET temp_buffers` fails
                # there from now on, whatever DISCARD ALL does; no other client may get it.
                server.retire = "temporary tables used"
            if not e.flag:   # ON COMMIT DROP ends with the transaction
                self._due(Reason.TEMP_OBJECT, c, protocol)
        elif k is K.DECLARE_CURSOR:
            if e.flag:
                self._due(Reason.CURSOR, c, protocol)
        elif k is K.LISTEN and self.subscribe is not None and not self.rds:
            # A LISTEN in a string with other statements: the relay had the server UNLISTEN it
            # at once (relay/carried.py listen_mixed), the proxy listens for the client. Its
            # ReadyForQuery waits for the listening connection (a barrier, frontend/client.py).
            self.subscriptions().op(LISTEN, e.name, False)
            self.listening.barrier_due = True
            self._due(Reason.LISTEN, c, protocol)       # the server says it does not listen
        elif k is K.UNLISTEN and self.listening is not None and not self.rds:
            # An UNLISTEN that reached the server (in a string with other statements, such as
            # asyncpg's reset): the proxy's own record of the client's channels follows it.
            self.listening.op(UNLISTEN, e.name, False)
            if Reason.LISTEN in self.pins:
                self._due(Reason.LISTEN, c, protocol)
        else:
            reason = _CHECK_TRIGGERS.get(k)
            if reason is not None and (k in (K.LISTEN, K.PREPARE) or reason in self.pins):
                self._due(reason, c, protocol)

    def _due(self, reason: Reason, c: Classification, protocol: str) -> None:
        self._checks[reason] = (c, protocol)

    # ------------------------------------------------------------------ parameters

    def _working(self, server) -> tuple[dict, dict]:
        if self._w_params is None:
            self._w_params = dict(self.params)
            self._w_server = dict(server.params) if server is not None else {}
        return self._w_params, self._w_server

    def _set(self, name: str, value: str) -> None:
        wp, ws = self._working(self._server_hint)
        wp[name] = value
        ws[name] = value

    def _reset(self, name: str) -> None:
        wp, ws = self._working(self._server_hint)
        self._unknown.discard(name)
        if name in self.startup:
            wp[name] = self.startup[name]
            if self._restored and name not in _NO_RESET_ALL:
                ws[name] = self.startup[name]   # the relay set it again right after the reset
                return
        else:
            wp.pop(name, None)
        ws.pop(name, None)

    def _reset_all(self) -> None:
        wp, ws = self._working(self._server_hint)
        keep_p = {n: wp[n] for n in _NO_RESET_ALL if n in wp}
        keep_s = {n: ws[n] for n in _NO_RESET_ALL if n in ws}
        wp.clear()
        wp.update(self.startup)
        wp.update(keep_p)
        ws.clear()
        if self._restored:
            ws.update((n, v) for n, v in self.startup.items() if n not in _NO_RESET_ALL)
        ws.update(keep_s)
        self._unknown -= {n for n in self._unknown if n not in _NO_RESET_ALL}

    def _conforming_strings(self) -> bool:
        """Surely on? (Not when a set_config gave it a value only the server knows yet.)"""
        name = "standard_conforming_strings"
        if name in self._unknown or name in self._unknown_done:
            return False
        value = (self._w_params if self._w_params is not None else self.params).get(name)
        return value is None or value.lower() in ("on", "true", "1", "yes")

    def _set_unknown(self, name: str) -> None:
        self._working(self._server_hint)
        self._unknown.add(name)

    def _readback(self, name: str, current: str | None, default: str | None, server,
                  source: str | None = None) -> None:
        """The server told us a value the text could not: record it, unless it is the default.

        `source` tells a RESET (the server's own value: not 'session') from an explicit SET
        to a value that happens to equal the default."""
        at_default = current == default if source is None else source != "session"
        if current is None:
            at_default = True
        if at_default:
            server.params.pop(name, None)
            if name in self.startup:
                self.params[name] = self.startup[name]     # a RESET goes back to the startup value
            else:
                self.params.pop(name, None)
        else:
            self.params[name] = current
            server.params[name] = current

    def _commit(self, server) -> None:
        if self.listening is not None:
            self.listening.commit()
        if self._w_params is not None:
            self.params = self._w_params
            if server is not None:
                server.params = self._w_server
        self._w_params = self._w_server = None
        self._savepoints.clear()
        self._unknown_done |= self._unknown
        self._unknown.clear()

    def _discard(self) -> None:
        if self.listening is not None:
            self.listening.discard()
        self._w_params = self._w_server = None
        self._savepoints.clear()
        self._unknown.clear()

    def _transaction(self, e: Effect, tag: bytes, server) -> None:
        op = e.name
        if op in ("commit", "prepare"):
            if tag == b"ROLLBACK":        # COMMIT of a failed transaction
                self._discard()
            else:
                self._commit(server)
        elif op == "rollback":
            self._discard()
        elif op == "savepoint":
            self._savepoints.append((str(e.value or ""),
                                     dict(self._w_params) if self._w_params is not None else None,
                                     dict(self._w_server) if self._w_server is not None else None,
                                     set(self._unknown),
                                     self.listening.mark() if self.listening is not None else 0))
        elif op == "release":
            for i in range(len(self._savepoints) - 1, -1, -1):
                if self._savepoints[i][0] == e.value:
                    del self._savepoints[i:]
                    break
        elif op == "rollback_to":
            for i in range(len(self._savepoints) - 1, -1, -1):
                name, wp, ws, unknown, mark = self._savepoints[i]
                if name == e.value:
                    if self.listening is not None:
                        self.listening.rollback_to(mark)
                    del self._savepoints[i + 1:]
                    self._w_params = dict(wp) if wp is not None else None
                    self._w_server = dict(ws) if ws is not None else None
                    self._unknown = set(unknown)
                    break

    # ------------------------------------------------------------------ checks

    def _check_sql(self, server) -> str | None:
        if not self._checks and not self._unknown_done and not self.options.verify:
            return None         # the common case: nothing to ask the server
        reasons = list(self._checks)
        if self.options.verify:
            reasons = list(CHECKS)
        unknown = sorted(self._unknown_done)
        if not reasons and not unknown:
            return None
        cols = [CHECKS[r] for r in reasons]
        for name in unknown:
            lit = quote_literal(name)
            cols.append(f"pg_catalog.current_setting({lit}, true)")
            cols.append(f"(SELECT reset_val FROM pg_catalog.pg_settings WHERE name = {lit})")
            cols.append(f"(SELECT source FROM pg_catalog.pg_settings WHERE name = {lit})")
        verify = self.options.verify
        if verify:
            cols.append(VERIFY_PARAMS)
        self._awaiting_check = [reasons, unknown, verify]
        return "SELECT " + ", ".join(cols)

    def _verify(self, found: str | None, server) -> None:
        """Verify mode: the parameters the server connection has from SQL in this session
        (pg_settings.source = 'session') against those the proxy believes it gave it. One the
        proxy does not know of was set where no parser can see it (inside a function, a DO
        block, a trigger): reported with the statements since the last check, and the client
        is pinned to that connection, since the proxy cannot carry what it does not know.
        Not seen: custom (dotted) parameters, which pg_settings does not list, and a reset
        made inside a function."""
        seen, self.seen = self.seen or [], []
        if self.rds or self.pins:
            return      # a pinned client keeps its connection; it is reset when the client leaves
        on_server = {n.lower() for n in found.split("\x1f")} if found else set()
        # Known: what the proxy gave the connection, or what the client's session has (a value
        # the proxy put back itself, e.g. a startup value after RESET ALL, before its books
        # catch up at the next resync).
        known = {n.lower() for n in server.params} | {n.lower() for n in self.params}
        unseen = sorted(on_server - known - _TRANSACTION_GUCS)
        if not unseen:
            return
        texts = list(dict.fromkeys(seen))
        what = ", ".join(unseen)
        log.warning("verify: client %d, server connection %s: session state the proxy did not see (%s) "
                    "after: %s", self.client.id, getattr(server, "id", "?"), what, " | ".join(texts) or "?")
        self._pin(Reason.SESSION_STATE, classify(";\n".join(texts)) if texts else None, "simple", server)

    # ------------------------------------------------------------------ pins and telling why

    def _pin(self, reason: Reason, c: Classification | None, protocol: str, server) -> None:
        if reason in self.pins:
            return
        self.pins[reason] = c.text if c is not None else ""
        self._log(PIN, reason, c, protocol, server)

    def carry(self, reason: Reason, c: Classification, protocol: str, server) -> None:
        """Smart mode carried state RDS Proxy pins for (LISTEN, SQL PREPARE: relay/carried.py)."""
        self._log(CARRIED, reason, c, protocol, server)

    def _unpin(self, reason: Reason, c: Classification | None, protocol: str, server) -> None:
        if self.pins.pop(reason, None) is not None:
            self._log(UNPIN, reason, c, protocol, server)

    def _log(self, event: str, reason: Reason, c: Classification | None, protocol: str, server) -> None:
        if self.pinlog is not None:
            self.pinlog.record(event, reason, self.client, server.id if server is not None else None, c, protocol)
