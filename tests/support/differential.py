"""Differential testing of session state: the same seeded op streams, run by many clients
through the proxy and by as many clients straight against PostgreSQL, must give the same
observable results (SPEC 4, and the last row of SPEC 8: zero state leaks).

The pieces, used by tests/e2e/test_differential.py:

  setup_sql(n)                    the schemas, tables, role and text search config the ops use
  generate_ops(seed, client, n)   a client's op stream (Generator: deterministic per (seed, client))
  run_client / run_clients        run one stream / every stream concurrently (a thread each),
                                  observing the session after every op -> Trace
  run_script(connect, steps)      run (client, op) steps one after the other (scripted cases)
  first_divergence, describe,     compare two traces, report the first differing step with
  differences                     the ops so far (also as psycopg calls) and both traces
  OBSERVE_SQL / OBS_NAMES         what is looked at after every op

An op is one client round trip: a simple-protocol query string (possibly several statements),
an extended-protocol query with bound parameters (unnamed, or a named prepared statement with
prepare=True), a client-side-bound query (ClientCursor: simple protocol with literals), a
pipeline of extended queries under one Sync, a psycopg server-side (named) cursor, or hanging
up and connecting again.

Nothing here depends on which side (proxy or direct) it runs against, and nothing recorded in
a trace depends on timing or on which backend served the client.
"""
from __future__ import annotations

import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import psycopg
from psycopg import ClientCursor

# ----------------------------------------------------------------------------- the database

SCHEMAS = {"s1": 1, "s2": 2, "Mixed Case": 3}       # each has a table obj(x int) holding this value
DIFF_ROLE = "diff_role"                              # a non-superuser role for SET ROLE / SESSION AUTHORIZATION


def setup_sql(n_clients: int) -> list[str]:
    """Objects the op streams use; run as a superuser before each side's run (idempotent)."""
    out = [
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{DIFF_ROLE}') THEN "
        f"CREATE ROLE {DIFF_ROLE} NOSUPERUSER NOLOGIN; END IF; END$$",
        "CREATE TABLE IF NOT EXISTS public.obj (x int)",
        "TRUNCATE public.obj",
        "INSERT INTO public.obj VALUES (0)",
        f"GRANT SELECT ON public.obj TO {DIFF_ROLE}",
    ]
    for schema, value in SCHEMAS.items():
        q = '"' + schema + '"'
        out += [f"CREATE SCHEMA IF NOT EXISTS {q}",
                f"CREATE TABLE IF NOT EXISTS {q}.obj (x int)",
                f"TRUNCATE {q}.obj",
                f"INSERT INTO {q}.obj VALUES ({value})",
                f"GRANT USAGE ON SCHEMA {q} TO {DIFF_ROLE}",
                f"GRANT SELECT ON {q}.obj TO {DIFF_ROLE}"]
    out += ["DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_ts_config WHERE cfgname = 'diff_ts') THEN "
            "CREATE TEXT SEARCH CONFIGURATION public.diff_ts (COPY = english); END IF; END$$"]
    for c in range(n_clients):
        out += [f"CREATE TABLE IF NOT EXISTS public.dt_{c} (x int)",
                f"TRUNCATE public.dt_{c}",
                f"GRANT ALL ON public.dt_{c} TO {DIFF_ROLE}"]
    return out


# ----------------------------------------------------------------------------- observation

# Settings that differ between any two sessions whatever the proxy does, or that the
# observation itself cannot hold constant. Placeholder (dotted) settings are left out of the
# pg_settings digest: whether a placeholder exists at all is server-session state no one can
# remove, so a server connection that once saw myapp.tenant reports '' where a fresh
# session reports NULL; myapp.tenant is observed with coalesce(..., '') instead.
SETTINGS_EXCLUDED = ("transaction_isolation", "transaction_read_only", "transaction_deferrable")

OBS_COLUMNS = [
    ("lock_timeout", "current_setting('lock_timeout')"),
    ("statement_timeout", "current_setting('statement_timeout')"),
    ("work_mem", "current_setting('work_mem')"),
    ("search_path", "current_setting('search_path')"),
    ("application_name", "current_setting('application_name')"),
    ("DateStyle", "current_setting('DateStyle')"),
    ("TimeZone", "current_setting('TimeZone')"),
    ("IntervalStyle", "current_setting('IntervalStyle')"),
    ("myapp.tenant", "coalesce(current_setting('myapp.tenant', true), '')"),
    ("extra_float_digits", "current_setting('extra_float_digits')"),
    ("default_transaction_isolation", "current_setting('default_transaction_isolation')"),
    ("session_replication_role", "current_setting('session_replication_role')"),
    ("log_lock_waits", "current_setting('log_lock_waits')"),
    ("client_min_messages", "current_setting('client_min_messages')"),
    ("standard_conforming_strings", "current_setting('standard_conforming_strings')"),
    ("transaction_isolation", "current_setting('transaction_isolation')"),
    ("current_user", "current_user::text"),
    ("session_user", "session_user::text"),
    ("temp_objects", "(SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())"),
    ("advisory_locks", "array(SELECT objid::int8 || ':' || mode FROM pg_catalog.pg_locks "
                       "WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() ORDER BY 1)::text"),
    ("listening", "array(SELECT c FROM pg_catalog.pg_listening_channels() c ORDER BY 1)::text"),
    ("hold_cursors", "array(SELECT name FROM pg_catalog.pg_cursors WHERE is_holdable ORDER BY 1)::text"),
    # SQL-prepared statements are not observed through pg_prepared_statements: through the proxy
    # it lists the server connection's statements under the proxy's names (a documented
    # difference); the ops observe them by running them (EXECUTE, DEALLOCATE, PREPARE again).
    ("obj", "pg_catalog.to_regclass('obj')::text"),                      # which schema search_path finds
    ("timestamptz", "'2024-03-05 13:14:15+00'::timestamptz::text"),      # DateStyle + TimeZone
    ("interval", "interval '1 day 02:03:04'::text"),                     # IntervalStyle
    ("float", "(0.1::float8 + 0.2::float8)::text"),                      # extra_float_digits
    ("settings", "(SELECT string_agg(name || '=' || setting, '; ' ORDER BY name) FROM pg_catalog.pg_settings "
                 "WHERE setting IS DISTINCT FROM boot_val AND name NOT LIKE '%.%' "
                 "AND name NOT IN (" + ", ".join(f"'{n}'" for n in SETTINGS_EXCLUDED) + "))"),
]
OBS_NAMES = [name for name, _ in OBS_COLUMNS]
OBSERVE_SQL = "SELECT " + ", ".join(expr for _, expr in OBS_COLUMNS)

# ParameterStatus values the client has been told (libpq keeps the last one per name).
REPORTED = ("application_name", "DateStyle", "TimeZone", "IntervalStyle", "is_superuser",
            "session_authorization", "client_encoding", "standard_conforming_strings",
            "default_transaction_read_only", "in_hot_standby", "integer_datetimes", "search_path")

# ----------------------------------------------------------------------------- ops


@dataclass(frozen=True)
class Op:
    kind: str                     # simple | params | prepared | client | pipeline | named | reconnect | exec_prepared
    sql: str | tuple = ""         # pipeline: tuple of (sql, params)
    params: tuple | None = None

    def __str__(self) -> str:
        if self.kind == "simple":
            return f"simple    {self.sql}"
        if self.kind == "reconnect":
            return "reconnect"
        if self.kind == "exec_prepared":
            return f"exec_prepared {self.sql}"
        if self.kind == "pipeline":
            return "pipeline  " + " | ".join(f"{s} {p!r}" for s, p in self.sql)
        return f"{self.kind:<9} {self.sql} {self.params!r}"

    def python(self, conn: str = "conn") -> str:
        """The psycopg 3 call that runs this op (for reproductions)."""
        if self.kind == "simple":
            return f"{conn}.execute({self.sql!r})"
        if self.kind == "reconnect":
            return f"{conn}.close(); {conn} = connect()"
        if self.kind == "exec_prepared":
            return f"{conn}.pgconn.exec_prepared({self.sql.encode()!r}, [])"
        if self.kind == "params":
            return f"{conn}.execute({self.sql!r}, {self.params!r})"
        if self.kind == "prepared":
            return f"{conn}.execute({self.sql!r}, {self.params!r}, prepare=True)"
        if self.kind == "client":
            return f"psycopg.ClientCursor({conn}).execute({self.sql!r}, {self.params!r})"
        if self.kind == "named":
            return (f"with {conn}.cursor(name='ncur', withhold={self.params[1]!r}) as cur: "
                    f"cur.execute({self.sql!r}, {self.params[:1]!r}); cur.fetchmany(2); cur.fetchall()")
        inner = "; ".join(f"{conn}.execute({s!r}, {p!r})" for s, p in self.sql)
        return f"with {conn}.pipeline(): {inner}"


S = lambda sql: Op("simple", sql)          # noqa: E731

# SET value spellings, as SQL (what follows "SET name ="). Values of statement_timeout are
# large enough never to fire; a few values equal the default on purpose.
SET_VALUES: dict[str, list[str]] = {
    "lock_timeout": ["3000", "'2s'", "'1min'", "0", "'750ms'", "'2500'"],
    "statement_timeout": ["'1h'", "600000", "0", "'45min'", "'2d'"],
    "work_mem": ["'8MB'", "16384", "'1GB'", "'4096kB'", "'64MB'", "'4MB'"],
    "search_path": ["s1", "s1, s2", '"Mixed Case", public', "'s2'", '"$user", public', "''",
                    "pg_catalog, s2", "'s1', \"Mixed Case\"", "public", "S1", '"s2"', "'s1, s2'"],
    "application_name": ["'app_a'", "'Mixed Case App'", "'it''s'", "'\u00e9-\u00fc'", "''", "plain_ident",
                         "'back\\slash'"],
    "DateStyle": ["ISO, DMY", "'SQL, MDY'", "German", "'Postgres, YMD'", "ISO", "'iso, mdy'"],
    "TimeZone": ["'UTC'", "'America/New_York'", "'Asia/Kolkata'", "'Europe/Paris'", "'<+03>-03'", "-7",
                 "'5.5'"],
    "myapp.tenant": ["'acme'", "42", "'x y'", "''", "'\u00dcn\u00efcode'"],
    "extra_float_digits": ["0", "3", "-5", "1", "'2'"],
    "default_transaction_isolation": ["'serializable'", "'repeatable read'", "'read committed'"],
    "IntervalStyle": ["'postgres_verbose'", "iso_8601", "'sql_standard'", "postgres"],
    # superuser-only (PGC_SUSET): replayed after a SET ROLE to a plain role, it must still work
    "session_replication_role": ["replica", "'local'", "origin"],
    "log_lock_waits": ["on", "off", "true"],
    "client_min_messages": ["error", "'warning'", "notice", "log"],      # changes which notices arrive
    "standard_conforming_strings": ["off", "on"],                        # changes how '\' is read
}
# How the names may be spelled (GUC names are case-insensitive, quoted or not).
SPELLINGS: dict[str, list[str]] = {
    "lock_timeout": ["lock_timeout", "LOCK_TIMEOUT", '"lock_timeout"'],
    "statement_timeout": ["statement_timeout", "Statement_Timeout"],
    "work_mem": ["work_mem", "WORK_MEM", '"work_mem"', "Work_Mem"],
    "search_path": ["search_path", "SEARCH_PATH", '"search_path"'],
    "application_name": ["application_name", "Application_Name"],
    "DateStyle": ["DateStyle", "datestyle", '"DateStyle"'],
    "TimeZone": ["TimeZone", "timezone", "TIMEZONE", "time zone"],   # "SET TIME ZONE x"
    "myapp.tenant": ["myapp.tenant", "MyApp.Tenant", '"myapp.tenant"', "myapp.TENANT"],
    "extra_float_digits": ["extra_float_digits"],
    "default_transaction_isolation": ["default_transaction_isolation"],
    "IntervalStyle": ["IntervalStyle", "intervalstyle"],
    "session_replication_role": ["session_replication_role"],
    "log_lock_waits": ["log_lock_waits"],
    "client_min_messages": ["client_min_messages", "CLIENT_MIN_MESSAGES"],
    "standard_conforming_strings": ["standard_conforming_strings"],
}
# Raw values for set_config(name, value, ...): the string as the GUC gets it.
RAW_VALUES: dict[str, list[str]] = {
    "lock_timeout": ["4s", "1500", "0"],
    "statement_timeout": ["2h", "900000", "0"],
    "work_mem": ["12MB", "2048", "4MB", "256MB"],
    "search_path": ["s1, s2", '"Mixed Case"', "s2,public", "", "pg_catalog,s1", '"$user", public'],
    "application_name": ["cfg_app", "with 'quote'", "", "sp ace"],
    "DateStyle": ["SQL, DMY", "ISO, MDY", "Postgres"],
    "TimeZone": ["Europe/Berlin", "UTC", "-3", "Australia/Adelaide"],
    "myapp.tenant": ["tenant-7", "", "t;x"],
    "extra_float_digits": ["-2", "1", "3"],
    "default_transaction_isolation": ["repeatable read", "serializable", "read committed"],
    "IntervalStyle": ["iso_8601", "postgres", "sql_standard"],
    "session_replication_role": ["replica", "origin"],
    "log_lock_waits": ["on", "off"],
    "client_min_messages": ["error", "notice"],
    "standard_conforming_strings": ["off", "on"],
}
GUCS = list(SET_VALUES)
TRACKED = GUCS   # the GUCs the leak check looks at on every server connection


def _sql_lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class Generator:
    """One client's op stream. A small model of the session (transaction open or failed,
    savepoints, temp objects, locks...) steers the choices toward meaningful sequences;
    the model never looks at results, so both sides get the very same ops."""

    def __init__(self, seed: int, client: int, permanent_pin: bool = False):
        self.rng = random.Random(f"{seed}/{client}")
        self.c = client
        self.permanent_pin = permanent_pin   # may this client pin for good (set_config with a bound name)?
        self.in_txn = False
        self.failed = False
        self.txn_ops = 0
        self.txn_limit = 0
        self.savepoints: list[str] = []
        self.temp: set[str] = set()
        self.locks: Counter = Counter()
        self.listening: set[str] = set()
        self.cursors: set[str] = set()
        self.sql_prepared: set[str] = set()
        self.keys = [100_000 * (client + 1) + k for k in (1, 2, 3)]
        self.pending: list[Op] = []          # the rest of a scripted scenario

    # -------------------------------------------------------------- the stream

    def ops(self, n: int) -> list[Op]:
        return [self.next() for _ in range(n)]

    def next(self) -> Op:
        r = self.rng
        if self.pending:
            return self._track(self.pending.pop(0))
        if self.in_txn:
            self.txn_ops += 1
            if self.txn_ops > self.txn_limit:
                return self._end_txn()
        elif r.random() < 0.02:
            return self._track(S("ROLLBACK"))        # a safety net: harmless outside a transaction
        held = len(self.temp) + sum(self.locks.values()) + len(self.listening) + len(self.cursors) + \
            len(self.sql_prepared)
        choices = [
            (self._set, 16), (self._reset, 6), (self._set_config, 9), (self._set_config_bound, 5),
            (self._set_local, 4 if self.in_txn else 1), (self._special_set, 4),
            (self._begin if not self.in_txn else self._in_txn, 12 if not self.in_txn else 16),
            (self._multi, 8), (self._prepared, 6), (self._pipeline, 3), (self._query, 4),
            (self._error, 3), (self._temp, 3 + 12 * bool(self.temp)),
            (self._advisory, 3 + 12 * bool(self.locks)), (self._other_pins, 2 + 10 * (held > 0)),
            (self._role, 2), (self._discard, 1), (self._scenario, 0 if self.in_txn else 6),
            (self._reconnect, 1), (self._listen, 3), (self._sql_prepare, 3),
        ]
        total = sum(w for _, w in choices)
        x = r.uniform(0, total)
        for fn, w in choices:
            x -= w
            if x <= 0:
                return fn()
        return choices[0][0]()

    # -------------------------------------------------------------- the model

    def _track(self, op: Op, statements: list[str] | None = None) -> Op:
        """Follow transaction control in op (statement by statement for a multi-statement
        string; `statements` gives them when the op text is not just them)."""
        if statements is None:
            statements = [op.sql] if isinstance(op.sql, str) else [s for s, _ in op.sql]
        for st in statements:
            u = st.strip().upper()
            if self.failed and not u.startswith(("ROLLBACK", "ABORT", "COMMIT", "END")):
                break                       # the rest of the string is skipped
            if u.startswith(("BEGIN", "START TRANSACTION")):
                if not self.in_txn:
                    self.in_txn, self.failed, self.txn_ops = True, False, 0
                    self.txn_limit = self.rng.choice((1, 2, 3, 4, 6, 10))
                    self.savepoints = []
            elif u.startswith(("COMMIT", "END", "ABORT")) or u in ("ROLLBACK", "ROLLBACK AND CHAIN",
                                                                      "ROLLBACK WORK"):
                chain = u.endswith("AND CHAIN") and self.in_txn
                self.in_txn = chain
                self.failed = False
                self.savepoints = []
                if not chain:
                    self.txn_ops = 0
            elif u.startswith("ROLLBACK TO"):
                name = u.split()[-1].lower()
                if self.in_txn and name in self.savepoints:
                    del self.savepoints[len(self.savepoints) - 1 - self.savepoints[::-1].index(name) + 1:]
                    self.failed = False
            elif u.startswith("SAVEPOINT") and self.in_txn:
                self.savepoints.append(u.split()[-1].lower())
            elif u.startswith("RELEASE") and self.in_txn:
                name = u.split()[-1].lower()
                if name in self.savepoints:
                    del self.savepoints[len(self.savepoints) - 1 - self.savepoints[::-1].index(name):]
            elif "1/0" in u or "1/%S" in u or "NO_SUCH" in u or "'BANANA'" in u:
                if self.in_txn:
                    self.failed = True
                else:
                    break                   # an implicit transaction: the rest is skipped
        return op

    # -------------------------------------------------------------- SET and friends

    def _guc(self) -> str:
        return self.rng.choice(GUCS)

    def _spell(self, guc: str) -> str:
        return self.rng.choice(SPELLINGS[guc])

    def _set_stmt(self, local: bool = False) -> str:
        r = self.rng
        guc = self._guc()
        spelled = self._spell(guc)
        value = r.choice(SET_VALUES[guc])
        scope = "LOCAL " if local else r.choice(("", "", "SESSION "))
        if spelled == "time zone":
            return f"SET {scope}TIME ZONE {value}"
        return f"SET {scope}{spelled} {r.choice(('=', 'TO'))} {value}"

    def _set(self) -> Op:
        return self._track(S(self._set_stmt()))

    def _reset(self) -> Op:
        r = self.rng
        guc = self._guc()
        spelled = self._spell(guc)
        if spelled == "time zone":
            spelled = "TimeZone"
        k = r.random()
        if k < 0.1:
            # A reset with a NULL the text does not show.
            return self._track(Op("params", r.choice((f"SELECT set_config('{guc}', %s, false)",
                                                      f"SELECT set_config('{guc}', %s, false), current_setting('{guc}')")),
                                  (None,)))
        if k < 0.18:
            return self._track(Op("prepared", f"SELECT set_config('{guc}', NULL, false), %s::text", ("x",)))
        sql = r.choice((f"RESET {spelled}", f"RESET {spelled}", "RESET ALL",
                        f"SET {spelled} TO DEFAULT", f"SET SESSION {spelled} = DEFAULT",
                        f"SET LOCAL {spelled} TO DEFAULT", f"SELECT set_config('{guc}', NULL, false)"))
        return self._track(S(sql))

    def _set_config_call(self, local: bool | None = None) -> str:
        r = self.rng
        guc = self._guc()
        name = r.choice((guc, guc, guc.upper()))
        value = r.choice(RAW_VALUES[guc])
        if local is None:
            local = r.random() < 0.3
        flag = r.choice(("true", "'on'", "1 = 1", "'t'")) if local else r.choice(("false", "'off'", "NULL", "'f'"))
        return f"set_config({_sql_lit(name)}, {_sql_lit(value)}, {flag})"

    def _set_config(self) -> Op:
        r = self.rng
        kind = r.random()
        if kind < 0.5:
            calls = [self._set_config_call() for _ in range(r.choice((1, 1, 2, 3)))]
            return self._track(S("SELECT " + ", ".join(calls)))
        if kind < 0.7:
            guc = self._guc()
            expr = r.choice((f"'{r.choice(RAW_VALUES[guc])}' || ''",
                             f"(SELECT {_sql_lit(r.choice(RAW_VALUES[guc]))})",
                             f"lower({_sql_lit(r.choice(RAW_VALUES[guc]))})"))
            return self._track(S(f"SELECT set_config('{guc}', {expr}, false)"))
        if kind < 0.8:
            guc = self._guc()
            return self._track(S(f"SELECT coalesce(current_setting('{guc}', true), '') AS before, "
                                 f"set_config('{guc}', {_sql_lit(r.choice(RAW_VALUES[guc]))}, false) AS after"))
        if kind < 0.9:
            # A set_config that the statement text names but that never runs.
            guc = self._guc()
            value = _sql_lit(r.choice(RAW_VALUES[guc]))
            sql = r.choice((f"SELECT set_config('{guc}', {value}, false) WHERE false",
                            f"SELECT CASE WHEN 1 = 0 THEN set_config('{guc}', {value}, false) END",
                            f"SELECT set_config('{guc}', {value}, false) FROM generate_series(1, 0)"))
            return self._track(S(sql))
        guc = self._guc()
        return self._track(Op("client", f"SELECT set_config('{guc}', %s, false)", (r.choice(RAW_VALUES[guc]),)))

    def _set_config_bound(self) -> Op:
        r = self.rng
        guc = self._guc()
        value = r.choice(RAW_VALUES[guc])
        k = r.random()
        if k < 0.45:
            return self._track(Op("params", f"SELECT set_config('{guc}', %s, false)", (value,)))
        if k < 0.6:
            return self._track(Op("params", f"SELECT set_config('{guc}', %s, %s)", (value, r.random() < 0.4)))
        if k < 0.75:
            return self._track(Op("prepared", f"SELECT set_config('{guc}', %s, false)", (value,)))
        if k < 0.85:
            g2 = self._guc()
            return self._track(Op("params", f"SELECT set_config('{guc}', %s, false), set_config('{g2}', %s, true)",
                                  (value, r.choice(RAW_VALUES[g2]))))
        if k < 0.9 and self.permanent_pin:
            # The parameter's name is bound too: the proxy cannot carry it, so it pins (for good).
            return self._track(Op("params", "SELECT set_config(%s, %s, false)", (guc, value)))
        return self._track(Op("params", f"SELECT set_config('{guc}', %s::text, false) AS v, %s::int AS n",
                              (value, r.randint(0, 9))))

    def _set_local(self) -> Op:
        r = self.rng
        if r.random() < 0.6:
            return self._track(S(self._set_stmt(local=True)))
        return self._track(S("SELECT " + self._set_config_call(local=True)))

    def _special_set(self) -> Op:
        r = self.rng
        sql = r.choice((
            "SET TIME ZONE LOCAL", "SET TIME ZONE DEFAULT", "SET TIME ZONE 'Europe/Paris'", "SET TIME ZONE -7",
            "SET TIME ZONE INTERVAL '+02:30' HOUR TO MINUTE", "SET TIME ZONE 'UTC'",
            "SET SCHEMA 's2'", "SET SCHEMA 'Mixed Case'", "SET NAMES 'UTF8'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET work_mem FROM CURRENT",
        ))
        return self._track(S(sql))

    # -------------------------------------------------------------- transactions

    def _begin(self) -> Op:
        sql = self.rng.choice(("BEGIN", "BEGIN", "START TRANSACTION", "BEGIN ISOLATION LEVEL REPEATABLE READ",
                               "begin work", "BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
        return self._track(S(sql))

    def _scenario(self) -> Op:
        """A transaction with savepoints around session changes, as separate ops or as one string."""
        r = self.rng
        sp = r.choice(("s1", "s2"))

        def change() -> str:
            k = r.random()
            if k < 0.55:
                return self._set_stmt()
            if k < 0.7:
                return "SELECT " + self._set_config_call(local=False)
            if k < 0.8:
                return self._set_stmt(local=True)
            if k < 0.9:
                g = self._guc()
                return f"RESET {self._spell(g) if g != 'TimeZone' else 'timezone'}"
            return "RESET ALL"
        body = [r.choice(("BEGIN", "START TRANSACTION")), change()]
        shape = r.random()
        if shape < 0.35:       # changes after a savepoint, undone by ROLLBACK TO, more changes, maybe an error first
            body += [f"SAVEPOINT {sp}", change(), change()]
            if r.random() < 0.5:
                body.append("SELECT 1/0")
            body += [f"ROLLBACK TO SAVEPOINT {sp}", change()]
        elif shape < 0.55:     # nested savepoints, roll back to the outer one
            body += ["SAVEPOINT a", change(), "SAVEPOINT b", change(), r.choice(("ROLLBACK TO a", "RELEASE b")),
                     change()]
        elif shape < 0.75:     # RELEASE keeps the changes
            body += [f"SAVEPOINT {sp}", change(), f"RELEASE SAVEPOINT {sp}"]
        else:                  # the same savepoint name twice
            body += [f"SAVEPOINT {sp}", change(), f"SAVEPOINT {sp}", change(), f"ROLLBACK TO {sp}",
                     f"RELEASE {sp}", change()]
        body.append(r.choice(("COMMIT", "COMMIT", "COMMIT", "ROLLBACK", "COMMIT AND CHAIN")))
        if body[-1].endswith("CHAIN"):
            body += [change(), "COMMIT"]
        if r.random() < 0.3:
            return self._track(S("; ".join(body)), body)
        first, self.pending = S(body[0]), [S(x) for x in body[1:]]
        return self._track(first)

    def _end_txn(self) -> Op:
        r = self.rng
        sql = r.choice(("COMMIT", "COMMIT", "ROLLBACK", "ROLLBACK", "END", "ABORT", "COMMIT AND CHAIN",
                        "ROLLBACK AND CHAIN"))
        if sql.endswith("CHAIN"):
            self.txn_limit = self.txn_ops + r.choice((1, 2, 3))
        return self._track(S(sql))

    def _in_txn(self) -> Op:
        r = self.rng
        k = r.random()
        if k < 0.3:
            return self._track(S(f"SAVEPOINT {r.choice(('a', 'b', 'a', 'SP_c'))}"))
        if k < 0.5 and self.savepoints:
            name = r.choice(self.savepoints)
            return self._track(S(r.choice((f"ROLLBACK TO SAVEPOINT {name}", f"ROLLBACK TO {name}"))))
        if k < 0.6 and self.savepoints:
            name = r.choice(self.savepoints)
            return self._track(S(r.choice((f"RELEASE SAVEPOINT {name}", f"RELEASE {name}"))))
        if k < 0.7:
            return self._track(S(r.choice(("ROLLBACK TO SAVEPOINT nope", "RELEASE nope"))))
        if k < 0.85:
            return self._track(S(f"INSERT INTO public.dt_{self.c} VALUES ({r.randint(1, 99)})"))
        return self._end_txn()

    def _error(self) -> Op:
        sql = self.rng.choice(("SELECT 1/0", "SELECT 1/0", "SELECT * FROM no_such_table",
                               "SET work_mem = 'banana'", "SET no_such_setting = 1",
                               "SELECT set_config('work_mem', 'banana', false)"))
        return self._track(S(sql))

    # -------------------------------------------------------------- multi-statement strings

    def _fragment(self) -> str:
        r = self.rng
        k = r.random()
        if k < 0.3:
            return self._set_stmt()
        if k < 0.4:
            return self._set_stmt(local=True)
        if k < 0.5:
            return "SELECT " + self._set_config_call()
        if k < 0.55:
            g = self._guc()
            return r.choice((f"RESET {self._spell(g) if g != 'TimeZone' else 'timezone'}", "RESET ALL"))
        if k < 0.65:
            return r.choice(("SELECT 1/0", "SELECT 1/0", "SET work_mem = 'banana'"))
        if k < 0.72:
            return r.choice(("BEGIN", "START TRANSACTION"))
        if k < 0.8:
            return r.choice(("COMMIT", "ROLLBACK"))
        if k < 0.85:
            return r.choice(("SAVEPOINT m", "ROLLBACK TO m", "RELEASE m"))
        if k < 0.9:
            return f"INSERT INTO public.dt_{self.c} VALUES ({r.randint(100, 199)})"
        return r.choice(("SELECT 1", "SHOW work_mem", "SELECT current_setting('search_path')",
                         f"SELECT count(*) FROM public.dt_{self.c}"))

    def _multi(self) -> Op:
        parts = [self._fragment() for _ in range(self.rng.choice((2, 2, 3, 4)))]
        return self._track(S("; ".join(parts)), parts)

    # -------------------------------------------------------------- other queries

    def _prepared(self) -> Op:
        r = self.rng
        n = r.randint(1, 50)
        if r.random() < 0.3:
            # Session and transaction statements as named prepared statements (extended protocol).
            sql = r.choice((self._set_stmt(), self._set_stmt(), self._set_stmt(local=True),
                            f"RESET {self._spell('work_mem')}", "RESET ALL", "BEGIN", "COMMIT", "ROLLBACK",
                            "SAVEPOINT a", "ROLLBACK TO SAVEPOINT a", "SELECT 1/0",
                            f"SELECT {self._set_config_call()}"))
            return self._track(Op("prepared", sql, None))
        if r.random() < 0.3:
            # Many distinct texts: psycopg closes old statements, the proxy evicts server ones.
            return self._track(Op("prepared", f"SELECT %s::int * {r.randint(1, 12)} AS m", (n,)))
        return self._track(r.choice((
            Op("prepared", "SELECT %s::int * 2 AS doubled", (n,)),
            Op("prepared", "SELECT current_setting('work_mem') AS w, current_setting('search_path') AS p, "
                           "%s::text AS t",
               (str(n),)),
            Op("prepared", "SELECT x FROM obj WHERE %s::int > 0", (n,)),
            Op("prepared", f"INSERT INTO public.dt_{self.c} VALUES (%s)", (n,)),
            Op("prepared", f"SELECT count(*), coalesce(sum(x), 0) FROM public.dt_{self.c} WHERE x > %s", (n,)),
            Op("prepared", "SELECT set_config('lock_timeout', %s, true)", (f"{n}s",)),
            Op("prepared", "SELECT 1/%s", (0,)),
        )))

    def _pipeline(self) -> Op:
        r = self.rng
        pool = [
            (f"SELECT set_config('{g}', %s, false)", (r.choice(RAW_VALUES[g])))
            for g in (self._guc(), self._guc())
        ] + [
            ("SELECT %s::int + 1", (r.randint(1, 9),)),
            ("SELECT 1/%s", (0,)),
            (f"INSERT INTO public.dt_{self.c} VALUES (%s)", (r.randint(200, 299),)),
            ("SELECT current_setting('work_mem'), %s::text", ("p",)),
        ]
        g = self._guc()
        pool += [(self._set_stmt(), None), (self._set_stmt(local=True), None), ("RESET ALL", None),
                 (f"RESET {self._spell('lock_timeout')}", None),
                 (f"SET {self._spell(g) if g != 'TimeZone' else 'TimeZone'} TO DEFAULT", None),
                 (f"SELECT set_config('{g}', %s, false)", (None,)),
                 (r.choice(("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT a", "ROLLBACK TO a")), None)]
        stmts = [r.choice(pool) for _ in range(r.choice((2, 3, 4)))]
        stmts = tuple((s, p if isinstance(p, tuple) or p is None else (p,)) for s, p in stmts)
        return self._track(Op("pipeline", stmts))

    def _query(self) -> Op:
        r = self.rng
        return self._track(r.choice((
            S("SELECT x FROM obj"), S("SHOW search_path"), S("SHOW timezone"),
            S(f"SELECT count(*), coalesce(sum(x), 0) FROM public.dt_{self.c}"),
            S(f"DELETE FROM public.dt_{self.c} WHERE x % 3 = 0"),
            Op("params", "SELECT %s::text || current_setting('application_name')", ("n:",)),
            Op("client", "SELECT %s::int + length(current_setting('search_path'))", (r.randint(1, 9),)),
        )))

    # -------------------------------------------------------------- state the proxy cannot carry

    def _temp(self) -> Op:
        r = self.rng
        if self.temp and r.random() < 0.55:
            name = r.choice(sorted(self.temp))
            sql = r.choice((f"DROP TABLE {name}" if name.startswith("tt") else
                            f"DROP {'SEQUENCE' if name.startswith('ts') else 'VIEW'} {name}",
                            "DROP TABLE IF EXISTS tt_a, tt_b, tt_d", "DISCARD TEMP"))
            if sql == "DISCARD TEMP":
                self.temp.clear()
            elif "IF EXISTS" in sql:
                self.temp -= {"tt_a", "tt_b", "tt_d"}
            else:
                self.temp.discard(name)
            return self._track(S(sql))
        k = r.random()
        if k < 0.2 and self.temp:
            name = r.choice([t for t in sorted(self.temp) if t.startswith("tt")] or ["tt_a"])
            return self._track(S(f"INSERT INTO {name} VALUES (1); SELECT count(*) FROM {name}"),
                               ["INSERT", "SELECT"])
        choices = [
            ("tt_a", "CREATE TEMP TABLE tt_a (x int)"),
            ("tt_b", "CREATE TEMPORARY TABLE tt_b (x int) ON COMMIT DELETE ROWS"),
            (None, "CREATE TEMP TABLE tt_c (x int) ON COMMIT DROP"),
            ("tt_d", "SELECT 1 AS x INTO TEMP tt_d"),
            ("ts_a", "CREATE TEMP SEQUENCE ts_a"),
            ("tv_a", "CREATE TEMP VIEW tv_a AS SELECT 1 AS x"),
            ("tt_e", "CREATE TABLE pg_temp.tt_e (x int)"),
        ]
        name, sql = r.choice(choices)
        if name is not None:
            self.temp.add(name)
        if name is None and not self.in_txn and r.random() < 0.5:
            return self._track(S(f"BEGIN; {sql}; INSERT INTO tt_c VALUES (1); COMMIT"), ["BEGIN", sql, "x", "COMMIT"])
        return self._track(S(sql))

    def _advisory(self) -> Op:
        r = self.rng
        key = r.choice(self.keys)
        if self.locks and r.random() < 0.5:
            key = r.choice(sorted(self.locks))
            sql = r.choice((f"SELECT pg_advisory_unlock({key})", f"SELECT pg_advisory_unlock({key})",
                            "SELECT pg_advisory_unlock_all()", f"SELECT pg_advisory_unlock_shared({key})"))
            if "unlock_all" in sql:
                self.locks.clear()
            else:
                self.locks[key] -= 1
                if self.locks[key] <= 0:
                    del self.locks[key]
            return self._track(S(sql))
        k = r.random()
        if k < 0.35:
            self.locks[key] += 1
            return self._track(S(f"SELECT pg_advisory_lock({key})"))
        if k < 0.55:
            self.locks[key] += 1
            return self._track(S(f"SELECT pg_try_advisory_lock({key})"))
        if k < 0.65:
            self.locks[key] += 1
            return self._track(Op("params", "SELECT pg_advisory_lock_shared(%s)", (key,)))
        if k < 0.8:
            return self._track(S(f"SELECT pg_advisory_xact_lock({key})"))
        if k < 0.9:
            return self._track(S(f"SELECT pg_try_advisory_xact_lock({key})"))
        return self._track(S(f"SELECT pg_advisory_unlock({key})"))   # maybe not held: a warning

    def _other_pins(self) -> Op:
        r = self.rng
        k = r.random()
        if k < 0.3:
            return self._listen()
        if k < 0.65:
            if self.cursors and r.random() < 0.6:
                sql = r.choice(("FETCH 2 FROM hc", "CLOSE hc", "CLOSE ALL", "MOVE 1 IN hc"))
                if sql.startswith("CLOSE"):
                    self.cursors.clear()
                return self._track(S(sql))
            self.cursors.add("hc")
            return self._track(S(r.choice((
                "DECLARE hc CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g",
                "DECLARE hc NO SCROLL CURSOR WITH HOLD FOR SELECT 1 AS one",
                "DECLARE nc CURSOR FOR SELECT 1",             # WITHOUT HOLD: needs a transaction
            ))))
        if k < 0.75:
            # psycopg server-side cursor: DECLARE (WITH HOLD: pins until its CLOSE), FETCH, CLOSE.
            return self._track(Op("named", "SELECT g, %s::text FROM generate_series(1, 5) g",
                                  (r.choice(("a", "b")), r.random() < 0.7)))
        return self._sql_prepare()

    def _listen(self) -> Op:
        """LISTEN / UNLISTEN / NOTIFY on this client's own channels (so what it receives does not
        depend on the other clients' timing): inside transactions or not, alone in a string or
        with other statements, and what pg_listening_channels() says."""
        r = self.rng
        c = self.c
        channels = (f"ch_a_{c}", f'"Ch B {c}"')
        k = r.random()
        if k < 0.3 and self.listening:
            sql = r.choice((f"UNLISTEN ch_a_{c}", "UNLISTEN *", f'UNLISTEN "Ch B {c}"'))
            if "*" in sql:
                self.listening.clear()
            else:
                self.listening.discard(sql.split(None, 1)[1])
            return self._track(S(sql))
        if k < 0.55:
            name = r.choice(channels)
            self.listening.add(name)
            return self._track(S(r.choice((f"LISTEN {name}", f"LISTEN {name}; LISTEN ch_a_{c}"))))
        if k < 0.85:
            name = r.choice(channels)
            payload = r.choice(("", "p", f"n{r.randint(1, 9)}", "it''s"))
            return self._track(S(r.choice((
                f"NOTIFY {name}, '{payload}'", f"NOTIFY {name}",
                f"SELECT pg_notify('{name.strip(chr(34))}', '{payload}')",
                f"NOTIFY {name}, 'a'; NOTIFY {name}, 'b'; NOTIFY {name}, 'a'",    # a repeat in one transaction: once
            ))))
        if k < 0.93:
            return self._track(S("SELECT array(SELECT c FROM pg_listening_channels() c ORDER BY 1)::text"))
        # LISTEN with another statement in the string: it runs on the server (and pins there).
        name = r.choice(channels)
        self.listening.add(name)
        return self._track(S(f"LISTEN {name}; SELECT 1"), [f"LISTEN {name}", "SELECT 1"])

    def _sql_prepare(self) -> Op:
        """PREPARE / EXECUTE / DEALLOCATE, names that may or may not exist (42P05, 26000 as
        PostgreSQL says), in transactions that commit or roll back, alone or in a string."""
        r = self.rng
        name = r.choice(("pq_a", "pq_b", '"PQ c"'))
        k = r.random()
        if k < 0.3:
            self.sql_prepared.add(name)
            return self._track(S(r.choice((f"PREPARE {name}(int) AS SELECT $1 * 10",
                                           f"PREPARE {name} AS SELECT current_setting('work_mem'), {self.c}",
                                           f"PREPARE {name}(text) AS SELECT $1 || 'x'"))))
        if k < 0.6:
            return self._track(S(r.choice((f"EXECUTE {name}(3)", f"EXECUTE {name}", f"EXECUTE {name}('t')",
                                           f"EXPLAIN (COSTS OFF) EXECUTE {name}(3)",
                                           "SELECT name, statement, parameter_types FROM pg_prepared_statements "
                                           "WHERE from_sql ORDER BY name"))))
        if k < 0.7:
            return self._track(Op("params", f"EXECUTE {name}(%s)", (r.randint(1, 9),)))
        if k < 0.85:
            sql = r.choice((f"DEALLOCATE {name}", f"DEALLOCATE PREPARE {name}", "DEALLOCATE ALL"))
            if sql == "DEALLOCATE ALL":
                self.sql_prepared.clear()
            else:
                self.sql_prepared.discard(name)
            return self._track(S(sql))
        self.sql_prepared.add(name)
        parts = [f"PREPARE {name}(int) AS SELECT $1 + 1", f"EXECUTE {name}(41)", f"DEALLOCATE {name}",
                 f"EXECUTE {name}(1)"][:r.choice((2, 3, 4))]
        return self._track(S("; ".join(parts)), parts)

    def _role(self) -> Op:
        sql = self.rng.choice((
            f"SET ROLE {DIFF_ROLE}", "RESET ROLE", "SET ROLE NONE", f"SET SESSION AUTHORIZATION {DIFF_ROLE}",
            "RESET SESSION AUTHORIZATION", "SET SESSION AUTHORIZATION DEFAULT", f"SET LOCAL ROLE {DIFF_ROLE}",
            f"SELECT set_config('role', '{DIFF_ROLE}', false)", "SET ROLE app",
        ))
        return self._track(S(sql))

    def _reconnect(self) -> Op:
        """Hang up (maybe inside a transaction, maybe holding pins) and connect again."""
        self.in_txn = self.failed = False
        self.txn_ops = 0
        self.savepoints = []
        self.temp.clear()
        self.locks.clear()
        self.listening.clear()
        self.cursors.clear()
        self.sql_prepared.clear()
        return Op("reconnect")

    def _discard(self) -> Op:
        sql = self.rng.choice(("DISCARD ALL", "DISCARD PLANS", "DISCARD SEQUENCES", "DISCARD ALL"))
        if sql == "DISCARD ALL" and not self.in_txn:
            self.temp.clear()
            self.locks.clear()
            self.listening.clear()
            self.cursors.clear()
            self.sql_prepared.clear()
        return self._track(S(sql))


# Every stream ends by dropping what pins, so the clients leave their server connections to
# the pool (with whatever parameters they had) for the leak check that follows.
EPILOGUE = [S("ROLLBACK"), S("UNLISTEN *"), S("CLOSE ALL"), S("DEALLOCATE ALL"), S("DISCARD TEMP"),
            S("SELECT pg_advisory_unlock_all()")]


def generate_ops(seed: int, client: int, n: int, permanent_pin: bool = False) -> list[Op]:
    return Generator(seed, client, permanent_pin).ops(n) + EPILOGUE


# ----------------------------------------------------------------------------- running


def _value(v) -> str:
    return repr(v)


def _capture(cur) -> tuple:
    """Every result set of the last execute: (status, rows) each."""
    out = []
    while True:
        rows = tuple(tuple(_value(v) for v in row) for row in cur.fetchall()) if cur.description else None
        out.append((cur.statusmessage, rows))
        if not cur.nextset():
            break
    return tuple(out)


def run_op(conn: psycopg.Connection, op: Op) -> tuple:
    """Run one op; returns ("ok", results) or ("error", sqlstate)."""
    if op.kind == "simple":
        return ("ok", _capture(conn.execute(op.sql)))
    if op.kind == "params":
        return ("ok", _capture(conn.execute(op.sql, op.params)))
    if op.kind == "prepared":
        return ("ok", _capture(conn.execute(op.sql, op.params, prepare=True)))
    if op.kind == "client":
        cur = ClientCursor(conn)
        cur.execute(op.sql, op.params)
        return ("ok", _capture(cur))
    if op.kind == "exec_prepared":
        # Bind/Execute/Sync of a statement name this session never prepared (libpq directly).
        res = conn.pgconn.exec_prepared(op.sql.encode(), [])
        if res.status == psycopg.pq.ExecStatus.FATAL_ERROR:
            return ("error", (res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) or b"").decode())
        return ("ok", tuple(tuple(res.get_value(r, c) for c in range(res.nfields)) for r in range(res.ntuples)))
    if op.kind == "named":
        value, withhold = op.params
        with conn.cursor(name="ncur", withhold=withhold) as cur:
            cur.execute(op.sql, (value,))
            rows = tuple(tuple(_value(v) for v in row) for row in cur.fetchmany(2))
            return ("ok", rows, tuple(tuple(_value(v) for v in row) for row in cur.fetchall()))
    # pipeline: all results, or the first error. (Which execute() call raises depends on
    # when psycopg reads the server's answers, so only the SQLSTATE is recorded.)
    curs = []
    try:
        with conn.pipeline():
            for sql, params in op.sql:
                curs.append(conn.execute(sql, params))
        return ("ok", tuple(_capture(cur) for cur in curs))
    except psycopg.Error as e:
        return ("pipeline-error", e.sqlstate)


@dataclass
class Step:
    op: Op
    result: tuple
    notices: tuple
    observed: tuple
    status: str
    reported: tuple
    detail: str = ""          # error messages, for humans only (not compared)
    notes: tuple = ()         # notifications received by the end of the op: (channel, payload)

    def key(self) -> tuple:
        return (self.result, self.notices, self.observed, self.status, self.reported, self.notes)

    def show(self) -> str:
        obs = self.observed
        if obs and obs[0] == "ok":
            obs = ("ok", {n: v for n, v in zip(OBS_NAMES, obs[1]) if n != "settings"})
        return (f"result={self.result!r}\n      notices={self.notices!r} status={self.status} "
                f"notifications={self.notes!r}\n"
                f"      observed={obs!r}\n      reported={dict(self.reported)!r}"
                + (f"\n      detail={self.detail}" if self.detail else ""))


@dataclass
class Trace:
    client: int
    steps: list[Step] = field(default_factory=list)
    fatal: str | None = None


def _notes(conn: psycopg.Connection) -> tuple:
    """Notifications received so far (the op's own arrive before its ReadyForQuery), without
    waiting: only the client's own channels are used, so nothing arrives late."""
    if conn.closed or conn.broken:
        return ()
    try:
        return tuple((n.channel, n.payload) for n in conn.notifies(timeout=0))
    except psycopg.Error:
        return ("error",)


def _observe(conn: psycopg.Connection) -> tuple:
    try:
        row = conn.execute(OBSERVE_SQL).fetchone()
        return ("ok", tuple(row))
    except psycopg.Error as e:
        return ("error", e.sqlstate)


def _wait_for_old_backend(conn: psycopg.Connection, client: int, timeout: float = 5.0) -> None:
    """After a hang-up: wait until no other backend holds this client's advisory lock keys.

    A backend releases its session's locks when it exits, a moment after its client hung up
    (whether the client is the proxy closing a pinned server connection or psycopg itself),
    so a lock attempt right after reconnecting races with that exit. Not recorded; a lock that
    stays held (a server connection that went back to the pool with it) shows in the trace
    after the timeout.
    """
    low = 100_000 * (client + 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            held = conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND objid BETWEEN %s AND %s "
                "AND pid <> pg_catalog.pg_backend_pid()", (low, low + 9), prepare=False).fetchone()[0]
        except psycopg.Error:
            return
        if not held:
            return
        time.sleep(0.02)


def run_client(connect, client: int, ops: list[Op], observe_every: int = 1) -> Trace:
    trace = Trace(client)
    notices: list = []
    try:
        conn = connect(client)
    except Exception as e:   # noqa: BLE001 - reported as a divergence
        trace.fatal = f"connect: {e!r}"
        return trace
    conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.sqlstate)))
    try:
        for i, op in enumerate(ops):
            notices.clear()
            detail = ""
            try:
                if op.kind == "reconnect":
                    conn.close()
                    conn = connect(client)
                    conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.sqlstate)))
                    _wait_for_old_backend(conn, client)
                    notices.clear()
                    result = ("ok", "reconnected")
                else:
                    result = run_op(conn, op)
            except psycopg.Error as e:
                result = ("error", e.sqlstate)
                detail = f"{type(e).__name__}: {e}".strip()
            if conn.closed or conn.broken:
                trace.steps.append(Step(op, result, tuple(notices), ("closed",), "closed", (), detail))
                trace.fatal = f"connection lost at step {i}: {detail}"
                break
            got = tuple(notices)
            notes = _notes(conn)
            observed = _observe(conn) if (i % observe_every == 0 or i == len(ops) - 1) else ("skipped",)
            status = conn.info.transaction_status.name
            reported = tuple((n, conn.info.parameter_status(n)) for n in REPORTED)
            trace.steps.append(Step(op, result, got, observed, status, reported, detail, notes))
    except Exception:   # noqa: BLE001
        trace.fatal = traceback.format_exc()
    finally:
        try:
            if not conn.closed and conn.info.transaction_status.name != "IDLE":
                conn.execute("ROLLBACK")
        except psycopg.Error:
            pass
        conn.close()
    return trace


def run_clients(connect, streams: dict[int, list[Op]], observe_every: int = 1) -> dict[int, Trace]:
    """Run each client's stream in its own thread, all at once."""
    traces: dict[int, Trace] = {}
    start = threading.Barrier(len(streams))

    def work(c: int) -> None:
        try:
            start.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        traces[c] = run_client(connect, c, streams[c], observe_every)

    threads = [threading.Thread(target=work, args=(c,), name=f"diff-client-{c}") for c in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return traces


def run_script(connect, script: list[tuple[str, Op]]) -> list[tuple[str, Step]]:
    """Run (client, op) steps one after the other, each client on its own connection from
    connect(client name); observe that client's session after each step."""
    conns: dict[str, psycopg.Connection] = {}
    notices: dict[str, list] = {}
    out = []
    try:
        for who, op in script:
            if op.kind == "reconnect":          # hang up (the next step of this client connects again)
                conn = conns.pop(who, None)
                if conn is not None:
                    conn.close()
                out.append((who, Step(op, ("ok", "closed"), (), ("closed",), "closed", ())))
                continue
            conn = conns.get(who)
            if conn is None:
                conn = conns[who] = connect(who)
                box = notices[who] = []
                conn.add_notice_handler(lambda d, box=box: box.append((d.severity_nonlocalized, d.sqlstate)))
            notices[who].clear()
            detail = ""
            try:
                result = run_op(conn, op)
            except psycopg.Error as e:
                result = ("error", e.sqlstate)
                detail = f"{type(e).__name__}: {e}".strip()
            got = tuple(notices[who])
            notes = _notes(conn)
            observed = _observe(conn)
            reported = tuple((n, conn.info.parameter_status(n)) for n in REPORTED)
            out.append((who, Step(op, result, got, observed, conn.info.transaction_status.name, reported, detail,
                                  notes)))
    finally:
        for conn in conns.values():
            conn.close()
    return out


def first_divergence(a: Trace, b: Trace) -> int | None:
    """Index of the first step where the traces differ, or None."""
    for i, (x, y) in enumerate(zip(a.steps, b.steps)):
        if x.key() != y.key():
            return i
    if len(a.steps) != len(b.steps) or (a.fatal is None) != (b.fatal is None):
        return min(len(a.steps), len(b.steps))
    return None


def differences(d: Step, p: Step) -> list[str]:
    """What differs between two observations, readably (pg_settings as a set difference)."""
    out = []
    if d.observed[0] == p.observed[0] == "ok":
        diff = {n: (x, y) for n, x, y in zip(OBS_NAMES, d.observed[1], p.observed[1]) if x != y}
        if "settings" in diff:
            x, y = (set((v or "").split("; ")) for v in diff["settings"])
            diff["settings"] = (sorted(x - y), sorted(y - x))
        out.append(f"observed differences (direct, proxied): {diff}")
    if d.reported != p.reported:
        diff = {n: (x, y) for (n, x), (_, y) in zip(d.reported, p.reported) if x != y}
        out.append(f"ParameterStatus differences (direct, proxied): {diff}")
    if d.notes != p.notes:
        out.append(f"notifications (direct, proxied): {d.notes!r} {p.notes!r}")
    return out


def describe(seed: int, client: int, step: int, ops: list[Op], direct: Trace, proxied: Trace,
             context: int = 0, rerun: str = "") -> str:
    """A report that lets a human reproduce and understand a divergence."""
    lines = [f"DIVERGENCE seed={seed} client={client} step={step}",
             f"  rerun: {rerun or f'UNPINNED_DIFF_SEED={seed}'} "
             "pytest -q tests/e2e/test_differential.py -k matches",
             "  ops so far (this client):"]
    first = max(0, step - context) if context else 0
    for i in range(first, min(step + 1, len(ops))):
        lines.append(f"    [{i:3d}] {ops[i]}")
    lines.append("  direct vs proxied, step by step:")
    for i in range(first, step + 1):
        d = direct.steps[i] if i < len(direct.steps) else None
        p = proxied.steps[i] if i < len(proxied.steps) else None
        mark = "  " if d is not None and p is not None and d.key() == p.key() else "!!"
        lines.append(f"  {mark}[{i:3d}] {ops[i] if i < len(ops) else '?'}")
        if mark == "!!" or i == step:
            lines.append(f"      DIRECT : {d.show() if d else direct.fatal}")
            lines.append(f"      PROXIED: {p.show() if p else proxied.fatal}")
            if d is not None and p is not None:
                lines += ["      " + line for line in differences(d, p)]
    if direct.fatal:
        lines.append(f"  direct fatal: {direct.fatal}")
    if proxied.fatal:
        lines.append(f"  proxied fatal: {proxied.fatal}")
    lines.append("  as a script:")
    for i in range(0, min(step + 1, len(ops))):
        lines.append(f"    {ops[i].python()}")
    return "\n".join(lines)
