"""Client authentication to the proxy (SCRAM-SHA-256, md5, trust) and the proxy's own login to
PostgreSQL (SCRAM, md5), end to end with real drivers."""
from __future__ import annotations

import base64
import logging
import socket

import asyncpg
import psycopg
import psycopg2
import pytest
import scramp

from support.raw_login import scram_exchange
from conftest import APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, SUPERUSER_PASSWORD
from unpinned.wire import messages as m

pytestmark = pytest.mark.timeout(60)

FAILED = 'password authentication failed for user "{}"'
WRONG = "definitely-Wrong-pw-7731"


def current_user_p2(**kw) -> str:
    conn = psycopg2.connect(**kw)
    try:
        cur = conn.cursor()
        cur.execute("SELECT current_user")
        return cur.fetchone()[0]
    finally:
        conn.close()


def server_time(pg) -> str:
    return pg.psql("SELECT clock_timestamp()", user="postgres", password=SUPERUSER_PASSWORD).strip()


def new_backends_since(pg, t0: str, user: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' "
                       f"AND backend_start > '{t0}'::timestamptz", user="postgres", password=SUPERUSER_PASSWORD))


def scram_verifier(password: str, iterations: int = 4096) -> str:
    salt, stored, server, it = scramp.ScramMechanism().make_auth_info(password, iteration_count=iterations)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${it}:{b64(salt)}${b64(stored)}:{b64(server)}"


# ---------------------------------------------------------------- SCRAM (the shared proxy)

def test_scram_psycopg2(proxy):
    assert current_user_p2(**proxy.kwargs()) == APP_USER


def test_scram_psycopg2_wrong_password(proxy):
    with pytest.raises(psycopg2.OperationalError) as ei:
        psycopg2.connect(**proxy.kwargs(password=WRONG))
    assert FAILED.format(APP_USER) in str(ei.value)


def test_scram_psycopg3(proxy):
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(proxy.dsn(password=WRONG))
    assert FAILED.format(APP_USER) in str(ei.value)


async def test_scram_asyncpg(proxy):
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError) as ei:
        await asyncpg.connect(proxy.dsn(password=WRONG))
    assert ei.value.sqlstate == "28P01"
    assert FAILED.format(APP_USER) in str(ei.value)


def test_scram_raw_client_checks_the_proxys_signature(proxy):
    msgs = scram_exchange(proxy.port, APP_USER, APP_PASSWORD)
    assert msgs[-1] == (b"Z", b"I")
    assert any(t == b"K" for t, _ in msgs)
    params = dict(m.split_parameter_status(b) for t, b in msgs if t == b"S")
    for name in ("server_version", "client_encoding", "DateStyle", "integer_datetimes", "standard_conforming_strings"):
        assert name in params


def test_scram_raw_wrong_password_is_fatal_28P01(proxy):
    msgs = scram_exchange(proxy.port, APP_USER, WRONG)
    errors = [m.parse_error_fields(b) for t, b in msgs if t == b"E"]
    assert len(errors) == 1
    assert errors[0]["S"] == "FATAL" and errors[0]["C"] == "28P01"
    assert errors[0]["M"] == FAILED.format(APP_USER)
    assert not any(t == b"R" and b[:4] == b"\x00\x00\x00\x0c" for t, b in msgs), "no SASLFinal for a wrong proof"


def test_unknown_user_is_rejected(proxy):
    with pytest.raises(psycopg2.OperationalError) as ei:
        psycopg2.connect(**proxy.kwargs(user="nobody_here", password="whatever"))
    assert FAILED.format("nobody_here") in str(ei.value)
    msgs = scram_exchange(proxy.port, "nobody_here", "whatever")
    errors = [m.parse_error_fields(b) for t, b in msgs if t == b"E"]
    assert errors and errors[-1]["S"] == "FATAL" and errors[-1]["C"] == "28P01"


def test_empty_password_is_rejected(proxy):
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(**proxy.kwargs(password=""))


def test_proxy_to_server_md5(pg, proxy):
    # The server stores legacy's password as md5, so the proxy's own login must answer an md5 challenge.
    stored = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{MD5_USER}'",
                     user="postgres", password=SUPERUSER_PASSWORD).strip()
    assert stored.startswith("md5")
    assert current_user_p2(**proxy.kwargs(user=MD5_USER, password=MD5_PASSWORD)) == MD5_USER
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(**proxy.kwargs(user=MD5_USER, password=WRONG))


def test_proxy_to_server_scram(pg, proxy):
    stored = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{APP_USER}'",
                     user="postgres", password=SUPERUSER_PASSWORD).strip()
    assert stored.startswith("SCRAM-SHA-256$")
    assert current_user_p2(**proxy.kwargs()) == APP_USER


# ---------------------------------------------------------------- md5 client auth

def test_md5_client_auth(make_proxy):
    handle = make_proxy(auth="md5")
    assert current_user_p2(**handle.kwargs()) == APP_USER
    assert current_user_p2(**handle.kwargs(user=MD5_USER, password=MD5_PASSWORD)) == MD5_USER
    with pytest.raises(psycopg2.OperationalError) as ei:
        psycopg2.connect(**handle.kwargs(password=WRONG))
    assert FAILED.format(APP_USER) in str(ei.value)


async def test_md5_client_auth_asyncpg(make_proxy):
    handle = make_proxy(auth="md5")
    conn = await asyncpg.connect(handle.dsn())
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(handle.dsn(password=WRONG))


def test_md5_client_auth_with_stored_md5_hash(make_proxy, tmp_path):
    import hashlib
    md5 = "md5" + hashlib.md5((APP_PASSWORD + APP_USER).encode()).hexdigest()
    users = tmp_path / "users.toml"
    users.write_text(f'[users.{APP_USER}]\nmd5 = "{md5}"\nserver_password = "{APP_PASSWORD}"\n')
    handle = make_proxy(auth="md5", users_file=str(users))
    assert current_user_p2(**handle.kwargs()) == APP_USER
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(**handle.kwargs(password=WRONG))


# ---------------------------------------------------------------- trust

def test_trust_lets_the_upstream_user_in_without_a_password(make_proxy):
    handle = make_proxy(auth="trust", users_file=None)
    assert current_user_p2(**handle.kwargs(user="postgres", password=None)) == "postgres"
    assert current_user_p2(**handle.kwargs(user="postgres", password="anything at all")) == "postgres"


def test_trust_with_users_file_uses_stored_server_credentials(make_proxy):
    handle = make_proxy(auth="trust")
    assert current_user_p2(**handle.kwargs(user=APP_USER, password=None)) == APP_USER


def test_trust_unknown_user_without_credentials_is_rejected(make_proxy):
    handle = make_proxy(auth="trust", users_file=None)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(**handle.kwargs(user=APP_USER, password=None))


# ---------------------------------------------------------------- no server work for a failed login

def test_failed_logins_open_no_server_connection(pg, make_proxy):
    scram = make_proxy(pool_size=3)
    md5 = make_proxy(auth="md5", pool_size=3)
    t0 = server_time(pg)
    for handle in (scram, md5):
        for _ in range(5):
            with pytest.raises(psycopg2.OperationalError):
                psycopg2.connect(**handle.kwargs(password=WRONG))
            with pytest.raises(psycopg2.OperationalError):
                psycopg2.connect(**handle.kwargs(user="ghost", password=WRONG))
        assert handle.server_count() == 0
        assert handle.server_count(user="ghost") == 0
        assert handle.pool(user="ghost") is None
    assert new_backends_since(pg, t0, APP_USER) == 0
    # The same proxy then logs the right password in, with a server connection.
    assert current_user_p2(**scram.kwargs()) == APP_USER
    assert new_backends_since(pg, t0, APP_USER) >= 1


def test_abandoned_scram_exchange_opens_no_server_connection(pg, make_proxy):
    handle = make_proxy(pool_size=3)
    t0 = server_time(pg)
    s = socket.create_connection(("127.0.0.1", handle.port), timeout=5)
    s.sendall(m.startup_message({"user": APP_USER, "database": "postgres"}))
    assert s.recv(1)[:1] == b"R"
    s.close()
    assert handle.server_count() == 0
    assert new_backends_since(pg, t0, APP_USER) == 0


# ---------------------------------------------------------------- SCRAM verifier instead of a password

def test_users_file_with_scram_verifier(make_proxy, tmp_path):
    client_pw = "only-the-proxy-knows-this"
    users = tmp_path / "users.toml"
    users.write_text(f'[users.{APP_USER}]\nscram_verifier = "{scram_verifier(client_pw)}"\n'
                     f'server_password = "{APP_PASSWORD}"\n')
    handle = make_proxy(users_file=str(users))
    # The client proves the verifier's password; the proxy logs in to PostgreSQL with server_password.
    assert current_user_p2(**handle.kwargs(password=client_pw)) == APP_USER
    with psycopg.connect(handle.dsn(password=client_pw)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
    # The server password is not a client password here.
    with pytest.raises(psycopg2.OperationalError) as ei:
        psycopg2.connect(**handle.kwargs(password=APP_PASSWORD))
    assert FAILED.format(APP_USER) in str(ei.value)


async def test_scram_verifier_asyncpg_and_other_iteration_counts(make_proxy, tmp_path):
    users = tmp_path / "users.toml"
    users.write_text(f'[users.{APP_USER}]\nscram_verifier = "{scram_verifier("pw-10k", 10000)}"\n'
                     f'server_password = "{APP_PASSWORD}"\n')
    handle = make_proxy(users_file=str(users))
    conn = await asyncpg.connect(handle.dsn(password="pw-10k"))
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(handle.dsn(password="pw-10"))


def test_scram_verifier_copied_from_pg_authid(pg, make_proxy, tmp_path):
    verifier = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{APP_USER}'",
                       user="postgres", password=SUPERUSER_PASSWORD).strip()
    users = tmp_path / "users.toml"
    users.write_text(f'[users.{APP_USER}]\nscram_verifier = "{verifier}"\nserver_password = "{APP_PASSWORD}"\n')
    handle = make_proxy(users_file=str(users))
    assert current_user_p2(**handle.kwargs()) == APP_USER


def test_scram_verifier_user_cannot_use_md5(make_proxy, tmp_path):
    # md5 needs the password or its md5 hash; a SCRAM verifier cannot answer an md5 challenge.
    users = tmp_path / "users.toml"
    users.write_text(f'[users.{APP_USER}]\nscram_verifier = "{scram_verifier(APP_PASSWORD)}"\n'
                     f'server_password = "{APP_PASSWORD}"\n')
    handle = make_proxy(auth="md5", users_file=str(users))
    with pytest.raises(psycopg2.OperationalError) as ei:
        psycopg2.connect(**handle.kwargs())
    assert FAILED.format(APP_USER) in str(ei.value)


# ---------------------------------------------------------------- secrets never logged

def test_passwords_never_logged(make_proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    users = tmp_path / "users.toml"
    verifier = scram_verifier("verifier-pw-5521")
    users.write_text(f'[users.{APP_USER}]\npassword = "{APP_PASSWORD}"\n\n'
                     f'[users.{MD5_USER}]\npassword = "{MD5_PASSWORD}"\n\n'
                     f'[users.vuser]\nscram_verifier = "{verifier}"\nserver_password = "server-pw-8812"\n')
    scram = make_proxy(users_file=str(users))
    md5 = make_proxy(auth="md5", users_file=str(users))
    for handle in (scram, md5):
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(**handle.kwargs(password=WRONG))
        current_user_p2(**handle.kwargs())
        current_user_p2(**handle.kwargs(user=MD5_USER, password=MD5_PASSWORD))
        with pytest.raises(psycopg2.OperationalError):      # server refuses server-pw-8812
            psycopg2.connect(**handle.kwargs(user="vuser", password="verifier-pw-5521"))
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(**handle.kwargs(user="ghost", password=WRONG))
    records = [r for r in caplog.records if r.name.startswith("unpinned")]
    assert any("failed authentication" in r.getMessage() for r in records), "the log capture saw nothing"
    text = "\n".join(r.getMessage() + repr(r.args) + (r.exc_text or "") for r in caplog.records) + caplog.text
    salt_b64 = verifier.split("$")[1].split(":")[1]
    for secret in (APP_PASSWORD, MD5_PASSWORD, SUPERUSER_PASSWORD, WRONG, "verifier-pw-5521", "server-pw-8812",
                   verifier.split("$")[2].split(":")[0], salt_b64):
        assert secret not in text, f"{secret!r} appears in the log"
