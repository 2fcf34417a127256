"""A tiny PostgreSQL v3 client for the benchmark, written for it.

Only what the bench needs: a startup handshake with trust authentication, one simple
Query whose result is counted in bytes and thrown away, and many idle connections opened
from one asyncio loop. It is not a driver: a fast client keeps the client's own cost out
of the large-result and idle-connection figures.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import Counter

PROTOCOL_3 = 196608
READY_IDLE = b"Z\x00\x00\x00\x05I"


class WireError(Exception):
    pass


def startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!I", PROTOCOL_3)
    for k, v in (("user", user), ("database", database), ("application_name", "unpinned-bench")):
        body += k.encode() + b"\x00" + v.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def error_text(payload: bytes) -> str:
    """The M (message) and C (SQLSTATE) fields of an ErrorResponse."""
    fields = {}
    for part in payload.split(b"\x00"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return f"{fields.get(b'M', '?')} ({fields.get(b'C', '?')})"


class Conn:
    """One blocking connection, logged in with trust authentication."""

    def __init__(self, host: str, port: int, user: str = "postgres", database: str = "postgres",
                 timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        try:
            self.sock.sendall(startup_packet(user, database))
            self._until_ready()
        except BaseException:
            self.sock.close()
            raise

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise WireError("connection closed by the server")
        self._buf += data

    def _message(self) -> tuple[bytes, bytes]:
        while len(self._buf) < 5:
            self._fill()
        n = struct.unpack_from("!I", self._buf, 1)[0]
        while len(self._buf) < 1 + n:
            self._fill()
        kind, payload = bytes(self._buf[:1]), bytes(self._buf[5:1 + n])
        del self._buf[:1 + n]
        return kind, payload

    def _until_ready(self) -> list[tuple[bytes, bytes]]:
        out, error = [], None
        while True:
            kind, payload = self._message()
            if kind == b"R":
                code = struct.unpack_from("!I", payload)[0]
                if code != 0:
                    raise WireError(f"the server asks for authentication (code {code}); the bench needs trust")
            elif kind == b"E":
                error = error_text(payload)
            elif kind == b"Z":
                if error:
                    raise WireError(error)
                return out
            else:
                out.append((kind, payload))

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        """A small simple Query: every message up to ReadyForQuery."""
        data = sql.encode() + b"\x00"
        self.sock.sendall(b"Q" + struct.pack("!I", len(data) + 4) + data)
        return self._until_ready()

    def stream(self, sql: str, tag: str) -> tuple[int, float]:
        """Run a large simple Query and discard the result: (bytes received, seconds).

        Rows are not parsed: the stream ends with CommandComplete(tag) + ReadyForQuery,
        a suffix the text of these results cannot contain, so looking at the tail is enough.
        """
        data = sql.encode() + b"\x00"
        t = tag.encode() + b"\x00"
        expected = b"C" + struct.pack("!I", len(t) + 4) + t + READY_IDLE
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        total, tail, first = 0, b"", b""
        start = time.perf_counter()
        self.sock.sendall(b"Q" + struct.pack("!I", len(data) + 4) + data)
        while True:
            n = self.sock.recv_into(buf)
            if n == 0:
                raise WireError("connection closed by the server mid-result")
            if not first:
                first = bytes(view[:min(n, 4096)])
            total += n
            tail = (tail + bytes(view[max(0, n - 64):n]))[-64:]
            if tail.endswith(expected):
                return total, time.perf_counter() - start
            if first[:1] == b"E" and tail.endswith(READY_IDLE):
                raise WireError(error_text(first[5:]))

    def close(self) -> None:
        try:
            self.sock.sendall(b"X\x00\x00\x00\x04")
        except OSError:
            pass
        self.sock.close()


def wait_ready(host: str, port: int, timeout: float, alive=lambda: True) -> None:
    """Until a trust login and SELECT 1 succeed at host:port (through a proxy: a whole round trip)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise WireError(f"the process behind {host}:{port} exited")
        try:
            c = Conn(host, port, timeout=5.0)
            try:
                c.query("SELECT 1")
            finally:
                c.close()
            return
        except (OSError, WireError) as e:
            last = e
            time.sleep(0.1)
    raise WireError(f"{host}:{port} not ready after {timeout:.0f}s: {last}")


# --------------------------------------------------------------------------- idle clients

class _Idle(asyncio.Protocol):
    """Logs in and then stays idle: ReadyForQuery resolves `done`."""

    def __init__(self, packet: bytes, done: asyncio.Future) -> None:
        self.packet, self.done, self.buf = packet, done, bytearray()

    def connection_made(self, transport) -> None:
        transport.write(self.packet)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self.buf += data
        while len(self.buf) >= 5:
            n = struct.unpack_from("!I", self.buf, 1)[0]
            if len(self.buf) < 1 + n:
                return
            kind, payload = bytes(self.buf[:1]), bytes(self.buf[5:1 + n])
            del self.buf[:1 + n]
            if kind == b"E":
                self.done.set_exception(WireError(error_text(payload)))
                return
            if kind == b"R" and struct.unpack_from("!I", payload)[0] != 0:
                self.done.set_exception(WireError("authentication requested"))
                return
            if kind == b"Z":
                self.buf = bytearray()
                self.done.set_result(True)
                return

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(WireError(f"closed during login: {exc}"))


async def open_idle(host: str, port: int, count: int, *, concurrency: int = 50,
                    timeout: float = 30.0) -> tuple[list, Counter]:
    """Open `count` logged-in idle connections: (transports, failures by message)."""
    loop = asyncio.get_running_loop()
    packet = startup_packet("postgres", "postgres")
    sem = asyncio.Semaphore(concurrency)
    failures: Counter = Counter()

    async def one():
        async with sem:
            done = loop.create_future()
            transport = None
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Idle(packet, done), host, port), timeout)
                await asyncio.wait_for(done, timeout)
                return transport
            except (OSError, WireError, asyncio.TimeoutError) as e:
                failures[f"{type(e).__name__}: {e}"[:120]] += 1
                if transport is not None:
                    transport.close()
                return None

    results = await asyncio.gather(*(one() for _ in range(count)))
    return [t for t in results if t is not None], failures
