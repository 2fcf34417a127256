"""Fuzz targets over the proxy's pure code: one function per target, bytes in, an exception
out only when a property is broken. Shared by the atheris scripts (fuzz_<target>.py), the
corpus replay in tests/test_fuzz.py, and the hypothesis tests there.

The property everywhere: whatever the bytes, the code ends in one of the outcomes the
proxy turns into a clear error for the client (`Refused`), or in a normal result whose
framing is sound; never in another exception, a hang, or unbounded growth.
"""
from __future__ import annotations

import struct

import pglast

from unpinned.wire.auth import AuthFailed, ClientAuth, UserSecret
from unpinned.telemetry.pinlog import ClientInfo
from unpinned.wire import messages as m
from unpinned.relay.relay import Relay
from unpinned.state.server_state import ServerState
from unpinned.state.session import Session, SessionOptions
from unpinned.relay.statements import StatementRegistry


class Broken(AssertionError):
    """A property of the target does not hold for this input."""


# What the login and relay shells (proxy.py) answer with FATAL 08P01 or the like: for the
# relay's client side, ProtocolError and the "invalid message format" family caught in
# ClientConnection._to_server.
RELAY_CLIENT_REFUSALS = (m.ProtocolError, ValueError, IndexError, struct.error)


def split_messages(data: bytes, types: frozenset | None = None) -> list[tuple[int, bytes]]:
    """Whole messages (type, body) of a stream that must be exactly framed."""
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 5:
            raise Broken(f"a fragment of {len(data) - pos} bytes where a message should start")
        ln = struct.unpack_from("!I", data, pos + 1)[0]
        if ln < 4 or pos + 1 + ln > len(data):
            raise Broken(f"message {data[pos:pos + 1]!r} with length {ln} at {pos} of {len(data)}")
        if types is not None and data[pos] not in types:
            raise Broken(f"message type {data[pos:pos + 1]!r} should not be sent")
        out.append((data[pos], data[pos + 5:pos + 1 + ln]))
        pos += 1 + ln
    return out


# ---------------------------------------------------------------- startup packet

def startup(data: bytes) -> None:
    """The body of a startup-phase packet (after its length), as ClientConnection reads it."""
    try:
        code, params = m.parse_startup(data)
    except m.ProtocolError:
        return
    if not isinstance(code, int) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise Broken(f"parse_startup gave {code!r}, {params!r}")
    if "options" in params:
        try:
            opts = m.parse_options(params["options"])
        except ValueError:      # the proxy answers 22023 "invalid command-line argument"
            return
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in opts.items()):
            raise Broken(f"parse_options gave {opts!r}")


# ---------------------------------------------------------------- backend messages the proxy reads

def backend_fields(data: bytes) -> None:
    """ErrorResponse/NoticeResponse and ParameterStatus bodies, and the request framing used
    to answer a cancel while a client waits (first_request_end)."""
    fields = m.parse_error_fields(data)
    if not all(len(k) == 1 and isinstance(v, str) for k, v in fields.items()):
        raise Broken(f"parse_error_fields gave {fields!r}")
    name, value = m.split_parameter_status(data)
    if not isinstance(name, str) or not isinstance(value, str):
        raise Broken("split_parameter_status gave non-text")
    end = m.first_request_end(data)
    if end is not None and not 0 < end <= len(data):
        raise Broken(f"first_request_end gave {end} for {len(data)} bytes")


# ---------------------------------------------------------------- client authentication

AUTH_SEP = b"||"          # between the client's messages in an auth input
NONCE_MARK = b"@@"        # replaced by the exchange's nonce, so mutations get past the nonce check
AUTH_MODES = ("scram", "scram-unknown", "scram-md5-only", "md5", "md5-unknown")
_USER = "app"
_KNOWN = {_USER: UserSecret(_USER, password="pw")}
_MD5_ONLY = UserSecret(_USER, md5_hash="md5" + "0" * 32)


def new_client_auth(mode: str) -> ClientAuth:
    method = "md5" if mode.startswith("md5") else "scram"
    if mode.endswith("unknown"):
        return ClientAuth.mock(method, "ghost", _KNOWN)
    return ClientAuth(method, _USER, _MD5_ONLY if mode == "scram-md5-only" else _KNOWN[_USER])


def auth(data: bytes) -> None:
    """Byte 0 picks the method and user; then the bodies of the client's 'p' messages,
    separated by AUTH_SEP. Every step answers an R message or raises AuthFailed; a
    client that does not know the password never gets in."""
    if not data:
        return
    a = new_client_auth(AUTH_MODES[data[0] % len(AUTH_MODES)])
    first = a.start()
    split_messages(first, frozenset(b"R"))
    for body in data[1:].split(AUTH_SEP)[:4]:
        scram = a._scram
        if scram is not None and scram.nonce:
            body = body.replace(NONCE_MARK, scram.nonce.encode())
        try:
            reply = a.step(body)
        except AuthFailed as e:
            if not (isinstance(e.sqlstate, str) and len(e.sqlstate) == 5 and str(e)):
                raise Broken(f"AuthFailed without a SQLSTATE and text: {e!r}") from None
            return
        split_messages(reply, frozenset(b"R"))
        if a.done:
            raise Broken("logged in without the password")


# ---------------------------------------------------------------- the relay

SERVER_SEP = b"\xff\xfe\xfd\xfc"   # between the client stream and the server's answers


def new_relay(mode: str = "smart") -> Relay:
    session = Session({"application_name": "fuzz", "search_path": "public"}, ClientInfo(1, "fuzz", "u", "db"),
                      None, SessionOptions(mode=mode))
    return Relay(StatementRegistry(), session)


class _Choices:
    """Fuzz bytes read one at a time; 0 once they run out (the plain, successful answer)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def __call__(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1] if self.pos <= len(self.data) else 0


_TAGS = ("SELECT 1", "SET", "RESET", "BEGIN", "COMMIT", "ROLLBACK", "DISCARD ALL", "PREPARE", "DEALLOCATE",
         "INSERT 0 1", "LISTEN", "CREATE TABLE", "SAVEPOINT", "RELEASE", "SHOW", "")
_ASIDES = (m.notice_response("fuzz notice"), m.parameter_status("application_name", "other"),
           m.parameter_status("TimeZone", "UTC"), m.message(b"A", b"\0\0\0\1ch\0payload\0"),
           m.parameter_status("search_path", "x, y"))
_ERRORS = ("42703", "57014", "25P02", "40001", "0A000", "26000", "42P05")
from unpinned.relay.pending import (CHECK as _CHECK, R_BIND as _R_BIND, R_CLOSE as _R_CLOSE,  # noqa: E402
                                    R_DESC_PORTAL as _R_DESC_PORTAL, R_DESC_STMT as _R_DESC_STMT,
                                    R_EXEC as _R_EXEC, R_FUNC as _R_FUNC, R_PARSE as _R_PARSE,
                                    R_QUERY as _R_QUERY, R_SYNC as _R_SYNC, R_SYNTH as _R_SYNTH)


def _check_row(relay: Relay, choose: _Choices) -> bytes:
    """The row answering the proxy's own question about session state, shaped as its SQL
    asks (Session._check_sql): a count per pin reason, three settings columns per parameter
    read back, then the verify column."""
    plan = relay.session._awaiting_check
    if plan is None:
        return m.data_row([])
    values: list = [str(choose() % 2) for _ in plan[0]]
    for _ in plan[1]:
        values += ["x" if choose() % 2 else None, "", "session"]
    if plan[2]:
        values.append(None if choose() % 2 else "")
    return m.data_row(values)


def _tag(statement: str) -> str:
    """The CommandComplete tag PostgreSQL gives a statement, near enough for the relay."""
    words = statement.split()
    first = words[0].upper() if words else ""
    second = words[1].upper() if len(words) > 1 else ""
    if first in ("SELECT", "WITH", "VALUES", "TABLE"):
        return "SELECT 1"
    if first == "INSERT":
        return "INSERT 0 1"
    if first in ("DISCARD", "DEALLOCATE") and second == "ALL":
        return f"{first} ALL"
    if first == "CREATE":
        kinds = [w.upper() for w in words[1:4]]
        for k in ("TABLE", "SEQUENCE", "INDEX", "VIEW", "FUNCTION"):
            if k in kinds:
                return f"CREATE {k}"
        return "CREATE"
    if first == "START":
        return "START TRANSACTION"
    if first == "END":
        return "COMMIT"
    return first or "EMPTY"


class Server:
    """PostgreSQL as the relay's server, near enough: it sees what the relay sends and answers
    the requests in the relay's queue (its record of what it sent), in order, with the
    choices made by fuzz bytes: each request's answer or an error (which, in an extended
    batch, skips to the Sync), rows, notices and parameter reports between. Transaction
    status follows BEGIN/COMMIT/ROLLBACK and errors."""

    def __init__(self):
        self.queries: list[str] = []      # Query texts sent and not yet answered
        self.status = b"I"

    def sent(self, data: bytes) -> None:
        for t, body in split_messages(data, m.FRONTEND_TYPES):
            if t == ord("Q"):
                self.queries.append(body[:-1].decode("utf-8", "replace"))

    def _run(self, statement: str, out: list) -> str:
        tag = _tag(statement)
        if tag in ("BEGIN", "START TRANSACTION") and self.status == b"I":
            self.status = b"T"
        elif tag in ("COMMIT", "ROLLBACK"):
            if self.status == b"E":
                tag = "ROLLBACK"
            self.status = b"I"
        if tag == "SELECT 1":
            out.append(m.row_description(["x"]))
            out.append(m.data_row(["1"]))
        out.append(m.command_complete(tag) if tag != "EMPTY" else m.message(b"I"))
        return tag

    def _error(self, c: int, out: list) -> None:
        out.append(m.error_response(_ERRORS[(c >> 3) % len(_ERRORS)], "fuzz error"))
        if self.status == b"T":
            self.status = b"E"

    def answers(self, relay: Relay, choose: _Choices) -> bytes:
        out: list[bytes] = []
        skipping = False
        for entry in list(relay.queue):
            kind = entry.kind
            if kind == _R_SYNTH:
                continue
            if skipping and kind != _R_SYNC:
                continue
            skipping = False
            c = choose()
            while c % 8 == 6:
                out.append(_ASIDES[(c >> 3) % len(_ASIDES)])
                c = choose()
            fail = c % 8 == 7
            if kind == _R_QUERY:
                text = self.queries.pop(0) if self.queries else "SELECT 1"
                if entry.action == _CHECK:
                    out += [m.row_description(["x"]), _check_row(relay, choose), m.command_complete("SELECT 1")]
                else:
                    try:
                        statements = pglast.split(text, with_parser=False) or ("",)
                    except Exception:
                        statements, fail = ("",), True
                    for i, statement in enumerate(statements):
                        if fail and i == (c >> 3) % len(statements):
                            self._error(c, out)
                            break
                        self._run(statement, out)
                    else:
                        fail = False
                out.append(m.ready_for_query(self.status))
                continue
            if fail and kind != _R_SYNC:
                self._error(c, out)
                if kind == _R_FUNC:
                    out.append(m.ready_for_query(self.status))
                else:
                    skipping = True
                continue
            if kind == _R_PARSE:
                out.append(m.PARSE_COMPLETE)
            elif kind == _R_BIND:
                out.append(m.BIND_COMPLETE)
            elif kind in (_R_DESC_STMT, _R_DESC_PORTAL):
                if kind == _R_DESC_STMT:
                    out.append(m.message(b"t", b"\0\0"))
                out.append(m.NO_DATA if c & 8 else m.row_description(["x"]))
            elif kind == _R_EXEC:
                c_ = entry.payload      # the statement's classification (a StatementRun's)
                text = c_.text if c_ is not None else "SELECT 1"
                if c & 8:
                    out.append(m.message(b"s"))      # PortalSuspended: a row limit was reached
                else:
                    self._run(text, out)
            elif kind == _R_CLOSE:
                out.append(m.CLOSE_COMPLETE)
            elif kind == _R_FUNC:
                out += [m.message(b"V", b"\xff\xff\xff\xff"), m.ready_for_query(self.status)]
            elif kind == _R_SYNC:
                out.append(m.ready_for_query(self.status))
        return b"".join(out)


def relay(data: bytes) -> None:
    """Byte 0: how the client stream is cut into reads (0: whole, n: reads of n bytes); then
    the client's bytes, then optionally SERVER_SEP and bytes choosing the server's answers (Server).
    What goes to the server is whole frontend messages, what goes to the client whole
    messages; a malformed client stream ends in a refusal the shell turns into FATAL."""
    if not data:
        return
    chunk = data[0]
    client, _, server = data[1:].partition(SERVER_SEP)
    r = new_relay("rds" if chunk & 0x80 else "smart")
    pg = Server()
    pg.sent(r.attach(ServerState()))
    chunk &= 0x7F
    reads = [client] if chunk == 0 else [client[i:i + chunk] for i in range(0, len(client), chunk)]
    fed = 0
    for piece in reads:
        fed += len(piece)
        try:
            out = r.from_client(piece)
        except RELAY_CLIENT_REFUSALS:
            return
        pg.sent(out)
        split_messages(b"".join(r.to_client))
        r.to_client.clear()
        held = r.cin if r.cin is not None and not r.cin.streaming else None   # relay/large.py
        if held is not None and held.have > fed:
            raise Broken("the relay holds more client bytes than it was given")
        if held is not None and held.have >= held.need:
            raise Broken("a whole client message was left in the buffer")
        if r.terminated:
            return
    # The server's side: answers to what the relay sent, cut in two reads, in rounds while
    # the relay's own requests (checks it asks while reading answers) need answers too.
    choose = _Choices(server)
    for _ in range(4):
        if not r.queue or all(e.kind == _R_SYNTH for e in r.queue):
            break
        answers = pg.answers(r, choose)
        cut = choose() * len(answers) // 256
        for piece in (answers[:cut], answers[cut:]):
            try:
                out = r.from_server(piece)
            except m.ProtocolError:
                return
            split_messages(out)
            pg.sent(b"".join(r.to_server))
            r.to_server.clear()
            if r.fatal is not None:
                return
    if r.queue:
        raise Broken(f"requests left unanswered after their answers: {list(r.queue)!r}")
