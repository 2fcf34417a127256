"""Authentication: clients to the proxy (SCRAM-SHA-256, md5, trust) and the proxy to
PostgreSQL (SCRAM-SHA-256, md5, cleartext, trust). Pure: the exchanges are step
functions over message bodies; the shell moves the bytes.

Secrets never reach a log line: `UserSecret.__repr__` hides them.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field

import scramp

from unpinned.wire import messages as m

SCRAM = "SCRAM-SHA-256"
SALT_LENGTH = 16    # PostgreSQL's; a mock exchange's salt has it too, so both look alike


class AuthFailed(Exception):
    def __init__(self, message: str, sqlstate: str = "28P01", detail: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail


@dataclass
class UserSecret:
    """How one user proves itself to the proxy, and how the proxy logs in for it."""
    name: str
    password: str | None = None          # plain text: verifies the client and logs in to the server
    scram_verifier: str | None = None    # "SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>"
    md5_hash: str | None = None          # "md5" + md5(password + user)
    server_user: str | None = None       # defaults to `name`
    server_password: str | None = None   # defaults to `password`
    admin: bool = False
    _scram_info: tuple | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"UserSecret(name={self.name!r}, admin={self.admin})"

    def scram_auth_info(self) -> tuple:
        """(salt, stored_key, server_key, iterations) for scramp's server, computed once."""
        if self._scram_info is None:
            if self.scram_verifier:
                self._scram_info = parse_scram_verifier(self.scram_verifier)
            elif self.password is not None:
                self._scram_info = scramp.ScramMechanism(SCRAM).make_auth_info(
                    self.password, iteration_count=4096, salt=os.urandom(SALT_LENGTH))
            else:
                raise AuthFailed(f'password authentication failed for user "{self.name}"')
        return self._scram_info

    def md5_expected(self, salt: bytes) -> str:
        inner = self.md5_hash[3:] if self.md5_hash else (
            hashlib.md5((self.password + self.name).encode()).hexdigest() if self.password is not None else None)
        if inner is None:
            raise AuthFailed(f'password authentication failed for user "{self.name}"')
        return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


def parse_scram_verifier(verifier: str) -> tuple:
    try:
        mech, rest = verifier.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iterations, salt = iter_salt.split(":", 1)
        stored, server = keys.split(":", 1)
        if mech != SCRAM:
            raise ValueError(mech)
        return (base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server), int(iterations))
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a SCRAM-SHA-256 verifier: {e}") from None


# ---------------------------------------------------------------- proxy as the server

class ClientAuth:
    """Proxy-side authentication of one client. Drive it with `start()` then `step(body)`.

    `secret` None (or one that cannot answer the method) runs a doomed exchange: the same
    messages as a wrong password, failing at the same point with the same error, so that an
    unknown user cannot be told from a known one (PostgreSQL's "mock authentication").
    Build that one with `ClientAuth.mock`."""

    def __init__(self, method: str, user: str, secret: UserSecret | None, doomed_key: bytes = b""):
        self.method = method
        self.user = user
        self.secret = secret
        self.done = False
        self._salt = os.urandom(4) if method == "md5" else b""
        self._scram: ScramServer | None = None
        self._mech_chosen = False
        self._doomed_key = doomed_key      # for the mock salt (see mock_key)

    @classmethod
    def mock(cls, method: str, user: str, users: dict) -> "ClientAuth":
        """The exchange for a user the proxy does not know; `users` are the configured ones."""
        return cls(method, user, None, mock_key(users))

    def _fail(self) -> AuthFailed:
        return AuthFailed(f'password authentication failed for user "{self.user}"')

    def start(self) -> bytes:
        if self.method == "trust":
            self.done = True
            return b""
        if self.method == "md5":
            return m.auth_md5(self._salt)
        return m.auth_sasl([SCRAM])

    def step(self, body: bytes) -> bytes:
        """Body of the client's 'p' message → bytes to send; sets `done`, or raises AuthFailed."""
        if self.method == "md5":
            given = read_password_packet(body)
            expected = self.secret.md5_expected(self._salt) if self.secret is not None else None
            if expected is None or not hmac.compare_digest(given, expected.encode()):
                raise self._fail()
            self.done = True
            return b""
        if not self._mech_chosen:
            # SASLInitialResponse: mechanism, then Int32 length of the client-first (-1: none yet).
            mech, pos = _read_string(body, 0)
            if mech != SCRAM.encode():
                raise AuthFailed("client selected an invalid SASL authentication mechanism", "08P01")
            if len(body) - pos < 4:
                raise AuthFailed("insufficient data left in message", "08P01")
            ln = m.unpack_i32(body, pos)[0]
            pos += 4
            if ln == 0xFFFFFFFF:
                first = None
            elif ln > len(body) - pos:
                raise AuthFailed("insufficient data left in message", "08P01")
            else:
                first, pos = body[pos:pos + ln], pos + ln
            if pos != len(body):
                raise AuthFailed("invalid message format", "08P01")
            self._mech_chosen = True
            self._scram = ScramServer(*self._scram_info())
            if first is None:
                return m.auth_sasl_continue(b"")    # the client-first follows in the next message
            body = first
        scram = self._scram
        if not scram.server_first:
            return m.auth_sasl_continue(scram.first(body).encode())
        if scram.done:
            raise AuthFailed("invalid SCRAM exchange state", "08P01")
        final = scram.final(body)          # raises AuthFailed 08P01 for a malformed message
        if final is None or scram.doomed:
            raise self._fail()
        self.done = True
        return m.auth_sasl_final(final.encode())

    def _scram_info(self) -> tuple[tuple, bool]:
        """(auth info, doomed)."""
        if self.secret is not None:
            try:
                return self.secret.scram_auth_info(), False
            except AuthFailed:
                # A user with only an md5 hash cannot do SCRAM: the doomed exchange, like PostgreSQL.
                return mock_scram_info(self.user, mock_key({self.user: self.secret})), True
        return mock_scram_info(self.user, self._doomed_key), True


def mock_key(users: dict) -> bytes:
    """A key known only to this proxy, the same in every worker and across restarts while the
    users are unchanged: made from every configured secret (PostgreSQL uses a per-cluster
    nonce). Cached per users mapping."""
    cached = _mock_keys.get(id(users))
    if cached is not None and cached[0] is users:
        return cached[1]
    h = hashlib.sha256(b"unpinned mock authentication\x00")
    for name in sorted(users):
        s = users[name]
        for part in (name, s.password, s.scram_verifier, s.md5_hash, s.server_password):
            h.update((part or "").encode() + b"\x00")
    key = h.digest()
    if len(_mock_keys) > 8:
        _mock_keys.clear()
    _mock_keys[id(users)] = (users, key)
    return key


_mock_keys: dict[int, tuple[dict, bytes]] = {}


def mock_scram_info(user: str, key: bytes) -> tuple:
    """(salt, stored_key, server_key, iterations) for an unknown user: a salt that is the same
    for every attempt with that name (a real user's salt does not change either), PostgreSQL's
    salt length and iteration count, keys no proof can match."""
    salt = hmac.new(key, user.encode(), hashlib.sha256).digest()[:SALT_LENGTH]
    return salt, bytes(32), bytes(32), 4096


def read_password_packet(body: bytes) -> bytes:
    """A PasswordMessage's password, checked as PostgreSQL checks it."""
    if not body or body.find(b"\x00") != len(body) - 1:
        raise AuthFailed("invalid password packet size", "08P01")
    if len(body) == 1:
        raise AuthFailed("empty password returned by client", "28P01")
    return body[:-1]


def _read_string(body: bytes, pos: int) -> tuple[bytes, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise AuthFailed("invalid string in message", "08P01")
    return body[pos:end], end + 1


def _malformed(detail: str) -> AuthFailed:
    return AuthFailed("malformed SCRAM message", "08P01", detail)


def _show(ch: str) -> str:
    """A character of client input for an error message, as PostgreSQL shows it."""
    return f"'{ch}'" if "\x21" <= ch <= "\x7e" else f"0x{ord(ch) if ch else 0:02x}"


class _Reader:
    """A cursor over a SCRAM message (RFC 5802 attr=value pairs separated by commas)."""

    __slots__ = ("s", "pos")

    def __init__(self, s: str):
        self.s = s
        self.pos = 0

    def peek(self) -> str:
        return self.s[self.pos] if self.pos < len(self.s) else ""

    def _value(self, attr: str) -> str:
        if self.s[self.pos + 1:self.pos + 2] != "=":
            raise _malformed(f'Expected character "=" for attribute "{attr}".')
        start = self.pos + 2
        end = self.s.find(",", start)
        if end < 0:
            self.pos = len(self.s)
            return self.s[start:]
        self.pos = end + 1
        return self.s[start:end]

    def attr(self, attr: str) -> str:
        if self.peek() != attr:
            raise _malformed(f'Expected attribute "{attr}" but found "{_show(self.peek())}".')
        return self._value(attr)

    def any_attr(self) -> tuple[str, str]:
        ch = self.peek()
        if not ch:
            raise _malformed("Attribute expected, but found end of string.")
        if not ("A" <= ch <= "Z" or "a" <= ch <= "z"):
            raise _malformed(f'Attribute expected, but found invalid character "{_show(ch)}".')
        return ch, self._value(ch)


def _printable(s: str) -> bool:
    return all("\x21" <= ch <= "\x7e" and ch != "," for ch in s)


def _text(message: bytes) -> str:
    """A SCRAM message as text, with PostgreSQL's checks on the bytes: not empty, no zero byte.
    Latin-1 keeps every byte as one character, so the proof is computed over the exact bytes."""
    if not message:
        raise _malformed("The message is empty.")
    if b"\x00" in message:
        raise _malformed("Message length does not match input length.")
    return message.decode("latin-1")


class ScramServer:
    """The server half of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, and parses it:
    the same messages accepted and refused, with PostgreSQL's SQLSTATE and text.

    Written here rather than taken from scramp because PostgreSQL clients send an empty
    user name (`n=`) in client-first (the startup packet names the user), which scramp's
    server rejects. No channel binding: the proxy never offers SCRAM-SHA-256-PLUS.
    """

    def __init__(self, auth_info: tuple, doomed: bool = False):
        self.salt, self.stored_key, self.server_key, self.iterations = auth_info
        self.doomed = doomed        # a mock exchange: fails at the proof whatever the client sends
        self.cbind_flag = ""
        self.cnonce = ""
        self.nonce = ""
        self.client_first_bare = ""
        self.server_first = ""
        self.done = False

    def first(self, message: bytes) -> str:
        """client-first-message → server-first-message; AuthFailed if malformed."""
        r = _Reader(_text(message))
        flag = r.peek()
        if flag == "p":
            raise _malformed("The client selected SCRAM-SHA-256 without channel binding, "
                             "but the SCRAM message includes channel binding data.")
        if flag not in ("n", "y"):
            raise _malformed(f'Unexpected channel-binding flag "{_show(flag)}".')
        r.pos += 1
        if r.peek() != ",":
            raise _malformed(f'Comma expected, but found character "{_show(r.peek())}".')
        r.pos += 1
        if r.peek() == "a":
            raise AuthFailed("client uses authorization identity, but it is not supported", "0A000")
        if r.peek() != ",":
            raise _malformed(f'Unexpected attribute "{_show(r.peek())}" in client-first-message.')
        r.pos += 1
        bare = r.s[r.pos:]
        if r.peek() == "m":
            raise AuthFailed("client requires an unsupported SCRAM extension", "0A000")
        r.attr("n")          # the user name: PostgreSQL takes it from the startup packet
        cnonce = r.attr("r")
        if not _printable(cnonce):
            raise AuthFailed("non-printable characters in SCRAM nonce", "08P01")
        while r.pos < len(r.s):
            r.any_attr()     # optional extensions, ignored
        self.cbind_flag = flag
        self.cnonce = cnonce
        self.client_first_bare = bare
        self.nonce = cnonce + base64.b64encode(os.urandom(18)).decode()
        self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={self.iterations}"
        return self.server_first

    def final(self, message: bytes) -> str | None:
        """client-final-message → server-final-message, or None for a wrong proof;
        AuthFailed if malformed or the nonce is not this exchange's."""
        r = _Reader(_text(message))
        cbind = r.attr("c")
        # Without channel binding, c= is the base64 of the GS2 header: "n,," or "y,,", the
        # flag the client-first gave.
        if not (cbind == "biws" and self.cbind_flag == "n" or cbind == "eSws" and self.cbind_flag == "y"):
            raise AuthFailed("unexpected SCRAM channel-binding attribute in client-final-message", "08P01")
        nonce = r.attr("r")
        while True:          # optional extensions, ignored, up to the proof
            proof_at = r.pos - 1
            attr, value = r.any_attr()
            if attr == "p":
                break
        try:
            proof = base64.b64decode(value.encode("latin-1"), validate=True)
        except ValueError:
            proof = b""
        if len(proof) != 32:
            raise _malformed("Malformed proof in client-final-message.")
        if r.pos < len(r.s):
            raise _malformed("Garbage found at the end of client-final-message.")
        if not hmac.compare_digest(nonce.encode("latin-1"), self.nonce.encode()):
            raise AuthFailed("invalid SCRAM response", "08P01", "Nonce does not match.")
        self.done = True
        without_proof = r.s[:proof_at]
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode("latin-1")
        # Computed for a doomed exchange too, so that it takes as long as a real one.
        signature = hmac.new(self.stored_key, auth_message, hashlib.sha256).digest()
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key) or self.doomed:
            return None
        server_signature = hmac.new(self.server_key, auth_message, hashlib.sha256).digest()
        return "v=" + base64.b64encode(server_signature).decode()


# ---------------------------------------------------------------- proxy as the client

class ServerAuth:
    """The proxy logging in to PostgreSQL. Feed each 'R' message body to `step`."""

    def __init__(self, user: str, password: str | None):
        self.user = user
        self.password = password
        self._scram: scramp.ScramClient | None = None

    def _need_password(self) -> str:
        if self.password is None:
            raise AuthFailed(f'the server asked for a password for user "{self.user}" and the proxy has none', "28P01")
        return self.password

    def step(self, body: bytes) -> bytes | None:
        """Returns bytes to send, b"" to wait, or None when authentication is OK."""
        code = m.unpack_i32(body, 0)[0]
        if code == 0:
            return None
        if code == 3:
            return m.password_message(m.cstr(self._need_password()))
        if code == 5:
            salt = body[4:8]
            inner = hashlib.md5((self._need_password() + self.user).encode()).hexdigest()
            return m.password_message(m.cstr("md5" + hashlib.md5(inner.encode() + salt).hexdigest()))
        if code == 10:
            mechs = [x.decode() for x in body[4:].split(b"\x00") if x]
            if SCRAM not in mechs:
                raise AuthFailed(f"server offers only SASL mechanisms {mechs}", "28000")
            self._scram = scramp.ScramClient([SCRAM], self.user, self._need_password())
            return m.sasl_initial_response(SCRAM, self._scram.get_client_first().encode())
        if code == 11:
            self._scram.set_server_first(body[4:].decode())
            return m.password_message(self._scram.get_client_final().encode())
        if code == 12:
            self._scram.set_server_final(body[4:].decode())
            return b""
        raise AuthFailed(f"unsupported authentication request {code} from the server", "28000")
