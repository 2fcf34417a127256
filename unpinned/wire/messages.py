"""PostgreSQL v3 wire protocol: message builders and parsers. Pure, no I/O.

Only what the proxy needs to read or synthesize; everything else is forwarded as bytes.
"""
from __future__ import annotations

import struct

_I32 = struct.Struct("!I")
_II = struct.Struct("!II")
_H = struct.Struct("!H")
pack_i32 = _I32.pack
unpack_i32 = _I32.unpack_from

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
# PostgreSQL itself refuses messages of 1 GB and more.
MAX_MESSAGE_LENGTH = 0x3FFFFFFF

# Frontend message types the proxy looks at.
QUERY, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, FLUSH = b"QPBDECSH"
TERMINATE, FUNCTION_CALL, COPY_DATA, COPY_DONE, COPY_FAIL, PASSWORD = b"XFdcfp"
FRONTEND_TYPES = frozenset(b"QPBDECSHXFdcf")     # after login; 'p' belongs to authentication only
# Backend message types the proxy looks at (some share a byte with a frontend type).
ERROR_RESPONSE, READY_FOR_QUERY, COMMAND_COMPLETE, PARAMETER_STATUS = b"EZCS"
NOTICE_RESPONSE, NOTIFICATION_RESPONSE, DATA_ROW, ROW_DESCRIPTION, EMPTY_QUERY_RESPONSE = b"NADTI"

PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
SYNC_MSG = b"S\x00\x00\x00\x04"
TERMINATE_MSG = b"X\x00\x00\x00\x04"
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
SSL_REFUSED = b"N"
SSL_ACCEPTED = b"S"
READY_IDLE = b"Z\x00\x00\x00\x05I"


class ProtocolError(Exception):
    """The peer sent bytes that are not valid protocol; the connection must close."""

    def __init__(self, message: str, sqlstate: str = "08P01"):
        super().__init__(message)
        self.sqlstate = sqlstate


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    return type_byte + pack_i32(len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\x00"


def read_cstr(buf: bytes | memoryview, pos: int) -> tuple[bytes, int]:
    end = bytes(buf).index(b"\x00", pos) if isinstance(buf, memoryview) else buf.index(b"\x00", pos)
    return bytes(buf[pos:end]), end + 1


# ---------------------------------------------------------------- backend messages

def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", pack_i32(code) + data)


def auth_md5(salt: bytes) -> bytes:
    return auth_request(5, salt)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return auth_request(10, b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return auth_request(11, data)


def auth_sasl_final(data: bytes) -> bytes:
    return auth_request(12, data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", _II.pack(pid, secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def negotiate_protocol_version(minor: int, unsupported: list[str]) -> bytes:
    return message(b"v", pack_i32(minor) + pack_i32(len(unsupported)) + b"".join(cstr(o) for o in unsupported))


def _fields(severity: str, code: str, text: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(code), b"M", cstr(text)]
    if detail:
        parts += [b"D", cstr(detail)]
    if hint:
        parts += [b"H", cstr(hint)]
    parts.append(b"\x00")
    return b"".join(parts)


def error_response(code: str, text: str, *, severity: str = "ERROR", detail: str | None = None,
                   hint: str | None = None) -> bytes:
    return message(b"E", _fields(severity, code, text, detail, hint))


def fatal(code: str, text: str, **kw) -> bytes:
    return error_response(code, text, severity="FATAL", **kw)


def notice_response(text: str, *, code: str = "01000", severity: str = "WARNING",
                    detail: str | None = None) -> bytes:
    return message(b"N", _fields(severity, code, text, detail, None))


def row_description(columns: list[str]) -> bytes:
    # Every column as text (oid 25), so psql and drivers print what we send.
    body = [struct.pack("!H", len(columns))]
    for name in columns:
        body.append(cstr(name) + struct.pack("!IHIhih", 0, 0, 25, -1, -1, 0))
    return message(b"T", b"".join(body))


def data_row(values: list[object]) -> bytes:
    body = [struct.pack("!H", len(values))]
    for v in values:
        if v is None:
            body.append(struct.pack("!i", -1))
        else:
            b = str(v).encode()
            body.append(pack_i32(len(b)) + b)
    return message(b"D", b"".join(body))


# ---------------------------------------------------------------- frontend messages

def startup_message(params: dict[str, str]) -> bytes:
    body = pack_i32(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return pack_i32(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return pack_i32(16) + pack_i32(CANCEL_REQUEST) + _II.pack(pid, secret)


def query(sql: str | bytes) -> bytes:
    return message(b"Q", cstr(sql))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + pack_i32(len(data)) + data)


def close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\x00")


# ---------------------------------------------------------------- parsers

def first_request_end(data: bytes) -> int | None:
    """Where the first request that PostgreSQL answers with ReadyForQuery (a Query, a
    FunctionCall, or an extended batch up to its Sync) ends in `data`; None if not complete."""
    pos, n = 0, len(data)
    while n - pos >= 5:
        end = pos + 1 + unpack_i32(data, pos + 1)[0]
        if end > n:
            return None
        if data[pos] in b"QSF":
            return end
        pos = end
    return None


def parse_startup(body: bytes) -> tuple[int, dict[str, str]]:
    """Body of a startup-phase packet (after the length): (code, params)."""
    if len(body) < 4:
        raise ProtocolError("invalid startup packet length")
    # (Plain integer operations: struct's untyped tuple would make mypyc use Python objects.)
    code = body[0] << 24 | body[1] << 16 | body[2] << 8 | body[3]
    params: dict[str, str] = {}
    if code >> 16 == 3:
        parts = body[4:].split(b"\x00")
        # A well-formed list ends with an empty name; tolerate its absence like PostgreSQL does not.
        if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
            raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
        if len(parts) % 2:      # names and values in pairs (the two final empty strings keep the parity)
            raise ProtocolError("invalid startup packet layout: missing value")
        if len(parts) > 2:      # (not only the terminator: compiled, body[4:-2] of 5 bytes fails)
            try:
                texts = body[4:-2].decode().split("\x00")
            except UnicodeDecodeError:
                raise ProtocolError("invalid startup packet: not UTF-8") from None
            for i in range(0, len(texts) - 1, 2):
                params[texts[i]] = texts[i + 1]
    return code, params


def parse_options(options: str) -> dict[str, str]:
    """The libpq `options` string: `-c name=value` / `--name=value` pairs, backslash escapes spaces."""
    words: list[str] = []
    cur: list[str] = []
    it = iter(options)
    for ch in it:
        if ch == "\\":
            cur.append(next(it, ""))
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif w.startswith("-c"):
            setting = w[2:]
            i += 1
        elif w.startswith("--"):
            setting = w[2:]
            i += 1
        else:
            raise ValueError(f"invalid command-line argument for server process: {w}")
        if "=" not in setting:
            raise ValueError(f"invalid command-line argument for server process: {setting}")
        name, value = setting.split("=", 1)
        out[name.strip().lower().replace("-", "_")] = value
    return out


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body (after the 5-byte header) → {field code: value}."""
    out: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        end = body.find(b"\x00", pos + 1)
        if end < 0:     # a last field without its terminator: taken as it is, not an IndexError
            end = n
        out[code] = body[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return out


def split_parameter_status(body: bytes) -> tuple[str, str]:
    name, _, rest = body.partition(b"\x00")
    value = rest[:-1] if rest.endswith(b"\x00") else rest
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")
