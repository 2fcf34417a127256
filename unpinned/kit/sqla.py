"""Make a SQLAlchemy engine pin-safe: for the unpinned proxy in `rds` mode and for AWS RDS Proxy itself.

One call, for sync engines and AsyncEngine alike::

    from unpinned.kit.sqla import make_pin_safe
    engine = make_pin_safe(create_engine(url))

What it does (each part can be turned off; see `make_pin_safe`):

* asyncpg: stops the session-level ``set_config('jit', 'off', false)`` that asyncpg sends
  the first time a connection meets an enum/domain/composite/extension type.
* ``statement_timeout`` / ``lock_timeout`` / ``idle_in_transaction_session_timeout`` and
  ``set_local={...}`` execution options, applied with ``SET LOCAL`` inside the transaction.
* a warning (or an error) when application code sends a session ``SET`` / ``RESET`` /
  ``set_config()`` / ``SET ROLE`` / ``SET SESSION CHARACTERISTICS`` through the engine, and
  when psycopg2 is about to send its own ``SET default_transaction_*`` / ``SET client_encoding``.
* psycopg2: a ``pool_pre_ping`` that does not toggle autocommit (the toggle sends
  ``SET default_transaction_isolation TO DEFAULT`` once an isolation level was set).
* psycopg 3: ``prepare_threshold=None``, so a rollback never sends ``DEALLOCATE ALL``.

Nothing here needs the unpinned proxy. See docs/sqlalchemy.md.
"""
from __future__ import annotations

import datetime
import inspect
import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

# Absolute imports: this module's own name does not shadow the real SQLAlchemy.
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

from unpinned.sql.classifier import classify
from unpinned.sql.effects import Kind, Reason, Scope
from unpinned.state.policy import PolicyOptions, rds_reasons
from unpinned.sql.text import quote_literal

__all__ = [
    "make_pin_safe", "pin_safe_connect_args", "asyncpg_connection_class", "check_statement",
    "PinSafeWarning", "SessionSetWarning", "SessionSetError", "TIMEOUT_OPTIONS",
]

log = logging.getLogger("unpinned.kit.sqla")

# Execution options the kit turns into SET LOCAL (option name == GUC name).
TIMEOUT_OPTIONS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
SET_LOCAL_OPTION = "set_local"
_MODES = ("warn", "error", "ignore")
# The reasons this kit reports: session settings. Other pin causes (temp tables,
# nextval, advisory locks, ...) are for `unpinned audit` / the proxy's pin log.
_SET_REASONS = frozenset({Reason.SET, Reason.SET_CONFIG, Reason.ROLE})
_POLICY = PolicyOptions()   # default: SET LOCAL does not pin


class PinSafeWarning(UserWarning):
    """Something the kit could not make pin-safe (e.g. timeouts under AUTOCOMMIT)."""


class SessionSetWarning(PinSafeWarning):
    """A statement about to be sent changes a session setting: RDS Proxy pins the session."""

    def __init__(self, message: str, sql: str = "", reasons: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.sql = sql
        self.reasons = list(reasons)


class SessionSetError(sqlalchemy.exc.InvalidRequestError):
    """Raised (on_session_set="error") before a session-changing statement reaches the server."""

    def __init__(self, message: str, sql: str, reasons: list[str]):
        super().__init__(message)
        self.sql = sql
        self.reasons = reasons


# --------------------------------------------------------------------------- statement check

_PYFORMAT = re.compile(r"%\((?:[^)]*)\)s|%s|%%")


def _dollar_params(sql: str) -> str:
    """psycopg-style placeholders -> $n, so PostgreSQL's parser can classify the text."""
    n = 0

    def sub(m: re.Match) -> str:
        nonlocal n
        if m.group(0) == "%%":
            return "%"
        n += 1
        return f"${n}"
    return _PYFORMAT.sub(sub, sql)


def check_statement(sql: str, paramstyle: str | None = None) -> tuple[list[str], str] | None:
    """(pin reasons, advice) if `sql` changes a session setting RDS Proxy would pin on, else None.

    Uses the proxy's own classifier and rds policy. SET LOCAL, SET TRANSACTION and the
    kit's own statements are fine; set_config() is not, even with is_local => true,
    because RDS Proxy pins on set_config in any form.
    """
    low = sql.lower()
    if "set" not in low and "u&" not in low:
        return None     # every SET / RESET / set_config / SET ROLE has "set" in it; the common case
    if paramstyle in ("pyformat", "format") and "%" in sql:
        sql = _dollar_params(sql)
    c = classify(sql)
    reasons = [r for r in rds_reasons(c, _POLICY) if r in _SET_REASONS]
    if not reasons:
        return None
    return [str(r) for r in reasons], _advice(c)


def _advice(c) -> str:
    names: list[str] = []
    set_config = role = False
    for e in c.effects:
        if e.kind is Kind.SET_CONFIG:
            set_config = True
        elif e.kind is Kind.ROLE and e.scope is Scope.SESSION:
            role = True
        elif e.kind in (Kind.SET, Kind.RESET) and e.scope is Scope.SESSION:
            names.append(e.name if isinstance(e.name, str) else "ALL")
    tips: list[str] = []
    timeouts = [n for n in names if n in TIMEOUT_OPTIONS]
    others = [n for n in names if n not in TIMEOUT_OPTIONS]
    if timeouts:
        opts = ", ".join(f"{n}='5s'" for n in timeouts)
        tips.append(f"use the execution option instead: conn.execution_options({opts}) "
                    "(applied with SET LOCAL per transaction)")
    if others:
        tips.append(f"use SET LOCAL {others[0]} = ... inside the transaction "
                    f"(or execution_options(set_local={{'{others[0]}': ...}})), or make it the role/database "
                    f"default: ALTER ROLE ... SET {others[0]} = ...")
    if set_config:
        tips.append("replace set_config(...) with SET LOCAL name = value: RDS Proxy pins on set_config "
                    "even when is_local is true")
    if role:
        tips.append("use SET LOCAL ROLE inside the transaction")
    return "; ".join(tips) or "use SET LOCAL inside the transaction"


def _short(sql: str, limit: int = 300) -> str:
    sql = " ".join(sql.split())
    return sql if len(sql) <= limit else sql[:limit] + "..."


def _internal_frame(f) -> bool:
    mod = f.f_globals.get("__name__", "")
    return mod == __name__ or mod.startswith(("sqlalchemy.", "greenlet", "asyncio.", "psycopg", "asyncpg"))


def _user_frame() -> Any:
    """The innermost application frame, also across SQLAlchemy's asyncio greenlet boundary."""
    f = sys._getframe(1)
    g = None
    while True:
        while f is not None and _internal_frame(f):
            f = f.f_back
        if f is not None:
            return f
        try:    # AsyncEngine: the caller waits in the parent greenlet
            import greenlet
            g = (g or greenlet.getcurrent()).parent
        except Exception:
            return None
        if g is None:
            return None
        f = g.gr_frame


def _warn(warning: Warning) -> None:
    # Point the warning at the application's line, not at SQLAlchemy's internals
    # (the default filter then shows each statement once per call site).
    f = _user_frame()
    if f is None:
        warnings.warn(warning, stacklevel=2)
        return
    warnings.warn_explicit(warning, type(warning), f.f_code.co_filename, f.f_lineno,
                           module=f.f_globals.get("__name__"),
                           registry=f.f_globals.setdefault("__warningregistry__", {}),
                           module_globals=f.f_globals)


class _Reporter:
    def __init__(self, mode: str):
        self.mode = mode

    def report(self, sql: str, reasons: list[str], advice: str, origin: str) -> None:
        if self.mode == "ignore":
            return
        msg = (f"{_short(sql)!r} ({origin}) changes a session setting: RDS Proxy pins the client session "
               f"to its database connection for the rest of the session (reason: {', '.join(reasons)}). "
               f"Fix: {advice}.")
        if self.mode == "error":
            raise SessionSetError(msg + " Not sent: on_session_set='error'.", sql, reasons)
        _warn(SessionSetWarning(msg, sql, reasons))


# --------------------------------------------------------------------------- asyncpg: the JIT toggle

_asyncpg_classes: dict[type, type] = {}


def asyncpg_connection_class(base: type | None = None) -> type:
    """An asyncpg `Connection` subclass (of `base`, default asyncpg.Connection) without the JIT toggle.

    asyncpg's `_introspect_types` runs `SELECT current_setting('jit'), set_config('jit', 'off',
    false)` whenever `_server_caps.jit` is true (PostgreSQL >= 11), whatever `jit` is set to.
    That session-level set_config pins on RDS Proxy. Clearing the capability skips it; the
    introspection query then runs with the server's jit setting (set jit=off per role or in
    the parameter group if that query is slow).
    """
    import asyncpg

    base = base or asyncpg.Connection
    if getattr(base, "_unpinned_no_jit_toggle", False):
        return base
    cls = _asyncpg_classes.get(base)
    if cls is None:
        class PinSafeConnection(base):   # type: ignore[misc, valid-type]
            __slots__ = ()
            _unpinned_no_jit_toggle = True

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                # An immutable namedtuple: replace it, do not mutate.
                self._server_caps = self._server_caps._replace(jit=False)

        if base is not asyncpg.Connection:
            PinSafeConnection.__name__ = PinSafeConnection.__qualname__ = f"PinSafe{base.__name__}"
        cls = _asyncpg_classes.setdefault(base, PinSafeConnection)
    return cls


def _asyncpg_clear_jit(driver_connection: Any) -> None:
    caps = getattr(driver_connection, "_server_caps", None)
    if caps is not None and getattr(caps, "jit", False):
        driver_connection._server_caps = caps._replace(jit=False)


# --------------------------------------------------------------------------- psycopg2: its own SETs

_UNCHANGED = object()
_ISO_NAMES = {1: "READ COMMITTED", 2: "REPEATABLE READ", 3: "SERIALIZABLE", 4: "READ UNCOMMITTED"}


def _iso_value(v: Any) -> str | None:
    """What psycopg2 would put in SET default_transaction_isolation (None = TO DEFAULT)."""
    if v is None or (isinstance(v, str) and v.lower() == "default"):
        return None
    if isinstance(v, int):
        return _ISO_NAMES.get(v, str(v))
    return str(v).upper()


def _onoff_value(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and v.lower() == "default"):
        return None
    return "on" if v else "off"


def _guc(name: str, value: str | None) -> str:
    return f"SET {name} TO DEFAULT" if value is None else f"SET {name} TO '{value}'"


def _psycopg2_session_sets(conn: Any, autocommit: Any = _UNCHANGED, iso: Any = _UNCHANGED,
                           readonly: Any = _UNCHANGED, deferrable: Any = _UNCHANGED) -> list[str]:
    """The SETs psycopg2's conn_set_session() sends for this change (psycopg/connection_int.c)."""
    want = conn.autocommit if autocommit is _UNCHANGED else bool(autocommit)
    out: list[str] = []
    if want:
        # In (or going into) autocommit there is no BEGIN to carry them: psycopg2 SETs session defaults.
        if iso is not _UNCHANGED:
            out.append(_guc("default_transaction_isolation", _iso_value(iso)))
        if readonly is not _UNCHANGED:
            out.append(_guc("default_transaction_read_only", _onoff_value(readonly)))
        if deferrable is not _UNCHANGED:
            out.append(_guc("default_transaction_deferrable", _onoff_value(deferrable)))
    elif conn.autocommit:
        # Leaving autocommit: psycopg2 resets whatever is not default, set before or not.
        if conn.isolation_level is not None:
            out.append(_guc("default_transaction_isolation", None))
        if conn.readonly is not None:
            out.append(_guc("default_transaction_read_only", None))
        if conn.deferrable is not None:
            out.append(_guc("default_transaction_deferrable", None))
    return out


def _psycopg2_watch_class(base: type, reporter: _Reporter) -> type:
    """A psycopg2 connection subclass that reports the SETs psycopg2 sends on its own.

    They never pass through SQLAlchemy's cursor events, so they are predicted from the
    call and the connection's state, and reported before psycopg2 sends them.
    """
    def desc(name: str) -> Any:
        return inspect.getattr_static(base, name)

    ac_d, iso_d, ro_d, df_d = desc("autocommit"), desc("isolation_level"), desc("readonly"), desc("deferrable")

    def check(self: Any, origin: str, **change: Any) -> None:
        for sql in _psycopg2_session_sets(self, **change):
            found = check_statement(sql)
            if found:
                reasons, _ = found
                reporter.report(sql, reasons, _PSYCOPG2_ADVICE, f"sent by psycopg2 itself, for {origin}")

    def prop(d: Any, key: str, origin: str) -> property:
        def get(self: Any) -> Any:
            return d.__get__(self, type(self))

        def set_(self: Any, value: Any) -> None:
            check(self, origin, **{key: value})
            d.__set__(self, value)
        return property(get, set_)

    base_set_session = base.set_session
    base_set_isolation_level = base.set_isolation_level
    base_set_client_encoding = base.set_client_encoding

    def set_session(self: Any, isolation_level: Any = None, readonly: Any = None, deferrable: Any = None,
                    autocommit: Any = None) -> None:
        # In set_session() None means "unchanged".
        def u(v: Any) -> Any:
            return _UNCHANGED if v is None else v
        check(self, "set_session()", autocommit=u(autocommit), iso=u(isolation_level), readonly=u(readonly),
              deferrable=u(deferrable))
        base_set_session(self, isolation_level, readonly, deferrable, autocommit)

    def set_isolation_level(self: Any, level: Any) -> None:
        if level == 0:
            check(self, "set_isolation_level() (isolation_level, AUTOCOMMIT)", autocommit=True)
        else:
            check(self, "set_isolation_level() (isolation_level, AUTOCOMMIT)", autocommit=False, iso=level)
        base_set_isolation_level(self, level)

    def set_client_encoding(self: Any, encoding: str) -> None:
        clean = "".join(ch for ch in encoding.upper() if ch.isalnum())
        if clean != self.encoding:
            sql = _guc("client_encoding", clean)
            reporter.report(sql, ["set"], "pass client_encoding in the URL or connect_args (a startup "
                                          "parameter) instead of create_engine(client_encoding=...)",
                            "sent by psycopg2 itself, for set_client_encoding()")
        base_set_client_encoding(self, encoding)

    return type(f"PinWatch{base.__name__}", (base,), {
        "autocommit": prop(ac_d, "autocommit", "autocommit (AUTOCOMMIT, pool_pre_ping)"),
        "isolation_level": prop(iso_d, "iso", "isolation_level"),
        "readonly": prop(ro_d, "readonly", "readonly (postgresql_readonly)"),
        "deferrable": prop(df_d, "deferrable", "deferrable (postgresql_deferrable)"),
        "set_session": set_session,
        "set_isolation_level": set_isolation_level,
        "set_client_encoding": set_client_encoding,
        "_unpinned_watch": True,
        "__module__": __name__,
    })


_PSYCOPG2_ADVICE = (
    "psycopg2 sets session defaults when isolation_level / postgresql_readonly / postgresql_deferrable "
    "are used with AUTOCOMMIT, and resets them with SET ... TO DEFAULT when leaving AUTOCOMMIT "
    "(pool_pre_ping does that on every checkout unless make_pin_safe(psycopg2_ping='transaction')); "
    "avoid those options together with AUTOCOMMIT, or set them per transaction")


def _psycopg2_transaction_ping(dialect: Any) -> Callable[[Any], bool]:
    select_one = getattr(dialect, "_dialect_specific_select_one", None) or "SELECT 1"

    def do_ping(dbapi_connection: Any) -> bool:
        # SQLAlchemy's ping toggles autocommit on and off; leaving autocommit makes
        # psycopg2 send SET default_transaction_* TO DEFAULT when an isolation level,
        # readonly or deferrable was ever set. Ping in a transaction instead
        # (BEGIN; SELECT 1; ROLLBACK), like SQLAlchemy's asyncpg dialect does for PgBouncer.
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(select_one)
        finally:
            cursor.close()
        if not dbapi_connection.autocommit:
            dbapi_connection.rollback()
        return True
    return do_ping


# --------------------------------------------------------------------------- per-transaction settings

_UNKNOWN = object()   # after ROLLBACK TO SAVEPOINT: the server may have reverted it
_STATE_KEY = "unpinned_set_local"
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?\Z")


def _literal(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)          # PostgreSQL's unit: milliseconds for the timeouts
    if isinstance(value, datetime.timedelta):
        return str(int(value.total_seconds() * 1000))
    if isinstance(value, str):
        return quote_literal(value)
    if isinstance(value, (list, tuple)):      # list GUCs such as search_path
        return ", ".join(quote_literal(str(v)) for v in value)
    raise TypeError(f"{name}: use an int (PostgreSQL's unit, ms for timeouts), a string such as '5s', "
                    f"a timedelta or a list, not {type(value).__name__}")


def _desired(options: Any, timeouts: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if timeouts:
        for name in TIMEOUT_OPTIONS:
            v = options.get(name)
            if v is not None:
                out[name] = v
    extra = options.get(SET_LOCAL_OPTION)
    if extra:
        for name, v in dict(extra).items():
            if not _GUC_NAME.match(name):
                raise ValueError(f"set_local: not a setting name: {name!r}")
            if v is not None:
                out[name.lower()] = v
    return out


# --------------------------------------------------------------------------- the kit

_KIT_ATTR = "_unpinned_pin_safe"


@dataclass
class _Kit:
    engine: Engine
    on_session_set: str
    timeouts: bool
    asyncpg_jit_fix: bool
    psycopg_prepare_threshold: Any
    psycopg2_ping: str
    listeners: list[tuple[Any, str, Callable]] = field(default_factory=list)
    saved_ping: Any = None
    # Shared with a later make_pin_safe on the same engine, so psycopg2 connections
    # already open follow the new on_session_set.
    reporter: _Reporter | None = None
    _psycopg2_classes: dict = field(default_factory=dict)

    def listen(self, target: Any, name: str, fn: Callable, **kw: Any) -> None:
        event.listen(target, name, fn, **kw)
        self.listeners.append((target, name, fn))

    def remove(self) -> None:
        for target, name, fn in self.listeners:
            event.remove(target, name, fn)
        self.listeners.clear()
        if self.saved_ping is not None:
            self.engine.dialect.__dict__.pop("do_ping", None)
            self.saved_ping = None

    def psycopg2_class(self, base: type | None) -> type:
        import psycopg2.extensions

        base = base or psycopg2.extensions.connection
        if getattr(base, "_unpinned_watch", False):
            return base
        cls = self._psycopg2_classes.get(base)
        if cls is None:
            cls = self._psycopg2_classes[base] = _psycopg2_watch_class(base, self.reporter)
        return cls


def make_pin_safe(engine: Any, *, on_session_set: str = "warn", timeouts: bool = True,
                  asyncpg_jit_fix: bool = True, psycopg_prepare_threshold: Any = None,
                  psycopg2_ping: str = "transaction") -> Any:
    """Make `engine` (an Engine or AsyncEngine) avoid the pins RDS Proxy makes; returns it.

    Call it right after create_engine. It works on an engine that already has connections
    (the asyncpg and psycopg 3 fixes are also applied at checkout), and calling it again
    replaces the earlier configuration. Options created later with
    `engine.execution_options(...)` share it.

    on_session_set: "warn" (SessionSetWarning), "error" (SessionSetError, raised before the
        statement is sent) or "ignore", for a session-level SET / RESET / set_config() /
        SET ROLE / SET SESSION CHARACTERISTICS sent through the engine, and for the
        `SET default_transaction_*` / `SET client_encoding` psycopg2 sends on its own.
        SET LOCAL, SET TRANSACTION and the kit's own statements are never reported.
    timeouts: honour the execution options statement_timeout, lock_timeout and
        idle_in_transaction_session_timeout (and set_local={"guc": value} always) with
        `SET LOCAL` before the first statement of each transaction that has them, and again
        only when they change. Values: '5s'-style strings, ints in PostgreSQL's unit (ms) or
        timedeltas. They need a transaction: under AUTOCOMMIT they are skipped with a
        PinSafeWarning. The session value is never touched.
    asyncpg_jit_fix: connect asyncpg with a Connection subclass whose _server_caps say
        jit=False, so type introspection does not send set_config('jit', 'off', false).
        A connection_class given in connect_args is subclassed, not replaced.
    psycopg_prepare_threshold: None (default) connects psycopg 3 with prepare_threshold=None.
        Once psycopg 3 has prepared a statement (the 5th execution of the same query, by
        default), the next rollback sends `DEALLOCATE ALL`, which pins on RDS Proxy. The cost of
        None: each execution is parsed and planned again (the unnamed extended-protocol
        statement), usually a small CPU cost for short OLTP queries. "keep" leaves
        the driver setting alone.
    psycopg2_ping: "transaction" (default) replaces pool_pre_ping's autocommit toggle with
        BEGIN; SELECT 1; ROLLBACK (psycopg2 sends `SET default_transaction_isolation TO
        DEFAULT` when leaving autocommit once an isolation level was set); "keep" leaves it.
    """
    if on_session_set not in _MODES:
        raise ValueError(f"on_session_set must be one of {_MODES}, not {on_session_set!r}")
    if psycopg_prepare_threshold not in (None, "keep"):
        raise ValueError("psycopg_prepare_threshold must be None (disable preparing) or 'keep'")
    if psycopg2_ping not in ("transaction", "keep"):
        raise ValueError("psycopg2_ping must be 'transaction' or 'keep'")
    sync_engine: Engine = getattr(engine, "sync_engine", engine)   # AsyncEngine -> its Engine
    if sync_engine.dialect.name != "postgresql":
        raise ValueError(f"make_pin_safe is for PostgreSQL engines, not {sync_engine.dialect.name}")
    kit = _Kit(sync_engine, on_session_set, timeouts, asyncpg_jit_fix, psycopg_prepare_threshold, psycopg2_ping)
    old = sync_engine.__dict__.pop(_KIT_ATTR, None)
    if old is not None:
        old.remove()
        kit.reporter, kit._psycopg2_classes = old.reporter, old._psycopg2_classes
    if kit.reporter is None:
        kit.reporter = _Reporter(on_session_set)
    kit.reporter.mode = on_session_set
    _install(kit)
    setattr(sync_engine, _KIT_ATTR, kit)
    return engine


def _install(kit: _Kit) -> None:
    engine = kit.engine
    dialect = engine.dialect
    driver = dialect.driver
    jit = kit.asyncpg_jit_fix and driver == "asyncpg"
    no_prepare = kit.psycopg_prepare_threshold is None and driver == "psycopg"
    watch = kit.on_session_set != "ignore" and driver == "psycopg2"

    if jit or no_prepare or watch:
        def do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict) -> None:
            # Runs before every new DBAPI connection, also for engines created earlier.
            if jit:
                cparams["connection_class"] = asyncpg_connection_class(cparams.get("connection_class"))
            elif no_prepare:
                cparams["prepare_threshold"] = None
            elif watch:
                cparams["connection_factory"] = kit.psycopg2_class(cparams.get("connection_factory"))
        kit.listen(engine, "do_connect", do_connect)

    if jit or no_prepare:
        def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            # For connections made before make_pin_safe, or by a custom (async_)creator.
            dc = record.driver_connection
            if jit:
                _asyncpg_clear_jit(dc)
            elif getattr(dc, "prepare_threshold", None) is not None:
                dc.prepare_threshold = None
        kit.listen(engine, "checkout", checkout)

    if driver == "psycopg2" and kit.psycopg2_ping == "transaction":
        kit.saved_ping = dialect.do_ping
        dialect.do_ping = _psycopg2_transaction_ping(dialect)   # instance attribute: this engine only

    reporter = kit.reporter if kit.on_session_set != "ignore" else None
    paramstyle = getattr(dialect, "paramstyle", None)
    timeouts = kit.timeouts

    def before_cursor_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                              executemany: bool) -> None:
        if reporter is not None:
            found = check_statement(statement, paramstyle)
            if found:
                reasons, advice = found
                reporter.report(statement, reasons, advice, "sent through the engine")
        if _is_savepoint_statement(context):
            # Nothing to set for SAVEPOINT/RELEASE, and after ROLLBACK TO the settings must
            # be re-applied after it, not before.
            return
        options = context.execution_options if context is not None else conn.get_execution_options()
        state = conn.info.get(_STATE_KEY)
        desired = _desired(options, timeouts)
        if desired or state:
            _apply_set_local(conn, desired, state)

    kit.listen(engine, "before_cursor_execute", before_cursor_execute)

    def begin(conn: Any) -> None:
        conn.info.pop(_STATE_KEY, None)   # a new transaction starts with the session values

    def rollback_savepoint(conn: Any, name: Any, context: Any) -> None:
        state = conn.info.get(_STATE_KEY)
        if state:
            # SET LOCAL inside the savepoint is undone: re-apply (or reset) before the next statement.
            conn.info[_STATE_KEY] = dict.fromkeys(state, _UNKNOWN)

    kit.listen(engine, "begin", begin)
    kit.listen(engine, "rollback_savepoint", rollback_savepoint)


_SAVEPOINT_CLAUSES = (sqlalchemy.sql.expression.SavepointClause,
                      sqlalchemy.sql.expression.RollbackToSavepointClause,
                      sqlalchemy.sql.expression.ReleaseSavepointClause)


def _is_savepoint_statement(context: Any) -> bool:
    compiled = getattr(context, "compiled", None)
    return compiled is not None and isinstance(compiled.statement, _SAVEPOINT_CLAUSES)


def _apply_set_local(conn: Any, desired: dict[str, Any], state: dict | None) -> None:
    state = {} if state is None else state
    dbapi_connection = conn.connection.dbapi_connection
    if getattr(dbapi_connection, "autocommit", False):
        if desired:
            _warn(PinSafeWarning(f"{', '.join(desired)} ignored: the connection is in AUTOCOMMIT, and SET LOCAL "
                                 "needs a transaction (a session SET would pin on RDS Proxy)"))
        return
    statements: list[str] = []
    for name, value in desired.items():
        if state.get(name, _UNKNOWN) != value:   # _UNKNOWN equals nothing
            statements.append(f"SET LOCAL {name} = {_literal(name, value)}")
            state[name] = value
    for name in [n for n in state if n not in desired]:
        statements.append(f"SET LOCAL {name} TO DEFAULT")   # back to the session value
        del state[name]
    if statements:
        # Sent on a raw DBAPI cursor: inside the driver's transaction, and never through the
        # engine's events (so the session-SET check does not see the kit's own statements).
        cursor = dbapi_connection.cursor()
        try:
            for sql in statements:
                log.debug("%s", sql)
                cursor.execute(sql)
        finally:
            cursor.close()
    if state:
        conn.info[_STATE_KEY] = state
    else:
        conn.info.pop(_STATE_KEY, None)


# --------------------------------------------------------------------------- connect_args helper

def pin_safe_connect_args(url: Any, connect_args: dict | None = None, *,
                          psycopg_prepare_threshold: Any = None) -> dict:
    """connect_args for create_engine() with the connect-time fixes, for code that cannot call
    make_pin_safe (or wants them visible at create_engine):

    * asyncpg: connection_class without the JIT toggle (a given connection_class is subclassed);
    * psycopg 3: prepare_threshold=None (unless psycopg_prepare_threshold="keep").

    Other drivers: `connect_args` unchanged. make_pin_safe does the same at connect time, so
    this is optional when you call it.
    """
    args = dict(connect_args or {})
    u = make_url(url)
    if u.get_backend_name() != "postgresql":
        return args
    driver = u.get_driver_name()
    if driver == "asyncpg":
        args["connection_class"] = asyncpg_connection_class(args.get("connection_class"))
    elif driver in ("psycopg", "psycopg_async") and psycopg_prepare_threshold is None:
        args["prepare_threshold"] = None
    return args
