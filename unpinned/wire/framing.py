"""One framing primitive, with PostgreSQL's own limits.

A message is a type byte, a 4-byte length that counts itself, and a body. PostgreSQL
refuses a message longer than its type allows (postgres.c, SocketBackend): a query, a
Parse, a Bind, a FunctionCall and CopyData may be large (up to 1 GB); every other type
is small (10,000 bytes). Startup packets and authentication messages have limits of
their own. The proxy applies the same limits, so a client gets the same FATAL from the
proxy that PostgreSQL would give it, before the proxy holds the bytes.
"""
from __future__ import annotations

from typing import Final

from unpinned.wire.messages import MAX_MESSAGE_LENGTH, ProtocolError, unpack_i32

SMALL_MESSAGE_LIMIT: Final = 10000            # PQ_SMALL_MESSAGE_LIMIT
LARGE_MESSAGE_LIMIT: Final = MAX_MESSAGE_LENGTH   # PQ_LARGE_MESSAGE_LIMIT (1 GB)
STARTUP_PACKET_LIMIT = 10000           # MAX_STARTUP_PACKET_LENGTH
AUTH_MESSAGE_LIMIT = 65535             # PG_MAX_AUTH_TOKEN_LENGTH
LARGE_FRONTEND_TYPES = b"QPBFd"

# The longest length a frontend message of each type may declare (index: the type byte).
FRONTEND_LIMITS: tuple[int, ...] = tuple(LARGE_MESSAGE_LIMIT if t in LARGE_FRONTEND_TYPES else SMALL_MESSAGE_LIMIT
                                         for t in range(256))


class FramingError(ProtocolError):
    """A length no message may have: the connection cannot be read any further."""


def message_end(buf: bytes | bytearray, pos: int, limit: int) -> int | None:
    """Where the typed message starting at `pos` ends, or None while it is incomplete.
    Raises FramingError (08P01) for a length below 4 or above `limit`, as soon as the
    length is there to read."""
    if len(buf) - pos < 5:
        return None
    ln = unpack_i32(buf, pos + 1)[0]
    if ln < 4 or ln > limit:
        raise FramingError("invalid message length")
    end = pos + 1 + ln
    return end if end <= len(buf) else None


def _length(data: bytes, pos: int) -> int:
    """The length of the message at `pos`: its 4 bytes after the type, big-endian. (Compiled,
    plain integer operations; struct's unpack_from returns an untyped tuple that mypyc can only
    handle as Python objects, 10 times the cost.)"""
    return data[pos + 1] << 24 | data[pos + 2] << 16 | data[pos + 3] << 8 | data[pos + 4]


def unnamed_batch(data: bytes) -> tuple[bytes, bool] | None:
    """(query text, whether a Describe is there) when `data` is exactly one extended-protocol
    batch on the unnamed statement and portal, as most drivers send a query: Parse of the
    unnamed statement, Bind of the unnamed portal to it, Describe of a portal or not, Execute of
    the unnamed portal, Sync; each message whole and within its limit. None for anything else
    (the relay's general walk reads it, and answers what is wrong)."""
    n = len(data)
    if n < 7 or data[0] != 80:                                          # Parse
        return None
    ln = _length(data, 0)
    pos = 1 + ln
    if ln < 6 or ln > LARGE_MESSAGE_LIMIT or pos > n or data[5] != 0:
        return None
    qend = data.find(b"\x00", 6, pos)
    if qend < 0 or n - pos < 7 or data[pos] != 66:                      # Bind
        return None
    ln = _length(data, pos)
    if ln < 6 or ln > LARGE_MESSAGE_LIMIT or data[pos + 5] != 0 or data[pos + 6] != 0:
        return None
    pos += 1 + ln
    described = n - pos >= 6 and data[pos] == 68                        # Describe
    if described:
        ln = _length(data, pos)
        if ln < 5 or ln > SMALL_MESSAGE_LIMIT or data[pos + 5] != 80:   # (of a portal)
            return None
        pos += 1 + ln
    if n - pos < 6 or data[pos] != 69:                                  # Execute
        return None
    ln = _length(data, pos)
    if ln < 5 or ln > SMALL_MESSAGE_LIMIT or data[pos + 5] != 0:
        return None
    pos += 1 + ln
    if n - pos != 5 or data[pos] != 83 or _length(data, pos) != 4:      # Sync, last
        return None
    return data[6:qend], described


def query_text(data: bytes) -> bytes | None:
    """The text of the simple Query that `data` is, exactly and whole (type, length, text, its
    terminating zero byte), without that zero byte; None for anything else. The relay's first
    test of a client's read, in one call."""
    n = len(data)
    if n < 6 or data[0] != 81 or 1 + _length(data, 0) != n:
        return None
    return data[5:n - 1]


def answer_types(data: bytes, last: int) -> bytes | None:
    """The type bytes of the messages in data[:last] that answer a request, leaving out those
    that ride along with any answer (DataRow, NoticeResponse, NotificationResponse); None if
    the last message does not end exactly at `last`. For the relay's fast walk of a batch: one
    call reads the headers of a whole answer."""
    types: list[int] = []
    pos = 0
    while pos < last:
        t = data[pos]
        if t != 68 and t != 78 and t != 65:
            types.append(t)
        pos += 1 + _length(data, pos)
    if pos != last:
        return None
    return bytes(types)


def unnamed_answer_completes(data: bytes, last: int, described: bool) -> int:
    """How many CommandComplete (0 or 1) data[:last] holds, when it is all the answer to one
    unnamed_batch (see there) in order: ParseComplete, BindComplete, RowDescription or NoData
    if `described`, then CommandComplete, EmptyQueryResponse or PortalSuspended, with DataRow,
    NoticeResponse and NotificationResponse riding along anywhere; -1 otherwise. answer_types
    and the relay's match of each type to its request in one call, for the commonest batch."""
    step = 0        # answers seen: 0 none, 1 ParseComplete, 2 BindComplete, 3 the Describe's, 4 the Execute's
    completes = 0
    pos = 0
    while pos < last:
        t = data[pos]
        if t == 68 or t == 78 or t == 65:
            pass
        elif step == 0 and t == 49:
            step = 1
        elif step == 1 and t == 50:
            step = 2 if described else 3
        elif step == 2 and (t == 84 or t == 110):
            step = 3
        elif step == 3 and (t == 67 or t == 73 or t == 115):
            step = 4
            if t == 67:
                completes = 1
        else:
            return -1
        pos += 1 + _length(data, pos)
    return completes if pos == last and step == 4 else -1


def query_answer_completes(data: bytes, last: int) -> int:
    """How many CommandComplete data[:last] holds, when it is all an answer to a simple Query
    without surprises (RowDescription, DataRow, CommandComplete, EmptyQueryResponse,
    NoticeResponse, NotificationResponse) ending exactly at `last`; -1 otherwise (an error, a
    parameter report, COPY, ...: the relay's general walk reads it)."""
    completes = 0
    pos = 0
    while pos < last:
        t = data[pos]
        if t == 67:
            completes += 1
        elif t != 68 and t != 84 and t != 73 and t != 78 and t != 65:
            return -1
        pos += 1 + _length(data, pos)
    return completes if pos == last else -1


def packet_end(buf: bytes | bytearray, limit: int = STARTUP_PACKET_LIMIT) -> int | None:
    """The same for an untyped startup-phase packet (its length counts itself, minimum 8)."""
    if len(buf) < 4:
        return None
    ln = unpack_i32(buf, 0)[0]
    if ln < 8 or ln > limit:
        raise FramingError("invalid length of startup packet")
    return ln if ln <= len(buf) else None
