"""The client's bytes that are not a whole message yet: held in linear time while small,
streamed to the server as they arrive when large.

A message up to the relay's buffer limit (`[proxy] max_client_message_buffer`) is held as
a list of reads, joined once when it is complete (re-concatenating on every read made a
100 MB query quadratic). A larger one is forwarded piece by piece as it arrives, so a
client's memory in the proxy stays within the limit whatever it sends; the relay decides
what to do with it from its first bytes (`HEAD` of them: the names of a Bind or a Parse)
and, for a statement text, from the pre-check run over every piece (sql/classifier.py
EffectScan), which never holds more than a few bytes of it. A text the pre-check cannot
clear is not guessed at: it counts as unparsed, which pins.

The length check comes first, as soon as the length is there to read: a type that
PostgreSQL limits to 10,000 bytes and declares more is a FATAL 08P01 at once, with no
byte of its body awaited (wire/framing.py).
"""
from __future__ import annotations

from unpinned.sql.classifier import EffectScan
from unpinned.wire import messages as m
from unpinned.wire.framing import FRONTEND_LIMITS, FramingError

DEFAULT_BUFFER_LIMIT = 1024 * 1024     # bytes of one message the relay holds; more is streamed
MIN_BUFFER_LIMIT = 16384 + 5           # a statement up to RDS's 16 KB limit is always held whole
HEAD = 4096                            # bytes of a streamed message read before deciding on it
PREFIX_KEPT = 200                      # bytes of a streamed statement's text kept for the pin log

_unpack_i32 = m.unpack_i32


class Held:
    """An incomplete message (or the head of one about to be streamed), as the reads came."""

    __slots__ = ("chunks", "have", "need")
    streaming = False           # nothing of it reached the server yet

    def __init__(self, first: bytes, need: int):
        self.chunks = [first]
        self.have = len(first)
        self.need = need            # bytes to reach before the walk can go on

    def feed(self, relay, data: bytes) -> tuple[bytes, bytes]:
        """(bytes for the server now, bytes for the relay's walk)."""
        self.chunks.append(data)
        self.have += len(data)
        if self.have < self.need:
            return b"", b""
        relay.cin = None
        return b"", b"".join(self.chunks)


class Streaming:
    """A message larger than the limit, passing through: only its count of bytes still to
    come, and the pre-check's state for a statement text, stay here."""

    __slots__ = ("remaining", "scan", "drop", "done", "prefix", "length")
    streaming = True            # the server has part of it: the connection cannot change hands

    def __init__(self, remaining: int, scan: EffectScan | None, drop: bool, done, prefix: bytes, length: int):
        self.remaining = remaining
        self.scan = scan
        self.drop = drop            # the server must not see it (skipped up to a Sync)
        self.done = done            # called with this object once the last byte went through
        self.prefix = prefix
        self.length = length        # of the statement text (or the whole body)

    def feed(self, relay, data: bytes) -> tuple[bytes, bytes]:
        rest = b""
        if len(data) >= self.remaining:
            data, rest = data[:self.remaining], data[self.remaining:]
        self.remaining -= len(data)
        if self.scan is not None:
            self.scan.feed(data, final=not self.remaining)
        if not self.remaining:
            relay.cin = None
            if self.done is not None:
                self.done(self)
        return (b"" if self.drop else data), rest


def partial(relay, data: bytes, pos: int) -> bytes:
    """The walk stopped at `pos` in the middle of a message: hold or start streaming it.
    Returns what may go to the server now."""
    t = data[pos]
    if t not in m.FRONTEND_TYPES:
        raise m.ProtocolError(f"invalid frontend message type {t}")
    have = len(data) - pos
    if have < 5:
        relay.cin = Held(data[pos:], 5)
        return b""
    ln = _unpack_i32(data, pos + 1)[0]
    if ln < 4 or ln > FRONTEND_LIMITS[t]:
        raise FramingError("invalid message length")
    total = 1 + ln
    if ln - 4 <= relay.buffer_limit:
        relay.cin = Held(data[pos:], total)
        return b""
    head = min(total, 5 + HEAD)
    if have < head:
        relay.cin = Held(data[pos:], head)
        return b""
    out = relay.stream_start(t, data, pos, total)
    if out is None:
        # Not one the relay can pass through (a named Parse: the proxy keeps its text to
        # prepare it on other server connections): held whole, as PostgreSQL's limit allows.
        relay.cin = Held(data[pos:], total)
        return b""
    return out


def start(relay, data: bytes, pos: int, total: int, scan_from: int | None, drop: bool, done) -> bytes:
    """Stream the message at `pos` (of `total` bytes): what goes to the server now is
    data[pos:], unless `drop`. `scan_from`: where its statement text starts, for the pre-check."""
    scan = None
    prefix = b""
    length = total - 5
    if scan_from is not None:
        scan = EffectScan()
        scan.feed(data[scan_from:])
        prefix = data[scan_from:scan_from + PREFIX_KEPT]
        length = total - (scan_from - pos)
    relay.cin = Streaming(total - (len(data) - pos), scan, drop, done, prefix, length)
    return b"" if drop else data[pos:]
