"""Logging a client in (frontend/login.py) without sockets: a startup packet seen before is
parsed once, and every login with it is still checked as the first one was."""
from __future__ import annotations

import struct

import trustme

from unpinned.config import load
from unpinned.frontend.login import Login
from unpinned.frontend.shared import Shared
from unpinned.telemetry.pinlog import PinLog
from unpinned.wire import messages as m


class _Transport:
    def __init__(self):
        self.written = b""
        self.closed = False
        self.protocol = None

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written += data

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def close(self) -> None:
        self.closed = True


def _packet(**params: str) -> bytes:
    body = struct.pack("!i", 3 << 16) + b"".join(k.encode() + b"\x00" + v.encode() + b"\x00"
                                                  for k, v in params.items()) + b"\x00"
    return struct.pack("!i", len(body) + 4) + body


def _shared(**config) -> Shared:
    shared = Shared(load(None, auth="trust", **config), None, PinLog(None))
    # What the pool learnt from its first server connection (the login answer's ParameterStatus).
    pool = shared.pool_for("shop", "app")
    pool.login_messages[frozenset({"application_name": "billing"}.items())] = \
        m.AUTH_OK + m.parameter_status("application_name", "billing")
    return shared


def _log_in(shared: Shared, packet: bytes, pieces: int = 1) -> tuple[Login, _Transport]:
    client, transport = Login(shared), _Transport()
    client.connection_made(transport)
    step = -(-len(packet) // pieces)
    for i in range(0, len(packet), step):
        client.data_received(packet[i:i + step])
    return client, transport


def _error_fields(data: bytes) -> dict[str, str]:
    assert data[:1] == b"E", data
    return {f[:1]: f[1:] for f in data[5:].decode().split("\x00") if f}


PACKET = _packet(user="app", database="shop", application_name="billing")


def test_logins_with_one_startup_packet_each_get_their_own_session():
    shared = _shared()
    first, t1 = _log_in(shared, PACKET)
    second, t2 = _log_in(shared, PACKET)
    third, t3 = _log_in(shared, PACKET, pieces=3)       # split over reads
    for client, transport in ((first, t1), (second, t2), (third, t3)):
        assert client.active and not transport.closed
        assert (client.user, client.database, client.application_name) == ("app", "shop", "billing")
        assert transport.written.startswith(m.AUTH_OK + m.parameter_status("application_name", "billing"))
        assert transport.written.endswith(m.READY_IDLE)
    # BackendKeyData: each its own cancel key, which routes to it.
    keys = {struct.unpack_from("!II", t.written, t.written.index(b"K\x00\x00\x00\x0c") + 5) for t in (t1, t2, t3)}
    assert len(keys) == 3 and all(shared.by_key[k].key == k for k in keys)
    # A SET in one session changes neither the next login's startup values nor another session's.
    first.relay.session.params["application_name"] = "changed"
    fourth, _ = _log_in(shared, PACKET)
    assert fourth.relay.session.startup == fourth.relay.session.params == {"application_name": "billing"}
    assert second.relay.session.params == {"application_name": "billing"}


def test_a_known_startup_packet_is_still_refused_without_tls_when_tls_is_required(tmp_path):
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    _log_in(_shared(), PACKET)      # known now
    client, transport = _log_in(_shared(require_tls=True, tls_cert_file=str(tmp_path / "cert.pem"),
                                        tls_key_file=str(tmp_path / "key.pem")), PACKET)
    fields = _error_fields(transport.written)
    assert (fields["S"], fields["C"]) == ("FATAL", "28000") and "requires TLS" in fields["M"]
    assert transport.closed and not client.active


def test_a_known_startup_packet_is_still_counted_against_max_client_connections():
    _log_in(_shared(), PACKET)
    shared = _shared(max_client_connections=1)
    _log_in(shared, PACKET)
    client, transport = _log_in(shared, PACKET)
    fields = _error_fields(transport.written)
    assert fields["C"] == "53300" and "maximum number of client connections" in fields["M"]
    assert transport.closed and not client.active


def test_a_startup_packet_with_options_is_read_at_every_login():
    packet = _packet(user="app", database="shop", application_name="billing", options="-c search_path=shop")
    shared = _shared()
    shared.pool_for("shop", "app").login_messages[
        frozenset({"application_name": "billing", "search_path": "shop"}.items())] = m.AUTH_OK
    for _ in range(2):
        client, transport = _log_in(shared, packet)
        assert client.active and client.relay.session.startup == {"application_name": "billing", "search_path": "shop"}
    client, transport = _log_in(_shared(mode="rds"), packet)
    assert _error_fields(transport.written)["C"] == "0A000"     # RDS Proxy refuses options
