"""Session effects: what a statement does to session state, as the classifier sees it.

This is the vocabulary shared by the SQL classifier (which produces effects from
statement text), the policies (which turn effects into pins for `rds` or `smart`
mode) and the session engine (which applies effects to a client's tracked state).
Nothing here parses SQL or does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from unpinned.sql.text import count_statements


class Kind(StrEnum):
    SET = "set"                          # SET name = value | TO DEFAULT; also SET TIME ZONE/NAMES/SCHEMA, SESSION CHARACTERISTICS
    RESET = "reset"                      # RESET name; name None means RESET ALL
    SET_CONFIG = "set_config"            # set_config(name, value, is_local) anywhere in an expression
    SET_TRANSACTION = "set_transaction"  # SET TRANSACTION ...: this transaction only
    ROLE = "role"                        # SET ROLE / RESET ROLE / SET SESSION AUTHORIZATION / RESET SESSION AUTHORIZATION
    PREPARE = "prepare"                  # SQL PREPARE name
    EXECUTE = "execute"                  # SQL EXECUTE name
    DEALLOCATE = "deallocate"            # SQL DEALLOCATE name; name None means ALL
    DISCARD = "discard"                  # DISCARD ALL|PLANS|SEQUENCES|TEMP (name holds which, upper case)
    CREATE_TEMP = "create_temp"          # CREATE TEMP TABLE/SEQUENCE/VIEW, SELECT INTO TEMP, pg_temp.x
    DROP = "drop"                        # DROP TABLE/SEQUENCE/VIEW ... (names), to notice temp objects going away
    DECLARE_CURSOR = "declare_cursor"    # DECLARE name CURSOR [WITH HOLD]
    CLOSE_CURSOR = "close_cursor"        # CLOSE name; name None means CLOSE ALL
    LISTEN = "listen"
    UNLISTEN = "unlisten"                # name None means UNLISTEN *
    LOAD = "load"
    ADVISORY_LOCK = "advisory_lock"      # pg_advisory_* / pg_try_advisory_* functions
    SEQUENCE = "sequence"                # nextval / setval / currval / lastval
    TRANSACTION = "transaction"          # BEGIN/START, COMMIT/END, ROLLBACK/ABORT, SAVEPOINT, RELEASE, ROLLBACK TO, PREPARE TRANSACTION
    UNPARSED = "unparsed"                # the parser could not parse the text
    PREPARED_VIEW = "prepared_view"      # reads pg_prepared_statements (no session effect: the relay
                                         # answers with the client's own statements, relay/prepared_view.py)


class Scope(StrEnum):
    SESSION = "session"
    LOCAL = "local"          # SET LOCAL, set_config(..., true): ends with the transaction


@dataclass(frozen=True, slots=True)
class Param:
    """A value that is a bound parameter ($n, 1-based) of an extended-protocol statement."""
    index: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """A value the text cannot tell (a function result, a column, an expression).

    `expr` is the SQL text of the expression, for logs only.
    """
    expr: str = ""


# A value in an effect: a literal string, None (DEFAULT / reset / ALL), a bound
# parameter, or something only the server knows.
Value = str | None | Param | Unknown


@dataclass(frozen=True, slots=True)
class Effect:
    kind: Kind
    # SET/RESET/SET_CONFIG: GUC name, lower case (str) or Param/Unknown for set_config.
    # PREPARE/EXECUTE/DEALLOCATE/DECLARE_CURSOR/CLOSE_CURSOR/LISTEN/UNLISTEN: the object name.
    # LOAD: library. ROLE: "role" or "session_authorization". DISCARD: "ALL"/"PLANS"/"SEQUENCES"/"TEMP".
    # CREATE_TEMP: object name. DROP: comma-joined names. ADVISORY_LOCK/SEQUENCE: function name, lower case.
    # TRANSACTION: "begin"|"commit"|"rollback"|"savepoint"|"release"|"rollback_to"|"prepare"|"commit_prepared"|"rollback_prepared".
    name: str | Param | Unknown | None = None
    # SET: value as PostgreSQL would show it from the text (None = DEFAULT); SET_CONFIG: the value argument.
    # ROLE: role name (None = NONE/DEFAULT/RESET). TRANSACTION savepoint ops: savepoint name.
    # CREATE_TEMP and DROP: "table"/"sequence"/"view". SEQUENCE: sequence name when literal.
    # SET_TRANSACTION: name transaction_isolation/_read_only/_deferrable/_snapshot, scope LOCAL.
    value: Value = None
    scope: Scope = Scope.SESSION
    # SET_CONFIG: is_local argument (True/False, or Param/Unknown). DECLARE_CURSOR: WITH HOLD.
    # CREATE_TEMP: True when ON COMMIT DROP. ADVISORY_LOCK: True for _xact_ variants.
    flag: bool | Param | Unknown = False
    # ADVISORY_LOCK: "lock" | "try_lock" | "unlock" | "unlock_all". Otherwise "".
    op: str = ""
    # SET_CONFIG: byte offsets (start, end) in the statement string of its value argument when
    # that is a literal NULL, a bound parameter or an expression (where the relay gives a reset
    # the client's startup value). Otherwise (-1, -1).
    span: tuple[int, int] = field(default=(-1, -1), compare=False, repr=False)


@dataclass(slots=True)
class Classification:
    """What one statement string (maybe several statements) does to the session."""
    text: str
    effects: tuple[Effect, ...]
    # Number of statements; None until asked for (counting costs a scan the proxy rarely needs).
    _statements: int | None = 1
    # The same effects split by statement, in order (empty when there are no effects):
    # the session engine matches the i-th CommandComplete with groups[i].
    groups: tuple[tuple[Effect, ...], ...] = ()
    byte_length: int = 0
    parsed: bool = True
    # Byte offset where each statement of `groups` ends (before its ';'), -1 for "at the end
    # of the string" (filled with the groups).
    ends: tuple[int, ...] = ()
    # Filled lazily by the classifier module (see classifier.fingerprint/digest).
    _fingerprint: str | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)
    # What it may leave in the server connection (sql/sequences.handoff_flags), once asked.
    _seq: int | None = field(default=None, repr=False)
    # One transaction control statement alone (BEGIN, COMMIT, ROLLBACK, SAVEPOINT...): the
    # relay's fast paths take it as a plain statement, and settle only its transaction.
    control_only: bool = field(default=False, repr=False)

    @property
    def has_effects(self) -> bool:
        return bool(self.effects)

    @property
    def statements(self) -> int:
        if self._statements is None:
            self._statements = count_statements(self.text)
        return self._statements


EMPTY: tuple[Effect, ...] = ()


class Reason(StrEnum):
    """Stable machine-readable pin reason codes (SPEC 2)."""
    SET = "set"
    SET_CONFIG = "set_config"
    STARTUP_OPTIONS = "startup_options"
    SQL_PREPARE = "sql_prepare"
    DISCARD = "discard"
    TEMP_OBJECT = "temp_object"
    CURSOR = "cursor"
    LISTEN = "listen"
    LOAD = "load"
    SEQUENCE = "sequence"
    ADVISORY_LOCK = "advisory_lock"
    STATEMENT_TOO_LONG = "statement_too_long"
    ROLE = "role"
    UNPARSED = "unparsed"
    SESSION_STATE = "session_state"   # foundation's conservative rule: a CommandComplete tag showed session state


REASON_SENTENCES: dict[Reason, str] = {
    Reason.SET: "The statement changed a session parameter with SET or RESET.",
    Reason.SET_CONFIG: "The statement called set_config(), which changes a session parameter.",
    Reason.STARTUP_OPTIONS: "The client sent command-line options (-c name=value) in its startup packet.",
    Reason.SQL_PREPARE: "The statement used SQL-level PREPARE, EXECUTE or DEALLOCATE; those prepared statements live on one server connection.",
    Reason.DISCARD: "The statement discarded session state (DISCARD).",
    Reason.TEMP_OBJECT: "The statement created a temporary table, sequence or view, which exists only on one server connection.",
    Reason.CURSOR: "The statement declared a cursor that outlives the transaction (WITH HOLD).",
    Reason.LISTEN: "The client listens on a notification channel, which is bound to one server connection.",
    Reason.LOAD: "The statement loaded a library module (LOAD) into the server process.",
    Reason.SEQUENCE: "The statement used a sequence function (nextval/setval/currval/lastval) whose session value lives on one server connection.",
    Reason.ADVISORY_LOCK: "The client holds a session-level advisory lock, which belongs to one server connection.",
    Reason.STATEMENT_TOO_LONG: "The statement text is longer than 16384 bytes.",
    Reason.ROLE: "The statement changed the current role or session authorization.",
    Reason.UNPARSED: "The statement could not be parsed, so its effect on the session is unknown.",
    Reason.SESSION_STATE: "The server reported a command that changes session state.",
}

# RDS Proxy's own reason text for its WARN line (see shared/reference/rds-proxy.md §2).
RDS_REASON_SQL = ("SQL changed session settings that the proxy doesn't track. "
                  "Consider moving session configuration to the proxy's initialization query.")
RDS_REASON_TOO_LONG = "The statement text exceeded the 16384-byte limit."
