"""The SQL classifier: statement text in, session effects out (SPEC 2, 4.1, 4.5, 4.6)."""
from __future__ import annotations

import time

import pytest

from unpinned.sql import classifier
from unpinned.sql.classifier import classify, digest, fingerprint
from unpinned.sql.effects import Effect, Kind, Param, Scope, Unknown

L = Scope.LOCAL


def SET(name, value, scope=Scope.SESSION):
    return Effect(Kind.SET, name=name, value=value, scope=scope)


def RESET(name, scope=Scope.SESSION):
    return Effect(Kind.RESET, name=name, scope=scope)


def SETTX(name, value):
    return Effect(Kind.SET_TRANSACTION, name=name, value=value, scope=L)


def ROLE(name, value, scope=Scope.SESSION):
    return Effect(Kind.ROLE, name=name, value=value, scope=scope)


def SC(name, value, flag):
    # set_config(..., true) is transaction-local; anything else may outlive it.
    return Effect(Kind.SET_CONFIG, name=name, value=value, flag=flag,
                  scope=L if flag is True else Scope.SESSION)


def ADV(fn, op, xact=False):
    return Effect(Kind.ADVISORY_LOCK, name=fn, flag=xact, op=op)


def SEQ(fn, seq=None):
    return Effect(Kind.SEQUENCE, name=fn, value=seq)


def TEMP(name, what="table", on_commit_drop=False):
    return Effect(Kind.CREATE_TEMP, name=name, value=what, flag=on_commit_drop)


def DROP(names, what="table"):
    return Effect(Kind.DROP, name=names, value=what)


def TX(op, value=None):
    return Effect(Kind.TRANSACTION, name=op, value=value)


def K(kind, name=None, **kw):
    return Effect(kind, name=name, **kw)


ASYNCPG_RESET = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"
JIT_TOGGLE = "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new"
BIG_IN = "SELECT * FROM orders WHERE id IN (" + ", ".join(str(i) for i in range(4000)) + ")"

# (sql, expected effects) or (sql, expected effects, {attribute: value})
CASES = [
    # ---- SET (SPEC 2 row "session SET/RESET", 4.1 forms)
    ("SET lock_timeout = 3000", [SET("lock_timeout", "3000")]),
    ("SET lock_timeout TO '3s'", [SET("lock_timeout", "3s")]),
    ("set LOCK_TIMEOUT=3000", [SET("lock_timeout", "3000")]),
    ('SET "Lock_Timeout" = 10', [SET("lock_timeout", "10")]),
    ("SET SESSION statement_timeout = 0", [SET("statement_timeout", "0")]),
    ("SET LOCAL statement_timeout = '5s'", [SET("statement_timeout", "5s", L)]),
    ('SET search_path = a, "B"', [SET("search_path", 'a, "B"')]),
    ('SET search_path TO "$user", public', [SET("search_path", '"$user", public')]),
    ("SET search_path = 'My Schema'", [SET("search_path", '"My Schema"')]),
    ('SET search_path = public, "user"', [SET("search_path", 'public, "user"')]),
    ("SET search_path = ''", [SET("search_path", '""')]),
    ("SET search_path TO DEFAULT", [SET("search_path", None)]),
    ("SET temp_tablespaces = 'fast_ssd'", [SET("temp_tablespaces", "fast_ssd")]),
    ("SET datestyle TO 'ISO'", [SET("datestyle", "ISO")]),                      # psycopg2
    ("SET DateStyle = ISO, MDY", [SET("datestyle", "iso, mdy")]),
    ("SET client_encoding TO 'UTF8'", [SET("client_encoding", "UTF8")]),         # psycopg2
    ("SET default_transaction_read_only TO DEFAULT", [SET("default_transaction_read_only", None)]),
    ("SET default_transaction_isolation TO 'read committed'",
     [SET("default_transaction_isolation", "read committed")]),
    ("SET extra_float_digits = 3", [SET("extra_float_digits", "3")]),           # pgjdbc
    ("SET x.y = -1.5", [SET("x.y", "-1.5")]),
    ("SET myapp.user_id = '42'", [SET("myapp.user_id", "42")]),
    ("SET enable_seqscan = off", [SET("enable_seqscan", "off")]),
    ("SET enable_seqscan TO true", [SET("enable_seqscan", "true")]),
    ("SET work_mem = '64MB'", [SET("work_mem", "64MB")]),
    ("SET application_name = 'my app'", [SET("application_name", "my app")]),
    ("SET x FROM CURRENT", [SET("x", Unknown("FROM CURRENT"))]),
    ("SET XML OPTION DOCUMENT", [SET("xmloption", "DOCUMENT")]),
    ("SET TIME ZONE 'UTC'", [SET("timezone", "UTC")]),
    ("SET TIME ZONE LOCAL", [SET("timezone", None)]),
    ("SET TIME ZONE DEFAULT", [SET("timezone", None)]),
    ("SET TIME ZONE -7", [SET("timezone", "-7")]),
    ("SET TIME ZONE INTERVAL '+02:00' HOUR TO MINUTE", [SET("timezone", Unknown("interval '+02:00'"))]),
    ("SET LOCAL TIME ZONE 'UTC'", [SET("timezone", "UTC", L)]),
    ("SET timezone = 'Europe/Paris'", [SET("timezone", "Europe/Paris")]),
    ("SET NAMES 'utf8'", [SET("client_encoding", "utf8")]),                     # doctrine
    ("SET NAMES DEFAULT", [SET("client_encoding", None)]),
    ("SET SCHEMA 'app'", [SET("search_path", "app")]),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
     [SET("default_transaction_isolation", "read uncommitted")]),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
     [SET("default_transaction_isolation", "serializable"), SET("default_transaction_read_only", "on"),
      SET("default_transaction_deferrable", "on")]),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", [SET("default_transaction_read_only", "off")]),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, NOT DEFERRABLE",
     [SET("default_transaction_isolation", "repeatable read"), SET("default_transaction_deferrable", "off")]),
    # ---- SET TRANSACTION: this transaction only
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", [SETTX("transaction_isolation", "serializable")]),
    ("SET TRANSACTION READ ONLY", [SETTX("transaction_read_only", "on")]),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", [SETTX("transaction_snapshot", "00000003-0000001B-1")]),
    # ---- RESET
    ("RESET statement_timeout", [RESET("statement_timeout")]),
    ("RESET ALL", [RESET(None)]),
    ("reset Search_Path", [RESET("search_path")]),
    ("RESET TIME ZONE", [RESET("timezone")]),
    # ---- ROLE / SESSION AUTHORIZATION
    ("SET ROLE admin", [ROLE("role", "admin")]),
    ("SET ROLE 'Admin'", [ROLE("role", "Admin")]),
    ("SET ROLE NONE", [ROLE("role", None)]),
    ("SET SESSION ROLE admin", [ROLE("role", "admin")]),
    ("SET LOCAL ROLE reader", [ROLE("role", "reader", L)]),
    ("RESET ROLE", [ROLE("role", None)]),
    ("SET SESSION AUTHORIZATION alice", [ROLE("session_authorization", "alice")]),
    ("SET SESSION AUTHORIZATION DEFAULT", [ROLE("session_authorization", None)]),
    ("RESET SESSION AUTHORIZATION", [ROLE("session_authorization", None)]),
    # ---- settings that are not this session's
    ("ALTER ROLE app SET statement_timeout = '5s'", []),
    ("ALTER ROLE app IN DATABASE db RESET ALL", []),
    ("ALTER DATABASE db SET search_path = x", []),
    ("ALTER SYSTEM SET work_mem = '1GB'", []),
    ("ALTER FUNCTION f() SET search_path = public", []),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = x AS $$ SELECT 1 $$", []),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET LOCAL work_mem = '1GB';"
     " PERFORM set_config('a', 'b', false); END $$", []),
    ("CREATE FUNCTION f() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT set_config('a', 'b', false); END", []),
    ("CREATE FUNCTION f(a text DEFAULT set_config('a', 'b', false)) RETURNS text LANGUAGE sql AS 'select a'", []),
    ("DO $$ BEGIN SET LOCAL statement_timeout = 0; END $$", []),
    ("DO $body$ BEGIN PERFORM set_config('x', 'y', false); PERFORM nextval('s'); END $body$", []),
    ("UPDATE t SET a = 1", []),
    ("UPDATE accounts SET balance = balance - 1 WHERE id = $1 RETURNING balance", []),
    ("ALTER TABLE t SET (fillfactor = 70)", []),
    # ---- comments, strings, identifiers that only look like effects
    ("-- set x = 1\nSELECT 1", []),
    ("/* SET search_path = x */ SELECT 1", []),
    ("SELECT /* pg_advisory_lock(1) */ 1", []),
    ("SELECT 'SET x = 1'", []),
    ("SELECT 'select set_config(''a'',''b'',false)'", []),
    ("SELECT $$ SET LOCAL x = 1 $$", []),
    ("SELECT $q$ LISTEN ch; DISCARD ALL $q$", []),
    ("SELECT E'nextval(\\'s\\')'", []),
    ('SELECT "set" FROM t', []),
    ('SELECT 1 AS "SET ROLE x"', []),
    ("SELECT offset_value, pending, attempt FROM settings OFFSET 5", []),
    ("SELECT 'x' AS set_config", []),
    ("SELECT current_setting('jit')", []),
    # ---- set_config anywhere (SPEC 4.1, 4.5)
    (JIT_TOGGLE, [SC("jit", "off", False)]),                                     # asyncpg
    ("SELECT set_config('jit', $1, false)", [SC("jit", Param(1), False)]),      # asyncpg
    ("SELECT set_config('search_path', 'a,b', true)", [SC("search_path", "a,b", True)]),
    ("SELECT pg_catalog.set_config('statement_timeout', '5s', false)", [SC("statement_timeout", "5s", False)]),
    ("select SET_CONFIG('Work_Mem', '1MB', 'off')", [SC("work_mem", "1MB", False)]),
    ('SELECT "set_config"(\'a\', \'b\', false)', [SC("a", "b", False)]),
    ("SELECT set_config('a', 'b', 't')", [SC("a", "b", True)]),
    ("SELECT set_config('a', 'b', 'yes')", [SC("a", "b", True)]),
    ("SELECT set_config('a', 'b', 'on')", [SC("a", "b", True)]),
    ("SELECT set_config('a', 'b', '0')", [SC("a", "b", False)]),
    ("SELECT set_config('a', 'b', 'maybe')", [SC("a", "b", Unknown("'maybe'"))]),
    ("SELECT set_config('a', 'off'::text, false::boolean)", [SC("a", "off", False)]),
    ("SELECT set_config('a', CAST('v' AS text), true)", [SC("a", "v", True)]),
    ("SELECT set_config($1, $2, $3)", [SC(Param(1), Param(2), Param(3))]),
    ("SELECT set_config($1::text, $2::text, $3::boolean)", [SC(Param(1), Param(2), Param(3))]),
    ("SELECT set_config('a', NULL, false)", [SC("a", None, False)]),
    ("SELECT set_config('a', 'b', NULL)", [SC("a", "b", False)]),
    ("SELECT set_config('a', current_user, false)", [SC("a", Unknown("current_user"), False)]),
    ("SELECT set_config('a', 'x' || 'y', false)", [SC("a", Unknown("'x' || 'y'"), False)]),
    ("SELECT set_config(lower('A'), 'b', is_local) FROM t",
     [SC(Unknown("lower('A')"), "b", Unknown("is_local"))]),
    ("SELECT set_config('a', '1', false), set_config('b', '2', true)",
     [SC("a", "1", False), SC("b", "2", True)]),
    ("WITH s AS (SELECT set_config('a', 'b', false)) SELECT * FROM s", [SC("a", "b", False)]),
    ("SELECT * FROM (SELECT set_config('a', 'b', false)) x", [SC("a", "b", False)]),
    ("SELECT 1 WHERE set_config('a', 'b', true) IS NOT NULL", [SC("a", "b", True)]),
    ("SELECT length(coalesce(set_config('a', 'b', false), ''))", [SC("a", "b", False)]),
    ("SELECT CASE WHEN $1 THEN set_config('a', 'b', false) END", [SC("a", "b", False)]),
    ("INSERT INTO log (v) VALUES (set_config('a', 'b', false))", [SC("a", "b", False)]),
    ("UPDATE t SET v = set_config('a', $1, true) WHERE id = $2", [SC("a", Param(1), True)]),
    ("CALL p(set_config('a', 'b', false))", [SC("a", "b", False)]),
    ("SELECT * FROM set_config('a', 'b', false)", [SC("a", "b", False)]),
    ("SELECT set_config(setting_name => 'a', new_value => 'b', is_local => true)", [SC("a", "b", True)]),
    ("SELECT set_config(is_local => false, new_value => 'b', setting_name => 'A')", [SC("a", "b", False)]),
    ("SELECT set_config(is_local => x > 1, new_value => upper('b'), setting_name => 'A') FROM t",
     [SC("a", Unknown("new_value => upper('b')"), Unknown("is_local => x > 1"))]),
    ('SELECT U&"\\0073et_config"(\'a\', \'b\', false)', [SC("a", "b", False)]),
    ("WITH x AS (SELECT nextval('s')) SELECT * FROM x WHERE set_config('a', 'b', true) IS NOT NULL",
     [SEQ("nextval", "s"), SC("a", "b", True)]),
    ("SELECT set_config('pghistory.context_id', '1', true), set_config('pghistory.context_metadata', '{}', true);"
     " SELECT 1",
     [SC("pghistory.context_id", "1", True), SC("pghistory.context_metadata", "{}", True)], {"statements": 2}),
    ("CREATE VIEW v AS SELECT set_config('a', 'b', false)", []),   # stored, not run
    ("EXPLAIN SELECT set_config('a', 'b', false)", []),           # planned, not run
    ("EXPLAIN (ANALYZE false) SELECT set_config('a', 'b', false)", []),
    ("EXPLAIN ANALYZE SELECT set_config('a', 'b', false)", [SC("a", "b", False)]),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT nextval('s')", [SEQ("nextval", "s")]),
    # ---- advisory locks
    ("SELECT pg_advisory_lock(1)", [ADV("pg_advisory_lock", "lock")]),
    ("SELECT pg_advisory_lock_shared(1, 2)", [ADV("pg_advisory_lock_shared", "lock")]),
    ("SELECT pg_try_advisory_lock(42)", [ADV("pg_try_advisory_lock", "try_lock")]),
    ("SELECT pg_try_advisory_lock_shared(42)", [ADV("pg_try_advisory_lock_shared", "try_lock")]),
    ("SELECT pg_advisory_unlock(42)", [ADV("pg_advisory_unlock", "unlock")]),
    ("SELECT pg_advisory_unlock_shared(42)", [ADV("pg_advisory_unlock_shared", "unlock")]),
    ("SELECT pg_advisory_unlock_all()", [ADV("pg_advisory_unlock_all", "unlock_all")]),
    ("SELECT pg_advisory_xact_lock(1)", [ADV("pg_advisory_xact_lock", "lock", True)]),
    ("SELECT pg_advisory_xact_lock_shared(1)", [ADV("pg_advisory_xact_lock_shared", "lock", True)]),
    ("SELECT pg_try_advisory_xact_lock(1)", [ADV("pg_try_advisory_xact_lock", "try_lock", True)]),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", [ADV("pg_try_advisory_xact_lock_shared", "try_lock", True)]),
    ("SELECT pg_catalog.pg_advisory_lock(hashtext('job'))", [ADV("pg_advisory_lock", "lock")]),
    ("SELECT id FROM jobs WHERE pg_try_advisory_lock(id) LIMIT 1", [ADV("pg_try_advisory_lock", "try_lock")]),
    ("SELECT PG_ADVISORY_LOCK(1), pg_advisory_unlock(1)",
     [ADV("pg_advisory_lock", "lock"), ADV("pg_advisory_unlock", "unlock")]),
    # ---- sequences (SPEC 4.6)
    ("SELECT nextval('s')", [SEQ("nextval", "s")]),
    ("SELECT nextval('public.s'::regclass)", [SEQ("nextval", "public.s")]),
    ("SELECT NEXTVAL('S')", [SEQ("nextval", "S")]),
    ("SELECT setval('s', 10, true)", [SEQ("setval", "s")]),
    ("SELECT currval('s')", [SEQ("currval", "s")]),
    ("SELECT lastval()", [SEQ("lastval")]),
    ("SELECT nextval($1)", [SEQ("nextval")]),
    ("INSERT INTO t (id, v) VALUES (nextval('t_id_seq'), $1)", [SEQ("nextval", "t_id_seq")]),
    ("CREATE TABLE t (id int DEFAULT nextval('s'))", []),    # default not evaluated: no rows yet
    ("CREATE SCHEMA s CREATE VIEW v AS SELECT nextval('x')", []),
    ("ALTER TABLE t ADD COLUMN id bigint DEFAULT nextval('s')", [SEQ("nextval", "s")]),  # runs per row
    ("COPY (SELECT nextval('s')) TO STDOUT", [SEQ("nextval", "s")]),
    ("EXECUTE q(nextval('s'))", [K(Kind.EXECUTE, "q"), SEQ("nextval", "s")]),
    # ---- SQL PREPARE / EXECUTE / DEALLOCATE
    ("PREPARE q (int) AS SELECT $1", [K(Kind.PREPARE, "q")]),
    ('PREPARE "Q" AS SELECT 1', [K(Kind.PREPARE, "Q")]),
    ("PREPARE q AS SELECT set_config('a', 'b', false)", [K(Kind.PREPARE, "q")]),   # runs at EXECUTE
    ("EXECUTE q(1)", [K(Kind.EXECUTE, "q")]),
    ("EXECUTE q", [K(Kind.EXECUTE, "q")]),
    ("DEALLOCATE q", [K(Kind.DEALLOCATE, "q")]),
    ("DEALLOCATE PREPARE q", [K(Kind.DEALLOCATE, "q")]),
    ("DEALLOCATE ALL", [K(Kind.DEALLOCATE, None)]),                 # psycopg 3
    ("DEALLOCATE PREPARE ALL", [K(Kind.DEALLOCATE, None)]),
    ("CREATE TEMP TABLE t AS EXECUTE q", [TEMP("t"), K(Kind.EXECUTE, "q")]),
    ("EXPLAIN ANALYZE EXECUTE q(1)", [K(Kind.EXECUTE, "q")]),
    # EXPLAIN without ANALYZE only plans, but looks the statement up by name (the relay renames it)
    ("EXPLAIN EXECUTE q(1)", [Effect(Kind.EXECUTE, name="q", op="explain")]),
    ("explain (costs off) execute q", [Effect(Kind.EXECUTE, name="q", op="explain")]),
    ("EXPLAIN CREATE TABLE t AS EXECUTE q", [Effect(Kind.EXECUTE, name="q", op="explain")]),
    # ---- pg_prepared_statements: no session effect, but smart mode answers it (relay/prepared_view.py)
    ("SELECT name FROM pg_prepared_statements", [K(Kind.PREPARED_VIEW, None)]),
    ("select * from pg_catalog.PG_PREPARED_STATEMENTS p where p.name = 'x'", [K(Kind.PREPARED_VIEW, None)]),
    ("SELECT 'pg_prepared_statements'", []),
    ("SELECT * FROM my_schema.pg_prepared_statements", []),
    # ---- DISCARD
    ("DISCARD ALL", [K(Kind.DISCARD, "ALL")]),
    ("DISCARD PLANS", [K(Kind.DISCARD, "PLANS")]),
    ("DISCARD SEQUENCES", [K(Kind.DISCARD, "SEQUENCES")]),
    ("DISCARD TEMP", [K(Kind.DISCARD, "TEMP")]),
    ("discard temporary", [K(Kind.DISCARD, "TEMP")]),
    # ---- temp objects
    ("CREATE TEMP TABLE t (a int)", [TEMP("t")]),
    ("CREATE TEMPORARY TABLE t (a int)", [TEMP("t")]),
    ("CREATE LOCAL TEMP TABLE t (a int)", [TEMP("t")]),
    ("CREATE GLOBAL TEMPORARY TABLE t (a int)", [TEMP("t")]),
    ("CREATE TEMP TABLE t (a int) ON COMMIT DROP", [TEMP("t", on_commit_drop=True)]),
    ("CREATE TEMP TABLE t (a int) ON COMMIT DELETE ROWS", [TEMP("t")]),
    ("CREATE TEMP TABLE t (a int) ON COMMIT PRESERVE ROWS", [TEMP("t")]),
    ("CREATE TABLE pg_temp.t (a int)", [TEMP("t")]),
    ("CREATE TABLE pg_temp_3.t (a int)", [TEMP("t")]),
    ("CREATE TEMP TABLE IF NOT EXISTS t (a int)", [TEMP("t")]),
    ('CREATE TEMPORARY TABLE IF NOT EXISTS "Tmp" (a int)', [TEMP("Tmp")]),
    ("CREATE TEMP TABLE t (id serial, v text)", [TEMP("t")]),
    ("CREATE TEMP TABLE t (LIKE orders INCLUDING ALL)", [TEMP("t")]),
    ("CREATE TEMP TABLE t AS SELECT 1", [TEMP("t")]),
    ("CREATE TEMP TABLE t ON COMMIT DROP AS SELECT * FROM x", [TEMP("t", on_commit_drop=True)]),
    ("CREATE TEMP TABLE t AS SELECT nextval('s')", [TEMP("t"), SEQ("nextval", "s")]),
    ("SELECT * INTO TEMP t FROM x", [TEMP("t")]),
    ("SELECT * INTO TEMP TABLE t FROM x", [TEMP("t")]),
    ("SELECT * INTO TEMPORARY t FROM x", [TEMP("t")]),
    ("SELECT 1 AS a INTO TEMP t UNION SELECT 2", [TEMP("t")]),
    ("SELECT * INTO t FROM x", []),
    ("CREATE TEMP SEQUENCE s", [TEMP("s", "sequence")]),
    ("CREATE SEQUENCE pg_temp.s", [TEMP("s", "sequence")]),
    ("CREATE TEMP VIEW v AS SELECT 1", [TEMP("v", "view")]),
    ("CREATE VIEW pg_temp.v AS SELECT 1", [TEMP("v", "view")]),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", [TEMP("v", "view")]),
    ("CREATE TABLE t (a int)", []),
    ("CREATE UNLOGGED TABLE t (a int)", []),
    ("CREATE SEQUENCE s", []),
    ("CREATE VIEW v AS SELECT 1", []),
    # ---- DROP
    ("DROP TABLE t", [DROP("t")]),
    ('DROP TABLE IF EXISTS a, "B", s.c CASCADE', [DROP("a,B,s.c")]),
    ("DROP TABLE pg_temp.t", [DROP("pg_temp.t")]),
    ("DROP SEQUENCE s", [DROP("s", "sequence")]),
    ("DROP VIEW v", [DROP("v", "view")]),
    ("DROP INDEX i", []),
    ("DROP FUNCTION f()", []),
    # ---- cursors
    ("DECLARE c CURSOR FOR SELECT 1", [K(Kind.DECLARE_CURSOR, "c")]),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", [K(Kind.DECLARE_CURSOR, "c", flag=True)]),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", [K(Kind.DECLARE_CURSOR, "c")]),
    ("DECLARE c BINARY INSENSITIVE NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM t",
     [K(Kind.DECLARE_CURSOR, "c", flag=True)]),
    ('DECLARE "C" SCROLL CURSOR FOR SELECT 1', [K(Kind.DECLARE_CURSOR, "C")]),
    ("CLOSE c", [K(Kind.CLOSE_CURSOR, "c")]),
    ("CLOSE ALL", [K(Kind.CLOSE_CURSOR, None)]),
    ("FETCH 10 FROM c", []),
    # ---- LISTEN / UNLISTEN / LOAD
    ("LISTEN ch", [K(Kind.LISTEN, "ch")]),
    ('LISTEN "Ch"', [K(Kind.LISTEN, "Ch")]),
    ("UNLISTEN ch", [K(Kind.UNLISTEN, "ch")]),
    ("UNLISTEN *", [K(Kind.UNLISTEN, None)]),
    ("NOTIFY ch, 'x'", []),
    ("SELECT pg_notify('ch', 'x')", []),
    ("LOAD 'auto_explain'", [K(Kind.LOAD, "auto_explain")]),
    ("LOAD '$libdir/plugins/auto_explain'", [K(Kind.LOAD, "$libdir/plugins/auto_explain")]),
    # ---- transaction control
    ("BEGIN", [TX("begin")]),
    ("BEGIN WORK", [TX("begin")]),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", [TX("begin")]),
    ("START TRANSACTION", [TX("begin")]),
    ("START TRANSACTION READ ONLY", [TX("begin")]),
    ("COMMIT", [TX("commit")]),
    ("COMMIT WORK", [TX("commit")]),
    ("END", [TX("commit")]),
    ("END TRANSACTION", [TX("commit")]),
    ("COMMIT AND CHAIN", [TX("commit")]),
    ("ROLLBACK", [TX("rollback")]),
    ("ABORT", [TX("rollback")]),
    ("ROLLBACK WORK", [TX("rollback")]),
    ("SAVEPOINT s1", [TX("savepoint", "s1")]),
    ("RELEASE SAVEPOINT s1", [TX("release", "s1")]),
    ("RELEASE s1", [TX("release", "s1")]),
    ("ROLLBACK TO SAVEPOINT s1", [TX("rollback_to", "s1")]),
    ("ROLLBACK TO s1", [TX("rollback_to", "s1")]),
    ("PREPARE TRANSACTION 'g1'", [TX("prepare", "g1")]),
    ("COMMIT PREPARED 'g1'", [TX("commit_prepared", "g1")]),
    ("ROLLBACK PREPARED 'g1'", [TX("rollback_prepared", "g1")]),
    # ---- multi-statement strings, in statement order
    (ASYNCPG_RESET, [ADV("pg_advisory_unlock_all", "unlock_all"), K(Kind.CLOSE_CURSOR, None),
                     K(Kind.UNLISTEN, None), RESET(None)], {"statements": 4}),
    ('SET search_path = "public"; SET NAMES \'UTF8\'',                           # prisma
     [SET("search_path", "public"), SET("client_encoding", "UTF8")], {"statements": 2}),
    ("SET DateStyle = 'ISO'; SET extra_float_digits = 2",                        # psqlodbc
     [SET("datestyle", "ISO"), SET("extra_float_digits", "2")], {"statements": 2}),
    ("BEGIN; SET LOCAL statement_timeout = '5s'; SELECT 1; COMMIT",
     [TX("begin"), SET("statement_timeout", "5s", L), TX("commit")], {"statements": 4}),
    ("SELECT 1; SELECT 2", [], {"statements": 2}),
    ("SELECT 1;", [], {"statements": 1}),
    ("", [], {"statements": 0}),
    # ---- ordinary statements
    ("SELECT 1", [], {"statements": 1, "parsed": True}),                         # SQLAlchemy pool_pre_ping
    ("select pg_catalog.version()", []),
    ("SHOW search_path", []),
    ("SHOW TRANSACTION ISOLATION LEVEL", []),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", []),
    ("INSERT INTO t VALUES (1, 'a')", []),
    ("DELETE FROM t WHERE id = $1", []),
    ("SELECT * FROM t FOR UPDATE", []),
    ("VACUUM ANALYZE t", []),
    ("TRUNCATE t", []),
    ("COPY t FROM STDIN", []),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", []),
    ("SELECT 'é'", [], {"byte_length": 11}),
    (BIG_IN, [], {"byte_length": len(BIG_IN)}),
    # ---- text the parser rejects
    ("SET x =", [K(Kind.UNPARSED)], {"parsed": False}),
    ("BEGIN TRANSACTION BOGUS", [K(Kind.UNPARSED)], {"parsed": False}),
    ("SELECT set_config('a', 'b'", [K(Kind.UNPARSED)], {"parsed": False}),
    ("SELEC 1 FROM", [], {"parsed": True}),   # no keyword that could change state: not parsed at all
]


def _id(case):
    sql = case[0]
    return (sql[:60] + "...") if len(sql) > 60 else sql


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_classify_table(case):
    sql, expected = case[0], case[1]
    attrs = case[2] if len(case) > 2 else {}
    c = classify(sql)
    assert c.effects == tuple(expected)
    assert c.byte_length == len(sql.encode())
    assert c.text == sql
    for k, v in attrs.items():
        assert getattr(c, k) == v, k
    if "parsed" not in attrs:
        assert c.parsed is not any(e.kind is Kind.UNPARSED for e in c.effects)


def test_table_is_large_enough():
    assert len(CASES) >= 150


def test_bytes_and_str_agree():
    for sql in (JIT_TOGGLE, ASYNCPG_RESET, "SET NAMES 'utf8'", "SELECT 'é', set_config('a', 'é', false)"):
        a, b = classify(sql), classify(sql.encode())
        assert a.effects == b.effects
        assert a.byte_length == b.byte_length == len(sql.encode())
        assert b.text == sql


def test_bytearray_and_memoryview_input():
    c = classify(bytearray(b"SET lock_timeout = 1"))
    assert c.effects == (SET("lock_timeout", "1"),)
    assert classify(memoryview(b"LISTEN x")).effects == (K(Kind.LISTEN, "x"),)


def test_invalid_utf8_is_classified():
    c = classify(b"SET application_name = '\xff'")
    assert c.effects[0].kind is Kind.SET and c.effects[0].name == "application_name"
    assert c.byte_length == 26


# ---------------------------------------------------------------- cache

@pytest.fixture
def parse_counter(monkeypatch):
    classifier.cache_clear()
    # A verify-mode session earlier in this process (an e2e test) asked for exact texts.
    monkeypatch.setattr(classifier, "_exact_texts", False)
    calls = []
    real = classifier._parse_json

    def counting(text):
        calls.append(text)
        return real(text)
    monkeypatch.setattr(classifier, "_parse_json", counting)
    yield calls
    classifier.cache_clear()


def test_cache_returns_same_object_and_parses_once(parse_counter):
    q1 = b"SET lock_timeout = 4242"
    q2 = bytes(bytearray(q1))           # equal bytes, a different object (as read from the wire)
    assert q1 is not q2
    c1 = classify(q1)
    c2 = classify(q2)
    assert c1 is c2
    assert len(parse_counter) == 1
    for _ in range(10):
        classify(q1)
    assert len(parse_counter) == 1


def test_cache_is_bounded(parse_counter, monkeypatch):
    monkeypatch.setattr(classifier, "CACHE_SIZE", 50)
    for i in range(500):
        classify(f"SET x = {i}".encode())
    assert len(classifier._cache) <= 50
    # the most recent ones are still there
    n = len(parse_counter)
    classify(b"SET x = 499")
    assert len(parse_counter) == n


def test_cache_byte_budget(parse_counter, monkeypatch):
    monkeypatch.setattr(classifier, "CACHE_BYTES", 10_000)
    for i in range(100):
        classify(f"SET x = '{i:0500d}'".encode())
    assert sum(len(k) for k in classifier._cache) <= 10_000
    assert classifier._cache_bytes == sum(len(k) for k in classifier._cache)


def test_precheck_skips_parser(parse_counter):
    for sql in ("SELECT a, b FROM t WHERE id = $1",
                "SELECT * FROM orders o JOIN users u ON u.id = o.user_id ORDER BY o.created_at DESC LIMIT 10",
                "INSERT INTO events (kind, payload) VALUES ($1, $2)",
                "SELECT 1 OFFSET 10",                        # "offset" holds "set" but is not SET
                "SELECT pending, attempt, extend FROM t",
                BIG_IN):
        c = classify(sql)
        assert c.effects == () and c.parsed and c.statements == 1
    assert parse_counter == []


def test_precheck_sends_possible_effects_to_parser(parse_counter):
    # Each of these has an effect; the pre-check must not hide any of them.
    sqls = ["START TRANSACTION", "END", "ABORT", "SELECT 1 INTO TEMP t", "CREATE TEMPORARY TABLE t ()",
            "CREATE TABLE pg_temp.t ()", "SELECT set_config('a','b',false)", "SELECT setval('s', 1)",
            "SELECT lastval()", "SELECT pg_try_advisory_xact_lock(1)", "RESET ALL", "UNLISTEN *",
            'SELECT U&"\\0073et_config"(\'a\', \'b\', false)', "select 1;commit", "SAVEPOINT a",
            "RELEASE a", "COMMIT PREPARED 'x'", "DISCARD ALL", "DEALLOCATE x", "EXECUTE x",
            "DECLARE c CURSOR FOR SELECT 1", "CLOSE c", "LOAD 'x'", "DROP TABLE t", "LISTEN x",
            "SELECT currval('s')", "SELECT nextval('s')", "SET ROLE x", "PREPARE p AS SELECT 1"]
    for sql in sqls:
        assert classify(sql).effects, sql
    assert len(parse_counter) == len(sqls)


def test_precheck_word_rules():
    f = classifier._may_have_effects
    assert f(b"update t set a = 1")
    assert f(b"select x from \"set\"")
    assert not f(b"select settings, offset_x, reset_at from t")
    assert not f(b"select set1")
    assert f(b"select 1;end")
    assert f(b'select "nextval"(1)')


def _random_statements(n, seed):
    """Texts built from the fragments the pre-check's word rule is about: its words, with
    letters, digits, $, underscores, quotes and high bytes right before and after them."""
    import random
    rnd = random.Random(seed)
    words = sorted(classifier._KEYWORDS) + [b"pg_temp", b"advisory", b"u&", b"U&", b"SET", b"Begin",
                                            b"select", b"from", b"offset", b"x"]
    glue = [b" ", b"", b"1", b"42", b"$", b"$1", b"_", b"a", b"\xc3\xa9", b".", b";", b"(", b")", b"'",
            b'"', b"\n", b"-", b"Z"]
    for _ in range(n):
        yield b"".join(rnd.choice(words) if rnd.random() < 0.4 else rnd.choice(glue)
                       for _ in range(rnd.randint(1, 8)))


def test_precheck_fast_stage_gives_the_rules_answer():
    # The translate/split first stage must never disagree with the word rule itself.
    for text in _random_statements(20_000, seed=5):
        want = classifier._PRECHECK_WORDS.search(text.lower()) is not None
        assert classifier._may_have_effects(text) == want, text


def test_precheck_answer_does_not_depend_on_digits():
    # What the shape cache relies on: changing digits never changes the pre-check's answer.
    import random
    rnd = random.Random(7)
    for text in _random_statements(20_000, seed=6):
        other = bytes(rnd.choice(b"0123456789") if 48 <= b <= 57 else b for b in text)
        assert classifier._may_have_effects(text) == classifier._may_have_effects(other), (text, other)


@pytest.mark.interpreted_only     # compiled, classify() calls _may_have_effects directly
def test_same_shape_other_digits_skips_the_check(parse_counter, monkeypatch):
    first = classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 4711;")
    assert first.effects == ()

    def no_check(raw):
        raise AssertionError(f"checked again: {raw!r}")
    with monkeypatch.context() as mp:
        mp.setattr(classifier, "_may_have_effects", no_check)
        c = classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1234;")
    assert c.effects == () and c.parsed and c.statements == 1
    assert c.text == "SELECT abalance FROM pgbench_accounts WHERE aid = 0000;"   # the shape's own
    assert c.byte_length == len(c.text)
    # Statements with effects are never remembered by shape: the next digits are checked too.
    assert classify(b"SELECT pg_advisory_lock(1)").effects
    assert classify(b"SELECT pg_advisory_lock(2)").effects
    assert classify(b"SET statement_timeout = 1").effects[0].value == "1"
    assert classify(b"SET statement_timeout = 2").effects[0].value == "2"
    assert parse_counter == ["SELECT pg_advisory_lock(1)", "SELECT pg_advisory_lock(2)",
                             "SET statement_timeout = 1", "SET statement_timeout = 2"]


def test_parsed_statements_without_effects_are_remembered_by_shape(parse_counter):
    # TPC-B's UPDATE ... SET: the word SET sends it to the parser; the next one with other
    # literals is served by its shape, not parsed again (issue 17: 400 µs per statement).
    first = classify(b"UPDATE pgbench_tellers SET tbalance = tbalance + -4711 WHERE tid = 12;")
    again = classify(b"UPDATE pgbench_tellers SET tbalance = tbalance + -1234 WHERE tid = 98;")
    assert first.effects == again.effects == () and again.parsed and again.statements == 1
    assert parse_counter == ["UPDATE pgbench_tellers SET tbalance = tbalance + -4711 WHERE tid = 12;"]
    # Every later text of the shape gets the shape's one Classification: no object per statement.
    assert classify(b"UPDATE pgbench_tellers SET tbalance = tbalance + -9876 WHERE tid = 55;") is again
    assert again.text == "UPDATE pgbench_tellers SET tbalance = tbalance + -0000 WHERE tid = 00;"


def test_verify_mode_keeps_each_statements_own_text(monkeypatch):
    # Verify mode names the statements that ran since a check: by their own texts, digits included.
    monkeypatch.setattr(classifier, "_exact_texts", False)
    classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 4711")
    shared = classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1234")
    assert shared.text == "SELECT abalance FROM pgbench_accounts WHERE aid = 0000"
    classifier.keep_exact_texts()
    own = classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 8150")
    assert own is not shared and own.text == "SELECT abalance FROM pgbench_accounts WHERE aid = 8150"
    assert own.effects == () and own.byte_length == len(own.text)


@pytest.mark.parametrize("plain, other", [
    # U& escapes spell names in digits: the second one calls set_config.
    ('SELECT U&"\\0061et_config"(\'a\', \'b\', false) FROM t', 'SELECT U&"\\0073et_config"(\'a\', \'b\', false) FROM t'),
    # A dollar-quote tag decides where the string ends: the second one runs SET ROLE.
    ("SELECT $a1$ x $a2$; SET ROLE r; SELECT $a2$ $a1$", "SELECT $a2$ x $a2$; SET ROLE r; SELECT $a1$ $a1$"),
])
def test_shapes_of_parsed_statements_leave_out_digits_that_are_not_literals(parse_counter, plain, other):
    assert classify(plain.encode()).effects == ()
    assert classify(other.encode()).effects != ()
    assert len(parse_counter) == 2


def test_a_flood_of_literals_evicts_nothing(parse_counter, monkeypatch):
    # pgbench -S in simple mode: a new text every transaction. Once the cache is full they are
    # served by shape, and the statements cached before stay.
    monkeypatch.setattr(classifier, "CACHE_SIZE", 50)
    for i in (1, 11, 111):      # one text of each shape (1, 2 and 3 digits) seen before
        classify(f"SELECT * FROM t WHERE id = {i}".encode())
    s = classify(b"SET search_path = app")
    for i in range(500):
        assert classify(f"SELECT * FROM t WHERE id = {i}".encode()).effects == ()
    assert len(classifier._cache) <= 50
    assert classify(b"SET search_path = app") is s
    assert len(parse_counter) == 1


def test_texts_with_parameters_are_cached_verbatim_and_literals_only_by_shape(parse_counter):
    # A $1 text comes back verbatim (an ORM's every query): one lookup next time. A text with
    # literals seldom does: its shape serves it, and it takes no room in the cache.
    classify(b"SELECT * FROM t WHERE id = $1 AND k = 7")
    param = b"SELECT * FROM t WHERE id = $1 AND k = 8"
    literal = b"SELECT * FROM t WHERE id = 12 AND k = 8"
    classify(b"SELECT * FROM t WHERE id = 34 AND k = 5")
    assert classify(param).effects == () and classify(literal).effects == ()
    assert param in classifier._cache and literal not in classifier._cache
    assert parse_counter == []


def test_shapes_are_bounded(parse_counter, monkeypatch):
    monkeypatch.setattr(classifier, "SHAPE_CACHE_SIZE", 10)
    for i in range(100):
        classify(f"SELECT c{'x' * i} FROM t WHERE id = 1".encode())
    classify(b"SELECT 1 FROM t WHERE x = '" + b"9" * 5000 + b"'")     # too long to remember
    assert len(classifier._plain_shapes) <= 10
    assert all(len(k) <= classifier.SHAPE_MAX_BYTES for k in classifier._plain_shapes)
    assert parse_counter == []


def test_cached_classify_under_5us():
    q = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    s = b"SET search_path = app, public"
    classify(q), classify(s)
    n = 100_000
    t = time.perf_counter()
    for _ in range(n):
        classify(q)
        classify(s)
    avg = (time.perf_counter() - t) / (2 * n)
    assert avg < 5e-6, f"{avg * 1e6:.2f} us"


# ---------------------------------------------------------------- fingerprint / digest

def _fresh(sql):
    classifier.cache_clear()
    return classify(sql)


def test_fingerprint_ignores_whitespace_and_literals():
    a = fingerprint(classify("SELECT * FROM t WHERE id = 1"))
    b = fingerprint(classify("select *\n  FROM t   WHERE id = 42"))
    c = fingerprint(classify("SELECT * FROM u WHERE id = 1"))
    assert a == b != c
    assert fingerprint(classify("SET lock_timeout = 3000")) == fingerprint(classify("SET lock_timeout=5000"))
    assert len(a) == 16 and int(a, 16) >= 0


def test_fingerprint_is_stored_and_stable():
    c = _fresh("SELECT nextval('s')")
    assert c._fingerprint is None
    fp = fingerprint(c)
    assert c._fingerprint == fp
    assert fingerprint(_fresh("SELECT nextval('s')")) == fp


def test_fingerprint_of_unparsed_text():
    a = fingerprint(classify("SET x ="))
    b = fingerprint(classify("set   X =\n"))
    assert a == b and len(a) == 16
    assert fingerprint(classify("SELEC 1 FROM")) == fingerprint(classify("selec 1  from"))  # skipped the parser


@pytest.mark.parametrize("sql,expected", [
    ("SET lock_timeout=3000", "set lock_timeout=$1"),
    ("SET search_path TO a,b,c", "set search_path to $1,$2,$3"),
    ('SET search_path = "public"; SET NAMES \'UTF8\';', "set search_path = $1; set names $2;"),
    ("SET client_encoding TO 'UTF8'", "set client_encoding to $1"),
    (ASYNCPG_RESET, "select pg_advisory_unlock_all(); close all; unlisten *; reset all;"),
    ("SELECT set_config('a', 'b', false), set_config('c', 'd', true)",
     "select set_config($1, $2, $3), set_config($4, $5, $6)"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
     "set session characteristics as transaction isolation level $1 uncommitted"),
    ("SELECT nextval('s')", "select nextval($1)"),
    ("SET x =", "set x ="),                    # unparsable: the text itself
])
def test_digest(sql, expected):
    c = classify(sql)
    assert digest(c) == expected
    assert c._digest == expected


@pytest.mark.parametrize("sql, alone", [
    ("BEGIN", True), ("COMMIT;", True), ("END", True), ("ROLLBACK TO SAVEPOINT s", True),
    ("BEGIN; SELECT 1", False), ("BEGIN; COMMIT", False), ("SET search_path = a", False),
    ("SELECT 1", False), ("BEGIN ISOLATION LEVEL SERIALIZABLE", True),
])
def test_transaction_control_alone_is_marked_for_the_fast_paths(sql, alone):
    assert classify(sql.encode()).control_only is alone
