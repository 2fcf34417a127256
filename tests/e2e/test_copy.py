"""COPY through the proxy, end to end against the real server: byte-identical to a direct
connection both ways, errors mid-stream, psycopg 3 and psycopg2."""
from __future__ import annotations

import hashlib
import io

import psycopg
import psycopg2
import pytest

from conftest import SUPERUSER_PASSWORD

ROWS = 1_000_000
SOURCE = f"SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g"
# The same rows as one checksum, computed by the server itself.
SOURCE_SUM = (f"SELECT count(*), sum(g), md5(string_agg(g::text || ':' || md5(g::text), ',' ORDER BY g)) "
              f"FROM generate_series(1, {ROWS}) g")
TABLE_SUM = "SELECT count(*), sum(g), md5(string_agg(g::text || ':' || h, ',' ORDER BY g)) FROM copy_big"


def copy_out(conn: psycopg.Connection, sql: str) -> tuple[int, str, bytes]:
    digest, size, chunks = hashlib.sha256(), 0, []
    with conn.cursor() as cur:
        with cur.copy(sql) as copy:
            for data in copy:
                b = bytes(data)
                digest.update(b)
                size += len(b)
                chunks.append(b)
    return size, digest.hexdigest(), b"".join(chunks)


@pytest.fixture(scope="module")
def direct(pg):
    conn = psycopg.connect(pg.dsn("postgres", SUPERUSER_PASSWORD), autocommit=True)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def source_bytes(direct):
    """COPY TO STDOUT of the million rows on a direct connection: the reference."""
    size, digest, data = copy_out(direct, f"COPY ({SOURCE}) TO STDOUT")
    assert size > 35 * ROWS
    return size, digest, data


def test_copy_out_is_byte_identical_to_direct(proxy, source_bytes):
    size, digest, _ = source_bytes
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        got_size, got_digest, _ = copy_out(conn, f"COPY ({SOURCE}) TO STDOUT")
        assert (got_size, got_digest) == (size, digest)
        # The connection is in step afterwards.
        assert conn.execute("SELECT 'after copy out'").fetchone() == ("after copy out",)


def test_copy_in_then_out_round_trips(proxy, direct, source_bytes):
    size, digest, data = source_bytes
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS copy_big")
        conn.execute("CREATE TABLE copy_big (g int, h text)")
        with conn.cursor() as cur:
            with cur.copy("COPY copy_big FROM STDIN") as copy:
                view = memoryview(data)
                for i in range(0, len(view), 1 << 16):  # 64 KB writes, rows cut anywhere
                    copy.write(view[i:i + (1 << 16)])
            assert cur.rowcount == ROWS
        # What the server holds is what the source was.
        assert conn.execute(TABLE_SUM).fetchone() == direct.execute(SOURCE_SUM).fetchone()
        # And it comes back out byte for byte.
        got_size, got_digest, _ = copy_out(conn, "COPY (SELECT g, h FROM copy_big ORDER BY g) TO STDOUT")
        assert (got_size, got_digest) == (size, digest)
        conn.execute("DROP TABLE copy_big")


def test_copy_in_error_mid_stream_keeps_connection_usable(proxy):
    good = "".join(f"{i}\tok\n" for i in range(200_000))
    bad = good + "not-a-number\tbad\n" + good
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS copy_err")
        conn.execute("CREATE TABLE copy_err (g int, h text)")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as ei:
            with conn.cursor() as cur:
                with cur.copy("COPY copy_err FROM STDIN") as copy:
                    for i in range(0, len(bad), 1 << 16):
                        copy.write(bad[i:i + (1 << 16)])
        assert ei.value.sqlstate == "22P02"
        assert "not-a-number" in str(ei.value)
        assert conn.execute("SELECT count(*) FROM copy_err").fetchone() == (0,)
        # A good COPY on the same client connection works.
        with conn.cursor() as cur:
            with cur.copy("COPY copy_err FROM STDIN") as copy:
                copy.write("1\tone\n2\ttwo\n")
        assert conn.execute("SELECT count(*), sum(g) FROM copy_err").fetchone() == (2, 3)
        conn.execute("DROP TABLE copy_err")


def test_copy_in_error_inside_transaction(proxy):
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("DROP TABLE IF EXISTS copy_tx")
        conn.execute("CREATE TABLE copy_tx (g int)")
        conn.commit()
        conn.execute("INSERT INTO copy_tx VALUES (-1)")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with conn.cursor().copy("COPY copy_tx FROM STDIN") as copy:
                copy.write("1\n2\nx\n4\n")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM copy_tx").fetchone() == (0,)
        conn.execute("DROP TABLE copy_tx")
        conn.commit()


def test_copy_fail_from_client(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS copy_cf")
        conn.execute("CREATE TABLE copy_cf (g int)")
        # psycopg sends CopyFail, swallows the server's 57014 and re-raises the client's exception.
        with pytest.raises(RuntimeError, match="client gives up"):
            with conn.cursor().copy("COPY copy_cf FROM STDIN") as copy:
                copy.write("1\n2\n")
                raise RuntimeError("client gives up")
        assert conn.execute("SELECT count(*) FROM copy_cf").fetchone() == (0,)
        conn.execute("DROP TABLE copy_cf")


def test_copy_out_error_mid_stream(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            copy_out(conn, "COPY (SELECT 1 / (50000 - g) FROM generate_series(1, 100000) g) TO STDOUT")
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


def test_psycopg2_copy_expert(proxy):
    data = "".join(f"{i}\tval {i}\n" for i in range(1, 50_001)).encode()
    conn = psycopg2.connect(**proxy.kwargs())
    try:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS copy_p2; CREATE TABLE copy_p2 (g int, h text)")
        cur.copy_expert("COPY copy_p2 FROM STDIN", io.BytesIO(data))
        conn.commit()
        out = io.BytesIO()
        cur.copy_expert("COPY (SELECT * FROM copy_p2 ORDER BY g) TO STDOUT", out)
        assert hashlib.sha256(out.getvalue()).hexdigest() == hashlib.sha256(data).hexdigest()
        conn.commit()
        # A bad row: the server's error, and the connection carries on.
        with pytest.raises(psycopg2.errors.InvalidTextRepresentation):
            cur.copy_expert("COPY copy_p2 FROM STDIN", io.BytesIO(data + b"oops\tbad\n" + data))
        conn.rollback()
        cur.execute("SELECT count(*) FROM copy_p2")
        assert cur.fetchone() == (50_000,)
        # CSV with a header through copy_expert too.
        out = io.StringIO()
        cur.copy_expert("COPY (SELECT g, h FROM copy_p2 WHERE g <= 2 ORDER BY g) TO STDOUT WITH (FORMAT csv, HEADER)",
                        out)
        assert out.getvalue() == "g,h\n1,val 1\n2,val 2\n"
        cur.execute("DROP TABLE copy_p2")
        conn.commit()
    finally:
        conn.close()


def test_copy_binary_format_round_trip(proxy, direct):
    sql = "COPY (SELECT g, g::float8 / 3, repeat('x', g % 50) FROM generate_series(1, 20000) g) TO STDOUT (FORMAT binary)"
    _, want, data = copy_out(direct, sql)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        _, got, _ = copy_out(conn, sql)
        assert got == want
        conn.execute("DROP TABLE IF EXISTS copy_bin")
        conn.execute("CREATE TABLE copy_bin (a int, b float8, c text)")
        with conn.cursor().copy("COPY copy_bin FROM STDIN (FORMAT binary)") as copy:
            copy.write(data)
        _, back, _ = copy_out(conn, "COPY (SELECT * FROM copy_bin ORDER BY a) TO STDOUT (FORMAT binary)")
        assert back == want
        conn.execute("DROP TABLE copy_bin")
