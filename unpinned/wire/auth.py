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
import struct
from dataclasses import dataclass, field

import scramp

from unpinned.wire import messages as m

SCRAM = "SCRAM-SHA-256"


class AuthFailed(Exception):
    def __init__(self, message: str, sqlstate: str = "28P01"):
        super().__init__(message)
        self.sqlstate = sqlstate


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
                self._scram_info = scramp.ScramMechanism(SCRAM).make_auth_info(self.password, iteration_count=4096)
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
    """Proxy-side authentication of one client. Drive it with `start()` then `step(body)`."""

    def __init__(self, method: str, user: str, secret: UserSecret | None):
        self.method = method
        self.user = user
        self.secret = secret
        self.done = False
        self._salt = os.urandom(4) if method == "md5" else b""
        self._scram = None

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
        if self.secret is None:
            raise self._fail()
        if self.method == "md5":
            given = body.rstrip(b"\x00").decode("ascii", "replace")
            if not hmac.compare_digest(given, self.secret.md5_expected(self._salt)):
                raise self._fail()
            self.done = True
            return b""
        try:
            if self._scram is None:
                mech, pos = m.read_cstr(body, 0)
                if mech.decode() != SCRAM:
                    raise AuthFailed(f"unsupported SASL mechanism {mech.decode(errors='replace')!r}", "28000")
                ln = m.unpack_i32(body, pos)[0]
                self._scram = ScramServer(self.secret.scram_auth_info())
                return m.auth_sasl_continue(self._scram.first(body[pos + 4:pos + 4 + ln].decode()).encode())
            final = self._scram.final(body.decode())
            self.done = True
            return m.auth_sasl_final(final.encode())
        except ScramMismatch:
            raise self._fail() from None
        except (ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error):
            raise AuthFailed("malformed SASL message", "08P01") from None


class ScramMismatch(Exception):
    pass


class ScramServer:
    """The server half of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it.

    Written here rather than taken from scramp because PostgreSQL clients send an empty
    user name (`n=`) in client-first (the startup packet names the user), which scramp's
    server rejects.
    """

    def __init__(self, auth_info: tuple):
        self.salt, self.stored_key, self.server_key, self.iterations = auth_info
        self.nonce = ""
        self.gs2 = ""
        self.client_first_bare = ""
        self.server_first = ""

    def first(self, client_first: str) -> str:
        flag, _authzid, bare = client_first.split(",", 2)
        if flag not in ("n", "y"):
            # "p=...": channel binding, which needs SCRAM-SHA-256-PLUS; we never offered it.
            raise ValueError("channel binding not supported")
        self.gs2 = client_first[: len(client_first) - len(bare)]
        attrs = dict(a.split("=", 1) for a in bare.split(",") if "=" in a)
        cnonce = attrs["r"]
        if not cnonce:
            raise ValueError("empty nonce")
        self.client_first_bare = bare
        self.nonce = cnonce + base64.b64encode(os.urandom(18)).decode()
        self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={self.iterations}"
        return self.server_first

    def final(self, client_final: str) -> str:
        without_proof, _, proof_b64 = client_final.rpartition(",p=")
        attrs = dict(a.split("=", 1) for a in without_proof.split(","))
        if attrs["c"] != base64.b64encode(self.gs2.encode()).decode() or attrs["r"] != self.nonce:
            raise ScramMismatch()
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        proof = base64.b64decode(proof_b64)
        signature = hmac.new(self.stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            raise ScramMismatch()
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key):
            raise ScramMismatch()
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
