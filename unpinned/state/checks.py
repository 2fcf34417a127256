"""The SQL the session engine asks a server connection at the end of a transaction whose
text could not settle what it left there (see state/session.py, `_check_sql`)."""
from __future__ import annotations

from unpinned.sql.effects import Reason

# Pins the server's own catalogs can confirm or clear: reason -> SQL counting what holds it.
# Verify mode: every parameter the server connection has from SQL, names joined by \x1f.
# (A value equal to the connection's reset value is no leak, and PostgreSQL reports source
# 'session' for one after RESET x; SET LOCAL x in one transaction.)
VERIFY_PARAMS = ("(SELECT pg_catalog.string_agg(name, chr(31)) FROM pg_catalog.pg_settings "
                 "WHERE source = 'session' AND setting IS DISTINCT FROM reset_val)")
CHECKS: dict[Reason, str] = {
    Reason.TEMP_OBJECT: "(SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())",
    Reason.CURSOR: "(SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)",
    Reason.LISTEN: "(SELECT count(*) FROM pg_catalog.pg_listening_channels())",
    Reason.ADVISORY_LOCK: "(SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
                          "AND pid = pg_catalog.pg_backend_pid())",
    # (U_<n>: the proxy's own names for statements it carries, see relay/carried.py)
    Reason.SQL_PREPARE: "(SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql "
                        "AND name !~ '^U_[0-9]+$')",
}
