"""Access to the HTTP listener: with a token set, /api/* and the live page need it (Bearer
header, basic auth, ?token=), /metrics only when asked; statements in /api/* without their
literals unless configured; the token never shown."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import psycopg2
import pytest

from unpinned.config import ConfigError, load

TOKEN = "s3cret-token"


def get(h, path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{h.proxy.http.port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture
def locked(make_proxy):
    return make_proxy(pool_size=2, http_listen="127.0.0.1:0", http_token=TOKEN)


@pytest.mark.parametrize("path", ["/api/pools", "/api/pins", "/api/summary", "/api/config", "/", "/index.html"])
def test_without_the_token_the_api_and_page_answer_401(locked, path):
    status, body, headers = get(locked, path)
    assert status == 401 and b"pool" not in body
    assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert get(locked, path, {"Authorization": "Bearer wrong"})[0] == 401
    assert get(locked, path + "?token=wrong")[0] == 401


@pytest.mark.parametrize("how", ["bearer", "basic", "query"])
def test_with_the_token_the_api_answers(locked, how):
    headers, path = {}, "/api/pools"
    if how == "bearer":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif how == "basic":
        headers["Authorization"] = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    else:
        path += f"?token={TOKEN}"
    status, body, _ = get(locked, path, headers)
    assert status == 200 and isinstance(json.loads(body), list)


def test_the_live_page_passes_its_token_to_the_api(locked):
    status, page, _ = get(locked, f"/?token={TOKEN}")
    assert status == 200 and b"fetch('/api/summary' + location.search)" in page
    assert get(locked, f"/api/summary?token={TOKEN}")[0] == 200


def test_metrics_stay_open_unless_asked(locked, make_proxy):
    assert get(locked, "/metrics")[0] == 200
    closed = make_proxy(pool_size=2, http_listen="127.0.0.1:0", http_token=TOKEN, http_metrics_auth=True)
    assert get(closed, "/metrics")[0] == 401
    status, body, _ = get(closed, "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"unpinned_" in body


def test_the_token_is_never_shown(locked):
    status, body, _ = get(locked, "/api/config", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and TOKEN.encode() not in body
    assert {r["key"]: r["value"] for r in json.loads(body)}["http_token"] == "***"


def test_the_token_comes_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("UNPINNED_HTTP_TOKEN", "from-env")
    assert load(None, auth="trust").http_token == "from-env"
    monkeypatch.delenv("UNPINNED_HTTP_TOKEN")
    with pytest.raises(ConfigError, match="http_metrics_auth needs http_token"):
        load(None, auth="trust", http_metrics_auth=True)


def test_a_port_alone_binds_to_localhost(make_proxy):
    h = make_proxy(pool_size=2, http_listen=":0")
    assert h.proxy.http.server.sockets[0].getsockname()[0] == "127.0.0.1"


@pytest.mark.parametrize("literals", [False, True])
def test_statements_in_the_api_lose_their_literals_unless_configured(make_proxy, literals):
    h = make_proxy(pool_size=2, http_listen="127.0.0.1:0", http_sql_literals=literals)
    c = psycopg2.connect(**h.kwargs())
    c.autocommit = True
    try:
        c.cursor().execute("SELECT pg_advisory_lock(4243), 'card 4111-1111-1111-1111'")
        pins = json.loads(get(h, "/api/pins")[1])
        reasons = json.loads(get(h, "/api/pin_reasons")[1])
        summary = get(h, "/api/summary")[1]
    finally:
        c.close()
    sql = pins[0]["sql"]
    sample = next(r["sample"] for r in reasons if r["reason"] == "advisory_lock")
    if literals:
        assert "4111-1111" in sql and "4111-1111" in sample
    else:
        assert sql == "SELECT pg_advisory_lock($1), $2" and sample == sql
        assert b"4111" not in summary and b"4243" not in summary


def _raw_http(h, data: bytes) -> bytes:
    import socket
    with socket.create_connection(("127.0.0.1", h.proxy.http.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_keep_alive_pipelining_head_and_bad_requests(locked):
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # Two requests pipelined on one connection, the second asking to close it.
    out = _raw_http(locked, b"GET /api/pools HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
                    b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 2
    head_part = out[out.index(b"HTTP/1.1 200", 10):]
    assert b"\r\n\r\n" in head_part and head_part.split(b"\r\n\r\n", 1)[1] == b""   # HEAD: no body
    assert _raw_http(locked, b"POST /api/pools HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                     ).startswith(b"HTTP/1.1 405")
    # Headers that go on and on: refused once past 16 KB, without waiting for their end.
    assert _raw_http(locked, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000).startswith(b"HTTP/1.1 431")
    assert _raw_http(locked, b"this is not http\r\n\r\n").startswith(b"HTTP/1.1 400")
    # The listener is still there.
    assert get(locked, "/metrics")[0] == 200
