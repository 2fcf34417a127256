"""One failure, one ErrorResponse: a server connection that PostgreSQL ends (its backend
terminated) reaches the client as PostgreSQL's own FATAL and nothing more, so drivers see one
error of the class their retry logic expects (psycopg 3: OperationalError, not the
InternalError "received 2 results" that two ErrorResponses give)."""
from __future__ import annotations

import psycopg
import pytest

from conftest import SUPERUSER_PASSWORD, start_proxy
from test_robustness import Raw
from unpinned.wire import messages as m

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def oproxy(pg, users_file):
    handle = start_proxy(pg, users_file, auth="trust", pool_size=4)
    yield handle
    handle.stop()


def _terminate(pg, pid: int) -> None:
    with psycopg.connect(pg.dsn("postgres", SUPERUSER_PASSWORD), autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (True,)


@pytest.mark.parametrize("when", ["between statements", "at commit"])
def test_psycopg3_sees_one_operational_error_when_its_backend_is_terminated(pg, oproxy, when):
    conn = psycopg.connect(**oproxy.kwargs())
    try:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]   # opens a transaction
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS t_one_error (x int) ON COMMIT DROP")
        _terminate(pg, pid)
        with pytest.raises(psycopg.Error) as info:
            if when == "at commit":
                conn.commit()
            else:
                conn.execute("SELECT 1")
        assert isinstance(info.value, psycopg.OperationalError), repr(info.value)
        assert not isinstance(info.value, psycopg.InternalError)
        assert "received 2 results" not in str(info.value)
    finally:
        conn.close()
    # The proxy goes on serving (with another server connection).
    with psycopg.connect(**oproxy.kwargs()) as again:
        assert again.execute("SELECT 40 + 2").fetchone() == (42,)


@pytest.mark.parametrize("idle", [True, False])
def test_exactly_one_error_response_on_the_wire(pg, oproxy, idle):
    """Raw bytes: after the backend is terminated, the client reads one ErrorResponse
    (PostgreSQL's FATAL 57P01) and then the end of the stream."""
    raw = Raw(oproxy.port)
    raw.login()
    msgs = raw.query("BEGIN; SELECT pg_backend_pid()")
    pid = int([body for t, body in msgs if t == b"D"][0][6:].decode())
    if idle:
        _terminate(pg, pid)
    else:
        raw.send(m.query("SELECT pg_sleep(30)"))
        _terminate(pg, pid)
    rest = raw.expect_closed()
    errors = [m.parse_error_fields(body) for t, body in rest if t == b"E"]
    assert len(errors) == 1, rest
    assert errors[0]["S"] == "FATAL" and errors[0]["C"] == "57P01", errors


def test_server_connection_lost_without_a_word_gets_the_proxys_08006(pg, oproxy):
    """When PostgreSQL says nothing (the socket just closes), the proxy's own FATAL 08006 is the one
    error. The client is idle in its transaction, so it hears it at its next request (closing at
    once, libpq would mostly report only "server closed the connection unexpectedly")."""
    raw = Raw(oproxy.port)
    raw.login()
    assert raw.query("BEGIN")[-1] == (b"Z", b"T")
    client = next(iter(c for c in oproxy.call(lambda: list(oproxy.proxy.shared.clients)) if c.server is not None))
    oproxy.call(lambda: client.server.transport.abort())
    raw.send(m.query("SELECT 1"))
    rest = raw.expect_closed()
    errors = [m.parse_error_fields(body) for t, body in rest if t == b"E"]
    assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "08006")], rest
