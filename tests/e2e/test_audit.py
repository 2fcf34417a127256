"""`unpinned audit` on logs written by real PostgreSQL servers, plus the parsers' edge cases.

The real-server workload is the seed's: asyncpg reading an enum column, which makes
asyncpg toggle `jit` with set_config() during type introspection, next to plain SET,
SET LOCAL, nextval, a >16 KB statement and a multi-line statement.
"""
from __future__ import annotations

import asyncio
import csv
import glob
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import asyncpg
import psycopg
import psycopg2
import pytest

from unpinned.kit.audit import (
    Audit,
    AuditError,
    LogSource,
    csvlog_statements,
    detect_format,
    exit_status,
    jsonlog_statements,
    pgss_statements,
    prefix_regex,
    render_markdown,
    run_audit,
    stderr_statements,
)
from unpinned.dev.embedded import EmbeddedPostgres
from unpinned.state.policy import PolicyOptions

UNPINNED = [sys.executable, "-m", "unpinned.cli"]
PREFIX = "%m [%p] %q%u@%d/%a "

LONG_SQL = "SELECT 1 WHERE 1 IN (" + ",".join(str(i) for i in range(4000)) + ")"
# A tab at the start of a line inside the SQL, besides the one the server adds.
MULTILINE_SQL = "SET\n\tstatement_timeout\n\t= 5000"
NEXTVAL_CALLS = 3
NO_SMART_PIN = {"set", "set_config", "sequence", "statement_too_long"}


# --------------------------------------------------------------------------- real servers

APP = "orders-api"


async def _asyncpg_enum(dsn: str) -> None:
    c = await asyncpg.connect(dsn)
    await c.execute("CREATE TYPE mood AS ENUM ('happy', 'sad'); CREATE TABLE t (m mood); "
                    "INSERT INTO t VALUES ('happy')")
    await c.close()
    # A fresh connection has no type cache: reading the enum runs the introspection (and the JIT toggle).
    c = await asyncpg.connect(dsn, server_settings={"application_name": APP})
    assert [r["m"] for r in await c.fetch("SELECT m FROM t")] == ["happy"]
    await c.close()


def _workload(pg: EmbeddedPostgres) -> None:
    asyncio.run(_asyncpg_enum(pg.dsn()))
    conn = psycopg2.connect(pg.dsn())
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SET lock_timeout = 3000")
    cur.execute("BEGIN")
    cur.execute("SET LOCAL lock_timeout = 3000")
    cur.execute("COMMIT")
    cur.execute("CREATE SEQUENCE s")
    for _ in range(NEXTVAL_CALLS):
        cur.execute("SELECT nextval('s')")
    cur.execute(LONG_SQL)
    cur.execute(MULTILINE_SQL)
    cur.execute("SELECT 'two\nlines', %s", ("it's",))
    conn.close()


def _server_dir() -> str:
    # Not pytest's tmp_path: as root the server runs as `nobody`, who cannot enter it.
    return tempfile.mkdtemp(prefix="unpinned-audit-")


@pytest.fixture(scope="module")
def stderr_log():
    """A stderr log with log_statement=all and a %q prefix, after a clean shutdown."""
    base = _server_dir()
    pg = EmbeddedPostgres(base_dir=base, password="pw", name="audit-stderr",
                          settings={"log_statement": "all", "log_line_prefix": PREFIX})
    pg.start()
    try:
        _workload(pg)
    finally:
        pg.stop()   # our base_dir is kept; stopping flushes and closes the log
    yield pg.log_file
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def collector_logs():
    """csvlog + jsonlog of the same workload, and a real pg_stat_statements export."""
    base = _server_dir()
    pg = EmbeddedPostgres(base_dir=base, password="pw", name="audit-collector",
                          settings={"log_statement": "all", "log_destination": "csvlog,jsonlog",
                                    "logging_collector": "on", "log_directory": "log",
                                    "shared_preload_libraries": "pg_stat_statements"})
    pg.start()
    pgss = os.path.join(base, "pgss.csv")
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute("CREATE EXTENSION pg_stat_statements")
        _workload(pg)
        with psycopg.connect(pg.dsn(), autocommit=True) as c, c.cursor() as cur, open(pgss, "wb") as f:
            with cur.copy("COPY (SELECT query, calls FROM pg_stat_statements) TO STDOUT (FORMAT csv, HEADER)") as cp:
                for chunk in cp:
                    f.write(chunk)
    finally:
        pg.stop()
    (csv_file,) = glob.glob(os.path.join(pg.data_dir, "log", "*.csv"))
    (json_file,) = glob.glob(os.path.join(pg.data_dir, "log", "*.json"))
    yield {"csvlog": csv_file, "jsonlog": json_file, "pgss": pgss}
    shutil.rmtree(base, ignore_errors=True)


def _cli(*args: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(UNPINNED + ["audit", *args], capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert r.returncode == check_rc, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return r


def _cli_json(*args: str, rc: int = 1) -> dict:
    return json.loads(_cli(*args, "--format", "json", check_rc=rc).stdout)


def _groups(report: dict, mode: str, reason: str | None = None) -> list[dict]:
    return [g for g in report["modes"][mode]["groups"] if reason is None or g["reason"] == reason]


def _reason_counts(report: dict, mode: str) -> dict[str, int]:
    return {r["reason"]: r["count"] for r in report["modes"][mode]["reasons"]}


def _assert_seed_findings(report: dict) -> None:
    """What the seed's team had to find by hand, and the rest of the workload."""
    rds = _reason_counts(report, "rds")
    assert {"set_config", "set", "sequence", "statement_too_long"} <= set(rds), rds
    assert rds["sequence"] == NEXTVAL_CALLS

    # asyncpg's JIT toggle: the full statement, as asyncpg sent it.
    toggles = [g for g in _groups(report, "rds", "set_config") if "current_setting('jit')" in g["sample"]["text"]]
    assert len(toggles) == 1
    sample = toggles[0]["sample"]["text"]
    assert "set_config('jit', 'off', false) AS new" in sample
    assert sample.strip().startswith("SELECT") and sample.rstrip().endswith("AS new")
    assert toggles[0]["digest"] == "select current_setting($1) as cur, set_config($2, $3, $4) as new"
    # ...and the restore, an extended-protocol statement with its parameter value attached.
    (restore,) = [g for g in _groups(report, "rds", "set_config") if "set_config('jit', $1, false)" in g["sample"]["text"]]
    assert restore["sample"]["parameters"] == "$1 = 'on'"
    assert restore["sample"]["prepared_name"].startswith("__asyncpg_stmt_")

    (too_long,) = _groups(report, "rds", "statement_too_long")
    assert too_long["sample"]["text"] == LONG_SQL       # the full text, not a cut
    assert len(too_long["sample"]["text"].encode()) > 16384

    set_samples = {g["sample"]["text"] for g in _groups(report, "rds", "set")}
    assert "SET lock_timeout = 3000" in set_samples
    assert MULTILINE_SQL in set_samples                  # continuation lines joined, server tabs stripped
    # SET LOCAL ends with the transaction: RDS rules (default options) do not pin it.
    assert not any("LOCAL" in g["sample"]["text"].upper() for g in _groups(report, "rds"))

    smart = report["modes"]["smart"]
    assert not {g["reason"] for g in smart["groups"]} & NO_SMART_PIN
    assert smart["pinning_statements"] == 0
    assert report["pinning"]["rds"] >= 2 + 2 + NEXTVAL_CALLS + 1
    assert report["statements"] > report["pinning"]["rds"]


# --------------------------------------------------------------------------- 1. stderr

def test_stderr_log_from_real_server_via_cli(stderr_log):
    report = _cli_json(stderr_log)
    assert report["files"][0]["format"] == "stderr"
    assert report["lines"] > 100
    _assert_seed_findings(report)
    # Without --log-line-prefix, user@db is guessed from the prefix.
    (toggle,) = [g for g in _groups(report, "rds", "set_config") if "current_setting" in g["sample"]["text"]]
    assert toggle["users"] == ["postgres"] and toggle["databases"] == ["postgres"]
    assert toggle["first_seen"] and toggle["first_seen"].endswith("UTC")


def test_stderr_log_with_given_prefix(stderr_log):
    report = _cli_json(stderr_log, "--log-line-prefix", PREFIX)
    _assert_seed_findings(report)
    for g in _groups(report, "rds"):
        assert g["users"] == ["postgres"] and g["databases"] == ["postgres"], g
        # psycopg2 sends no application_name: the server logs [unknown], reported as none.
        assert g["applications"] == ([APP] if g["reason"] == "set_config" else []), g
        assert g["sample"]["timestamp"].endswith(" UTC")
        assert g["first_seen"] <= g["last_seen"]


def test_wrong_prefix_warns(stderr_log):
    r = _cli(stderr_log, "--log-line-prefix", "%t:%r:%u@%d:[%p]:", "--format", "json", check_rc=0)
    report = json.loads(r.stdout)
    assert report["statements"] == 0
    assert any("--log-line-prefix" in w for w in report["warnings"])
    assert "no statements found" in r.stderr


def test_set_local_pins_and_sequence_options(stderr_log):
    report = _cli_json(stderr_log, "--set-local-pins", "--sequences", "pin")
    assert any(g["sample"]["text"] == "SET LOCAL lock_timeout = 3000" for g in _groups(report, "rds", "set"))
    assert _reason_counts(report, "smart") == {"sequence": NEXTVAL_CALLS}


def test_modes_and_exit_status(stderr_log):
    smart = _cli_json(stderr_log, "--mode", "smart", rc=0)
    assert list(smart["modes"]) == ["smart"]
    rds = _cli_json(stderr_log, "--mode", "rds", rc=1)
    assert list(rds["modes"]) == ["rds"]
    # The header counts both modes whichever is shown.
    assert smart["pinning"] == rds["pinning"]


def test_table_output(stderr_log):
    r = _cli(stderr_log, check_rc=1)
    out = r.stdout
    assert "statements classified" in out and "pin under rds" in out and "pin under smart" in out
    for reason in ("set_config", "sequence", "statement_too_long"):
        assert reason in out
    assert "smart: no statement pins" in out
    assert r.stderr == ""       # no progress bar when stderr is not a terminal


def test_markdown_output(stderr_log):
    md = _cli(stderr_log, "--format", "markdown", check_rc=1).stdout
    assert md.startswith("# unpinned audit\n")
    assert "## rds:" in md and "## smart: no statement pins" in md
    assert "| set_config |" in md
    assert "set_config('jit', 'off', false) AS new" in md      # the sample, in a code block
    assert "```sql" in md
    assert "sample cut at" in md                               # the >16 KB one is shortened here only


def test_top_limits_groups(stderr_log):
    full = _cli_json(stderr_log)
    top1 = _cli_json(stderr_log, "--top", "1")
    assert len(_groups(full, "rds")) > 1 and len(_groups(top1, "rds")) == 1
    assert top1["modes"]["rds"]["groups_total"] == len(_groups(full, "rds"))


def test_gzip_and_progress(stderr_log, tmp_path):
    gz = tmp_path / "postgresql.log.gz"
    with open(stderr_log, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = _cli_json(stderr_log)
    zipped = _cli_json(str(gz), "--progress")
    assert zipped["files"][0]["compressed"] is True
    assert zipped["lines"] == plain["lines"]
    assert _without_file(zipped) == _without_file(plain)


def _without_file(report: dict) -> dict:
    modes = json.loads(json.dumps(report["modes"]))
    for mode in modes.values():
        for g in mode["groups"]:
            g["sample"].pop("file")
    return modes


def test_stdin(stderr_log):
    with open(stderr_log, "rb") as f:
        r = subprocess.run(UNPINNED + ["audit", "-", "--format", "json"], stdin=f, capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    _assert_seed_findings(json.loads(r.stdout))


def test_missing_and_unreadable_files(tmp_path, stderr_log):
    r = _cli(str(tmp_path / "nope.log"), check_rc=2)
    assert "cannot read" in r.stderr and "nope.log" in r.stderr and "No such file" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    # One bad file among good ones: nothing is read, exit 2.
    r = _cli(stderr_log, str(tmp_path), check_rc=2)
    assert "is a directory" in r.stderr and "Traceback" not in r.stderr
    r = _cli(check_rc=2)
    assert "Missing argument" in r.stderr


# --------------------------------------------------------------------------- 2. csvlog / jsonlog

def test_csvlog_and_jsonlog_agree_with_stderr(stderr_log, collector_logs):
    reports = {"stderr": _cli_json(stderr_log)}
    for fmt in ("csvlog", "jsonlog"):
        reports[fmt] = _cli_json(collector_logs[fmt])
        assert reports[fmt]["files"][0]["format"] == fmt
        _assert_seed_findings(reports[fmt])
    counts = {k: _reason_counts(r, "rds") for k, r in reports.items()}
    assert counts["stderr"] == counts["csvlog"] == counts["jsonlog"], counts
    digests = {k: sorted((g["reason"], g["digest"]) for g in _groups(r, "rds")) for k, r in reports.items()}
    assert digests["stderr"] == digests["csvlog"] == digests["jsonlog"]
    for fmt in ("csvlog", "jsonlog"):
        g = _groups(reports[fmt], "rds", "sequence")[0]
        assert g["users"] == ["postgres"] and g["databases"] == ["postgres"]
        assert all(g["applications"] == [APP] for g in _groups(reports[fmt], "rds", "set_config"))


def test_several_files_in_one_report(stderr_log, collector_logs):
    one = _cli_json(stderr_log)
    both = _cli_json(stderr_log, collector_logs["csvlog"])
    assert [f["format"] for f in both["files"]] == ["stderr", "csvlog"]
    assert both["statements"] == sum(f["statements"] for f in both["files"])
    assert _reason_counts(both, "rds") == {k: 2 * v for k, v in _reason_counts(one, "rds").items()}
    # Same fingerprints from both files: one group each, the first file's line as the sample.
    assert len(_groups(both, "rds")) == len(_groups(one, "rds"))
    assert all(g["sample"]["file"] == stderr_log for g in _groups(both, "rds"))


def test_forced_input_format(collector_logs):
    report = _cli_json(collector_logs["csvlog"], "--input", "csvlog")
    assert report["files"][0]["format"] == "csvlog"
    # Read as stderr, a csvlog has no severity markers where a stderr log has them.
    wrong = _cli_json(collector_logs["csvlog"], "--input", "stderr", rc=0)
    assert wrong["statements"] == 0


# --------------------------------------------------------------------------- 3. pg_stat_statements

def test_pgss_export_from_real_server(collector_logs):
    path = collector_logs["pgss"]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    calls = {r["query"]: int(r["calls"]) for r in rows}
    report = _cli_json(path)
    assert report["files"][0]["format"] == "pgss"
    assert report["statements"] == sum(calls.values())
    rds = _reason_counts(report, "rds")
    # Parameters are gone from the export, but the set_config calls still show.
    assert {"set_config", "sequence", "set"} <= set(rds)
    # PostgreSQL 17 keeps SET text as sent; SET LOCAL still does not pin under rds rules.
    assert not any("LOCAL" in g["sample"]["text"] for g in _groups(report, "rds"))
    (seq,) = _groups(report, "rds", "sequence")
    assert seq["count"] == calls[seq["sample"]["text"]] == NEXTVAL_CALLS
    toggle = [g for g in _groups(report, "rds", "set_config") if "current_setting" in g["sample"]["text"]]
    assert toggle and "set_config($2, $3, $4)" in toggle[0]["sample"]["text"]
    assert report["modes"]["smart"]["pinning_statements"] == 0


def test_pgss_weighted_by_calls(tmp_path):
    p = tmp_path / "pgss.csv"
    p.write_text('userid,query,calls,rolname,datname\n'
                 '10,"SELECT current_setting($1) AS cur,\n  set_config($2, $3, $4) AS new",12000,app,prod\n'
                 '10,SELECT nextval($1),7,app,prod\n'
                 '10,SET lock_timeout = $1,5,batch,prod\n'
                 '10,SET LOCAL lock_timeout = $1,900,app,prod\n'
                 '10,SELECT * FROM t WHERE id = $1,100000,app,prod\n'
                 '10,"LISTEN jobs",2,worker,prod\n')
    report = _cli_json(str(p))
    assert report["statements"] == 12000 + 7 + 5 + 900 + 100000 + 2
    assert report["entries"] == 6
    assert _reason_counts(report, "rds") == {"set_config": 12000, "sequence": 7, "set": 5, "listen": 2}
    assert report["pinning"] == {"rds": 12014, "smart": 2}
    assert _reason_counts(report, "smart") == {"listen": 2}
    top = _groups(report, "rds")[0]
    assert top["reason"] == "set_config" and top["users"] == ["app"] and top["databases"] == ["prod"]
    assert top["share"] == pytest.approx(12000 / report["statements"], rel=1e-4)


# --------------------------------------------------------------------------- 4. parsing units

def _stmts(text: str, prefix: str | None = None) -> list:
    return list(stderr_statements(io.StringIO(text), prefix))


@pytest.mark.parametrize("prefix,line,fields", [
    ("%m [%p] ", "2024-05-01 10:00:00.123 UTC [42] LOG:  statement: SET jit = off",
     {"timestamp": "2024-05-01 10:00:00.123 UTC", "user": None}),
    ("%t:%r:%u@%d:[%p]:", "2024-05-01 10:00:00 UTC:10.0.0.7(51234):app@prod:[4567]:LOG:  statement: SET jit = off",
     {"timestamp": "2024-05-01 10:00:00 UTC", "user": "app", "database": "prod"}),
    ("%t:%r:%u@%d:[%p]:", "2024-05-01 10:00:00 UTC:[local]:app@prod:[4567]:LOG:  statement: SET jit = off",
     {"user": "app", "database": "prod"}),
    ("%m [%p] %q%u@%d ", "2024-05-01 10:00:00.123 CEST [42] app@prod LOG:  statement: SET jit = off",
     {"timestamp": "2024-05-01 10:00:00.123 CEST", "user": "app", "database": "prod"}),
    ("%m [%p] %q%u@%d/%a ", "2024-05-01 10:00:00.123 +03 [42] app@prod/my app v2 LOG:  statement: SET jit = off",
     {"user": "app", "database": "prod", "application": "my app v2"}),
    ("<%-8u%5p> %% ", "<app     42424> % LOG:  statement: SET jit = off", {"user": "app"}),
    ("%n %c %l %x %v %e %i %h %b ", "1714557600.123 663210a0.1f40 7 0 3/12 00000 SET 10.0.0.7 client backend "
     "LOG:  statement: SET jit = off", {"timestamp": "1714557600.123"}),
    ("", "LOG:  statement: SET jit = off", {"user": None}),
])
def test_log_line_prefixes(prefix, line, fields):
    text = line + "\n"
    for given in (prefix, None):
        (st,) = _stmts(text, given)
        assert st.text == "SET jit = off"
        if given is not None:
            for k, v in fields.items():
                assert getattr(st, k) == v, (k, prefix)
    # A non-session process line: with %q the rest of the prefix is left out.
    if "%q" in prefix:
        head = line.split("] ")[0] + "] "
        assert _stmts(head + "LOG:  database system is ready to accept connections\n" + text, prefix)[0].text == \
            "SET jit = off"


def test_prefix_regex_shapes():
    assert prefix_regex("%%") == "%"
    assert prefix_regex("x%q%u") == "x(?:(?P<user>.*?))?"
    assert prefix_regex("%Z%") == ""        # unknown escapes and a lone % print nothing


STDERR_SAMPLE = textwrap.dedent("""\
    2024-05-01 10:00:00.000 UTC [1] LOG:  database system is ready to accept connections
    2024-05-01 10:00:01.000 UTC [7] app@db LOG:  statement: SELECT 1,
    \t  2
    \t\tFROM t
    2024-05-01 10:00:02.000 UTC [7] app@db LOG:  execute <unnamed>: SELECT set_config('jit', $1, false)
    2024-05-01 10:00:02.000 UTC [7] app@db DETAIL:  Parameters: $1 = 'off'
    2024-05-01 10:00:03.000 UTC [7] app@db LOG:  duration: 0.050 ms  parse S_1: SELECT nextval($1)
    2024-05-01 10:00:03.000 UTC [7] app@db LOG:  duration: 0.020 ms  bind S_1/C_1: SELECT nextval($1)
    2024-05-01 10:00:03.000 UTC [7] app@db DETAIL:  Parameters: $1 = 's'
    2024-05-01 10:00:03.000 UTC [7] app@db LOG:  duration: 0.031 ms  execute S_1/C_1: SELECT nextval($1)
    2024-05-01 10:00:03.000 UTC [7] app@db DETAIL:  Parameters: $1 = 's'
    2024-05-01 10:00:03.100 UTC [7] app@db LOG:  execute fetch from S_1/C_1: SELECT nextval($1)
    2024-05-01 10:00:04.000 UTC [7] app@db LOG:  duration: 1.5 ms  statement: SET search_path = a,
    \tb
    2024-05-01 10:00:05.000 UTC [7] app@db ERROR:  relation "nope" does not exist at character 15
    2024-05-01 10:00:05.000 UTC [7] app@db STATEMENT:  SELECT * FROM nope
    2024-05-01 10:00:06.000 UTC [7] app@db LOG:  statement: SELECT 'multi
    \tline ''LOG:  statement: x'' literal'
    2024-05-01 10:00:07.000 UTC [7] app@db LOG:  execute <unnamed>: SELECT $1
    2024-05-01 10:00:07.000 UTC [7] app@db DETAIL:  Parameters: $1 = 'a
    \tb'
    2024-05-01 10:00:08.000 UTC [7] app@db LOG:  duration: 2.000 ms
    2024-05-01 10:00:09.000 UTC [7] app@db LOG:  statement: SELECT 2
""")


def test_stderr_multiline_extended_protocol_and_no_double_count():
    for prefix in ("%m [%p] %q%u@%d ", None):
        sts = _stmts(STDERR_SAMPLE, prefix)
        texts = [s.text for s in sts]
        assert texts == [
            "SELECT 1,\n  2\n\tFROM t",
            "SELECT set_config('jit', $1, false)",
            "SELECT nextval($1)",                      # execute only: parse/bind/fetch are not counted
            "SET search_path = a,\nb",
            "SELECT 'multi\nline ''LOG:  statement: x'' literal'",
            "SELECT $1",
            "SELECT 2",
        ], prefix
        assert [s.parameters for s in sts] == [None, "$1 = 'off'", "$1 = 's'", None, None, "$1 = 'a\nb'", None]
        assert [s.name for s in sts][:3] == [None, "<unnamed>", "S_1/C_1"]
        assert sts[0].line == 2 and sts[0].user == "app" and sts[0].database == "db"
        assert sts[0].timestamp.startswith("2024-05-01 10:00:01")


def test_continuation_without_tab_with_given_prefix():
    log = "2024-05-01 10:00:00 UTC LOG:  statement: SET\nlock_timeout = 1\n2024-05-01 10:00:01 UTC LOG:  statement: SELECT 1\n"
    assert [s.text for s in _stmts(log, "%t ")] == ["SET\nlock_timeout = 1", "SELECT 1"]


def test_statement_size_cap(monkeypatch):
    import unpinned.kit.audit_logs as logs_mod
    monkeypatch.setattr(logs_mod, "MAX_STATEMENT_CHARS", 1000)
    body = "".join(f"\t, col{i}\n" for i in range(500))
    log = f"2024-05-01 10:00:00 UTC [1] LOG:  statement: SET a = 1\n{body}2024-05-01 10:00:01 UTC [1] LOG:  statement: SELECT 2\n"
    stats = logs_mod.ParseStats()
    sts = list(stderr_statements(io.StringIO(log), stats=stats))
    assert [s.truncated for s in sts] == [True, False] and stats.truncated == 1
    assert len(sts[0].text) <= 1000 and sts[1].text == "SELECT 2"


def test_audit_aggregation_in_process():
    a = Audit(PolicyOptions())
    for st in _stmts(STDERR_SAMPLE):
        a.add(st)
    r = a.report()
    assert r["statements"] == 7
    assert _reason_counts(r, "rds") == {"set_config": 1, "sequence": 1, "set": 1}
    assert exit_status(r) == 1
    assert exit_status(a.report(["smart"])) == 0
    md = render_markdown(r)
    assert "Parameters: `$1 = 'off'`" in md


def test_group_limit_and_seen_caps():
    from unpinned.kit.audit import Statement
    a = Audit(max_groups=3)
    for i in range(10):
        a.add(Statement(text=f"SET app.k{i} = 1", user=f"u{i}", database="db"))
    groups = _groups(a.report(), "rds")
    assert len(groups) == 4 and sum(g["count"] for g in groups) == 10
    other = [g for g in groups if g["fingerprint"] == "*"][0]
    assert other["count"] == 7 and len(other["users"]) == 5 and other["capped"] == ["users"]


def test_csvlog_and_jsonlog_units():
    row = ["2024-05-01 10:00:00.000 UTC", "app", "db", "7", "127.0.0.1:5", "s.1", "1", "SELECT", "x", "3/1", "0",
           "LOG", "00000", "execute <unnamed>: SELECT set_config('jit', $1, false)", "Parameters: $1 = 'off'",
           "", "", "", "", "", "", "", "my app", "client backend", "", "0"]
    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    buf.write('2024-05-01 10:00:01.000 UTC,app,db,7,,,2,,,,0,LOG,00000,"statement: SET\n  x = 1",,,,,,,,,,,,0\n')
    text = buf.getvalue()
    assert detect_format(text.splitlines()[0]) == "csvlog"
    sts = list(csvlog_statements(io.StringIO(text)))
    assert [s.text for s in sts] == ["SELECT set_config('jit', $1, false)", "SET\n  x = 1"]
    assert sts[0].parameters == "$1 = 'off'" and sts[0].application == "my app" and sts[0].user == "app"

    lines = [json.dumps({"timestamp": "t", "user": "u", "dbname": "d", "application_name": "a", "error_severity": "LOG",
                         "message": "statement: SELECT nextval('s')"}),
             json.dumps({"error_severity": "ERROR", "message": "statement: SET x = 1"}),
             "not json"]
    assert detect_format(lines[0]) == "jsonlog"
    sts = list(jsonlog_statements(lines))
    assert [(s.text, s.user, s.database, s.application) for s in sts] == [("SELECT nextval('s')", "u", "d", "a")]


def test_detect_format():
    assert detect_format("query,calls\n") == "pgss"
    assert detect_format('"userid","dbid","query","calls"\n') == "pgss"
    assert detect_format("2024-05-01 10:00:00.000 UTC [1] LOG:  x\n") == "stderr"
    assert detect_format("LOG:  statement: x\n") == "stderr"
    assert detect_format("", "postgresql.csv.gz") == "csvlog"
    with pytest.raises(AuditError, match="query"):
        list(pgss_statements(["a,b\n", "1,2\n"]))


def test_empty_and_wrong_files(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("")
    r = _cli(str(empty), "--format", "json", check_rc=0)
    assert json.loads(r.stdout)["statements"] == 0 and "no statements found" in r.stderr
    clean = tmp_path / "clean.log"
    clean.write_text("2024-05-01 10:00:00 UTC [1] LOG:  statement: SELECT 1\n")
    assert _cli_json(str(clean), rc=0)["statements"] == 1
    truncated = tmp_path / "cut.log.gz"
    truncated.write_bytes(gzip.compress(b"2024-05-01 10:00:00 UTC [1] LOG:  statement: SET a = 1\n" * 1000)[:-20])
    r = _cli(str(truncated), "--format", "json", check_rc=1)
    assert "stopped after line" in r.stderr


# --------------------------------------------------------------------------- 5. bounded memory

def _write_big_log(path: Path, lines: int) -> None:
    jit = ("{ts} UTC [{pid}] app@prod/api LOG:  execute __asyncpg_stmt_2__: \n"
           "\t    SELECT\n\t        current_setting('jit') AS cur,\n\t        set_config('jit', 'off', false) AS new\n")
    sel = ("{ts} UTC [{pid}] app@prod/api LOG:  statement: SELECT id, name, payload FROM items WHERE id = {i} "
           "AND tenant = 'tenant-{t}' /* " + "x" * 190 + " */\n")
    with open(path, "w", buffering=1 << 20) as f:
        n = i = 0
        while n < lines:
            ts = f"2024-05-01 10:{(i // 60000) % 60:02d}:{(i // 1000) % 60:02d}.{i % 1000:03d}"
            if i % 10 == 0:
                f.write(jit.format(ts=ts, pid=1000 + i % 50))
                n += 4
            else:
                f.write(sel.format(ts=ts, pid=1000 + i % 50, i=i, t=i % 97))
                n += 1
            i += 1


def test_bounded_memory_on_a_large_log(tmp_path):
    log = tmp_path / "big.log"
    _write_big_log(log, 200_000)
    size = log.stat().st_size
    assert size > 40 * 1024 * 1024
    # A fresh interpreter, so the peak RSS is this audit's and not the test run's.
    script = textwrap.dedent(f"""
        import json, resource, sys
        from unpinned.kit.audit import run_audit
        from unpinned.sql.classifier import classify
        classify("SELECT 1")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        a = run_audit([{str(log)!r}])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = a.report()
        print(json.dumps({{"before_kb": before, "after_kb": after, "lines": r["lines"],
                           "statements": r["statements"], "rds": r["pinning"]["rds"]}}))
    """)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["lines"] == 200_000
    assert res["rds"] == -(-res["statements"] // 10)   # every tenth statement is the JIT toggle
    growth_mb = (res["after_kb"] - res["before_kb"]) / 1024
    # The classifier's cache is bounded (10,000 entries); the log is ~50 MB.
    assert growth_mb < 30, (growth_mb, size)
    assert elapsed < 30


def test_parser_streams_with_tracemalloc(tmp_path):
    import tracemalloc
    log = tmp_path / "mid.log"
    _write_big_log(log, 40_000)
    src = LogSource(str(log))
    tracemalloc.start()
    try:
        n = sum(1 for _ in stderr_statements(src.iter_lines()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        src.close()
    assert n > 10_000
    assert peak < 2 * 1024 * 1024, peak       # one message at a time, whatever the file size


def test_run_audit_rejects_bad_input_format(stderr_log):
    with pytest.raises(AuditError):
        run_audit([stderr_log], input_format="xml")
