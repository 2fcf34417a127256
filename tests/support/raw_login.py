"""Logins on a raw socket, for tests that must see every message of the exchange (the
mock exchange for unknown users, tampered SCRAM, the proxy's signature), sent the same way
to PostgreSQL directly and through the proxy so the two can be compared."""
from __future__ import annotations

import hashlib
import socket
import struct
from typing import Callable

import scramp

from unpinned.wire import messages as m

Message = tuple[bytes, bytes]      # (type byte, body)


class MessageReader:
    """Whole backend messages from a socket; every message read is kept in `seen`."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf, self.seen = sock, b"", []

    def read(self) -> Message | None:
        while True:
            if len(self.buf) >= 5:
                ln = struct.unpack_from("!I", self.buf, 1)[0]
                if len(self.buf) >= 1 + ln:
                    msg, self.buf = (self.buf[:1], self.buf[5:1 + ln]), self.buf[1 + ln:]
                    self.seen.append(msg)
                    return msg
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def until_end(self) -> list[Message]:
        """Read up to ErrorResponse, ReadyForQuery or the end of the connection."""
        while (msg := self.read()) is not None and msg[0] not in (b"E", b"Z"):
            pass
        return self.seen


def scram_exchange(port: int, user: str, password: str,
                   first: Callable[[str], str] | None = None,
                   final: Callable[[str, str], str] | None = None) -> list[Message]:
    """A SCRAM login (PostgreSQL ignores the user name inside SCRAM). `first`/`final` may
    rewrite the client-first/-final text. Checks the server's signature when it comes.
    Returns every message received until ErrorResponse, ReadyForQuery or the end."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = MessageReader(s)
    try:
        s.sendall(m.startup_message({"user": user, "database": "postgres"}))
        client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
        while (msg := reader.read()) is not None:
            t, body = msg
            if t in (b"E", b"Z"):
                break
            code = struct.unpack("!I", body[:4])[0] if t == b"R" else None
            if code == 10:
                assert b"SCRAM-SHA-256\x00" in body[4:]
                text = client.get_client_first()
                s.sendall(m.sasl_initial_response("SCRAM-SHA-256", (first(text) if first else text).encode()))
            elif code == 11:
                server_first = body[4:].decode()
                client.set_server_first(server_first)
                text = client.get_client_final()
                s.sendall(m.password_message((final(text, server_first) if final else text).encode()))
            elif code == 12:
                client.set_server_final(body[4:].decode())   # raises unless the signature is right
        return reader.seen
    finally:
        s.close()


def md5_exchange(port: int, user: str, password: str) -> list[Message]:
    """An md5 login; returns every message received until ErrorResponse, ReadyForQuery or the end."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = MessageReader(s)
    try:
        s.sendall(m.startup_message({"user": user, "database": "postgres"}))
        t, body = reader.read() or (b"", b"")
        if t == b"R" and body[:4] == struct.pack("!I", 5):
            inner = hashlib.md5((password + user).encode()).hexdigest()
            s.sendall(m.password_message(m.cstr("md5" + hashlib.md5(inner.encode() + body[4:8]).hexdigest())))
            reader.until_end()
        return reader.seen
    finally:
        s.close()
