"""The walk of PostgreSQL's parse tree (libpg_query's JSON) that finds a statement's session
effects: SET and its relatives, temporary objects, prepared statements, cursors, LISTEN,
transaction control, and the functions that change session state (set_config, advisory
locks, sequences). Used by classifier.py for the texts its pre-check cannot clear."""
from __future__ import annotations

import re
from typing import Any

from pglast import keywords as _kw
from pglast import parser as _pg

from unpinned.sql.effects import Effect, Kind, Param, Scope, Unknown, Value


class Ctx:
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


def statement_effects(stmt: dict, ctx: Ctx, effects: list[Effect]) -> None:
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
            statement_effects(n["query"], ctx, effects)
        else:
            # Planned only, but the prepared statement is looked up by name all the same.
            query = n.get("query")
            if isinstance(query, dict) and "CreateTableAsStmt" in query:
                query = query["CreateTableAsStmt"].get("query")
            _nested_execute(query, effects, "explain")
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


def _nested_execute(query: Any, effects: list[Effect], op: str = "") -> None:
    """CREATE TABLE ... AS EXECUTE p / EXPLAIN ANALYZE EXECUTE p run a prepared statement;
    EXPLAIN EXECUTE p plans it (op "explain")."""
    if isinstance(query, dict) and "ExecuteStmt" in query:
        effects.append(Effect(Kind.EXECUTE, name=query["ExecuteStmt"].get("name"), op=op))


def reads_relation(obj: Any, relname: str) -> bool:
    """Whether a statement's tree reads the relation `relname` (unqualified or in pg_catalog)."""
    if isinstance(obj, dict):
        rv = obj.get("RangeVar")
        if rv is not None and rv.get("relname") == relname and rv.get("schemaname", "pg_catalog") == "pg_catalog":
            return True
        return any(reads_relation(v, relname) for v in obj.values())
    if isinstance(obj, list):
        return any(reads_relation(v, relname) for v in obj)
    return False


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


def _call_effect(call: dict, ctx: Ctx) -> Effect | None:
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
