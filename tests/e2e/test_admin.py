"""The admin console (psql-style, PgBouncer's commands), the HTTP API, and `unpinned check`."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request

import psycopg2
import pytest

from conftest import SUPERUSER_PASSWORD


@pytest.fixture
def h(make_proxy):
    return make_proxy(pool_size=2, http_listen="127.0.0.1:0")


def admin(h):
    conn = psycopg2.connect(**h.kwargs(user="postgres", password=SUPERUSER_PASSWORD, dbname="unpinned"))
    conn.autocommit = True
    return conn


def rows(conn, sql):
    cur = conn.cursor()
    cur.execute(sql)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def api(h, path):
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{h.proxy.http.port}{path}", timeout=10).read())


def test_show_views_agree_with_the_api(h):
    a = admin(h)
    c = psycopg2.connect(**h.kwargs(), application_name="viewer")
    c.autocommit = True
    try:
        c.cursor().execute("CREATE TEMP TABLE adm_t (x int)")          # pinned: holds a server connection
        pools = rows(a, "SHOW POOLS")
        assert pools == [{k: str(v) for k, v in p.items()} for p in api(h, "/api/pools")]
        app_pool = next(p for p in pools if p["user"] == "app")
        assert app_pool["cl_pinned"] == "1" and app_pool["sv_active"] == "1" and app_pool["pool_size"] == "2"
        clients = rows(a, "SHOW CLIENTS")
        viewer = next(x for x in clients if x["application_name"] == "viewer")
        assert viewer["pinned"] == "True" and viewer["pin_reasons"] == "temp_object"
        servers = rows(a, "SHOW SERVERS")
        assert any(s["client_id"] == viewer["id"] for s in servers)
        assert rows(a, "SHOW PINS")[0]["sql"] == "CREATE TEMP TABLE adm_t (x int)"
        stats = rows(a, "SHOW STATS")[0]
        assert int(stats["pins"]) >= 1 and int(stats["query_requests"]) >= 1
        config = {r["key"]: r["value"] for r in rows(a, "SHOW CONFIG")}
        assert config["pool_size"] == "2" and "postgres-pw" not in json.dumps(config)
        assert rows(a, "SHOW VERSION")[0]["version"].startswith("unpinned ")
        with pytest.raises(psycopg2.Error, match="unknown admin command"):
            a.cursor().execute("SHOW NONSENSE")
        summary = api(h, "/api/summary")
        assert summary["mode"] == "smart" and summary["pins"][0]["reason"] == "temp_object"
        page = urllib.request.urlopen(f"http://127.0.0.1:{h.proxy.http.port}/", timeout=10).read()
        assert b"/api/summary" in page
    finally:
        c.close()
        a.close()


def test_admin_needs_an_admin_user(h):
    with pytest.raises(psycopg2.OperationalError, match="may not use the admin console"):
        psycopg2.connect(**h.kwargs(dbname="unpinned"))


def test_pause_holds_new_transactions_until_resume(h):
    a = admin(h)
    c = psycopg2.connect(**h.kwargs())
    c.autocommit = True
    try:
        c.cursor().execute("SELECT 1")
        a.cursor().execute("PAUSE postgres")
        done = threading.Event()

        def query():
            c.cursor().execute("SELECT 2")
            done.set()

        t = threading.Thread(target=query)
        t.start()
        assert not done.wait(0.7), "a query ran while the pool was paused"
        assert rows(a, "SHOW POOLS")[0]["paused"] == "True"
        a.cursor().execute("RESUME postgres")
        assert done.wait(10)
        t.join()
    finally:
        c.close()
        a.close()


def test_kill_disconnects_a_client_and_others_carry_on(h):
    a = admin(h)
    victim = psycopg2.connect(**h.kwargs(), application_name="victim")
    other = psycopg2.connect(**h.kwargs())
    try:
        victim_id = next(x["id"] for x in rows(a, "SHOW CLIENTS") if x["application_name"] == "victim")
        a.cursor().execute(f"KILL {victim_id}")
        with pytest.raises(psycopg2.Error):
            victim.cursor().execute("SELECT 1")
        cur = other.cursor()
        cur.execute("SELECT 'alive'")
        assert cur.fetchone() == ("alive",)
    finally:
        victim.close()
        other.close()
        a.close()


def test_reload_applies_a_changed_file_and_keeps_clients(pg, tmp_path, users_file):
    from conftest import start_proxy
    conf = tmp_path / "unpinned.toml"
    conf.write_text('[pool]\npool_size = 2\n')
    cfg_opts = dict(listen="127.0.0.1:0", upstream=pg.dsn("postgres", SUPERUSER_PASSWORD), auth="scram",
                    users_file=users_file)
    handle = start_proxy(pg, users_file)
    try:
        # Point the running proxy at the file, as `unpinned serve --config` would.
        handle.call(lambda: setattr(handle.proxy, "config_path", str(conf)))
        handle.call(lambda: handle.proxy.overrides.update({k: v for k, v in cfg_opts.items() if k != "listen"}))
        c = psycopg2.connect(**handle.kwargs())
        c.autocommit = True
        a = admin(handle)
        conf.write_text('[pool]\npool_size = 7\n')
        a.cursor().execute("RELOAD")
        assert {r["key"]: r["value"] for r in rows(a, "SHOW CONFIG")}["pool_size"] == "7"
        c.cursor().execute("SELECT 1")                       # the client was not dropped
        conf.write_text('[pool]\npool_size = "lots"\n')
        with pytest.raises(psycopg2.Error, match="old configuration kept"):
            a.cursor().execute("RELOAD")
        assert {r["key"]: r["value"] for r in rows(a, "SHOW CONFIG")}["pool_size"] == "7"
        c.close()
        a.close()
    finally:
        handle.stop()


def test_check_command():
    run = lambda *args: subprocess.run([sys.executable, "-m", "unpinned.cli", "check", *args],
                                       capture_output=True, text=True, timeout=60)
    r = run("--json", "SET lock_timeout = 3000")
    out = json.loads(r.stdout)
    assert r.returncode == 1
    assert out["rds"]["pins"] and out["rds"]["reasons"][0]["code"] == "set"
    assert not out["smart"]["pins"] and out["digest"] == "set lock_timeout = $1"
    r = run("--mode", "smart", "SET LOCAL lock_timeout = 3000")
    assert r.returncode == 0 and "smart: no pin" in r.stdout
    r = run("--mode", "smart", "CREATE TEMP TABLE t (x int)")
    assert r.returncode == 1 and "temp_object" in r.stdout
