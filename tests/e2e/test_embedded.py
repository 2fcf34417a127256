"""The embedded server everything else tests against: start, auth, clients, crash, cleanup."""
from __future__ import annotations

import os
import sys
import subprocess
import threading
from collections.abc import Iterator

import psycopg2
import pytest

from unpinned.dev.embedded import EmbeddedPostgres


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    # md5 in pg_hba lets both md5 and SCRAM verifiers log in (the server uses SCRAM
    # whenever the stored verifier is SCRAM), so one server covers both.
    with EmbeddedPostgres(auth="md5", name="test-embedded") as server:
        yield server


def _query(dsn: str, sql: str) -> object:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def _pids_using(data_dir: str, pgid: int | None) -> list[int]:
    """Live processes whose command line names data_dir, or that are in the postmaster's group."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
            stat = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] == "Z":
            continue
        if data_dir in cmdline or (pgid is not None and int(fields[2]) == pgid):
            found.append(int(p))
    return found


def test_version_via_psql_and_psycopg2(pg: EmbeddedPostgres) -> None:
    assert "PostgreSQL 17" in pg.psql("SELECT version()")
    assert "PostgreSQL 17" in _query(pg.dsn(), "SELECT version()")
    assert pg.psql("SHOW max_connections") == "300"


def test_wrong_password_is_rejected(pg: EmbeddedPostgres) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(pg.dsn(password="wrong")).close()


def test_roles_with_md5_and_scram_verifiers(pg: EmbeddedPostgres) -> None:
    pg.create_role("md5_user", "md5 pw'q", password_encryption="md5")
    pg.create_role("scram_user", "scram pw@/:", password_encryption="scram-sha-256")
    stored = pg.psql("SELECT rolname || '=' || left(rolpassword, 6) FROM pg_authid "
                     "WHERE rolname IN ('md5_user', 'scram_user') ORDER BY 1").splitlines()
    assert stored[0].startswith("md5_user=md5") and stored[1] == "scram_user=SCRAM-"
    assert _query(pg.dsn("md5_user", "md5 pw'q"), "SELECT current_user") == "md5_user"
    assert _query(pg.dsn("scram_user", "scram pw@/:"), "SELECT current_user") == "scram_user"
    assert pg.psql("SELECT current_user", user="scram_user", password="scram pw@/:") == "scram_user"


def test_create_database(pg: EmbeddedPostgres) -> None:
    pg.create_role("owner_user", "pw")
    pg.create_database("Mixed Case", owner="owner_user")
    assert _query(pg.dsn("owner_user", "pw", dbname="Mixed Case"),
                  "SELECT current_database()") == "Mixed Case"


def test_psql_check(pg: EmbeddedPostgres) -> None:
    with pytest.raises(RuntimeError, match="no_such_table"):
        pg.psql("SELECT * FROM no_such_table")
    pg.psql("SELECT * FROM no_such_table", check=False)


def test_pgbench(pg: EmbeddedPostgres) -> None:
    pg.create_database("bench")
    env = pg.env()
    init = subprocess.run([pg.tool("pgbench"), "-i", "-s", "1", "-q", "bench"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    run = subprocess.run([pg.tool("pgbench"), "-S", "-T", "2", "-c", "4", "-j", "2", "bench"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "tps =" in run.stdout


def test_kill_then_restart(pg: EmbeddedPostgres) -> None:
    conn = psycopg2.connect(pg.dsn())
    old_pid, port = pg.pid, pg.port
    pg.kill()
    assert not pg.running and pg.pid is None
    assert _pids_using(pg.data_dir, old_pid) == []
    with pytest.raises(psycopg2.Error):
        conn.cursor().execute("SELECT 1")
    conn.close()
    pg.restart()
    assert pg.port == port and pg.pid != old_pid
    assert pg.psql("SELECT 1") == "1"
    assert _query(pg.dsn(), "SELECT 2") == 2


def test_stop_leaves_nothing_and_parallel_start() -> None:
    servers = [EmbeddedPostgres(name=f"par{i}") for i in range(2)]
    errors: list[BaseException] = []
    pids: dict[str, int | None] = {}

    def start(s: EmbeddedPostgres) -> None:
        try:
            s.start()
        except BaseException as e:  # surfaced below; a thread would swallow it
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        a, b = servers
        assert a.port != b.port
        # Default auth is scram-sha-256 everywhere, the unix socket included.
        for s in servers:
            assert _query(s.dsn(), "SHOW port") == str(s.port)
            assert s.psql("SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'scram-sha-256'") == "3"
            assert os.path.exists(os.path.join(s.socket_dir, f".s.PGSQL.{s.port}"))

        pids.update((s.data_dir, s.pid) for s in servers)
        assert all(_pids_using(d, pid) for d, pid in pids.items())
    finally:
        for s in servers:
            s.stop()
    for s in servers:
        s.stop()  # idempotent
        assert not s.running
        assert _pids_using(s.data_dir, pids[s.data_dir]) == []
        assert not os.path.exists(s.base_dir) and not os.path.exists(s.socket_dir)


def test_start_failure_reports_log() -> None:
    s = EmbeddedPostgres(settings={"shared_buffers": "not-a-size"}, name="broken")
    try:
        with pytest.raises(RuntimeError, match="shared_buffers"):
            s.start()
        assert not s.running
    finally:
        s.stop()


def test_a_server_left_by_a_killed_process_is_stopped_by_the_next_one(tmp_path):
    # A test run killed by a timeout leaves its servers running (atexit never ran): the next
    # process that makes a temporary server stops them and removes their directories.
    import sys
    maker = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from unpinned.dev.embedded import EmbeddedPostgres\n"
        "pg = EmbeddedPostgres(auth='trust', name='orphan').start()\n"
        "print(pg.base_dir, pg.data_dir, pg.pid, pg.port, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    base_dir, data_dir, pid, port = maker.stdout.readline().split()
    maker.kill()
    maker.wait()
    assert _pids_using(data_dir, int(pid)), "the server should outlive its killed maker"
    assert _query(f"postgresql://postgres@127.0.0.1:{port}/postgres", "SELECT 1") == 1
    reaper = subprocess.run([sys.executable, "-c", (
        "from unpinned.dev.embedded import EmbeddedPostgres\n"
        "pg = EmbeddedPostgres(auth='trust', name='next')\n"      # made, not started: reaps first
        "pg.stop()\n")], capture_output=True, text=True, timeout=60)
    assert reaper.returncode == 0, reaper.stderr
    assert not _pids_using(data_dir, int(pid))
    assert not os.path.exists(base_dir)


def test_the_servers_of_a_living_process_are_left_alone(pg):
    reaper = subprocess.run([sys.executable, "-c", "from unpinned.dev.embedded import reap_orphans; print(reap_orphans())"],
                            capture_output=True, text=True, timeout=60)
    assert pg.base_dir not in reaper.stdout
    assert _query(pg.dsn(), "SELECT 1") == 1
