"""The pytest plugin, run on a sample test suite in a subprocess against real PostgreSQL."""
from __future__ import annotations

import pytest

from conftest import SUPERUSER_PASSWORD

pytest_plugins = ["pytester"]

SAMPLE = '''
import os
import psycopg2

def _conn():
    conn = psycopg2.connect(os.environ["DATABASE_URL"])
    conn.autocommit = False
    return conn

def test_uses_set_local():
    conn = _conn()
    cur = conn.cursor()
    cur.execute("SET LOCAL search_path = public")
    cur.execute("SELECT 1")
    conn.commit()
    conn.close()

def test_uses_session_set():
    conn = _conn()
    cur = conn.cursor()
    cur.execute("SET search_path = public")
    cur.execute("SELECT 1")
    conn.commit()
    conn.close()

def test_fixture_gives_the_proxy(unpinned_dsn):
    assert unpinned_dsn == os.environ["DATABASE_URL"]
    conn = psycopg2.connect(unpinned_dsn)
    conn.cursor().execute("SELECT 1")
    conn.close()
'''


@pytest.fixture
def sample(pytester):
    pytester.makepyfile(test_sample=SAMPLE)
    return pytester


def test_fails_the_test_that_pins_and_names_the_statement(sample, pg):
    result = sample.runpytest_subprocess(
                                         "--unpinned-upstream", pg.dsn("postgres", SUPERUSER_PASSWORD))
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_uses_session_set*", "*pinned [[]set[]] by: SET search_path = public*"])
    assert "test_uses_set_local FAILED" not in result.stdout.str()


def test_smart_mode_fail_on_would_pin(sample, pg):
    result = sample.runpytest_subprocess(
                                         "--unpinned-upstream", pg.dsn("postgres", SUPERUSER_PASSWORD),
                                         "--unpinned-mode", "smart", "--unpinned-fail-on", "would-pin")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*would pin on RDS Proxy [[]set[]] by: SET search_path = public*"])


def test_smart_mode_does_not_fail_a_carried_set(sample, pg):
    result = sample.runpytest_subprocess(
                                         "--unpinned-upstream", pg.dsn("postgres", SUPERUSER_PASSWORD),
                                         "--unpinned-mode", "smart")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*no test pinned (smart mode)*"])


def test_inert_without_upstream(pytester):
    pytester.makepyfile(test_x="def test_x():\n    assert True\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
