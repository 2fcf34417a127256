"""Pin policies over classified statements: rds mode (RDS Proxy's rules) and smart mode's text-only pins (SPEC 2)."""
from __future__ import annotations

import pytest

from unpinned.sql.classifier import classify
from unpinned.sql.effects import REASON_SENTENCES, Classification, Effect, Kind, Reason
from unpinned.state.policy import STATEMENT_LIMIT, PolicyOptions, describe, rds_reasons, static_smart_reasons, carried_reasons

R = Reason
BIG_IN = "SELECT * FROM orders WHERE id IN (" + ", ".join(str(i) for i in range(4000)) + ")"
ASYNCPG_RESET = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"

# (sql, rds reasons, smart reasons) with default options
CASES = [
    # session SET / RESET / set_config(..., false): pin on RDS, carried in smart
    ("SET lock_timeout = 3000", [R.SET], []),
    ("SET SESSION statement_timeout = '5s'", [R.SET], []),
    ("RESET statement_timeout", [R.SET], []),
    ("RESET ALL", [R.SET], []),
    ("SET search_path TO DEFAULT", [R.SET], []),
    ("SET TIME ZONE 'UTC'", [R.SET], []),
    ("SET NAMES 'utf8'", [R.SET], []),
    ("SET SCHEMA 'app'", [R.SET], []),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED", [R.SET], []),
    ("SET datestyle TO 'ISO'", [R.SET], []),
    ("SET extra_float_digits = 3", [R.SET], []),
    ('SET search_path = "public"; SET NAMES \'UTF8\'', [R.SET], []),          # deduplicated
    ("SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new", [R.SET_CONFIG], []),
    ("SELECT set_config('jit', $1, false)", [R.SET_CONFIG], []),
    # SET LOCAL / set_config(..., true)
    ("SET LOCAL statement_timeout = '5s'", [], []),
    ("SELECT set_config('search_path', 'a', true)", [R.SET_CONFIG], []),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", [], []),
    # role
    ("SET ROLE admin", [R.ROLE], []),
    ("RESET ROLE", [R.ROLE], []),
    ("SET SESSION AUTHORIZATION alice", [R.ROLE], []),
    ("SET LOCAL ROLE reader", [], []),
    # SQL prepared statements
    ("PREPARE q AS SELECT 1", [R.SQL_PREPARE], []),     # carried by default; sql_prepare = "pin" below
    ("EXECUTE q", [R.SQL_PREPARE], []),
    ("EXPLAIN EXECUTE q", [], []),                      # plans only, what the PREPARE pinned already
    ("DEALLOCATE q", [R.SQL_PREPARE], []),
    ("DEALLOCATE ALL", [R.SQL_PREPARE], []),
    # DISCARD
    ("DISCARD ALL", [R.DISCARD], []),
    ("DISCARD TEMP", [R.DISCARD], []),
    ("DISCARD SEQUENCES", [R.DISCARD], []),
    ("DISCARD PLANS", [R.DISCARD], []),
    # temp objects
    ("CREATE TEMP TABLE t (a int)", [R.TEMP_OBJECT], [R.TEMP_OBJECT]),
    ("CREATE TEMP TABLE t (a int) ON COMMIT DROP", [R.TEMP_OBJECT], []),
    ("SELECT * INTO TEMP t FROM x", [R.TEMP_OBJECT], [R.TEMP_OBJECT]),
    ("CREATE TEMP SEQUENCE s", [R.TEMP_OBJECT], [R.TEMP_OBJECT]),
    ("CREATE VIEW pg_temp.v AS SELECT 1", [R.TEMP_OBJECT], [R.TEMP_OBJECT]),
    ("DROP TABLE t", [], []),
    # cursors
    ("DECLARE c CURSOR FOR SELECT 1", [R.CURSOR], []),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", [R.CURSOR], []),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", [R.CURSOR], [R.CURSOR]),
    ("CLOSE c", [], []),
    # LISTEN / LOAD
    ("LISTEN ch", [R.LISTEN], []),                       # the proxy listens for the client
    ("LISTEN a; UNLISTEN b; LISTEN c", [R.LISTEN], []),
    ("LISTEN ch; SELECT 1", [R.LISTEN], []),             # undone on the server in the same string
    ("LISTEN ch; EXECUTE q", [R.LISTEN, R.SQL_PREPARE], [R.LISTEN]),   # with SQL PREPARE carried, the LISTEN pins
    ("UNLISTEN ch", [], []),
    ("LOAD 'auto_explain'", [R.LOAD], [R.LOAD]),
    # advisory locks
    ("SELECT pg_advisory_lock(1)", [R.ADVISORY_LOCK], [R.ADVISORY_LOCK]),
    ("SELECT pg_advisory_lock_shared(1)", [R.ADVISORY_LOCK], [R.ADVISORY_LOCK]),
    ("SELECT pg_try_advisory_lock(1)", [R.ADVISORY_LOCK], [R.ADVISORY_LOCK]),
    ("SELECT pg_try_advisory_lock_shared(1)", [R.ADVISORY_LOCK], [R.ADVISORY_LOCK]),
    ("SELECT pg_advisory_unlock(1)", [R.ADVISORY_LOCK], []),
    ("SELECT pg_advisory_unlock_all()", [R.ADVISORY_LOCK], []),
    ("SELECT pg_advisory_xact_lock(1)", [], []),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", [], []),
    # sequences
    ("SELECT nextval('s')", [R.SEQUENCE], []),
    ("SELECT setval('s', 1)", [R.SEQUENCE], []),
    ("SELECT currval('s')", [R.SEQUENCE], []),
    ("SELECT lastval()", [R.SEQUENCE], []),
    # statement length: rds only
    (BIG_IN, [R.STATEMENT_TOO_LONG], []),
    # unparsable
    ("SET x =", [R.UNPARSED], [R.UNPARSED]),
    # nothing to pin
    ("SELECT 1", [], []),
    ("BEGIN", [], []),
    ("COMMIT", [], []),
    ("UPDATE t SET a = 1", [], []),
    ("ALTER ROLE app SET statement_timeout = '5s'", [], []),
    ("DO $$ BEGIN PERFORM set_config('a', 'b', false); END $$", [], []),
    # several reasons: first seen first, deduplicated
    (ASYNCPG_RESET, [R.ADVISORY_LOCK, R.SET], []),
    ("SELECT nextval('s'), set_config('a', 'b', false), nextval('t'); LISTEN x; SET y = 1",
     [R.SEQUENCE, R.SET_CONFIG, R.LISTEN, R.SET], []),
    ("PREPARE p AS SELECT 1; EXECUTE p; DEALLOCATE p", [R.SQL_PREPARE], []),
    ("CREATE TEMP TABLE a (x int); SELECT pg_advisory_lock(1); DECLARE c CURSOR WITH HOLD FOR SELECT 1",
     [R.TEMP_OBJECT, R.ADVISORY_LOCK, R.CURSOR], [R.TEMP_OBJECT, R.ADVISORY_LOCK, R.CURSOR]),
]


@pytest.mark.parametrize("sql,rds,smart", CASES, ids=[c[0][:60] for c in CASES])
def test_reasons(sql, rds, smart):
    c = classify(sql)
    assert rds_reasons(c) == rds
    assert rds_reasons(c, PolicyOptions()) == rds
    assert static_smart_reasons(c) == smart


def test_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("sql,expected", [
    ("SET LOCAL statement_timeout = '5s'", [R.SET]),
    ("SET LOCAL ROLE reader", [R.ROLE]),
    ("SET LOCAL TIME ZONE 'UTC'", [R.SET]),
    ("SET TRANSACTION READ ONLY", []),             # SET TRANSACTION never pins
    ("SET statement_timeout = 1", [R.SET]),
])
def test_set_local_pins_option(sql, expected):
    assert rds_reasons(classify(sql), PolicyOptions(set_local_pins=True)) == expected


@pytest.mark.parametrize("sql", ["SELECT nextval('s')", "SELECT setval('s', 5)", "SELECT currval('s')",
                                 "SELECT lastval()"])
def test_sequences_pin_option(sql):
    c = classify(sql)
    assert static_smart_reasons(c, PolicyOptions(sequences="pin")) == [R.SEQUENCE]
    assert static_smart_reasons(c, PolicyOptions(sequences="carry")) == []
    assert rds_reasons(c, PolicyOptions(sequences="carry")) == [R.SEQUENCE]   # RDS always pins


def test_sequences_option_is_checked():
    with pytest.raises(ValueError):
        PolicyOptions(sequences="sometimes")


def test_statement_limit_boundary():
    assert STATEMENT_LIMIT == 16384
    at = Classification(text="x", effects=(), byte_length=STATEMENT_LIMIT)
    over = Classification(text="x", effects=(), byte_length=STATEMENT_LIMIT + 1)
    assert rds_reasons(at) == []
    assert rds_reasons(over) == [R.STATEMENT_TOO_LONG]
    assert static_smart_reasons(over) == []


def test_long_statement_with_effects():
    sql = "SET application_name = '" + "x" * 20000 + "'"
    c = classify(sql)
    assert c.byte_length > STATEMENT_LIMIT
    assert rds_reasons(c) == [R.STATEMENT_TOO_LONG, R.SET]
    assert static_smart_reasons(c) == []


def test_effects_built_by_hand():
    # Policies read effects only; they never look at the text.
    c = Classification(text="", effects=(Effect(Kind.ADVISORY_LOCK, name="pg_advisory_lock", op="lock"),
                                         Effect(Kind.CREATE_TEMP, name="t", value="table", flag=True)))
    assert rds_reasons(c) == [R.ADVISORY_LOCK, R.TEMP_OBJECT]
    assert static_smart_reasons(c) == [R.ADVISORY_LOCK]


def test_describe():
    for r in Reason:
        assert describe(r) == REASON_SENTENCES[r]
    assert "set_config" in describe(R.SET_CONFIG)


@pytest.mark.parametrize("sql,carried", [
    ("LISTEN ch", [R.LISTEN]),
    ("LISTEN ch; SELECT 1", [R.LISTEN]),
    ("PREPARE q AS SELECT 1", [R.SQL_PREPARE]),     # sql_prepare = "carry" (the default)
    ("EXECUTE q(1)", [R.SQL_PREPARE]),
    ("SET work_mem = '8MB'", [R.SET]),
    ("CREATE TEMP TABLE t (x int)", []),
    ("SELECT 1", []),
])
def test_carried_reasons(sql, carried):
    """What RDS Proxy pins for and smart mode carries instead: what `check` and `audit` report."""
    assert carried_reasons(classify(sql)) == carried


CARRY = PolicyOptions(sql_prepare="carry")
PIN = PolicyOptions(sql_prepare="pin")


@pytest.mark.parametrize("sql,smart,carried", [
    ("PREPARE q AS SELECT 1", [R.SQL_PREPARE], []),
    ("EXECUTE q(1)", [], []),      # the engine pins while a PREPARE's statement exists
])
def test_sql_prepare_pinned_when_configured(sql, smart, carried):
    c = classify(sql)
    assert static_smart_reasons(c, PIN) == smart
    assert carried_reasons(c, PIN) == carried


@pytest.mark.parametrize("sql,smart,carried", [
    ("PREPARE q AS SELECT 1", [], [R.SQL_PREPARE]),
    ("EXECUTE q(1)", [], [R.SQL_PREPARE]),
    ("LISTEN ch; EXECUTE q", [R.LISTEN], [R.SQL_PREPARE]),    # only one of the two is carried
    ("PREPARE p AS SELECT 1; EXECUTE p; DEALLOCATE p", [], [R.SQL_PREPARE]),
])
def test_sql_prepare_carried_when_configured(sql, smart, carried):
    c = classify(sql)
    assert static_smart_reasons(c, CARRY) == smart
    assert carried_reasons(c, CARRY) == carried
