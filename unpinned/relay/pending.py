"""The relay's response queue: one entry per request that gets a response, in the order the
server answers them, with the backend message types that end each response.

Entries are made on the hot path (one or more per transaction), so they are small slotted
classes with positional constructors, and entries that carry nothing but their kind and
action are shared constants (never changed: only an entry with a statement changes its action).
"""
from __future__ import annotations

# Request kinds in the response queue, and the backend message types that end each.
R_PARSE, R_BIND, R_DESC_STMT, R_DESC_PORTAL, R_EXEC, R_CLOSE, R_SYNC, R_QUERY, R_FUNC, R_SYNTH = range(10)
TERMINALS = (b"1", b"2", b"Tn", b"Tn", b"CIs", b"3", b"Z", b"Z", b"Z", b"")
EXTENDED = frozenset((R_PARSE, R_BIND, R_DESC_STMT, R_DESC_PORTAL, R_EXEC, R_CLOSE))

# How a queued request's response is treated.
FORWARD, SWALLOW, PRELUDE, CHECK, HIDE, QUIET, SHAPE = 0, 1, 2, 3, 4, 5, 6
# SWALLOW: the proxy's own Parse/Bind/Execute/Close, only errors reach the client.
# PRELUDE: the proxy's parameter sync; an error there is fatal for the client.
# CHECK:   the proxy asking the server about session state; the row goes to the session engine.
# HIDE:    a client's simple Query while the server answers a statement the proxy put into
#          its text (see relay/restore.py); back to FORWARD at that statement's CommandComplete.
# QUIET:   the proxy's own simple Query right behind a client's (or ahead of its first, see
#          Relay._discard_sequences); nothing of it reaches the client but ParameterStatus, and
#          the client's ReadyForQuery waits for it.
# SHAPE:   the proxy's Describe of a statement it just prepared: nothing reaches the client;
#          the answer is compared with the statement's shape (see relay/statements.py).
READY_NOW = None   # a made-up response that is ReadyForQuery with the status of the moment


class Pending:
    """A request waiting for its response. `payload` by kind: R_PARSE (server name, client name
    or None) for a statement being prepared, R_SYNTH the made-up response (bytes, or READY_NOW),
    R_QUERY and R_EXEC the statement's classification (the entry is then a StatementRun),
    R_BIND and R_DESC_STMT the statement (or None), SHAPE entries [statement, client name or
    None, ParameterDescription body]. `undo`: for R_SYNTH, (client name, statement or None) to
    restore if the server ends up skipping the request it answers; for the others, the proxy's
    refusal (an ErrorResponse) the client gets in place of the server's error (see _fail)."""

    __slots__ = ("kind", "action", "payload", "undo")

    def __init__(self, kind: int, action: int, payload=None, undo=None):
        self.kind = kind
        self.action = action
        self.payload = payload
        self.undo = undo

    def _fields(self) -> tuple:
        return tuple(getattr(self, f, None) for f in _FIELDS[type(self)])

    def __eq__(self, other):
        return type(other) is type(self) and self._fields() == other._fields()

    def __repr__(self):
        return f"{type(self).__name__}{self._fields()!r}"


class StatementRun(Pending):
    """The entry of a Query or an Execute whose text the relay classified (`payload`): how many
    of its statements have completed, and what the proxy changed in it (see relay/restore.py).

    One object with the entry rather than one beside it, and no __init__ (see statement_run):
    a Python __init__ costs about 2% of the proxy's instructions per transaction."""

    __slots__ = ("count", "protocol", "restored", "own_after", "shifts")
    # count:     CommandCompletes seen so far
    # protocol:  "simple" or "extended"
    # restored:  indexes of statements whose reset the proxy restored, or None
    # own_after: indexes followed by the proxy's own statement (answers hidden), or None
    # shifts:    (character offset, old length, new length) of the proxy's edits to the text, or None
    __init__ = object.__init__      # made by statement_run, or field by field on the hot path


def statement_run(kind: int, c, protocol: str) -> StatementRun:
    run = StatementRun()
    run.kind = kind
    run.action = FORWARD
    run.payload = c
    run.count = 0
    run.protocol = protocol
    run.restored = run.own_after = run.shifts = None
    return run


_FIELDS = {Pending: Pending.__slots__, StatementRun: Pending.__slots__[:3] + StatementRun.__slots__}


# Shared entries without a payload (made once, appended as they are).
PARSE_FORWARD = Pending(R_PARSE, FORWARD)
PARSE_SWALLOW = Pending(R_PARSE, SWALLOW)
BIND_FORWARD = Pending(R_BIND, FORWARD)
BIND_SWALLOW = Pending(R_BIND, SWALLOW)
DESC_STMT_FORWARD = Pending(R_DESC_STMT, FORWARD)
DESC_PORTAL_FORWARD = Pending(R_DESC_PORTAL, FORWARD)
EXEC_FORWARD = Pending(R_EXEC, FORWARD)
EXEC_SWALLOW = Pending(R_EXEC, SWALLOW)
CLOSE_FORWARD = Pending(R_CLOSE, FORWARD)
CLOSE_SWALLOW = Pending(R_CLOSE, SWALLOW)
SYNC_FORWARD = Pending(R_SYNC, FORWARD)
QUERY_FORWARD = Pending(R_QUERY, FORWARD)
QUERY_PRELUDE = Pending(R_QUERY, PRELUDE)
QUERY_CHECK = Pending(R_QUERY, CHECK)
QUERY_QUIET = Pending(R_QUERY, QUIET)
# The proxy's DISCARD SEQUENCES ahead of a client's first request on a server connection another
# client had (relay.attach): QUIET, and told apart by identity (its answer is always the same).
QUERY_DISCARD = Pending(R_QUERY, QUIET)
QUERY_SWALLOW = Pending(R_QUERY, SWALLOW)
FUNC_FORWARD = Pending(R_FUNC, FORWARD)
