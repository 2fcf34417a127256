"""Statement text in, session effects out.

`classify()` turns the text of a simple Query (or of a Parse message) into a
`Classification`: the session effects of each statement, in order. It uses
PostgreSQL's own parser (pglast / libpg_query), but only when a cheap keyword
check says the text could have an effect at all, and it caches the result, so a
statement seen before costs one dict lookup.

The walk works on libpg_query's JSON output (`parse_sql_json`) rather than on
pglast's Python node objects: it is about five times faster to build, and the
classifier only reads a handful of fields.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from typing import Any

from pglast import keywords as _kw
from pglast import parser as _pg

from unpinned.sql.text import _count_statements, count_statements  # noqa: F401  (count_statements: public here too)
from unpinned.sql.effects import (
    EMPTY,
    Classification,
    Effect,
    Kind,
    Param,
    Scope,
    Unknown,
    Value,
)

__all__ = ["classify", "fingerprint", "digest", "cache_clear", "CACHE_SIZE", "CACHE_BYTES", "EffectScan", "unheld", "redact_sql"]

# --------------------------------------------------------------------------- cache

CACHE_SIZE = 10_000            # entries
CACHE_BYTES = 64 * 1024 * 1024  # total key text; keeps a flood of huge statements bounded

# OrderedDict: FIFO eviction with popitem is O(1); a plain dict's next(iter()) slows
# down after many deletions at its front.
_cache: "OrderedDict[bytes | str, Classification]" = OrderedDict()
_cache_bytes = 0


def cache_clear() -> None:
    global _cache_bytes
    _cache.clear()
    _plain_shapes.clear()
    _cache_bytes = 0


def classify(query: bytes | str) -> Classification:
    """Session effects of a statement string. Cached by the exact text."""
    global _cache_bytes
    try:
        c = _cache.get(query)
    except TypeError:           # bytearray / memoryview: unhashable, copy once
        query = bytes(query)
        c = _cache.get(query)
    if c is not None:
        return c
    if query.__class__ is bytes:
        # Same text as one the pre-check passed but for its digits (pgbench's `WHERE aid =
        # 4711`, an ORM's literals): no effects either. Cached by its exact text only while
        # the cache has room, so a stream of such statements evicts nothing.
        if query.translate(_DIGITS_AS_ZERO) in _plain_shapes:
            c = Classification(query.decode("utf-8", "replace"), EMPTY, None, (), len(query), True)
            if len(_cache) < CACHE_SIZE and _cache_bytes + len(query) <= CACHE_BYTES:
                _cache[query] = c
                _cache_bytes += len(query)
            return c
    return _classify_new(query)


def _classify_new(query: bytes | str) -> Classification:
    global _cache_bytes
    if isinstance(query, str):
        text = query
        raw = query.encode("utf-8", "surrogatepass")
        c = _classify_text(text, raw)
    else:
        # A memoryview key would keep the caller's receive buffer alive: store bytes.
        query = raw = bytes(query)
        shape = raw.translate(_DIGITS_AS_ZERO)    # (classify() looked it up already)
        # PostgreSQL would reject invalid UTF-8; we still classify what we can.
        text = raw.decode("utf-8", "replace")
        if _may_have_effects(raw):
            c = _parse_effects(text, raw)
        else:
            c = Classification(text, EMPTY, None, (), len(raw), True)
            if shape != raw and len(raw) <= SHAPE_MAX_BYTES:
                # The text itself is cached below too, for statements that come back
                # verbatim ($1 texts).
                if len(_plain_shapes) >= SHAPE_CACHE_SIZE:
                    _plain_shapes.popitem(last=False)
                _plain_shapes[shape] = None
    size = len(query)   # same measure as the eviction below (chars for str keys)
    # Bounded: FIFO eviction is enough; hot statements come back in one parse.
    while _cache and (len(_cache) >= CACHE_SIZE or _cache_bytes + size > CACHE_BYTES):
        old, _ = _cache.popitem(last=False)
        _cache_bytes -= len(old)
    if size <= CACHE_BYTES:
        _cache[query] = c
        _cache_bytes += size
    return c


# Statements the pre-check passed, with every digit made 0: the pre-check gives the same
# answer whatever the digits are (none of its words has one, and it treats every digit
# alike), so a statement of the same shape needs no check at all.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
SHAPE_CACHE_SIZE = 5_000
SHAPE_MAX_BYTES = 2048          # so the shapes stay under 10 MB
_plain_shapes: "OrderedDict[bytes, None]" = OrderedDict()


# --------------------------------------------------------------------------- pre-check

# libpg_query's JSON parse tree: ~5x faster to build than pglast's node objects.
# (A module attribute so tests can count parses.)
_parse_json = _pg.parse_sql_json

# Every effect needs one of these words in the text (SQL keywords and the
# function names are whole words to PostgreSQL's lexer). Why the list is enough,
# so the pre-check never misses an effect:
#  set/reset   SET, RESET: also SET ROLE / SESSION AUTHORIZATION / SESSION
#              CHARACTERISTICS / TIME ZONE / NAMES / SCHEMA / TRANSACTION
#  temp, temporary, and the substring pg_temp (pg_temp.x, pg_temp_3.x): temp
#              objects, SELECT ... INTO TEMP (SELECT INTO without TEMP makes an
#              ordinary table, so "into" is not needed)
#  prepare, execute, deallocate, discard, declare, close, listen, unlisten,
#  load, drop
#  begin, start, commit, end, rollback, abort, savepoint, release: transaction
#              control (PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED included)
#  set_config, setval, nextval, currval, lastval, and the substring advisory
#              (pg_advisory_*, pg_try_advisory_*): functions
#  u&          U&"..." identifiers can spell any function or schema name with
#              escapes (U&"\0073et_config"), so they always go to the parser.
# Text without any of them cannot change session state, whether it parses or
# not, so it skips the parser (most SELECT/INSERT/UPDATE do).
#
# The rule: one of those words, as a whole word. A letter/underscore before, or an
# identifier character after, makes it part of a longer identifier ("offset", "settings",
# "temp1"). Digits and $ before are allowed on purpose: conservative, a false hit only
# costs one parse.
_PRECHECK_WORDS = re.compile(
    rb"pg_temp|advisory|u&|(?<![a-z_\x80-\xff])(?:set|reset|temp|temporary|prepare|execute"
    rb"|deallocate|discard|declare|close|listen|unlisten|load|drop|begin|start|commit|end"
    rb"|rollback|abort|savepoint|release|set_config|setval|nextval|currval|lastval)"
    rb"(?![a-z0-9_$\x80-\xff])")
_KEYWORDS = frozenset(
    b"set reset temp temporary prepare execute deallocate discard declare close listen unlisten load drop "
    b"begin start commit end rollback abort savepoint release set_config setval nextval currval lastval".split())
# For the fast first stage: A-Z lower-cased; letters, '_' and bytes >= 0x80 kept; every other
# byte (digits and $ included) a space. Every whole word the rule finds is then one of the
# split() tokens, so "no token is a keyword" is exact; a token that is one may still be a
# longer identifier ("set1"), which the regular expression decides.
_WORD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 95 or c >= 128 else 32
                    for c in range(256))


def _may_have_effects(raw: bytes) -> bool:
    """The pre-check on the statement bytes (any case). ~0.5 µs for a typical SELECT."""
    words = raw.translate(_WORD_BYTES)
    if b"pg_temp" in words or b"advisory" in words or b"u&" in raw or b"U&" in raw:
        return True
    if _KEYWORDS.isdisjoint(words.split()):
        return False
    return _PRECHECK_WORDS.search(raw.lower()) is not None


# Function names the expression walk looks for; a statement with none of these
# substrings (or u&) has no function effect, so its AST is not walked for calls.
_FUNC_HINT = re.compile(rb"set_config|advisory|nextval|setval|currval|lastval|u&")


def _classify_text(text: str, raw: bytes) -> Classification:
    if not _may_have_effects(raw):
        return Classification(text, EMPTY, None, (), len(raw), True)
    return _parse_effects(text, raw)


def _parse_effects(text: str, raw: bytes) -> Classification:
    """The effects of text the pre-check could not clear, from PostgreSQL's parser."""
    low = raw.lower()
    try:
        tree = json.loads(_parse_json(text))
        stmts = tree.get("stmts", ())
        ctx = _Ctx(text, _FUNC_HINT.search(low) is not None)
        effects: list[Effect] = []
        groups: list[tuple[Effect, ...]] = []
        ends: list[int] = []
        for raw_stmt in stmts:
            stmt = raw_stmt.get("stmt")
            before = len(effects)
            if stmt:
                _statement(stmt, ctx, effects)
            groups.append(tuple(effects[before:]))
            ln = raw_stmt.get("stmt_len", 0)
            ends.append(raw_stmt.get("stmt_location", 0) + ln if ln else -1)
    except Exception:   # ParseError; also RecursionError on absurdly deep expressions
        return Classification(text=text, effects=(Effect(Kind.UNPARSED),),
                              _statements=max(1, _count_statements(text, raw)),
                              byte_length=len(raw), parsed=False)
    return Classification(text=text, effects=tuple(effects) if effects else EMPTY,
                          _statements=len(stmts), byte_length=len(raw), parsed=True,
                          groups=tuple(groups) if effects else (), ends=tuple(ends) if effects else ())


class _Ctx:
    __slots__ = ("text", "funcs", "_tokens", "_bytes")

    def __init__(self, text: str, funcs: bool):
        self.text = text
        self.funcs = funcs          # walk expressions for function calls?
        self._tokens = None
        self._bytes = None

    def arg_text(self, func_loc: int, index: int) -> str:
        """SQL text of argument `index` of the call at byte offset func_loc (for Unknown.expr)."""
        toks = self._arg_tokens(func_loc, index)
        return self.text[toks[0].start:toks[-1].end + 1] if toks else ""

    def arg_span(self, func_loc: int, index: int) -> tuple[int, int]:
        """Byte offsets (start, end) of argument `index` of the call at byte offset func_loc,
        or (-1, -1)."""
        toks = self._arg_tokens(func_loc, index)
        if not toks:
            return -1, -1
        start = len(self.text[:toks[0].start].encode("utf-8", "surrogatepass"))
        return start, start + len(self.text[toks[0].start:toks[-1].end + 1].encode("utf-8", "surrogatepass"))

    def _arg_tokens(self, func_loc: int, index: int) -> list:
        try:
            if self._bytes is None:
                self._bytes = self.text.encode("utf-8", "surrogatepass")
                self._tokens = _pg.scan(self.text)
            start = len(self._bytes[:func_loc].decode("utf-8", "replace"))  # bytes -> chars
            args: list[list] = []
            depth = 0
            for tok in self._tokens:
                if tok.start < start:
                    continue
                ch = self.text[tok.start:tok.end + 1]
                if depth == 0:
                    if ch == "(":
                        depth = 1
                        args.append([])
                    continue
                if ch in "([":
                    depth += 1
                elif ch in ")]":
                    depth -= 1
                    if depth == 0:
                        break
                elif ch == "," and depth == 1:
                    args.append([])
                    continue
                args[-1].append(tok)
            return args[index]
        except Exception:
            return []


# --------------------------------------------------------------------------- statements

def _node(wrapper: Any) -> tuple[str, Any]:
    """{"TypeName": {...}} -> ("TypeName", {...})."""
    for k, v in wrapper.items():
        return k, v
    return "", {}


def _const(node: Any) -> tuple[bool, Any]:
    """If node is a constant (under casts/COLLATE), (True, python value); else (False, None).

    Strings come back as str, integers as int, floats as their text, booleans as
    bool, NULL as None.
    """
    while True:
        if not isinstance(node, dict):
            return False, None
        t, n = _node(node)
        if t in ("TypeCast", "CollateClause"):
            node = n.get("arg")
            continue
        if t != "A_Const":
            return False, None
        if n.get("isnull"):
            return True, None
        if "sval" in n:
            return True, n["sval"].get("sval", "")
        if "ival" in n:
            return True, n["ival"].get("ival", 0)
        if "fval" in n:
            return True, n["fval"].get("fval", "0")
        if "boolval" in n:
            return True, bool(n["boolval"].get("boolval", False))
        if "bsval" in n:
            return True, n["bsval"].get("bsval", "")
        return False, None


def _null_location(node: Any) -> int:
    """Byte offset of a literal NULL (under casts/COLLATE), or -1."""
    while isinstance(node, dict):
        t, n = _node(node)
        if t in ("TypeCast", "CollateClause"):
            node = n.get("arg")
            continue
        if t == "A_Const" and n.get("isnull"):
            return n.get("location", -1)
        return -1
    return -1


def _param(node: Any) -> Param | None:
    """$n (under casts) -> Param(n)."""
    while isinstance(node, dict):
        t, n = _node(node)
        if t in ("TypeCast", "CollateClause"):
            node = n.get("arg")
            continue
        if t == "ParamRef":
            return Param(n.get("number", 0))
        return None
    return None


# GUCs whose list elements PostgreSQL quotes as identifiers when it flattens a
# SET argument list (GUC_LIST_QUOTE in guc_tables.c).
_LIST_QUOTE = frozenset({"search_path", "temp_tablespaces", "local_preload_libraries",
                         "session_preload_libraries", "shared_preload_libraries",
                         "unix_socket_directories"})
_NOT_SAFE_KEYWORDS = frozenset(_kw.RESERVED_KEYWORDS | _kw.COL_NAME_KEYWORDS
                               | _kw.TYPE_FUNC_NAME_KEYWORDS)
_SAFE_IDENT = re.compile(r"[a-z_][a-z0-9_]*\Z")


def _quote_ident(s: str) -> str:
    """PostgreSQL's quote_identifier()."""
    if _SAFE_IDENT.match(s) and s not in _NOT_SAFE_KEYWORDS:
        return s
    return '"' + s.replace('"', '""') + '"'


def _set_value(name: str, args: list) -> Value:
    """The value text PostgreSQL builds for SET name = args (flatten_set_variable_args)."""
    parts: list[str] = []
    quote = name in _LIST_QUOTE
    for a in args:
        ok, v = _const(a)
        t, _n = _node(a)
        if not ok or t != "A_Const":
            # SET TIME ZONE INTERVAL '...' HOUR TO MINUTE: the server computes it.
            return Unknown(_deparse(a))
        if isinstance(v, str):
            parts.append(_quote_ident(v) if quote else v)
        elif isinstance(v, bool):
            parts.append("on" if v else "off")
        else:
            parts.append(str(v))
    return ", ".join(parts)


def _deparse(node: Any) -> str:
    try:
        t, n = _node(node)
        if t == "TypeCast":
            ok, v = _const(node)
            tn = ".".join(x["String"]["sval"] for x in n["typeName"]["names"]
                          if x["String"]["sval"] != "pg_catalog")
            return f"{tn} '{v}'" if ok else tn
    except Exception:
        pass
    return ""


_ISOLATION_DEFAULTS = {
    "transaction_isolation": "default_transaction_isolation",
    "transaction_read_only": "default_transaction_read_only",
    "transaction_deferrable": "default_transaction_deferrable",
}


def _multi_values(args: list) -> list[tuple[str, str]]:
    """SET [SESSION CHARACTERISTICS AS] TRANSACTION options -> [(name, value)]."""
    out = []
    for a in args:
        t, d = _node(a)
        if t != "DefElem":
            continue
        ok, v = _const(d.get("arg"))
        if d.get("defname") == "transaction_isolation":
            out.append(("transaction_isolation", str(v)))
        else:   # read_only / deferrable come as integer 1/0
            out.append((d.get("defname", ""), "on" if v else "off"))
    return out


def _variable_set(n: dict, effects: list[Effect]) -> None:
    kind = n.get("kind")
    scope = Scope.LOCAL if n.get("is_local") else Scope.SESSION
    name = n.get("name", "")
    lname = name.lower()
    if kind == "VAR_SET_MULTI":
        if name == "SESSION CHARACTERISTICS":
            for opt, v in _multi_values(n.get("args", [])):
                effects.append(Effect(Kind.SET, name=_ISOLATION_DEFAULTS.get(opt, opt), value=v, scope=scope))
        elif name == "TRANSACTION SNAPSHOT":
            ok, v = _const((n.get("args") or [None])[0])
            effects.append(Effect(Kind.SET_TRANSACTION, name="transaction_snapshot",
                                  value=v if ok else None, scope=Scope.LOCAL))
        else:   # TRANSACTION
            for opt, v in _multi_values(n.get("args", [])):
                effects.append(Effect(Kind.SET_TRANSACTION, name=opt, value=v, scope=Scope.LOCAL))
        return
    if lname in ("role", "session_authorization"):
        value: Value = None
        if kind == "VAR_SET_VALUE":
            ok, v = _const((n.get("args") or [None])[0])
            value = v if ok else Unknown()
            if lname == "role" and value == "none":   # SET ROLE NONE (PG compares the string too)
                value = None
        effects.append(Effect(Kind.ROLE, name=lname, value=value, scope=scope))
        return
    if kind == "VAR_SET_VALUE":
        effects.append(Effect(Kind.SET, name=lname, value=_set_value(lname, n.get("args", [])), scope=scope))
    elif kind == "VAR_SET_DEFAULT":
        effects.append(Effect(Kind.SET, name=lname, value=None, scope=scope))
    elif kind == "VAR_SET_CURRENT":
        effects.append(Effect(Kind.SET, name=lname, value=Unknown("FROM CURRENT"), scope=scope))
    elif kind == "VAR_RESET":
        effects.append(Effect(Kind.RESET, name=lname, scope=scope))
    elif kind == "VAR_RESET_ALL":
        effects.append(Effect(Kind.RESET, name=None, scope=scope))


def _is_temp_rel(rel: dict) -> bool:
    if rel.get("relpersistence") == "t":
        return True
    schema = rel.get("schemaname")
    # pg_temp, or pg_temp_N when it is this session's own temp schema.
    return schema is not None and (schema == "pg_temp" or
                                   (schema.startswith("pg_temp_") and schema[8:].isdigit()))


def _into(n: dict) -> dict | None:
    """The INTO clause of a SELECT (it sits on the leftmost arm of a set operation)."""
    while n is not None:
        into = n.get("intoClause")
        if into is not None:
            return into
        n = n.get("larg")
    return None


_DROP_TYPES = {"OBJECT_TABLE": "table", "OBJECT_SEQUENCE": "sequence", "OBJECT_VIEW": "view"}
_DISCARD = {"DISCARD_ALL": "ALL", "DISCARD_PLANS": "PLANS", "DISCARD_SEQUENCES": "SEQUENCES",
            "DISCARD_TEMP": "TEMP"}
_TRANS = {
    "TRANS_STMT_BEGIN": "begin", "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit", "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint", "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback_to", "TRANS_STMT_PREPARE": "prepare",
    "TRANS_STMT_COMMIT_PREPARED": "commit_prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback_prepared",
}
_CURSOR_OPT_HOLD = 0x0020

# Statements whose expressions are stored, not run now (a view's query, a
# function's defaults or BEGIN ATOMIC body, a new table's column defaults, rule,
# trigger, policy and statistics expressions, CREATE SCHEMA's elements; index
# expressions may only call immutable functions), and PREPARE, whose query runs
# at EXECUTE. Everything else is walked, ALTER TABLE included (a volatile
# column default is evaluated for existing rows).
_NO_WALK = frozenset({"PrepareStmt", "CreateFunctionStmt", "ViewStmt", "CreateStmt", "RuleStmt",
                      "CreateTrigStmt", "CreatePolicyStmt", "AlterPolicyStmt", "CreateDomainStmt",
                      "AlterFunctionStmt", "CreateSeqStmt", "DoStmt", "CreateSchemaStmt",
                      "IndexStmt", "CreateStatsStmt"})


def _statement(stmt: dict, ctx: _Ctx, effects: list[Effect]) -> None:
    t, n = _node(stmt)
    walk = ctx.funcs and t not in _NO_WALK
    if t == "VariableSetStmt":
        _variable_set(n, effects)
    elif t == "SelectStmt":
        into = _into(n)
        if into is not None and _is_temp_rel(into.get("rel", {})):
            effects.append(Effect(Kind.CREATE_TEMP, name=into["rel"].get("relname"), value="table",
                                  flag=into.get("onCommit") == "ONCOMMIT_DROP"))
    elif t == "TransactionStmt":
        op = _TRANS.get(n.get("kind", ""), "")
        if op:
            effects.append(Effect(Kind.TRANSACTION, name=op,
                                  value=n.get("savepoint_name", n.get("gid"))))
    elif t == "CreateStmt":
        rel = n.get("relation", {})
        if _is_temp_rel(rel):
            effects.append(Effect(Kind.CREATE_TEMP, name=rel.get("relname"), value="table",
                                  flag=n.get("oncommit") == "ONCOMMIT_DROP"))
    elif t == "CreateTableAsStmt":
        into = n.get("into", {})
        rel = into.get("rel", {})
        if _is_temp_rel(rel):
            effects.append(Effect(Kind.CREATE_TEMP, name=rel.get("relname"), value="table",
                                  flag=into.get("onCommit") == "ONCOMMIT_DROP"))
        _nested_execute(n.get("query"), effects)
    elif t == "CreateSeqStmt":
        rel = n.get("sequence", {})
        if _is_temp_rel(rel):
            effects.append(Effect(Kind.CREATE_TEMP, name=rel.get("relname"), value="sequence"))
    elif t == "ViewStmt":
        rel = n.get("view", {})
        if _is_temp_rel(rel):
            effects.append(Effect(Kind.CREATE_TEMP, name=rel.get("relname"), value="view"))
    elif t == "DropStmt":
        what = _DROP_TYPES.get(n.get("removeType", ""))
        if what:
            names = []
            for obj in n.get("objects", []):
                items = obj.get("List", {}).get("items", [])
                names.append(".".join(i.get("String", {}).get("sval", "") for i in items))
            effects.append(Effect(Kind.DROP, name=",".join(names), value=what))
    elif t == "PrepareStmt":
        effects.append(Effect(Kind.PREPARE, name=n.get("name")))
    elif t == "ExecuteStmt":
        effects.append(Effect(Kind.EXECUTE, name=n.get("name")))
    elif t == "DeallocateStmt":
        effects.append(Effect(Kind.DEALLOCATE, name=None if n.get("isall") else n.get("name")))
    elif t == "DiscardStmt":
        effects.append(Effect(Kind.DISCARD, name=_DISCARD.get(n.get("target", "DISCARD_ALL"), "ALL")))
    elif t == "DeclareCursorStmt":
        effects.append(Effect(Kind.DECLARE_CURSOR, name=n.get("portalname"),
                              flag=bool(n.get("options", 0) & _CURSOR_OPT_HOLD)))
    elif t == "ClosePortalStmt":
        effects.append(Effect(Kind.CLOSE_CURSOR, name=n.get("portalname")))
    elif t == "ListenStmt":
        effects.append(Effect(Kind.LISTEN, name=n.get("conditionname")))
    elif t == "UnlistenStmt":
        effects.append(Effect(Kind.UNLISTEN, name=n.get("conditionname")))
    elif t == "LoadStmt":
        effects.append(Effect(Kind.LOAD, name=n.get("filename")))
    elif t == "ExplainStmt":
        # EXPLAIN without ANALYZE plans but does not run the query.
        # EXPLAIN ANALYZE runs its statement (which may be CREATE TABLE AS, EXECUTE...).
        if _explain_analyze(n.get("options", ())) and isinstance(n.get("query"), dict):
            _statement(n["query"], ctx, effects)
        walk = False
    if walk:
        calls: list[dict] = []
        _find_calls(n, calls)
        if calls:
            calls.sort(key=lambda c: c.get("location", 0))   # textual order
            for call in calls:
                e = _call_effect(call, ctx)
                if e is not None:
                    effects.append(e)


def _explain_analyze(options: Any) -> bool:
    """EXPLAIN ANALYZE, EXPLAIN (ANALYZE), EXPLAIN (ANALYZE on|true|1) run the query."""
    for o in options:
        d = o.get("DefElem", {})
        if d.get("defname") != "analyze":
            continue
        arg = d.get("arg")
        if arg is None:
            return True
        t, a = _node(arg)
        if t == "String":
            return _parse_bool(a.get("sval", "")) is not False
        if t == "Boolean":
            return bool(a.get("boolval", False))
        if t == "Integer":
            return a.get("ival", 0) != 0
        return True     # unknown form: assume it runs
    return False


def _nested_execute(query: Any, effects: list[Effect]) -> None:
    """CREATE TABLE ... AS EXECUTE p / EXPLAIN ANALYZE EXECUTE p run a prepared statement."""
    if isinstance(query, dict) and "ExecuteStmt" in query:
        effects.append(Effect(Kind.EXECUTE, name=query["ExecuteStmt"].get("name")))


# --------------------------------------------------------------------------- function calls

_ADVISORY = {
    "pg_advisory_lock": ("lock", False),
    "pg_advisory_lock_shared": ("lock", False),
    "pg_try_advisory_lock": ("try_lock", False),
    "pg_try_advisory_lock_shared": ("try_lock", False),
    "pg_advisory_unlock": ("unlock", False),
    "pg_advisory_unlock_shared": ("unlock", False),
    "pg_advisory_unlock_all": ("unlock_all", False),
    "pg_advisory_xact_lock": ("lock", True),
    "pg_advisory_xact_lock_shared": ("lock", True),
    "pg_try_advisory_xact_lock": ("try_lock", True),
    "pg_try_advisory_xact_lock_shared": ("try_lock", True),
}
_SEQUENCE = frozenset({"nextval", "setval", "currval", "lastval"})
_INTERESTING = frozenset({"set_config"}) | frozenset(_ADVISORY) | _SEQUENCE


def _find_calls(obj: Any, out: list[dict]) -> None:
    """Collect every FuncCall node below obj (select list, WHERE, CTEs, subqueries, args...)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "FuncCall":
                names = v.get("funcname", ())
                if names and names[-1].get("String", {}).get("sval", "").lower() in _INTERESTING:
                    out.append(v)
            if isinstance(v, (dict, list)):
                _find_calls(v, out)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, (dict, list)):
                _find_calls(v, out)


def _parse_bool(s: str) -> bool | None:
    """PostgreSQL's parse_bool: case-insensitive prefixes of true/false/yes/no, on/off, 1/0."""
    s = s.strip().lower()
    if not s:
        return None
    c = s[0]
    if c == "t" and "true".startswith(s) or c == "y" and "yes".startswith(s):
        return True
    if c == "f" and "false".startswith(s) or c == "n" and "no".startswith(s):
        return False
    if c == "o" and len(s) >= 2:     # "o" alone is ambiguous
        if "on".startswith(s):
            return True
        if "off".startswith(s):
            return False
    if s == "1":
        return True
    if s == "0":
        return False
    return None


def _call_args(call: dict, names: tuple[str, ...]) -> tuple[list[Any], list[int]]:
    """Positional view of a call's args, mapping named notation (name => value).

    Returns the args by parameter position and, for each, its position in the
    text (they differ with named notation), for Unknown.expr.
    """
    out: list[Any] = [_MISSING] * len(names)
    where = [-1] * len(names)
    pos = 0
    for i, a in enumerate(call.get("args", ())):
        t, n = _node(a)
        if t == "NamedArgExpr":
            name = n.get("name", "").lower()
            if name in names:
                j = names.index(name)
                out[j], where[j] = n.get("arg"), i
        else:
            if pos < len(out):
                out[pos], where[pos] = a, i
            pos += 1
    return out, where


_MISSING = object()


def _call_effect(call: dict, ctx: _Ctx) -> Effect | None:
    fname = call["funcname"][-1]["String"]["sval"].lower()
    if fname == "set_config":
        args, where = _call_args(call, ("setting_name", "new_value", "is_local"))
        loc = call.get("location", 0)

        def expr(i: int) -> Unknown:
            return Unknown(ctx.arg_text(loc, where[i]) if where[i] >= 0 else "")

        def val(i: int, as_name: bool = False) -> Value:
            a = args[i]
            if a is _MISSING:
                return Unknown()
            ok, v = _const(a)
            if ok:
                if v is None:
                    return None          # NULL value: set_config resets to the default
                v = str(v) if not isinstance(v, bool) else ("true" if v else "false")
                return v.lower() if as_name else v
            p = _param(a)
            if p is not None:
                return p
            return expr(i)

        name = val(0, as_name=True)
        value = val(1)
        span = (-1, -1)
        if value is None and args[1] is not _MISSING:
            at = _null_location(args[1])
            span = (at, at + 4) if at >= 0 else span
        elif isinstance(value, (Param, Unknown)) and where[1] >= 0 and \
                _node(call["args"][where[1]])[0] != "NamedArgExpr":
            span = ctx.arg_span(loc, where[1])
        a = args[2]
        flag: bool | Param | Unknown
        ok, v = _const(a) if a is not _MISSING else (False, None)
        if ok:
            if v is None or isinstance(v, bool):
                flag = bool(v)           # NULL is_local means false
            elif isinstance(v, int):
                flag = v != 0
            else:
                b = _parse_bool(str(v))
                flag = b if b is not None else expr(2)
        else:
            p = _param(a) if a is not _MISSING else None
            flag = p if p is not None else expr(2)
        return Effect(Kind.SET_CONFIG, name=name, value=value, flag=flag,
                      scope=Scope.LOCAL if flag is True else Scope.SESSION, span=span)
    adv = _ADVISORY.get(fname)
    if adv is not None:
        return Effect(Kind.ADVISORY_LOCK, name=fname, flag=adv[1], op=adv[0])
    if fname in _SEQUENCE:
        seq = None
        a = call.get("args")
        if a:
            ok, v = _const(a[0])
            if ok and isinstance(v, str):
                seq = v
        return Effect(Kind.SEQUENCE, name=fname, value=seq)
    return None


# --------------------------------------------------------------------------- fingerprint / digest

_WS = re.compile(r"\s+")


def _text_hash(text: str) -> str:
    norm = _WS.sub(" ", text).strip().lower()
    return hashlib.blake2b(norm.encode("utf-8", "replace"), digest_size=8).hexdigest()


def fingerprint(c: Classification) -> str:
    """pglast (pg_query) fingerprint: same for statements that differ only in literals/whitespace."""
    fp = c._fingerprint
    if fp is None:
        try:
            fp = _pg.fingerprint(c.text) if c.parsed else _text_hash(c.text)
        except Exception:   # the fast path does not parse: the text may still be invalid
            fp = _text_hash(c.text)
        c._fingerprint = fp
    return fp


def digest(c: Classification) -> str:
    """RDS Proxy style digest: literals as $1..$n, lower case, whitespace collapsed."""
    d = c._digest
    if d is None:
        try:
            d = _pg.normalize(c.text)
        except Exception:
            d = c.text
        d = _WS.sub(" ", d).strip().lower()
        c._digest = d
    return d


def redact_sql(text: str) -> str:
    """The statement with its literals replaced by $n (PostgreSQL's normalization, as in the
    digest), for showing where literals may be secrets. Text the parser cannot read is not
    shown at all: it could hold anything."""
    try:
        return _WS.sub(" ", _pg.normalize(text)).strip()
    except Exception:
        return f"(not shown: {len(text.encode())} bytes that PostgreSQL's parser could not read)"


# --------------------------------------------------------------------------- text in pieces

class EffectScan:
    """The pre-check over a statement that arrives in pieces too large to hold whole (see
    relay/large.py): `hit` ends up True whenever `_may_have_effects` of the whole text would be.

    Each piece is checked together with the last `OVERLAP` bytes of the text before it, so a word
    cut in two is seen whole (the longest word and its context bytes fit). A word found at the
    very end of a piece waits for the next one: it may begin a longer identifier. A word right at
    the start of the overlap was already judged, with the byte before it, in the piece before
    (OVERLAP is more than twice the longest word), so it is skipped there."""

    __slots__ = ("tail", "hit", "inside")
    OVERLAP = 32

    def __init__(self) -> None:
        self.tail = b""
        self.hit = False
        self.inside = False     # the overlap starts after the text's first byte

    def feed(self, piece: bytes, final: bool = False) -> None:
        if self.hit:
            return
        buf = self.tail + piece
        words = buf.translate(_WORD_BYTES)
        # _may_have_effects, cheapest test first (a long text costs its bytes several times).
        if b"&" in buf and (b"u&" in buf or b"U&" in buf) or b"pg_temp" in words or b"advisory" in words \
                or not _KEYWORDS.isdisjoint(words.split()):
            size = len(buf)
            for found in _PRECHECK_WORDS.finditer(buf.lower()):
                if (found.end() < size or final) and (found.start() > 0 or not self.inside):
                    self.hit = True
                    return
        if len(buf) > self.OVERLAP:
            self.tail = buf[-self.OVERLAP:]
            self.inside = True
        else:
            self.tail = buf


def unheld(prefix: bytes, byte_length: int, scan: EffectScan) -> Classification:
    """The classification of a statement of `byte_length` bytes that was forwarded as it arrived
    without being held whole, from the pre-check over all of it: no effects when the pre-check
    clears it (it never misses one); otherwise it cannot be judged, and counts as unparsed
    (pinned, conservatively). `prefix`: its first bytes, for the pin log."""
    text = prefix.decode("utf-8", "replace") + f"... ({byte_length} bytes, not held by the proxy)"
    if not scan.hit:
        return Classification(text, EMPTY, 1, (), byte_length, True)
    return Classification(text=text, effects=(Effect(Kind.UNPARSED),), _statements=1,
                          byte_length=byte_length, parsed=False)
