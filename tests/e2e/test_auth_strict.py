"""Strict SCRAM parsing and the mock exchange for unknown users, checked against PostgreSQL
itself: the same raw-socket exchange goes to the server directly and through the proxy, and
what comes back (message types, lengths, error fields) must be the same."""
from __future__ import annotations

import struct

import psycopg2
import pytest

from support.raw_login import md5_exchange, scram_exchange
from conftest import APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER
from unpinned.wire.auth import AuthFailed, ClientAuth, UserSecret, read_password_packet
from unpinned.wire import messages as m

pytestmark = pytest.mark.timeout(60)

GHOST = "gho"        # unknown everywhere; as long as APP_USER, so message lengths compare
assert len(GHOST) == len(APP_USER)


def shape(msgs: list[tuple[bytes, bytes]], user: str) -> list:
    """What a client can observe: each message's type and length (an R's code too), and the
    error's fields a client sees, with the user name made neutral."""
    out = []
    for t, body in msgs:
        if t == b"E":
            f = m.parse_error_fields(body)
            out.append(("E", f.get("S"), f.get("C"), f.get("M", "").replace(f'"{user}"', '"USER"'), f.get("D")))
        else:
            out.append((t.decode(), len(body), body[:4] if t == b"R" else b""))
    return out


def test_unknown_user_looks_like_a_wrong_password(proxy):
    wrong = scram_exchange(proxy.port, APP_USER, "not-the-password")
    ghost = scram_exchange(proxy.port, GHOST, "not-the-password")
    assert [t for t, _ in wrong] == [b"R", b"R", b"E"]
    assert shape(ghost, GHOST) == shape(wrong, APP_USER)
    assert m.parse_error_fields(ghost[-1][1])["M"] == f'password authentication failed for user "{GHOST}"'


def test_unknown_user_looks_as_it_does_to_postgresql(pg, proxy):
    direct = scram_exchange(pg.port, GHOST, "whatever")
    via = scram_exchange(proxy.port, GHOST, "whatever")
    assert shape(via, GHOST) == shape(direct, GHOST)


def test_unknown_user_salt_is_the_same_every_time_and_differs_by_name(proxy):
    def salt(user):
        msgs = scram_exchange(proxy.port, user, "x")
        return dict(a.split("=", 1) for a in msgs[1][1][4:].decode().split(","))["s"]
    assert salt(GHOST) == salt(GHOST)
    assert salt(GHOST) != salt("ghoul")


def _tamper_cases():
    # (name, rewrite of client-first, rewrite of client-final (text, server-first))
    return [
        ("extra attribute after the proof", None, lambda f, s: f + ",x=1"),
        ("y flag, c=biws", lambda f: "y" + f[1:], None),
        ("channel binding flag p", lambda f: "p=tls-server-end-point" + f[1:], None),
        ("unknown flag", lambda f: "q" + f[1:], None),
        ("authzid", lambda f: "n,a=bob," + f[3:], None),
        ("mandatory extension", lambda f: "n,,m=x," + f[3:], None),
        ("no user attribute", lambda f: "n,," + f[f.index("r="):], None),
        ("non-printable nonce", lambda f: f.replace("r=", "r=\x01"), None),
        ("bad channel binding", None, lambda f, s: f.replace("c=biws", "c=eSws")),
        ("missing nonce", None, lambda f, s: "c=biws," + f[f.index("p="):]),
        ("nonce mismatch", None, lambda f, s: f.replace("r=", "r=A", 1)),
        ("bad base64 proof", None, lambda f, s: f[:f.index("p=") + 2] + "!!!!" + f[f.index("p=") + 6:]),
        ("short proof", None, lambda f, s: f[:f.index("p=")] + "p=AAAA"),
        ("no proof", None, lambda f, s: f[:f.index(",p=")]),
        ("bad attribute char", None, lambda f, s: f.replace(",p=", ",1=x,p=")),
        ("attribute without =", None, lambda f, s: f.replace(",p=", ",e,p=")),
        ("extension before the proof", None, lambda f, s: f.replace(",p=", ",e=1,p=")),
    ]


@pytest.mark.parametrize("name,first,final", _tamper_cases(), ids=[c[0] for c in _tamper_cases()])
def test_tampered_scram_is_refused_as_postgresql_refuses_it(pg, proxy, name, first, final):
    direct = scram_exchange(pg.port, APP_USER, APP_PASSWORD, first, final)
    via = scram_exchange(proxy.port, APP_USER, APP_PASSWORD, first, final)
    assert direct[-1][0] == b"E" and via[-1][0] == b"E", f"{name}: let in (directly: {direct[-1][0]!r})"
    assert shape(via, APP_USER) == shape(direct, APP_USER)


def test_a_trailing_comma_after_the_proof_is_let_in_as_postgresql_does(pg, proxy):
    # PostgreSQL's attribute reader steps over the comma that ends a value, so nothing is left
    # after the proof: the login succeeds directly, and must through the proxy too.
    direct = scram_exchange(pg.port, APP_USER, APP_PASSWORD, None, lambda f, s: f + ",")
    via = scram_exchange(proxy.port, APP_USER, APP_PASSWORD, None, lambda f, s: f + ",")
    assert direct[-1] == via[-1] == (b"Z", b"I")


def test_drivers_still_log_in(proxy):
    conn = psycopg2.connect(**proxy.kwargs())
    conn.close()
    with pytest.raises(psycopg2.OperationalError) as ei:
        psycopg2.connect(**proxy.kwargs(user=GHOST, password="x"))
    assert f'password authentication failed for user "{GHOST}"' in str(ei.value)


async def test_asyncpg_still_logs_in(proxy):
    import asyncpg
    conn = await asyncpg.connect(proxy.dsn())
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(proxy.dsn(user=GHOST, password="x"))


def test_md5_unknown_user_looks_like_a_wrong_password(make_proxy):
    handle = make_proxy(auth="md5")
    wrong = md5_exchange(handle.port, MD5_USER, "nope")
    ghost = md5_exchange(handle.port, "ghostx", "nope")     # as long as MD5_USER
    assert [t for t, _ in wrong] == [b"R", b"E"]
    assert shape(ghost, "ghostx") == shape(wrong, MD5_USER)
    assert md5_exchange(handle.port, MD5_USER, MD5_PASSWORD)[-1] == (b"Z", b"I")


# ---------------------------------------------------------------- the pure step functions

def test_md5_password_packet_is_checked_like_postgresql():
    assert read_password_packet(b"md5abc\x00") == b"md5abc"
    for bad in (b"", b"md5abc", b"md5\x00abc\x00"):
        with pytest.raises(AuthFailed) as ei:
            read_password_packet(bad)
        assert (ei.value.sqlstate, str(ei.value)) == ("08P01", "invalid password packet size")
    with pytest.raises(AuthFailed) as ei:
        read_password_packet(b"\x00")
    assert ei.value.sqlstate == "28P01"


def test_md5_non_ascii_answer_is_a_wrong_password_not_a_crash():
    auth = ClientAuth("md5", MD5_USER, UserSecret(MD5_USER, password=MD5_PASSWORD))
    auth.start()
    with pytest.raises(AuthFailed) as ei:
        auth.step("md5é".encode() + b"\x00")
    assert ei.value.sqlstate == "28P01"


def test_sasl_initial_response_framing():
    def first_step(body):
        auth = ClientAuth("scram", APP_USER, UserSecret(APP_USER, password=APP_PASSWORD))
        auth.start()
        return auth.step(body)
    cases = {
        b"SCRAM-SHA-256": "invalid string in message",
        b"SCRAM-SHA-1\x00" + struct.pack("!I", 3) + b"n,,": "client selected an invalid SASL authentication mechanism",
        b"SCRAM-SHA-256\x00\x00\x00": "insufficient data left in message",
        b"SCRAM-SHA-256\x00" + struct.pack("!I", 30) + b"n,,": "insufficient data left in message",
        b"SCRAM-SHA-256\x00" + struct.pack("!I", 3) + b"n,,xx": "invalid message format",
        b"SCRAM-SHA-256\x00" + struct.pack("!I", 0): "malformed SCRAM message",
    }
    for body, text in cases.items():
        with pytest.raises(AuthFailed) as ei:
            first_step(body)
        assert (ei.value.sqlstate, str(ei.value)) == ("08P01", text), body
    # No initial response (length -1): an empty challenge, and the client-first comes next.
    auth = ClientAuth("scram", APP_USER, UserSecret(APP_USER, password=APP_PASSWORD))
    auth.start()
    assert auth.step(b"SCRAM-SHA-256\x00\xff\xff\xff\xff") == m.auth_sasl_continue(b"")
    reply = auth.step(b"n,,n=,r=abc")
    assert reply[:1] == b"R" and reply[5:9] == struct.pack("!I", 11) and reply[9:14] == b"r=abc"
