"""The parts of the SQLAlchemy kit (sqla.py) that are about one driver: asyncpg's JIT toggle,
and the SETs psycopg2 sends on its own (predicted and reported) and its pre-ping."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from unpinned.kit.sqla_check import _Reporter, check_statement

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
