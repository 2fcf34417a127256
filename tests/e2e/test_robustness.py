"""Bad clients on raw sockets: garbage, huge lengths, unknown messages, unsupported startups.

Each bad client gets a FATAL (or is simply closed), quickly; the proxy keeps serving, and a
well-behaved psycopg2 client connected through the same proxy before the bad one, holding an
open transaction on its server connection, carries on untouched.
"""
from __future__ import annotations

import socket
import struct
import time

import psycopg
import psycopg2
import pytest

from conftest import SUPERUSER_PASSWORD, start_proxy
from unpinned.wire import messages as m

pytestmark = pytest.mark.timeout(60)

RDS_OPTIONS_TEXT = "Feature not supported: RDS Proxy currently doesn't support command-line options."


# ---------------------------------------------------------------- raw-socket client

class Raw:
    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_bytes(self, n: int) -> bytes:
        while len(self.buf) < n and self._fill():
            pass
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_message(self) -> tuple[bytes, bytes] | None:
        """One backend message, or None at end of stream."""
        while True:
            if len(self.buf) >= 5:
                ln = struct.unpack_from("!I", self.buf, 1)[0]
                if len(self.buf) >= 1 + ln:
                    t, body = self.buf[:1], self.buf[5:1 + ln]
                    self.buf = self.buf[1 + ln:]
                    return t, body
            if not self._fill():
                return None

    def read_until(self, types: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)
            if msg[0] in [bytes([t]) for t in types]:
                return out

    def expect_fatal(self, code: str | None = None) -> dict[str, str]:
        """Read to the end: there must be a FATAL ErrorResponse, then the connection closes."""
        msgs = []
        while (msg := self.read_message()) is not None:
            msgs.append(msg)
        assert self.eof, "the proxy did not close the connection"
        errors = [m.parse_error_fields(body) for t, body in msgs if t == b"E"]
        assert errors, f"no ErrorResponse, got {[t for t, _ in msgs]}"
        fields = errors[-1]
        assert fields["S"] == "FATAL", fields
        if code is not None:
            assert fields["C"] == code, fields
        return fields

    def expect_closed(self) -> list[tuple[bytes, bytes]]:
        msgs = []
        while (msg := self.read_message()) is not None:
            msgs.append(msg)
        assert self.eof
        return msgs

    def login(self, user: str = "postgres", database: str = "postgres", **params: str) -> list:
        self.send(m.startup_message({"user": user, "database": database, **params}))
        msgs = self.read_until(b"ZE")
        assert msgs and msgs[-1][0] == b"Z", msgs
        assert (b"R", struct.pack("!I", 0)) in msgs
        return msgs

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(m.query(sql))
        return self.read_until(b"Z")

    def close(self) -> None:
        self.sock.close()


def startup_packet(code: int, payload: bytes = b"") -> bytes:
    body = struct.pack("!I", code) + payload
    return struct.pack("!I", len(body) + 4) + body


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tproxy(pg, users_file):
    """A trust-mode proxy (raw clients log in without a password exchange), pool of 4."""
    handle = start_proxy(pg, users_file, auth="trust", pool_size=4)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def bystander(request):
    """A psycopg2 client with an open transaction, connected before the bad client: it must not notice."""
    if "tproxy" not in request.fixturenames:
        yield None
        return
    handle = request.getfixturevalue("tproxy")
    conn = psycopg2.connect(**handle.kwargs())
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid(), txid_current()")
    before = cur.fetchone()
    yield conn
    cur.execute("SELECT pg_backend_pid(), txid_current()")
    assert cur.fetchone() == before, "the bystander's transaction or server connection changed"
    conn.commit()
    cur.execute("SELECT 40 + 2")
    assert cur.fetchone() == (42,)
    conn.close()
    # The proxy still serves new clients.
    conn = psycopg2.connect(**handle.kwargs())
    conn.cursor().execute("SELECT 1")
    conn.close()
    raw = Raw(handle.port)
    raw.login()
    assert raw.query("SELECT 1")[-1] == (b"Z", b"I")
    raw.close()


# ---------------------------------------------------------------- startup phase

@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,    # a TLS ClientHello
    b"\x00\x00\x00\x08\x00\x00\x00\x00",                                 # protocol 0.0
    b"\x00\x00\x00\x03",                                                  # length below the minimum
    b"\x00\x00\x00\x10" + b"\xff" * 12,                                  # unknown request code
])
def test_garbage_startup_packet(tproxy, garbage):
    raw = Raw(tproxy.port)
    raw.send(garbage)
    msgs = raw.expect_closed()
    for t, body in msgs:
        assert t == b"E" and m.parse_error_fields(body)["S"] == "FATAL", msgs


def test_garbage_after_login_is_fatal_08P01(tproxy):
    raw = Raw(tproxy.port)
    raw.login()
    assert raw.query("SELECT 1")[-1] == (b"Z", b"I")
    raw.send(b"this is not the protocol\x00\x01\x02" * 4)
    fields = raw.expect_fatal("08P01")
    assert fields["M"]


@pytest.mark.parametrize("message", [
    m.message(b"P", b"\x00SELECT 1"),                                # unnamed Parse, text not ended
    m.message(b"P", b"no terminating zero byte"),                   # named Parse, nothing ended
    m.message(b"B", b"\x00no statement end"),                        # Bind, statement name not ended
    m.message(b"E", b"portal"),                                      # Execute, portal not ended
    m.message(b"D", b""),                                            # Describe without its kind
    m.message(b"P", b""),                                            # Parse with nothing at all
])
def test_malformed_message_body_gets_08P01_and_the_client_goes_on(tproxy, message):
    # PostgreSQL answers these with ERROR 08P01 and goes on; so does the proxy.
    raw = Raw(tproxy.port)
    raw.login()
    assert raw.query("SELECT 1")[-1] == (b"Z", b"I")
    raw.send(message + m.SYNC_MSG)
    msgs = raw.read_until(b"Z")
    errors = [m.parse_error_fields(body) for t, body in msgs if t == b"E"]
    assert [e["C"] for e in errors] == ["08P01"] and errors[0]["S"] == "ERROR", msgs
    assert raw.query("SELECT 41 + 1")[-2:] == [(b"C", b"SELECT 1\x00"), (b"Z", b"I")]


def test_malformed_message_the_proxy_cannot_read_is_fatal_08P01(tproxy):
    # A Bind whose statement name runs to the end of everything sent: the proxy cannot tell
    # which statement it names, so it ends the connection, as PostgreSQL does when it
    # cannot make sense of a message.
    raw = Raw(tproxy.port)
    raw.login()
    assert raw.query("SELECT 1")[-1] == (b"Z", b"I")
    raw.send(m.message(b"B", b"\x00name"))
    assert raw.expect_fatal("08P01")["M"] == "invalid message format"


def test_garbage_with_plausible_length_after_login_is_fatal_quickly(tproxy):
    # Type byte 0x00 is no frontend message; PostgreSQL says so before reading any body.
    raw = Raw(tproxy.port)
    raw.login()
    start = time.monotonic()
    raw.send(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    raw.expect_fatal("08P01")
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("phase", ["startup", "password", "query"])
def test_two_gigabyte_length_is_fatal_at_once(pg, users_file, tproxy, phase):
    if phase == "password":
        handle = start_proxy(pg, users_file, auth="scram")   # to be in the password phase
        try:
            raw = Raw(handle.port)
            raw.send(m.startup_message({"user": "app", "database": "postgres"}))
            t, body = raw.read_message()
            assert t == b"R" and struct.unpack("!I", body[:4])[0] == 10   # SASL
            start = time.monotonic()
            raw.send(b"p" + struct.pack("!I", 0x80000000))
            raw.expect_fatal("08P01")
            assert time.monotonic() - start < 3
        finally:
            handle.stop()
        return
    raw = Raw(tproxy.port)
    if phase == "startup":
        header = struct.pack("!I", 0x80000000) + struct.pack("!I", m.PROTOCOL_3_0)
    else:
        raw.login()
        header = b"Q" + struct.pack("!I", 0x80000000) + b"SELECT "
    start = time.monotonic()
    raw.send(header)
    raw.expect_fatal("08P01")
    assert time.monotonic() - start < 3


def test_unknown_message_type_after_login(tproxy):
    raw = Raw(tproxy.port)
    raw.login()
    raw.send(m.message(b"!", b"what is this\x00"))
    fields = raw.expect_fatal("08P01")
    assert "33" in fields["M"] or "type" in fields["M"]


def test_unknown_message_type_between_good_ones(tproxy):
    raw = Raw(tproxy.port)
    raw.login()
    raw.send(m.query("SELECT 1") + m.message(b"~", b""))
    raw.expect_fatal("08P01")


def test_password_message_after_login_is_a_protocol_error(tproxy):
    # 'p' is valid only during authentication.
    raw = Raw(tproxy.port)
    raw.login()
    raw.send(m.password_message(b"letmein\x00"))
    raw.expect_fatal("08P01")
    # The pool did not lose a server connection to it.
    assert tproxy.server_count(user="postgres") >= 1


@pytest.mark.parametrize("major, minor", [(2, 0), (1, 0), (4, 0)])
def test_other_protocol_versions_are_fatal_0A000(tproxy, major, minor):
    raw = Raw(tproxy.port)
    raw.send(startup_packet((major << 16) | minor, b"user\x00postgres\x00\x00"))
    fields = raw.expect_fatal("0A000")
    assert f"{major}.{minor}" in fields["M"]


def test_protocol_3_2_is_negotiated_down(tproxy):
    raw = Raw(tproxy.port)
    raw.send(startup_packet((3 << 16) | 2, b"user\x00postgres\x00database\x00postgres\x00_pq_.x\x00y\x00\x00"))
    msgs = raw.read_until(b"ZE")
    assert msgs[0][0] == b"v"
    minor, n = struct.unpack_from("!II", msgs[0][1])
    assert (minor, n) == (0, 1) and b"_pq_.x" in msgs[0][1]
    assert msgs[-1] == (b"Z", b"I")
    assert raw.query("SELECT 1")[-1] == (b"Z", b"I")


@pytest.mark.parametrize("value", ["database", "true", "on", "1"])
def test_replication_startup_is_fatal_0A000(tproxy, value):
    raw = Raw(tproxy.port)
    raw.send(m.startup_message({"user": "postgres", "database": "postgres", "replication": value}))
    raw.expect_fatal("0A000")


def test_replication_false_is_a_normal_connection(tproxy):
    raw = Raw(tproxy.port)
    raw.login(replication="false")
    assert raw.query("SELECT 1")[-1] == (b"Z", b"I")


def test_ssl_request_refused_then_normal_startup(tproxy):
    raw = Raw(tproxy.port)
    raw.send(startup_packet(m.SSL_REQUEST))
    assert raw.read_bytes(1) == b"N"
    raw.login()
    rows = raw.query("SELECT 'plain'")
    assert (b"Z", b"I") == rows[-1]
    assert any(t == b"D" and b"plain" in body for t, body in rows)


def test_gssenc_request_refused_then_ssl_then_startup(tproxy):
    raw = Raw(tproxy.port)
    raw.send(startup_packet(m.GSSENC_REQUEST))
    assert raw.read_bytes(1) == b"N"
    raw.send(startup_packet(m.SSL_REQUEST))
    assert raw.read_bytes(1) == b"N"
    raw.login()
    assert raw.query("SELECT 1")[-1] == (b"Z", b"I")


def test_psycopg2_with_sslmode_prefer_falls_back(tproxy):
    conn = psycopg2.connect(**tproxy.kwargs(), sslmode="prefer")
    cur = conn.cursor()
    cur.execute("SELECT 1")
    assert cur.fetchone() == (1,)
    conn.close()


def test_startup_without_user_is_fatal_28000(tproxy):
    raw = Raw(tproxy.port)
    raw.send(m.startup_message({"database": "postgres"}))
    fields = raw.expect_fatal("28000")
    assert "user" in fields["M"]


def test_startup_with_empty_user_is_fatal_28000(tproxy):
    raw = Raw(tproxy.port)
    raw.send(m.startup_message({"user": "", "database": "postgres"}))
    raw.expect_fatal("28000")


def test_connect_and_close_without_a_byte(tproxy):
    clients_before = len(tproxy.proxy.clients)
    for _ in range(20):
        Raw(tproxy.port).close()
    deadline = time.monotonic() + 5
    while len(tproxy.proxy.clients) > clients_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(tproxy.proxy.clients) <= clients_before


@pytest.mark.parametrize("fragment", [
    b"\x00\x00",                                                   # half a length word
    m.startup_message({"user": "postgres", "database": "postgres"})[:-7],   # half a startup packet
])
def test_half_a_startup_packet_then_close(tproxy, fragment):
    for _ in range(5):
        raw = Raw(tproxy.port)
        raw.send(fragment)
        raw.close()


def test_half_a_message_after_login_then_close(tproxy):
    servers = tproxy.server_count(user="postgres")
    for cut in (1, 3, 5, 9):
        raw = Raw(tproxy.port)
        raw.login()
        raw.send(m.query("SELECT pg_sleep(0)")[:cut])
        raw.close()
    # Half a message never reached a server: no server connection was lost or leaked.
    time.sleep(0.2)
    assert tproxy.server_count(user="postgres") <= max(servers, 1)
    pool = tproxy.pool(user="postgres")
    assert tproxy.call(lambda: len(pool.busy)) == 0


def _table_exists(handle, name: str) -> bool:
    # As the same user, so the check borrows from the same pool the vanished client used.
    raw = Raw(handle.port)
    raw.login()
    msgs = raw.query(f"SELECT to_regclass('{name}') IS NOT NULL")
    raw.close()
    assert msgs[-1] == (b"Z", b"I"), msgs
    rows = [body for t, body in msgs if t == b"D"]
    assert len(rows) == 1, msgs
    return rows[0].endswith(b"t")


def test_half_an_extended_batch_then_close(tproxy):
    raw = Raw(tproxy.port)
    raw.login()
    # Parse + Bind + Execute (an implicit transaction on the server), Flush, no Sync, then vanish.
    raw.send(m.message(b"P", b"\x00CREATE TABLE robust_half (a int)\x00\x00\x00")
             + m.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
             + m.message(b"E", b"\x00\x00\x00\x00\x00") + m.message(b"H"))
    assert [t for t, _ in raw.read_until(b"C")] == [b"1", b"2", b"C"]
    raw.close()
    time.sleep(0.3)
    # The implicit transaction was never committed: no later client may commit it by accident.
    for _ in range(3):
        assert not _table_exists(tproxy, "robust_half")


def test_extended_batch_with_flush_keeps_its_server_connection(tproxy, bystander):
    # Parse + Flush, then Bind/Execute/Sync later: the unnamed statement lives on one server
    # connection, which must not go to another client in between.
    busy = [psycopg2.connect(**tproxy.kwargs(user="postgres", password=None)) for _ in range(3)]
    try:
        raw = Raw(tproxy.port)
        raw.login()
        raw.send(m.message(b"P", b"\x00SELECT pg_backend_pid()\x00\x00\x00") + m.message(b"H"))
        assert raw.read_message()[0] == b"1"
        for c in busy:   # other clients of the same pool run queries meanwhile
            c.cursor().execute("SELECT 1")
            c.commit()
        raw.send(m.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
                 + m.message(b"E", b"\x00\x00\x00\x00\x00") + m.SYNC_MSG)
        msgs = raw.read_until(b"Z")
        assert [t for t, _ in msgs] == [b"2", b"D", b"C", b"Z"], msgs
        raw.close()
    finally:
        for c in busy:
            c.close()


def test_client_vanishes_mid_transaction(tproxy):
    raw = Raw(tproxy.port)
    raw.login()
    raw.query("BEGIN")
    raw.query("CREATE TABLE robust_mid (a int)")
    raw.close()
    time.sleep(0.3)
    for _ in range(3):
        assert not _table_exists(tproxy, "robust_mid")


def test_many_bad_clients_at_once(tproxy):
    socks = []
    for i in range(30):
        raw = Raw(tproxy.port)
        raw.send([b"\x00\x00", b"GET / HTTP/1.0\r\n\r\n", startup_packet(2 << 16)][i % 3])
        socks.append(raw)
    for raw in socks:
        raw.close()


def test_cancel_request_with_unknown_key_is_harmless(tproxy):
    raw = Raw(tproxy.port)
    raw.send(m.cancel_request(12345, 67890))
    assert raw.expect_closed() == []


# ---------------------------------------------------------------- rds mode

def test_rds_mode_rejects_options_like_rds_proxy(make_proxy):
    handle = make_proxy(mode="rds", auth="trust")
    with pytest.raises(psycopg2.OperationalError) as ei:
        psycopg2.connect(**handle.kwargs(user="postgres", password=None), options="-c statement_timeout=5000")
    assert RDS_OPTIONS_TEXT in str(ei.value)
    raw = Raw(handle.port)
    raw.send(m.startup_message({"user": "postgres", "database": "postgres", "options": "-c statement_timeout=5000"}))
    fields = raw.expect_fatal("0A000")
    assert fields["M"] == RDS_OPTIONS_TEXT
    # Without options the same client gets in.
    conn = psycopg2.connect(**handle.kwargs(user="postgres", password=None))
    conn.close()


def test_rds_mode_replication_and_version_wording(make_proxy):
    handle = make_proxy(mode="rds", auth="trust")
    raw = Raw(handle.port)
    raw.send(m.startup_message({"user": "postgres", "database": "postgres", "replication": "database"}))
    assert "RDS Proxy" in raw.expect_fatal("0A000")["M"]
    raw = Raw(handle.port)
    raw.send(startup_packet(2 << 16, b"user\x00postgres\x00\x00"))
    assert "RDS Proxy" in raw.expect_fatal("0A000")["M"]


def test_smart_mode_accepts_options(tproxy):
    conn = psycopg2.connect(**tproxy.kwargs(user="postgres", password=None), options="-c statement_timeout=5000")
    cur = conn.cursor()
    cur.execute("SHOW statement_timeout")
    assert cur.fetchone() == ("5s",)
    conn.close()


def test_bad_options_string_is_fatal(tproxy):
    raw = Raw(tproxy.port)
    raw.send(m.startup_message({"user": "postgres", "database": "postgres", "options": "statement_timeout=5"}))
    raw.expect_fatal()


def test_the_superuser_password_is_not_needed_in_trust_mode(tproxy):
    # Sanity for the fixtures above: trust lets the upstream user in with no password exchange.
    raw = Raw(tproxy.port)
    msgs = raw.login()
    assert SUPERUSER_PASSWORD.encode() not in b"".join(body for _, body in msgs)


# ---------------------------------------------------------------- Flush keeps the batch together

def _pipeline_with_fetch_in_the_middle(dsn: str, table: str) -> tuple:
    """psycopg 3 pipeline: a fetch before the end sends Flush (no Sync), so everything up to the
    final Sync is one implicit transaction on one server connection."""
    others = [psycopg.connect(dsn) for _ in range(3)]
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} (a int)")
            with pytest.raises(psycopg.errors.DivisionByZero):
                with conn.pipeline():
                    conn.execute(f"INSERT INTO {table} VALUES (1)")
                    first = conn.execute("SELECT pg_backend_pid(), statement_timestamp() = now()").fetchone()
                    for o in others:      # other clients take server connections meanwhile
                        o.execute("SELECT 1")
                    second = conn.execute("SELECT pg_backend_pid(), now()").fetchone()
                    conn.execute("SELECT 1 / 0")
            for o in others:
                o.rollback()
            count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            conn.execute(f"DROP TABLE {table}")
            return first, second, count
    finally:
        for o in others:
            o.close()


def test_psycopg3_pipeline_with_flush_is_one_transaction_on_one_server_connection(pg, proxy):
    # Control: directly on PostgreSQL, the failing statement rolls back the INSERT.
    first, second, count = _pipeline_with_fetch_in_the_middle(pg.dsn("app", "app-secret"), "robust_pipe_direct")
    assert first[0] == second[0] and count == 0
    first, second, count = _pipeline_with_fetch_in_the_middle(proxy.dsn(), "robust_pipe_proxy")
    assert first[0] == second[0], "the pipeline moved to another server connection after a Flush"
    assert count == 0, "the INSERT before the error was committed"


@pytest.mark.parametrize("sent", [b"", b"\x00\x00\x00\x30\x00\x03"])   # nothing; half a startup packet
def test_a_client_stuck_before_login_is_dropped_after_login_timeout(pg, users_file, sent):
    """A slow or stuck client cannot hold a connection slot forever; others keep working."""
    handle = start_proxy(pg, users_file, auth="trust", pool_size=2, login_timeout=1.0)
    try:
        s = socket.create_connection(("127.0.0.1", handle.port), timeout=10)
        if sent:
            s.sendall(sent)
        t0 = time.monotonic()
        other = psycopg2.connect(**handle.kwargs())       # logs in fine meanwhile
        other.cursor().execute("SELECT 1")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert 0.5 < time.monotonic() - t0 < 5
        assert data[:1] == b"E"
        fields = m.parse_error_fields(data[5:])
        assert fields["C"] == "08P01" and fields["M"] == "timeout during login"
        other.cursor().execute("SELECT 2")   # the other client was not touched
        other.close()
        s.close()
    finally:
        handle.stop()
