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
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

# Absolute imports: this module's own name does not shadow the real SQLAlchemy.
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

from unpinned.kit.sqla_check import (
    TIMEOUT_OPTIONS,
    PinSafeWarning,
    SessionSetError,
    SessionSetWarning,
    _Reporter,
    _warn,
    check_statement,
)
from unpinned.kit.sqla_drivers import (
    _asyncpg_clear_jit,
    _psycopg2_transaction_ping,
    _psycopg2_watch_class,
    asyncpg_connection_class,
)
from unpinned.sql.text import quote_literal

__all__ = [
    "make_pin_safe", "pin_safe_connect_args", "asyncpg_connection_class", "check_statement",
    "PinSafeWarning", "SessionSetWarning", "SessionSetError", "TIMEOUT_OPTIONS",
]

log = logging.getLogger("unpinned.kit.sqla")

# Execution options the kit turns into SET LOCAL: TIMEOUT_OPTIONS (in sqla_check.py), and this
# one's {name: value} mapping.
SET_LOCAL_OPTION = "set_local"
_MODES = ("warn", "error", "ignore")


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
