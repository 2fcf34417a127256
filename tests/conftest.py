"""Fixtures: a real PostgreSQL (embedded, pip-installed) and real proxies in front of it.

The proxy runs on its own uvloop event loop in a background thread, so blocking
drivers (psycopg2, psycopg, pgbench) and asyncio drivers (asyncpg) in the test can
both talk to it, and the test can look at the proxy's state directly.
"""
from __future__ import annotations

import asyncio
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import uvloop

from unpinned import compiled_modules
from unpinned.config import load
from unpinned.dev.embedded import EmbeddedPostgres
from unpinned.proxy import Proxy

SUPERUSER_PASSWORD = "postgres-pw"
APP_USER, APP_PASSWORD = "app", "app-secret"
MD5_USER, MD5_PASSWORD = "legacy", "legacy-secret"


@pytest.fixture(scope="session")
def pg():
    """One PostgreSQL for the whole run: scram and md5 roles, pgbench tables, a test table."""
    server = EmbeddedPostgres(password=SUPERUSER_PASSWORD, auth="md5", name="tests",
                              settings={"max_connections": "400"}).start()
    server.create_role(APP_USER, APP_PASSWORD, superuser=True)
    server.create_role(MD5_USER, MD5_PASSWORD, password_encryption="md5", superuser=True)
    subprocess.run([server.tool("pgbench"), "-i", "-s", "1", "-q"], env=server.env(), check=True,
                   capture_output=True)
    yield server
    server.stop()


class ProxyHandle:
    """A running proxy: its port, DSNs for clients, and a way to look inside it."""

    def __init__(self, proxy: Proxy, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self.proxy = proxy
        self.loop = loop
        self.thread = thread
        self.port = proxy.port
        self.host = "127.0.0.1"

    def dsn(self, user: str = APP_USER, password: str | None = APP_PASSWORD, dbname: str = "postgres",
            **params: str) -> str:
        auth = f"{user}:{password}@" if password is not None else f"{user}@"
        extra = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}" + (f"?{extra}" if extra else "")

    def kwargs(self, user: str = APP_USER, password: str | None = APP_PASSWORD, dbname: str = "postgres") -> dict:
        return dict(host="127.0.0.1", port=self.port, user=user, password=password, dbname=dbname)

    def call(self, fn, *args):
        """Run fn(*args) on the proxy's loop thread and return its result (coroutines awaited)."""
        async def wrapper():
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout=60)

    def pool(self, database: str = "postgres", user: str = APP_USER):
        return self.proxy.pools.get((database, user))

    def server_count(self, database: str = "postgres", user: str = APP_USER) -> int:
        pool = self.pool(database, user)
        return self.call(lambda: pool.size) if pool else 0

    def stop(self) -> None:
        async def _stop():
            await self.proxy.stop()
        try:
            asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)


def start_proxy(pg: EmbeddedPostgres, users_file: str | None = None, **options) -> ProxyHandle:
    options.setdefault("listen", "127.0.0.1:0")
    options.setdefault("upstream", pg.dsn("postgres", SUPERUSER_PASSWORD))
    options.setdefault("auth", "scram")
    options.setdefault("users_file", users_file)
    cfg = load(None, **options)
    loop = uvloop.new_event_loop()
    started = threading.Event()
    box: dict = {}

    def run():
        asyncio.set_event_loop(loop)
        proxy = Proxy(cfg)
        try:
            loop.run_until_complete(proxy.start())
            box["proxy"] = proxy
        except BaseException as e:  # report start failures to the test thread
            box["error"] = e
            started.set()
            return
        started.set()
        loop.run_forever()
        # Let close callbacks run, then close the loop.
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()

    thread = threading.Thread(target=run, name="unpinned-proxy", daemon=True)
    thread.start()
    started.wait(30)
    if "error" in box:
        raise box["error"]
    return ProxyHandle(box["proxy"], loop, thread)


@pytest.fixture(scope="session")
def users_file():
    path = Path(tempfile.mkdtemp(prefix="unpinned-users-")) / "users.toml"
    path.write_text(
        f'[users.{APP_USER}]\npassword = "{APP_PASSWORD}"\n\n'
        f'[users.{MD5_USER}]\npassword = "{MD5_PASSWORD}"\n\n'
        f'[users.postgres]\npassword = "{SUPERUSER_PASSWORD}"\nadmin = true\n'
    )
    return str(path)


@pytest.fixture(scope="session")
def proxy(pg, users_file):
    """A shared smart-mode proxy with SCRAM client auth and a pool of 10."""
    handle = start_proxy(pg, users_file, pool_size=10)
    yield handle
    handle.stop()


@pytest.fixture
def make_proxy(pg, users_file):
    """Start extra proxies with their own settings; all are stopped after the test."""
    handles: list[ProxyHandle] = []

    def factory(**options) -> ProxyHandle:
        options.setdefault("users_file", users_file)
        h = start_proxy(pg, **options)
        handles.append(h)
        return h

    yield factory
    for h in handles:
        h.stop()


def backends(pg: EmbeddedPostgres, user: str = APP_USER) -> int:
    """Client backends the server has for `user` right now."""
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' "
                       "AND backend_type = 'client backend'", user="postgres", password=SUPERUSER_PASSWORD))


def pg_tool_env(pg: EmbeddedPostgres, handle: ProxyHandle, user=APP_USER, password=APP_PASSWORD) -> dict:
    env = pg.env()
    env.update(PGHOST="127.0.0.1", PGPORT=str(handle.port), PGUSER=user, PGPASSWORD=password,
               PGDATABASE="postgres")
    return env


# A test that monkeypatches a function or a method of a compiled module (unpinned/compiled.txt)
# cannot work against the compiled build: compiled code calls its own functions directly and
# its classes take no new attributes. Such a test is marked interpreted_only and runs in
# `make test`'s second pass, the unit tests against the .py sources (UNPINNED_PURE_PYTHON=1).
def pytest_collection_modifyitems(config, items):
    if not compiled_modules():
        return
    skip = pytest.mark.skip(reason="patches a compiled module: runs in make test's interpreted pass")
    for item in items:
        if item.get_closest_marker("interpreted_only"):
            item.add_marker(skip)
