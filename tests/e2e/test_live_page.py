"""The live page (`/` on the HTTP endpoint), rendered by a real browser: headless Chromium
runs its script against the proxy's JSON API and the test reads the resulting DOM.

Chromium comes from Debian's package (`.ci/run` installs it); where no browser is installed
the test is skipped and says so."""
from __future__ import annotations

import html
import re
import shutil
import subprocess

import psycopg2
import pytest

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")


def rendered(url: str, tmp_path) -> str:
    """The page's DOM after its script has run for a few (virtual) seconds."""
    out = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def cells(dom: str, table_id: str) -> list[list[str]]:
    """Rows of one table of the rendered page, as text."""
    m = re.search(rf'<table id="{table_id}">(.*?)</table>', dom, re.S)
    assert m, f"table {table_id} not rendered"
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", m.group(1), re.S)]


def test_live_page_shows_pools_pins_and_reasons(make_proxy, tmp_path):
    h = make_proxy(pool_size=2, http_listen="127.0.0.1:0", http_sql_literals=True)
    pinned = psycopg2.connect(**h.kwargs(), application_name="live-viewer")
    pinned.autocommit = True
    try:
        # A pin whose SQL holds markup: the page must show it as text, not run it.
        pinned.cursor().execute("SELECT pg_advisory_lock(4242) /* <b>bold</b> */")
        dom = rendered(f"http://127.0.0.1:{h.proxy.http.port}/", tmp_path)
    finally:
        pinned.close()

    assert "smart mode" in dom
    summary = html.unescape(re.search(r'<p id="summary">(.*?)</p>', dom, re.S).group(1))
    assert re.search(r"queries \d+ · pins 1 · unpins 0", summary), summary

    pools = cells(dom, "pools")
    assert pools[0][:4] == ["database", "user", "cl_active", "cl_idle"]
    app = next(r for r in pools[1:] if r[1] == "app")
    assert app[pools[0].index("cl_pinned")] == "1" and app[pools[0].index("pool_size")] == "2"

    pins = cells(dom, "pins")
    assert pins[0] == ["client_id", "user", "application_name", "reason", "sql"]
    assert pins[1][1:4] == ["app", "live-viewer", "advisory_lock"]
    assert pins[1][4] == "SELECT pg_advisory_lock(4242) /* <b>bold</b> */"
    assert "<b>bold</b>" not in dom and "&lt;b&gt;bold&lt;/b&gt;" in dom

    reasons = cells(dom, "reasons")
    assert any(r[0] == "advisory_lock" and r[2] == "1" for r in reasons[1:])
    assert re.search(r'<svg id="chart"[^>]*><polyline', dom), "the chart was not drawn"


def test_live_page_says_when_the_proxy_is_unreachable(tmp_path):
    # The same page with no proxy behind its API (opened from a file): it says so.
    from importlib.resources import files
    static = tmp_path / "live.html"
    static.write_text(files("unpinned.ops").joinpath("live.html").read_text(encoding="utf-8"), encoding="utf-8")
    dom = rendered(static.as_uri(), tmp_path)
    assert "proxy unreachable" in dom and "loading…" not in dom


def test_live_page_with_a_token_in_its_address_reaches_the_api(make_proxy, tmp_path):
    # With http_token set, the page opened as /?token=... passes the token on to /api/summary;
    # without it, the page itself is refused.
    h = make_proxy(pool_size=2, http_listen="127.0.0.1:0", http_token="page-token")
    base = f"http://127.0.0.1:{h.proxy.http.port}/"
    dom = rendered(base + "?token=page-token", tmp_path)
    summary = html.unescape(re.search(r'<p id="summary">(.*?)</p>', dom, re.S).group(1))
    assert re.search(r"queries \d+ · pins \d+", summary), summary
    assert "— smart mode" in dom
    refused = rendered(base, tmp_path / "second")
    assert "<table" not in refused and "a token is needed" in refused
