"""One framing primitive, with PostgreSQL's own limits.

A message is a type byte, a 4-byte length that counts itself, and a body. PostgreSQL
refuses a message longer than its type allows (postgres.c, SocketBackend): a query, a
Parse, a Bind, a FunctionCall and CopyData may be large (up to 1 GB); every other type
is small (10,000 bytes). Startup packets and authentication messages have limits of
their own. The proxy applies the same limits, so a client gets the same FATAL from the
proxy that PostgreSQL would give it, before the proxy holds the bytes.
"""
from __future__ import annotations

from unpinned.wire.messages import MAX_MESSAGE_LENGTH, ProtocolError, unpack_i32

SMALL_MESSAGE_LIMIT = 10000            # PQ_SMALL_MESSAGE_LIMIT
LARGE_MESSAGE_LIMIT = MAX_MESSAGE_LENGTH   # PQ_LARGE_MESSAGE_LIMIT (1 GB)
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


def packet_end(buf: bytes | bytearray, limit: int = STARTUP_PACKET_LIMIT) -> int | None:
    """The same for an untyped startup-phase packet (its length counts itself, minimum 8)."""
    if len(buf) < 4:
        return None
    ln = unpack_i32(buf, 0)[0]
    if ln < 8 or ln > limit:
        raise FramingError("invalid length of startup packet")
    return ln if ln <= len(buf) else None
