"""Which statements may set the session's sequence state (what currval() and lastval() read).

nextval() runs not only where the text says so: a serial or identity column's default, a
trigger, a function, a rule, a view's expression. So the relay treats a statement as maybe
calling nextval() unless its text shows it cannot: a read (SELECT, WITH, VALUES, TABLE,
SHOW) that calls no function outside a short list of built-ins, or transaction control and
settings. Being wrong the safe way (a statement marked that did not call nextval) costs one
`DISCARD SEQUENCES` when the server connection next goes to another client; the other way
would let a client read another client's value, so the list stays short. What the text cannot
show at all: a view whose definition calls nextval(), read by a plain SELECT.
"""
from __future__ import annotations

import re

from unpinned.sql.classifier import note_shape_flags
from unpinned.sql import kinds as K
from unpinned.sql.effects import Classification

# First words of statements that never call a function by themselves.
_QUIET_FIRST = frozenset((
    "begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release", "set", "reset",
    "show", "fetch", "move", "close", "deallocate", "discard", "listen", "unlisten", "prepare"))
# First words of reads: quiet unless they call a function.
_READ_FIRST = frozenset(("select", "with", "values", "table"))
# Words that may stand before "(" in a read without calling a user's function: SQL syntax and
# built-ins that cannot reach nextval(). Anything else before "(" counts as a function call.
_SAFE_CALLS = frozenset((
    "in", "exists", "any", "some", "all", "values", "over", "filter", "within", "cast", "coalesce",
    "nullif", "greatest", "least", "row", "array", "and", "or", "not", "from", "where", "select",
    "on", "using", "as", "when", "then", "else", "case", "join", "lateral", "by", "is", "like",
    "between", "having", "limit", "offset", "union", "intersect", "except", "distinct", "partition",
    "count", "sum", "avg", "min", "max", "now", "lower", "upper", "length", "abs", "round", "floor",
    "ceil", "extract", "date_trunc", "to_char", "array_agg", "string_agg", "json_agg", "jsonb_agg",
    "json_build_object", "jsonb_build_object", "row_number", "rank", "dense_rank", "current_setting",
    "pg_backend_pid", "version", "set_config", "currval", "lastval", "unnest", "generate_series",
    "substring", "substr", "position", "trim", "concat", "replace", "to_timestamp", "age",
    "char_length", "octet_length", "numeric", "int", "integer", "bigint", "varchar", "char",
    "decimal", "timestamp", "timestamptz", "time", "interval", "float", "double", "bit",
    "pg_catalog", "format_type", "pg_get_expr", "has_table_privilege", "quote_ident", "any_value",
))
# Statements that run PL/pgSQL where the text shows it, loading the library into the backend
# (its parameters become real, and the "plpgsql." prefix reserved): DO, CALL, and CREATE
# FUNCTION/PROCEDURE (the validator compiles the body). Functions and triggers that happen to be
# written in PL/pgSQL load it too, unseen.
_PLPGSQL = re.compile(r"^(?:do|call|create\s+(?:or\s+replace\s+)?(?:function|procedure))\b")
_FIRST_WORDS = re.compile(r"(?:^|;)[\s(]*(?:(?:--[^\n]*\n|/\*.*?\*/)[\s(]*)*([a-z_]+)", re.S)
_CALLS = re.compile(r"([a-z_][a-z0-9_$]*)\s*\(")
_WRITES = re.compile(r"\b(?:insert|update|delete|merge|copy|call|execute|do|into)\b")


# handoff_flags bits
SEQUENCES = 1       # may set the session's sequence state
PLPGSQL = 2         # runs PL/pgSQL where the text shows it


def handoff_flags(c: Classification) -> int:
    """What a statement string may leave in the server connection for the next client, as
    SEQUENCES | PLPGSQL bits. Cached on `c`, and by the text's shape (its digits made 0: the
    answer does not depend on them), since statements with literals (pgbench's `WHERE aid =
    4711`) get a new Classification each time: the classifier gives the next texts of a plain
    shape this answer as it classifies them."""
    flags = c._seq
    if flags is None:
        # (bytes: str.translate looks every character up in a dict, ten times the cost)
        shape = c.text.encode("utf-8", "surrogatepass").translate(_DIGITS_AS_ZERO)
        flags = _by_shape.get(shape)
        if flags is None:
            flags = (SEQUENCES if _may_set(c) else 0) | \
                (PLPGSQL if any(_PLPGSQL.match(s.lstrip(" \t\r\n(")) for s in c.text.lower().split(";")) else 0)
            if len(_by_shape) >= _SHAPES:
                _by_shape.pop(next(iter(_by_shape)))
            _by_shape[shape] = flags
        note_shape_flags(shape, flags)
        c._seq = flags
    return flags


_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_SHAPES = 5000
_by_shape: dict[bytes, int] = {}


def may_set_sequences(c: Classification) -> bool:
    """Might this statement string set the session's sequence state?"""
    return bool(handoff_flags(c) & SEQUENCES)


def _may_set(c: Classification) -> bool:
    if not c.parsed:
        return True
    for e in c.effects:
        if e.kind is K.SEQUENCE and e.name in ("nextval", "setval"):
            return True
    text = c.text.lower()
    firsts = _FIRST_WORDS.findall(text)
    if not firsts:
        return bool(text.strip(" \t\r\n;"))    # empty: quiet; anything unrecognised: maybe
    reads = False
    for word in firsts:
        if word in _READ_FIRST:
            reads = True
        elif word not in _QUIET_FIRST:
            return True
    if not reads:
        return False
    if _WRITES.search(text):        # a data-modifying WITH, SELECT INTO, ...
        return True
    return any(name not in _SAFE_CALLS for name in _CALLS.findall(text))
