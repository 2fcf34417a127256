"""Write the seed corpus: valid messages for each target (python fuzz/seeds.py). Files are
named by content, so running it again adds nothing new; crashes found later sit beside them."""
from __future__ import annotations

import base64
import hashlib
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unpinned.wire import messages as m  # noqa: E402

from targets import AUTH_MODES, AUTH_SEP, NONCE_MARK, SERVER_SEP  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse(name: bytes, sql: bytes, types=()) -> bytes:
    return m.message(b"P", name + b"\0" + sql + b"\0" + struct.pack("!H", len(types))
                     + b"".join(struct.pack("!I", t) for t in types))


def bind(portal: bytes, stmt: bytes, params=()) -> bytes:
    body = portal + b"\0" + stmt + b"\0" + struct.pack("!HH", 0, len(params))
    for p in params:
        body += struct.pack("!I", len(p)) + p
    return m.message(b"B", body + struct.pack("!H", 0))


def execute(portal: bytes = b"") -> bytes:
    return m.message(b"E", portal + b"\0" + struct.pack("!I", 0))


def describe(kind: bytes, name: bytes) -> bytes:
    return m.message(b"D", kind + name + b"\0")


def close(kind: bytes, name: bytes) -> bytes:
    return m.message(b"C", kind + name + b"\0")


SYNC, FLUSH = m.SYNC_MSG, m.message(b"H")
ZI, ZT, ZE = m.ready_for_query(b"I"), m.ready_for_query(b"T"), m.ready_for_query(b"E")
P1, B2, C3, NODATA = m.PARSE_COMPLETE, m.BIND_COMPLETE, m.CLOSE_COMPLETE, m.NO_DATA
ROWS = m.row_description(["x"]) + m.data_row([1]) + m.command_complete("SELECT 1")
ERR = m.error_response("42703", "column does not exist")


def relay_seeds():
    q = m.query
    cases = [
        (q("SELECT 1"), ROWS + ZI),
        (q("BEGIN"), m.command_complete("BEGIN") + ZT),
        (q("BEGIN; SELECT 1; COMMIT"), m.command_complete("BEGIN") + ROWS + m.command_complete("COMMIT") + ZI),
        (q("SET search_path TO other"), m.command_complete("SET") + ZI),
        (q("SET application_name = 'x'"), m.command_complete("SET") + m.parameter_status("application_name", "x") + ZI),
        (q("RESET ALL"), m.command_complete("RESET") + ZI),
        (q("DISCARD ALL"), m.command_complete("DISCARD ALL") + ZI),
        (q("SELECT set_config('search_path', NULL, false)"), ROWS + ZI),
        (q("PREPARE s AS SELECT 1"), m.command_complete("PREPARE") + ZI),
        (q("DEALLOCATE s"), m.command_complete("DEALLOCATE") + ZI),
        (q("LISTEN ch"), m.command_complete("LISTEN") + ZI),
        (q("CREATE TEMP TABLE t (x int)"), m.command_complete("CREATE TABLE") + ZI),
        (q("SELECT pg_advisory_lock(1)"), ROWS + ZI),
        (q("SELECT nextval('s')"), ROWS + ZI),
        (q("SELECT bad"), ERR + ZI),
        (q(""), m.message(b"I") + ZI),
        (q("COPY t FROM STDIN"), m.message(b"G", b"\0\0\0")),
        (q("COPY t TO STDOUT"), m.message(b"H", b"\0\0\0") + m.message(b"d", b"1\n") + m.message(b"c")
         + m.command_complete("COPY 1") + ZI),
        (parse(b"", b"SELECT $1", (23,)) + bind(b"", b"", (b"1",)) + describe(b"P", b"") + execute() + SYNC,
         P1 + B2 + m.row_description(["x"]) + m.data_row([1]) + m.command_complete("SELECT 1") + ZI),
        (parse(b"s1", b"SELECT 1") + describe(b"S", b"s1") + SYNC,
         P1 + m.message(b"t", b"\0\0") + m.row_description(["x"]) + ZI),
        (parse(b"s1", b"SELECT 1") + SYNC + bind(b"p", b"s1") + execute(b"p") + close(b"P", b"p") + SYNC,
         P1 + ZI + B2 + m.data_row([1]) + m.command_complete("SELECT 1") + C3 + ZI),
        (parse(b"s1", b"SELECT 1") + close(b"S", b"s1") + SYNC, P1 + ZI),
        (parse(b"", b"SET search_path TO x") + bind(b"", b"") + execute() + SYNC,
         P1 + B2 + m.command_complete("SET") + ZI),
        (parse(b"", b"SELECT bad") + bind(b"", b"") + execute() + SYNC, ERR + ZI),
        (bind(b"", b"U_1") + execute() + SYNC, ERR + ZI),
        (bind(b"", b"nosuch") + execute() + SYNC, ERR + ZI),
        (parse(b"", b"SELECT 1") + FLUSH, P1),
        (m.message(b"F", struct.pack("!IH", 1, 0) + struct.pack("!HH", 0, 0)), m.message(b"V", b"\xff\xff\xff\xff") + ZI),
        (m.message(b"d", b"1\n") + m.message(b"c"), m.command_complete("COPY 1") + ZI),
        (m.message(b"f", b"no\0"), ERR + ZI),
        (m.TERMINATE_MSG, b""),
    ]
    # The server's answers come from targets.Server; these bytes pick among them:
    # none (every request succeeds), an error first, a notice then success, an error later.
    choices = (b"", b"\x07", b"\x0e\x00\x08", b"\x00\x00\x00\x0f\x80")
    out = []
    for i, (client, _answer) in enumerate(cases):
        out.append(b"\0" + client + SERVER_SEP + choices[i % len(choices)])
        out.append(b"\x03" + client)
    out.append(b"\x80" + m.query("SET search_path TO x") + SERVER_SEP + b"\x07")
    return out


def auth_seeds():
    proof = base64.b64encode(bytes(32))
    first = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
    initial = b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first
    final = b"c=biws,r=" + NONCE_MARK + b",p=" + proof
    out = []
    for i, mode in enumerate(AUTH_MODES):
        if mode.startswith("md5"):
            out.append(bytes((i,)) + b"md5" + b"0" * 32 + b"\0")
        else:
            out.append(bytes((i,)) + initial + AUTH_SEP + final)
            out.append(bytes((i,)) + b"SCRAM-SHA-256\0\xff\xff\xff\xff" + AUTH_SEP + first + AUTH_SEP + final)
    out.append(b"\0" + initial + AUTH_SEP + b"c=biws,r=" + NONCE_MARK + b",e=x,p=" + proof)
    out.append(b"\0" + b"SCRAM-SHA-256\0" + struct.pack("!I", 26) + b"y,,n=,r=abc,e=1,f=2,g=3" + AUTH_SEP
               + b"c=eSws,r=" + NONCE_MARK + b",p=" + proof)
    return out


def startup_seeds():
    def body(params: dict) -> bytes:
        return m.startup_message(params)[4:]
    return [
        body({"user": "app", "database": "db"}),
        body({"user": "app", "database": "db", "application_name": "x", "client_encoding": "UTF8"}),
        body({"user": "app", "options": "-c search_path=a,b --statement_timeout=5s -c x\\ y=1"}),
        body({"user": "app", "_pq_.ext": "1", "replication": "false"}),
        struct.pack("!I", m.SSL_REQUEST),
        struct.pack("!I", m.GSSENC_REQUEST),
        struct.pack("!III", m.CANCEL_REQUEST, 1, 2),
        struct.pack("!I", (3 << 16) | 2) + b"user\0app\0\0",
    ]


def backend_seeds():
    return [
        ERR[5:],
        m.notice_response("hello", detail="d")[5:],
        m.fatal("57P01", "terminating connection due to administrator command")[5:],
        m.parameter_status("TimeZone", "UTC")[5:],
        m.query("SELECT 1"),
        parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + SYNC,
        m.message(b"F", b"\0" * 12),
    ]


def write(target: str, cases) -> int:
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    new = 0
    for data in cases:
        path = os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16])
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
            new += 1
    return new


if __name__ == "__main__":
    for name, cases in (("startup", startup_seeds()), ("backend_fields", backend_seeds()),
                        ("auth", auth_seeds()), ("relay", relay_seeds())):
        print(name, write(name, cases), "new seeds")
