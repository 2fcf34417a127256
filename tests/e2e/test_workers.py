"""Several worker processes on one port (`workers = N`): one proxy to its users.

End to end with `unpinned serve --workers 2` as a user starts it; the merge functions
(pure) also on their own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request

import psycopg2
import psycopg2.errors
import pytest

from unpinned.ops import admin
from unpinned.config import ConfigError, load
from unpinned.config import WorkerInfo, share
from unpinned.ops.workers import merge_history, merge_metrics
from conftest import APP_PASSWORD, APP_USER, SUPERUSER_PASSWORD
from test_cli import UNPINNED, _free_port, _wait_port

POOL = 4


@pytest.fixture
def workers(pg, users_file):
    """`unpinned serve --workers 2`, pool 4 in all, with the HTTP listener."""
    port, http = _free_port(), _free_port()
    _BEFORE[:] = _app_backend_pids(pg)     # other proxies of this test session have their own
    proc = subprocess.Popen(UNPINNED + ["serve", "--listen", f"127.0.0.1:{port}", "--users", users_file,
                                        "--upstream", pg.dsn("postgres", SUPERUSER_PASSWORD),
                                        "--pool-size", str(POOL), "--workers", "2", "--http", f"127.0.0.1:{http}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_port(port, proc)
    _wait_port(http, proc)
    time.sleep(0.3)     # the second worker binds a moment after the first
    yield proc, port, http
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


_BEFORE: list[int] = []


def _app_backend_pids(pg) -> list[int]:
    out = pg.psql(f"SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE usename = '{APP_USER}' "
                  "AND backend_type = 'client backend'", user="postgres", password=SUPERUSER_PASSWORD)
    return [int(p) for p in out.split()]


def _ours(pg) -> int:
    """Backends the workers' pools hold (not those of other proxies left from earlier tests)."""
    return len(set(_app_backend_pids(pg)) - set(_BEFORE))


def _connect(port: int, user: str = APP_USER, password: str = APP_PASSWORD, dbname: str = "postgres"):
    conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=dbname)
    conn.autocommit = True
    return conn


def _admin(port: int):
    return _connect(port, "postgres", SUPERUSER_PASSWORD, "unpinned")


def _show(port: int, what: str) -> list[dict]:
    a = _admin(port)
    try:
        cur = a.cursor()
        cur.execute(f"SHOW {what}")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        a.close()


def _worker_pids(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_many_clients_over_both_workers_never_exceed_the_pool(pg, workers):
    proc, port, _ = workers
    clients = [_connect(port) for _ in range(24)]
    try:
        errors: list[BaseException] = []
        peak = [0]

        def work(conn, i):
            try:
                cur = conn.cursor()
                for n in range(15):
                    cur.execute("BEGIN")
                    cur.execute("SELECT %s + 1, pg_sleep(0.002)", (i * 100 + n,))
                    assert cur.fetchone()[0] == i * 100 + n + 1
                    cur.execute("COMMIT")
            except BaseException as e:   # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], _ours(pg))
            time.sleep(0.01)
        assert not errors, errors[0]
        assert 0 < peak[0] <= POOL, f"server saw {peak[0]} backends from a pool of {POOL} split over 2 workers"

        # One proxy to look at: every client of both workers, ids unique, the pool totals.
        rows = [r for r in _show(port, "CLIENTS") if r["database"] == "postgres"]
        assert len(rows) == 24
        ids = [int(r["id"]) for r in rows]
        assert len(set(ids)) == 24
        assert {i % 2 for i in ids} == {0, 1}, "the kernel gave every client to one worker"
        pools = [r for r in _show(port, "POOLS") if r["database"] == "postgres"]
        assert len(pools) == 1
        assert int(pools[0]["cl_idle"]) + int(pools[0]["cl_active"]) == 24
        assert int(pools[0]["pool_size"]) == POOL
        assert int(pools[0]["borrows"]) >= 24 * 15
        stats = _show(port, "STATS")[0]
        assert int(stats["query_requests"]) >= 24 * 45
        assert float(stats["query_latency_p50_s"]) <= float(stats["query_latency_p99_s"])
        assert not [k for k in stats if k.startswith("_")], "a merge-only column is shown"
    finally:
        for c in clients:
            c.close()


def test_a_cancel_reaches_the_worker_that_holds_the_client(pg, workers):
    """psycopg2's cancel opens a new connection, which the kernel may give to the other
    worker: it must be passed on. Ten cancels: both cases happen (1 in 512 they all stay)."""
    _, port, _ = workers
    clients = [_connect(port) for _ in range(10)]
    try:
        outcome: dict[int, str] = {}

        def sleep(i, conn):
            try:
                conn.cursor().execute("SELECT pg_sleep(20)")
                outcome[i] = "finished"
            except psycopg2.errors.QueryCanceled:
                outcome[i] = "canceled"
            except psycopg2.Error as e:
                outcome[i] = repr(e)

        threads = [threading.Thread(target=sleep, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        for c in clients:
            c.cancel()
        for t in threads:
            t.join(15)
        assert outcome == {i: "canceled" for i in range(10)}
        assert time.monotonic() - t0 < 10
        for c in clients:      # and each client goes on working
            cur = c.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        for c in clients:
            c.close()


def test_kill_and_pause_reach_every_worker(pg, workers):
    _, port, _ = workers
    clients = [_connect(port) for _ in range(8)]
    a = _admin(port)
    try:
        cur = a.cursor()
        cur.execute("PAUSE postgres")
        paused = [r for r in _show(port, "POOLS") if r["database"] == "postgres"]
        assert paused[0]["paused"] == "True"
        cur.execute("RESUME postgres")
        for c in clients:
            c.cursor().execute("SELECT 1")
        ids = [int(r["id"]) for r in _show(port, "CLIENTS") if r["database"] == "postgres"]
        assert {i % 2 for i in ids} == {0, 1}
        for i in ids:
            cur.execute(f"KILL {i}")
        for c in clients:
            with pytest.raises(psycopg2.OperationalError):
                c.cursor().execute("SELECT 1")
        assert not [r for r in _show(port, "CLIENTS") if r["database"] == "postgres"]
        with pytest.raises(psycopg2.Error, match="no client or database"):
            cur.execute("KILL 999999")
        with pytest.raises(psycopg2.Error, match='no pool for database "nope"'):
            cur.execute("PAUSE nope")
        cur.execute("RELOAD")
    finally:
        a.close()
        for c in clients:
            c.close()


def test_metrics_and_api_count_both_workers(workers):
    _, port, http = workers
    clients = [_connect(port) for _ in range(10)]
    try:
        for c in clients:
            c.cursor().execute("SELECT 1")
        text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10).read().decode()
        connected = [line for line in text.splitlines() if line.startswith("unpinned_client_connections ")]
        assert connected and float(connected[0].split()[1]) == 10
        allowed = [line for line in text.splitlines()
                   if line.startswith("unpinned_max_database_connections_allowed{")]
        assert allowed and float(allowed[0].split()[-1]) == POOL
        import json
        summary = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http}/api/summary", timeout=10).read())
        assert sum(p["cl_idle"] + p["cl_active"] for p in summary["pools"]) == 10
        assert summary["stats"]["query_requests"] >= 10
    finally:
        for c in clients:
            c.close()


def test_a_dead_worker_is_replaced_and_sigterm_stops_all(workers):
    proc, port, _ = workers
    pids = _worker_pids(proc)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = _worker_pids(proc)
        if len(now) == 2 and pids[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the supervisor did not start a new worker")
    for _ in range(10):     # new connections work whichever worker they reach
        c = _connect(port)
        c.cursor().execute("SELECT 1")
        c.close()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "exited" in err and "starting a new one" in err
    assert not _worker_pids(proc)


def test_workers_config_is_checked():
    with pytest.raises(ConfigError, match=r"workers \(4\) must not exceed pool_size \(2\)"):
        load(None, workers=4, pool_size=2, auth="trust")
    with pytest.raises(ConfigError, match="workers must be 0"):
        load(None, workers=-1, auth="trust")


# ------------------------------------------------------------------ pure parts

def test_share_splits_totals_exactly():
    cfg = load(None, pool_size=7, auth="trust", max_client_connections=10, workers=3)
    parts = [share(cfg, WorkerInfo(i, 3, 1)) for i in range(3)]
    assert sum(p.pool_size for p in parts) == 7
    assert sum(p.max_idle for p in parts) == cfg.max_idle
    assert all(p.max_client_connections == 10 for p in parts)   # checked against all workers' clients
    assert cfg.pool_size == 7   # the total is left as it was


def test_merge_view_adds_pools_and_stats_and_keeps_clients_apart():
    pools = admin.merge_view("POOLS", [
        [{"database": "d", "user": "u", "cl_active": 1, "cl_idle": 2, "pool_size": 5, "paused": False}],
        [{"database": "d", "user": "u", "cl_active": 3, "cl_idle": 0, "pool_size": 5, "paused": True},
         {"database": "e", "user": "u", "cl_active": 0, "cl_idle": 1, "pool_size": 5, "paused": False}]])
    assert pools == [{"database": "d", "user": "u", "cl_active": 4, "cl_idle": 2, "pool_size": 10, "paused": True},
                     {"database": "e", "user": "u", "cl_active": 0, "cl_idle": 1, "pool_size": 5, "paused": False}]
    stats = admin.merge_view("STATS", [[{"uptime_s": 5.0, "query_requests": 10, "query_latency_p99_s": None}],
                                       [{"uptime_s": 4.0, "query_requests": 7, "query_latency_p99_s": 0.01}]])
    assert stats == [{"uptime_s": 5.0, "query_requests": 17, "query_latency_p99_s": 0.01}]
    clients = admin.merge_view("CLIENTS", [[{"id": 4}, {"id": 2}], [{"id": 3}]])
    assert [c["id"] for c in clients] == [2, 3, 4]
    reasons = admin.merge_view("PIN_REASONS", [
        [{"reason": "temp_table", "fingerprint": "f", "count": 2, "pins": 2, "last_seen": "2026-01-01 00:00:01",
          "sample": "a"}],
        [{"reason": "temp_table", "fingerprint": "f", "count": 3, "pins": 3, "last_seen": "2026-01-01 00:00:02",
          "sample": "b"}]])
    assert reasons == [{"reason": "temp_table", "fingerprint": "f", "count": 5, "pins": 5,
                        "last_seen": "2026-01-01 00:00:02", "sample": "a"}]


def test_merged_latency_quantiles_are_those_of_all_requests():
    # Worker 0 answered 99 requests fast, worker 1 one request slowly: the proxy's median is
    # fast (the slowest worker's median would say 1 s).
    from unpinned.telemetry.counters import BUCKETS
    fast = [0] * (len(BUCKETS) + 1)
    fast[0] = 99
    slow = [0] * (len(BUCKETS) + 1)
    slow[BUCKETS.index(1.0)] = 1
    rows = [[{"query_requests": 99, "query_latency_p50_s": BUCKETS[0], "query_latency_p99_s": BUCKETS[0],
              "_query_latency_counts": fast}],
            [{"query_requests": 1, "query_latency_p50_s": 1.0, "query_latency_p99_s": 1.0,
              "_query_latency_counts": slow}]]
    stats = admin.merge_view("STATS", rows)
    assert stats == [{"query_requests": 100, "query_latency_p50_s": BUCKETS[0],
                      "query_latency_p99_s": BUCKETS[0]}]
    rows[0][0]["_query_latency_counts"][0] = 98
    assert admin.merge_view("STATS", rows)[0]["query_latency_p99_s"] == 1.0


def test_merge_metrics_adds_samples_with_the_same_labels():
    a = ('# HELP x_total X.\n# TYPE x_total counter\nx_total{pool="p"} 2.0\n'
         '# HELP g G.\n# TYPE g gauge\ng 1.0\n'
         '# HELP h H.\n# TYPE h histogram\nh_bucket{le="0.1"} 1.0\nh_bucket{le="+Inf"} 2.0\nh_sum 0.3\nh_count 2.0\n')
    b = ('# HELP x_total X.\n# TYPE x_total counter\nx_total{pool="p"} 3.0\nx_total{pool="q"} 1.0\n'
         '# HELP g G.\n# TYPE g gauge\ng 4.0\n'
         '# HELP h H.\n# TYPE h histogram\nh_bucket{le="0.1"} 0.0\nh_bucket{le="+Inf"} 1.0\nh_sum 0.5\nh_count 1.0\n')
    out = merge_metrics([a, b]).decode()
    assert 'x_total{pool="p"} 5.0' in out and 'x_total{pool="q"} 1.0' in out
    assert "\ng 5.0" in out
    assert 'h_bucket{le="0.1"} 1.0' in out and 'h_bucket{le="+Inf"} 3.0' in out and "h_count 3.0" in out


def test_merge_history_aligns_the_newest_samples():
    h = merge_history([[{"t": 1, "clients": 1}, {"t": 2, "clients": 2}], [{"t": 2.1, "clients": 5}]])
    assert h == [{"t": 2, "clients": 7}]


def test_max_client_connections_counts_every_workers_clients(pg, users_file, tmp_path):
    """The limit is the proxy's, not each worker's, however the kernel spreads clients."""
    cfg = tmp_path / "unpinned.toml"
    cfg.write_text("[proxy]\nmax_client_connections = 6\nworkers = 2\n")
    port = _free_port()
    proc = subprocess.Popen(UNPINNED + ["serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
                                        "--users", users_file, "--upstream", pg.dsn("postgres", SUPERUSER_PASSWORD),
                                        "--pool-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients = []
    try:
        _wait_port(port, proc)
        time.sleep(0.3)
        for _ in range(6):
            clients.append(_connect(port))
        with pytest.raises(psycopg2.OperationalError, match="maximum number of client connections"):
            _connect(port)
        clients.pop().close()
        time.sleep(0.2)
        clients.append(_connect(port))      # room again
    finally:
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_a_forked_worker_draws_its_own_cancel_secrets():
    # Cancel keys come from a block of CSPRNG bytes; a worker forked after the block was drawn
    # must not hand out the same secrets as its parent.
    from unpinned.frontend import login as proxy_mod
    proxy_mod._random64()                    # the parent has a block now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, proxy_mod._random64().to_bytes(8, "big"))
        finally:
            os._exit(0)
    os.close(w)
    child = int.from_bytes(os.read(r, 8), "big")
    os.close(r)
    os.waitpid(pid, 0)
    assert child != proxy_mod._random64()
