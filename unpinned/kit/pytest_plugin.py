"""pytest plugin: run a test suite's database traffic through unpinned and fail the
tests that pin, naming the statement.

    pytest --unpinned-upstream postgresql://user:pw@localhost:5432/app_test

starts a proxy (rds mode by default: find what would pin on RDS Proxy) in front of that
server for the session. Tests reach it through the `unpinned_dsn` fixture, or through
an environment variable the plugin sets before collection (`--unpinned-env DATABASE_URL`,
the default), so an application that reads its URL from the environment needs no change.

A test that pins fails with the reason and the full statement. `--unpinned-fail-on`:
`pin` (default), `would-pin` (smart mode: also statements that would pin on RDS Proxy),
or `none` (report only, in the terminal summary).
"""
from __future__ import annotations

import asyncio
import os
import threading
from urllib.parse import urlsplit, urlunsplit

import pytest

from unpinned.config import load
from unpinned.proxy import Proxy

_STATE_KEY = "_unpinned_state"


class _Running:
    """A proxy on its own event loop thread, so blocking and asyncio tests can both use it."""

    def __init__(self, upstream: str, mode: str, pool_size: int):
        try:
            import uvloop
            self.loop = uvloop.new_event_loop()
        except ImportError:   # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.config = load(None, listen="127.0.0.1:0", upstream=upstream, auth="trust", mode=mode,
                           pool_size=pool_size)
        self.proxy = Proxy(self.config)
        ready = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.proxy.start())
            except BaseException as e:   # reported to the main thread
                self.error = e
                ready.set()
                return
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(asyncio.sleep(0.05))
            self.loop.close()

        self.thread = threading.Thread(target=run, name="unpinned-pytest", daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.error is not None:
            raise self.error

    def dsn(self, upstream: str) -> str:
        """The upstream URL with host and port replaced by the proxy's."""
        u = urlsplit(upstream)
        auth = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
        return urlunsplit((u.scheme, f"{auth}127.0.0.1:{self.proxy.port}", u.path, u.query, u.fragment))

    def events(self) -> list:
        return asyncio.run_coroutine_threadsafe(self._events(), self.loop).result(10)

    async def _events(self) -> list:
        return list(self.proxy.pinlog.recent)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("unpinned", "run database traffic through unpinned and fail tests that pin")
    group.addoption("--unpinned-upstream", default=os.environ.get("UNPINNED_UPSTREAM"),
                    help="postgresql:// URL of the server; enables the plugin (env UNPINNED_UPSTREAM)")
    group.addoption("--unpinned-mode", choices=("rds", "smart"), default="rds",
                    help="rds: fail on what RDS Proxy would pin (default); smart: fail on unpinned's own pins")
    group.addoption("--unpinned-fail-on", choices=("pin", "would-pin", "none"), default="pin")
    group.addoption("--unpinned-env", default="DATABASE_URL",
                    help="environment variable set to the proxy's URL for the tests (default DATABASE_URL)")
    group.addoption("--unpinned-pool-size", type=int, default=10)


def pytest_configure(config: pytest.Config) -> None:
    upstream = config.getoption("--unpinned-upstream")
    if not upstream:
        return
    running = _Running(upstream, config.getoption("--unpinned-mode"), config.getoption("--unpinned-pool-size"))
    running.url = running.dsn(upstream)
    env = config.getoption("--unpinned-env")
    if env:
        os.environ[env] = running.url
    setattr(config, _STATE_KEY, running)
    running.found = []   # (nodeid, event) for the summary


def pytest_unconfigure(config: pytest.Config) -> None:
    running = getattr(config, _STATE_KEY, None)
    if running is not None:
        running.stop()


@pytest.fixture(scope="session")
def unpinned_dsn(request: pytest.FixtureRequest) -> str:
    """postgresql:// URL of the unpinned proxy in front of --unpinned-upstream."""
    running = getattr(request.config, _STATE_KEY, None)
    if running is None:
        pytest.skip("unpinned plugin not enabled: pass --unpinned-upstream")
    return running.url


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    running = getattr(item.config, _STATE_KEY, None)
    if running is not None:
        item._unpinned_mark = len(running.events())
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    running = getattr(item.config, _STATE_KEY, None)
    if running is None or call.when != "call":
        return
    report = outcome.get_result()
    events = running.events()[getattr(item, "_unpinned_mark", 0):]
    fail_on = item.config.getoption("--unpinned-fail-on")
    kinds = {"pin"} | ({"would_pin_rds"} if fail_on == "would-pin" else set())
    bad = [e for e in events if e.event in kinds]
    running.found += [(item.nodeid, e) for e in bad]
    if bad and fail_on != "none" and report.outcome == "passed":
        lines = [f"this test pinned its database session ({item.config.getoption('--unpinned-mode')} mode):"]
        for e in bad:
            what = "would pin on RDS Proxy" if e.event == "would_pin_rds" else "pinned"
            lines.append(f"  {what} [{e.reason}] by: {e.sql}")
        lines.append("Use SET LOCAL inside a transaction, or see `unpinned check \"<statement>\"`.")
        report.outcome = "failed"
        report.longrepr = "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    running = getattr(config, _STATE_KEY, None)
    if running is None:
        return
    terminalreporter.section("unpinned")
    if not running.found:
        terminalreporter.write_line(f"no test pinned ({config.getoption('--unpinned-mode')} mode)")
        return
    for nodeid, e in running.found:
        terminalreporter.write_line(f"{nodeid}: {e.event} [{e.reason}] {' '.join(e.sql.split())[:200]}")
