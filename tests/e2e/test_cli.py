"""The command line as a user runs it: `unpinned serve`, `unpinned demo`, --help, and the
config reference staying in sync with the code."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import psycopg2
import pytest

from unpinned.config import Config
from conftest import SUPERUSER_PASSWORD

ROOT = Path(__file__).resolve().parents[2]
UNPINNED = [sys.executable, "-m", "unpinned.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited early: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("proxy did not start listening")


def test_serve_runs_and_stops_on_sigterm(pg):
    port = _free_port()
    proc = subprocess.Popen(UNPINNED + ["serve", "--listen", f"127.0.0.1:{port}", "--auth", "trust",
                                        "--upstream", pg.dsn("postgres", SUPERUSER_PASSWORD), "--pool-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(port, proc)
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        cur = conn.cursor()
        cur.execute("SELECT 'through the proxy'")
        assert cur.fetchone() == ("through the proxy",)
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "trust" in err and "Development only" in err   # the loud warning
    assert SUPERUSER_PASSWORD not in err                   # credentials never logged


def test_serve_rejects_bad_config_clearly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[proxy]\nmode = "sometimes"\n')
    r = subprocess.run(UNPINNED + ["serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "mode must be 'smart' or 'rds'" in r.stderr
    r = subprocess.run(UNPINNED + ["serve", "--auth", "scram"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "no users are configured" in r.stderr


def test_help_lists_commands():
    r = subprocess.run(UNPINNED + ["--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for cmd in ("serve", "demo"):
        assert re.search(rf"^\s+{cmd}\s", r.stdout, re.M), r.stdout
    r = subprocess.run(UNPINNED + ["serve", "--help"], capture_output=True, text=True, timeout=30)
    for flag in ("--listen", "--upstream", "--mode", "--pool-size", "--auth", "--users", "--config"):
        assert flag in r.stdout


@pytest.mark.timeout(180)
def _demo_servers() -> set[str]:
    """Pids of embedded servers of a demo (their data directory names it), on the whole machine."""
    return {p for p in os.listdir("/proc") if p.isdigit() and "unpinned-db-demo" in _cmdline(p)}


def test_demo_runs_and_leaves_nothing_running():
    before = _demo_servers()     # another demo on this machine (not this test's) is not a leftover
    env = dict(os.environ, COLUMNS="220")
    r = subprocess.run(UNPINNED + ["demo", "--clients", "60", "--pool-size", "5", "--seconds", "2"],
                       capture_output=True, text=True, timeout=150, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout

    def row(case: str) -> str:
        line = next((l for l in out.splitlines() if l.startswith("│ " + case)), None)
        assert line is not None, f"no row for {case!r} in:\n{out}"
        return line

    # rds mode reproduces the seeds' pins; smart mode has none of them.
    cells = lambda case: [c.strip() for c in row(case).split("│")[2:4]]
    rds, smart = cells("psycopg2, options=")
    assert rds.startswith("rejected: Feature not supported: RDS Proxy currently doesn't support command-line")
    assert smart.startswith("no pin (statement_timeout = 5s)")
    for case, reason in [("SET lock_timeout", "set"), ("SELECT nextval", "sequence"),
                         ("SELECT ... WHERE id IN", "statement_too_long"),
                         ("asyncpg via SQLAlchemy reads an enum column", "set_config")]:
        rds, smart = cells(case)
        assert rds == f"pinned ({reason})", (case, rds)
        assert smart.startswith("no pin"), (case, smart)
    assert cells("SET LOCAL lock_timeout") == ["no pin", "no pin"]
    rds, smart = cells("CREATE TEMP TABLE")
    assert rds == "pinned (temp_object)" and "unpinned when the state was" in smart
    assert "Live page: http://127.0.0.1:" in out
    m = re.search(r"server connections used \(max\)\s*│\s*(\d+)", out)
    assert m and 1 <= int(m.group(1)) <= 5, out
    assert re.search(r"money conserved.*│\s*yes", out)
    # The failover act: clients went on on the promoted replica, the money all there.
    m = re.search(r"first commit through the proxy after the promotion\s*│\s*([\d.]+) s", out)
    assert m and float(m.group(1)) < 5, out
    assert len(re.findall(r"money conserved.*│\s*yes", out)) == 2, out
    # No embedded server of the demo survives it.
    assert _demo_servers() - before == set()


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_config_reference_in_sync():
    """Every config key is in the commented example and in the README table."""
    example = (ROOT / "unpinned.example.toml").read_text()
    readme = (ROOT / "README.md").read_text()
    for f in fields(Config):
        if f.name in ("upstream", "users"):
            continue
        assert re.search(rf"^#?\s*{f.name}\s*=", example, re.M), f"{f.name} missing from unpinned.example.toml"
        assert f"`{f.name}`" in readme or f"] {f.name}`" in readme, f"{f.name} missing from README"


@pytest.mark.timeout(120)
def test_demo_ctrl_c_leaves_nothing_running():
    before = _demo_servers()
    proc = subprocess.Popen(UNPINNED + ["demo", "--clients", "40", "--seconds", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # Wait until the workload runs (the embedded server is up), then press Ctrl-C.
    while time.monotonic() < deadline and not _demo_servers() - before:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    time.sleep(0.5)
    assert _demo_servers() - before == set()
