"""What the SQLAlchemy kit (sqla.py) reports: the check of a statement for session settings
that pin on RDS Proxy, with advice, and the warnings and errors it raises, pointed at the
application's own line."""
from __future__ import annotations

import re
import sys
import warnings
from typing import Any

# Absolute imports: no module of the kit shadows the real SQLAlchemy.
import sqlalchemy

from unpinned.sql.classifier import classify
from unpinned.sql.effects import Kind, Reason, Scope
from unpinned.state.policy import PolicyOptions, rds_reasons

# Execution options the kit turns into SET LOCAL (option name == GUC name).
TIMEOUT_OPTIONS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")

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
    # The kit's own modules (sqla, sqla_check, sqla_drivers) count as internal too.
    return mod.startswith(("unpinned.kit.sqla", "sqlalchemy.", "greenlet", "asyncio.", "psycopg", "asyncpg"))


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
