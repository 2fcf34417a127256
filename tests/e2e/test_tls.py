"""TLS between clients and the proxy (SPEC 3.2): optional, or required with `require_tls`.

A throwaway CA (trustme) signs a certificate for 127.0.0.1 and localhost; clients are the
real drivers with their own TLS settings (libpq's sslmode, asyncpg's ssl context).
"""
from __future__ import annotations

import asyncio
import ssl

import asyncpg
import psycopg
import psycopg2
import pytest
import trustme

from conftest import APP_PASSWORD, APP_USER, start_proxy
from unpinned.config import ConfigError, load


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    ca_file, cert_file, key_file = d / "ca.pem", d / "cert.pem", d / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {"ca": str(ca_file), "cert": str(cert_file), "key": str(key_file), "ca_obj": ca}


@pytest.fixture(scope="module")
def tls_proxy(pg, users_file, certs):
    handle = start_proxy(pg, users_file, pool_size=3, tls_cert_file=certs["cert"], tls_key_file=certs["key"])
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def tls_only(pg, users_file, certs):
    handle = start_proxy(pg, users_file, pool_size=3, tls_cert_file=certs["cert"], tls_key_file=certs["key"],
                         require_tls=True)
    yield handle
    handle.stop()


def _tls_clients(handle) -> tuple[int, int]:
    return handle.call(lambda: (sum(1 for c in handle.proxy.clients if c.active and c.tls),
                                sum(1 for c in handle.proxy.clients if c.active and not c.tls)))


def test_psycopg2_sslmode_require_is_encrypted(tls_proxy):
    conn = psycopg2.connect(**tls_proxy.kwargs(), sslmode="require")
    try:
        cur = conn.cursor()
        cur.execute("SELECT 'over TLS', 40 + 2")
        assert cur.fetchone() == ("over TLS", 42)
        assert conn.info.ssl_in_use
        assert conn.info.ssl_attribute("protocol") in ("TLSv1.2", "TLSv1.3")
        assert _tls_clients(tls_proxy)[0] == 1
    finally:
        conn.close()


def test_psycopg3_verify_full_checks_the_certificate(tls_proxy, certs):
    # verify-full: the client checks the chain against the CA and the host name.
    with psycopg.connect(host="localhost", port=tls_proxy.port, user=APP_USER, password=APP_PASSWORD,
                         dbname="postgres", sslmode="verify-full", sslrootcert=certs["ca"]) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
        assert conn.pgconn.ssl_in_use
    # A CA the proxy's certificate does not come from: the client refuses the proxy.
    other = trustme.CA()
    wrong = certs["ca"] + ".other"
    other.cert_pem.write_to_path(wrong)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(host="localhost", port=tls_proxy.port, user=APP_USER, password=APP_PASSWORD,
                        dbname="postgres", sslmode="verify-full", sslrootcert=wrong, connect_timeout=5)


def test_asyncpg_over_tls_with_prepared_statements(tls_proxy, certs):
    async def go():
        ctx = ssl.create_default_context(cafile=certs["ca"])
        conn = await asyncpg.connect(host="localhost", port=tls_proxy.port, user=APP_USER, password=APP_PASSWORD,
                                     database="postgres", ssl=ctx)
        try:
            for i in range(20):                   # the statement cache, across server connections
                assert await conn.fetchval("SELECT $1::int * 2", i) == i * 2
        finally:
            await conn.close()
    asyncio.run(go())


def test_plain_clients_still_welcome_when_tls_is_optional(tls_proxy):
    conn = psycopg2.connect(**tls_proxy.kwargs(), sslmode="disable")
    try:
        conn.cursor().execute("SELECT 1")
        assert not conn.info.ssl_in_use
    finally:
        conn.close()


def test_cancel_over_tls(tls_proxy):
    # psycopg 3's cancel_safe: psycopg2's cancel() holds the GIL while it waits, and this
    # proxy runs on a thread of this process. The cancel connection asks for TLS too.
    import threading
    import time
    conn = psycopg.connect(tls_proxy.dsn(), sslmode="require", autocommit=True)
    outcome: list = []

    def sleep():
        try:
            conn.execute("SELECT pg_sleep(20)")
            outcome.append("finished")
        except psycopg.errors.QueryCanceled:
            outcome.append("canceled")

    try:
        t = threading.Thread(target=sleep)
        t.start()
        time.sleep(0.5)
        started = time.monotonic()
        conn.cancel_safe(timeout=5)
        t.join(10)
        assert outcome == ["canceled"] and time.monotonic() - started < 5
    finally:
        conn.close()


def test_require_tls_refuses_plain_clients_clearly(tls_only):
    with pytest.raises(psycopg2.OperationalError, match="requires TLS"):
        psycopg2.connect(**tls_only.kwargs(), sslmode="disable")
    conn = psycopg2.connect(**tls_only.kwargs(), sslmode="prefer")    # libpq's default: tries TLS first
    try:
        conn.cursor().execute("SELECT 1")
        assert conn.info.ssl_in_use
    finally:
        conn.close()


def test_a_broken_handshake_hurts_only_that_client(tls_proxy):
    import socket
    import struct
    ok = psycopg2.connect(**tls_proxy.kwargs(), sslmode="require")
    try:
        s = socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=5)
        s.sendall(struct.pack("!II", 8, 80877103))             # SSLRequest
        assert s.recv(1) == b"S"
        s.sendall(b"\x16\x03\x01\x00\x05not a client hello at all" * 4)
        # The proxy answers with a TLS alert at most, and hangs up (a timeout here fails).
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        s.close()
        cur = ok.cursor()
        cur.execute("SELECT 'still here'")
        assert cur.fetchone() == ("still here",)
    finally:
        ok.close()


def test_tls_config_errors_are_clear(tmp_path, certs):
    with pytest.raises(ConfigError, match="go together"):
        load(None, auth="trust", tls_cert_file=certs["cert"])
    with pytest.raises(ConfigError, match="require_tls needs"):
        load(None, auth="trust", require_tls=True)
    with pytest.raises(ConfigError, match="not found"):
        load(None, auth="trust", tls_cert_file=str(tmp_path / "nope.pem"), tls_key_file=certs["key"])
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot use TLS certificate"):
        load(None, auth="trust", tls_cert_file=str(bad), tls_key_file=certs["key"])


# ---------------------------------------------------------------------------- proxy -> PostgreSQL

@pytest.fixture(scope="module")
def tls_pg(certs):
    """A second PostgreSQL with TLS on (the same test CA). Its key must belong to the user the
    server runs as (`nobody` when the tests run as root) and be private."""
    import os
    import shutil
    import tempfile

    from conftest import SUPERUSER_PASSWORD
    from unpinned.dev.embedded import EmbeddedPostgres
    d = tempfile.mkdtemp(prefix="unpinned-pgtls-")
    cert, key = os.path.join(d, "server.crt"), os.path.join(d, "server.key")
    shutil.copy(certs["cert"], cert)
    shutil.copy(certs["key"], key)
    os.chmod(key, 0o600)
    if os.geteuid() == 0:
        import pwd
        nobody = pwd.getpwnam("nobody")
        for p in (d, cert, key):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    server = EmbeddedPostgres(password=SUPERUSER_PASSWORD, auth="md5", name="tls",
                              settings={"ssl": "on", "ssl_cert_file": cert, "ssl_key_file": key}).start()
    server.create_role(APP_USER, APP_PASSWORD, superuser=True)
    yield server
    server.stop()
    shutil.rmtree(d, ignore_errors=True)


def _upstream(server, query: str = "") -> str:
    from conftest import SUPERUSER_PASSWORD
    return server.dsn("postgres", SUPERUSER_PASSWORD) + (("?" + query) if query else "")


def _server_side_ssl(handle) -> bool:
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        return conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]


@pytest.mark.parametrize("query,encrypted", [
    ("", True),                          # prefer, the default: TLS when the server offers it
    ("sslmode=require", True),
    ("sslmode=disable", False),
])
def test_server_connections_use_tls_as_sslmode_says(tls_pg, users_file, query, encrypted):
    handle = start_proxy(tls_pg, users_file, pool_size=2, upstream=_upstream(tls_pg, query))
    try:
        assert _server_side_ssl(handle) is encrypted
    finally:
        handle.stop()


def test_verify_full_checks_the_servers_certificate(tls_pg, users_file, certs, tmp_path):
    handle = start_proxy(tls_pg, users_file, pool_size=2,
                         upstream=_upstream(tls_pg, f"sslmode=verify-full&sslrootcert={certs['ca']}"))
    try:
        assert _server_side_ssl(handle) is True
    finally:
        handle.stop()
    wrong = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong))
    handle = start_proxy(tls_pg, users_file, pool_size=2,
                         upstream=_upstream(tls_pg, f"sslmode=verify-full&sslrootcert={wrong}"))
    try:
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(handle.dsn(), connect_timeout=10)
    finally:
        handle.stop()


def test_sslmode_require_against_a_server_without_tls_is_a_clear_error(pg, users_file):
    handle = start_proxy(pg, users_file, pool_size=2, upstream=_upstream(pg, "sslmode=require"))
    try:
        with pytest.raises(psycopg.OperationalError, match="does not support TLS"):
            psycopg.connect(handle.dsn(), connect_timeout=10)
    finally:
        handle.stop()


def test_bad_upstream_sslmode_is_a_config_error():
    with pytest.raises(ConfigError, match="sslmode must be one of"):
        load(None, auth="trust", upstream="postgresql://u@h/db?sslmode=sometimes")


def test_reload_picks_up_a_renewed_certificate(pg, users_file, certs, tmp_path):
    """Certificates expire: RELOAD (or SIGHUP) gives new clients the new one, no restart."""
    import shutil
    import socket
    import struct
    import threading

    import uvloop

    from conftest import SUPERUSER_PASSWORD, ProxyHandle
    from unpinned.proxy import Proxy
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(certs["cert"], cert)
    shutil.copy(certs["key"], key)
    conf = tmp_path / "unpinned.toml"
    conf.write_text(f'[proxy]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')

    def served_serial(port: int) -> int:
        ctx = ssl.create_default_context(cafile=certs["ca"])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(struct.pack("!II", 8, 80877103))        # SSLRequest
            assert raw.recv(1) == b"S"
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return int(tls.getpeercert()["serialNumber"], 16)

    overrides = dict(listen="127.0.0.1:0", upstream=pg.dsn("postgres", SUPERUSER_PASSWORD), auth="scram",
                     users_file=users_file)
    loop = uvloop.new_event_loop()
    proxy = Proxy(load(str(conf), **overrides), str(conf), overrides)
    loop.run_until_complete(proxy.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handle = ProxyHandle(proxy, loop, thread)
    try:
        first = served_serial(handle.port)
        renewed = certs["ca_obj"].issue_cert("127.0.0.1", "localhost")   # same CA: a renewal
        renewed.private_key_and_cert_chain_pem.write_to_path(str(cert))
        renewed.private_key_pem.write_to_path(str(key))
        assert served_serial(handle.port) == first       # nothing changes before the reload
        handle.call(proxy.reload)
        assert served_serial(handle.port) != first
    finally:
        handle.stop()
