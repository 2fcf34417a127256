"""Pure tests of the wire-protocol helpers in unpinned.wire.messages: no sockets."""
from __future__ import annotations

import struct

import pytest

from unpinned.wire import messages as m
from unpinned.sql.text import quote_ident, quote_literal


def _body(packet: bytes) -> bytes:
    """A startup packet without its length word, checking the length on the way."""
    assert struct.unpack("!I", packet[:4])[0] == len(packet)
    return packet[4:]


# ---------------------------------------------------------------- parse_startup

def test_parse_startup_round_trips_startup_message():
    params = {"user": "app", "database": "db", "application_name": "naïve app", "options": "-c a=b"}
    code, parsed = m.parse_startup(_body(m.startup_message(params)))
    assert code == m.PROTOCOL_3_0
    assert parsed == params


def test_parse_startup_empty_parameter_list():
    code, parsed = m.parse_startup(struct.pack("!I", m.PROTOCOL_3_0) + b"\x00")
    assert (code, parsed) == (m.PROTOCOL_3_0, {})


def test_parse_startup_empty_value_is_kept():
    body = struct.pack("!I", m.PROTOCOL_3_0) + b"user\x00app\x00options\x00\x00\x00"
    assert m.parse_startup(body) == (m.PROTOCOL_3_0, {"user": "app", "options": ""})


@pytest.mark.parametrize("code", [m.SSL_REQUEST, m.GSSENC_REQUEST])
def test_parse_startup_special_requests_have_no_params(code):
    assert m.parse_startup(struct.pack("!I", code)) == (code, {})


def test_parse_startup_cancel_request_code():
    packet = m.cancel_request(1234, 5678)
    assert len(packet) == 16
    code, params = m.parse_startup(_body(packet))
    assert code == m.CANCEL_REQUEST and params == {}
    assert struct.unpack("!II", packet[8:]) == (1234, 5678)


def test_parse_startup_other_protocol_versions_are_reported_not_parsed():
    code, params = m.parse_startup(struct.pack("!I", 2 << 16) + b"garbage without terminator")
    assert code >> 16 == 2 and params == {}
    code, params = m.parse_startup(struct.pack("!I", (3 << 16) | 2) + b"user\x00u\x00\x00")
    assert code & 0xFFFF == 2 and params == {"user": "u"}


@pytest.mark.parametrize("body", [
    b"",                                                              # no protocol word
    b"\x00\x03",                                                      # short protocol word
    struct.pack("!I", m.PROTOCOL_3_0) + b"user\x00app\x00",           # no final terminator
    struct.pack("!I", m.PROTOCOL_3_0) + b"user\x00app",               # unterminated value
    struct.pack("!I", m.PROTOCOL_3_0) + b"user\x00\x00",              # name without value
    struct.pack("!I", m.PROTOCOL_3_0) + b"user\x00app\x00database\x00\x00",  # odd count
    struct.pack("!I", m.PROTOCOL_3_0) + b"user\x00\xff\xfe\x00\x00",  # not UTF-8
    struct.pack("!I", m.PROTOCOL_3_0),                                # nothing at all after version
])
def test_parse_startup_malformed_raises_protocol_error(body):
    with pytest.raises(m.ProtocolError) as ei:
        m.parse_startup(body)
    assert ei.value.sqlstate == "08P01"


# ---------------------------------------------------------------- parse_options

@pytest.mark.parametrize("options, expected", [
    ("-c a=b -c x=y", {"a": "b", "x": "y"}),
    ("-ca=b -cx=y", {"a": "b", "x": "y"}),
    ("--a=b --x=y", {"a": "b", "x": "y"}),
    ("  -c   statement_timeout=5000   ", {"statement_timeout": "5000"}),
    ("-c search_path=a,b", {"search_path": "a,b"}),
    (r"-c application_name=my\ app\ name", {"application_name": "my app name"}),
    (r"-c a=back\\slash", {"a": "back\\slash"}),
    ("-c a=x=y", {"a": "x=y"}),                      # only the first '=' separates
    ("-c a=", {"a": ""}),
    ("--statement-timeout=5s", {"statement_timeout": "5s"}),
    ("-c DateStyle=ISO", {"datestyle": "ISO"}),      # GUC names are case-insensitive
    ("-c a=1 -c a=2", {"a": "2"}),                   # the last one wins, as in PostgreSQL
    ("-c myapp.tenant=42", {"myapp.tenant": "42"}),
    ("", {}),
    ("   ", {}),
])
def test_parse_options(options, expected):
    assert m.parse_options(options) == expected


@pytest.mark.parametrize("options", ["statement_timeout=5", "-c", "-c novalue", "--novalue", "-x a=b", "a"])
def test_parse_options_errors(options):
    with pytest.raises(ValueError, match="invalid command-line argument"):
        m.parse_options(options)


# ---------------------------------------------------------------- quoting

@pytest.mark.parametrize("name, expected", [
    ("search_path", "search_path"),
    ("work_mem", "work_mem"),
    ("myapp.tenant", "myapp.tenant"),      # custom GUCs are dotted names, not one identifier
    ("DateStyle", '"DateStyle"'),
    ("a b", '"a b"'),
    ('we"ird', '"we""ird"'),
    ("1abc", '"1abc"'),
    ("a;drop", '"a;drop"'),
    ("", '""'),
])
def test_quote_ident(name, expected):
    assert quote_ident(name) == expected


@pytest.mark.parametrize("value, expected", [
    ("plain", "'plain'"),
    ("", "''"),
    ("it's", "'it''s'"),
    ("''", "''''''"),
    ("a\\b", "E'a\\\\b'"),
    ("a\\'b", "E'a\\\\''b'"),
    ("$user, public", "'$user, public'"),
])
def test_quote_literal(value, expected):
    assert quote_literal(value) == expected


# ---------------------------------------------------------------- error responses

def test_error_response_round_trip():
    msg = m.error_response("42P01", 'relation "t" does not exist', detail="the detail", hint="a hint")
    assert msg[:1] == b"E"
    assert struct.unpack("!I", msg[1:5])[0] == len(msg) - 1
    assert msg.endswith(b"\x00\x00")
    assert m.parse_error_fields(msg[5:]) == {
        "S": "ERROR", "V": "ERROR", "C": "42P01", "M": 'relation "t" does not exist',
        "D": "the detail", "H": "a hint"}


def test_fatal_round_trip_non_ascii():
    msg = m.fatal("28P01", 'password authentication failed for user "zoë"')
    fields = m.parse_error_fields(msg[5:])
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "28P01",
                      "M": 'password authentication failed for user "zoë"'}


def test_notice_response_round_trip():
    msg = m.notice_response("look out", detail="d")
    assert msg[:1] == b"N"
    assert m.parse_error_fields(msg[5:]) == {"S": "WARNING", "V": "WARNING", "C": "01000",
                                             "M": "look out", "D": "d"}


def test_parse_error_fields_of_a_real_server_error():
    # Captured shape of a PostgreSQL 17 error: fields in server order, with F/L/R.
    body = (b"SERROR\x00VERROR\x00C22012\x00Mdivision by zero\x00Fint.c\x00L841\x00Rint4div\x00\x00")
    assert m.parse_error_fields(body) == {"S": "ERROR", "V": "ERROR", "C": "22012", "M": "division by zero",
                                          "F": "int.c", "L": "841", "R": "int4div"}


# ---------------------------------------------------------------- other builders

def test_message_framing_and_fixed_messages():
    assert m.message(b"Q", b"x\x00") == b"Q\x00\x00\x00\x06x\x00"
    assert m.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert m.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"
    assert m.PARSE_COMPLETE == m.message(b"1")
    assert m.BIND_COMPLETE == m.message(b"2")
    assert m.CLOSE_COMPLETE == m.message(b"3")
    assert m.SYNC_MSG == m.message(b"S")
    assert m.AUTH_OK == m.auth_request(0)
    assert m.close_statement(b"U_1") == b"C\x00\x00\x00\x09SU_1\x00"


def test_parameter_status_and_split():
    msg = m.parameter_status("TimeZone", "Europe/Zürich")
    assert msg[:1] == b"S"
    assert m.split_parameter_status(msg[5:]) == ("TimeZone", "Europe/Zürich")


def test_negotiate_protocol_version():
    msg = m.negotiate_protocol_version(0, ["_pq_.foo", "_pq_.bar"])
    assert msg[:1] == b"v"
    assert struct.unpack("!II", msg[5:13]) == (0, 2)
    assert msg[13:] == b"_pq_.foo\x00_pq_.bar\x00"


def test_backend_key_data():
    assert m.backend_key_data(7, 0xFFFFFFFF) == b"K\x00\x00\x00\x0c" + struct.pack("!II", 7, 0xFFFFFFFF)


def test_row_description_and_data_row():
    rd = m.row_description(["a", "b"])
    assert rd[:1] == b"T" and struct.unpack("!H", rd[5:7])[0] == 2
    dr = m.data_row([1, None, "x"])
    assert dr == b"D" + struct.pack("!IH", 4 + 2 + 5 + 4 + 5, 3) + struct.pack("!I", 1) + b"1" \
        + struct.pack("!i", -1) + struct.pack("!I", 1) + b"x"


def test_read_cstr():
    assert m.read_cstr(b"abc\x00def\x00", 0) == (b"abc", 4)
    assert m.read_cstr(memoryview(b"abc\x00def\x00"), 4) == (b"def", 8)


def test_first_request_end():
    q = m.query("SELECT 1")
    parse = m.message(b"P", b"\x00SELECT 1\x00\x00\x00")
    sync = m.message(b"S")
    assert m.first_request_end(q + q) == len(q)
    assert m.first_request_end(parse + sync + q) == len(parse + sync)
    assert m.first_request_end(parse) is None          # a batch without its Sync yet
    assert m.first_request_end(q[:-2]) is None          # half a message
    assert m.first_request_end(b"") is None


# ---------------------------------------------------------------- the fast walks' framing helpers

def _reference_types(data: bytes, last: int) -> bytes | None:
    """answer_types as the relay's walk read headers before: with struct."""
    out, pos = bytearray(), 0
    while pos < last:
        if data[pos] not in b"DNA":
            out.append(data[pos])
        pos += 1 + m.unpack_i32(data, pos + 1)[0]
    return bytes(out) if pos == last else None


def test_answer_helpers_read_headers_as_struct_does():
    import random
    from unpinned.wire.framing import answer_types, query_answer_completes
    rng = random.Random(17)
    for _ in range(2000):
        msgs = [m.message(bytes([rng.choice(b"12TDCINAESZ3n")]), rng.randbytes(rng.choice((0, 1, 5, 300))))
                for _ in range(rng.randrange(0, 6))]
        data = b"".join(msgs) + m.READY_IDLE
        last = len(data) - 6 - rng.choice((0, 0, 0, 1, 2))     # sometimes a tail that is not a message end
        want = _reference_types(data, last)
        assert answer_types(data, last) == want
        plain = want is not None and not want.translate(None, b"TIC")
        assert query_answer_completes(data, last) == (want.count(b"C") if plain else -1)


def test_query_text_is_the_text_of_one_whole_query_only():
    import random
    from unpinned.wire.framing import query_text
    q = m.query("SELECT 1")
    assert query_text(q) == b"SELECT 1" and query_text(m.query("")) == b""
    rng = random.Random(19)
    for _ in range(2000):
        data = rng.choice((q, q + q, q[:-1], m.message(b"P", b"\x00SELECT 1\x00\x00\x00"), b"Q\x00\x00\x00\x04",
                           b"Q\xff\xff\xff\xff" + b"x" * 3, b"", b"Q"))
        if rng.random() < 0.3:
            data = bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.1 else b for b in data)
        whole = len(data) > 5 and data[0] == 81 and len(data) == 1 + struct.unpack("!i", data[1:5])[0]
        assert query_text(data) == (data[5:-1] if whole else None)


def test_unnamed_answer_matches_the_batch_in_order():
    import random
    import re
    from unpinned.wire.framing import unnamed_answer_completes
    rng = random.Random(18)
    seen = set()
    for _ in range(3000):
        # Mostly the answer's own shape, with riders and a wrong or missing type now and then.
        types = [b"1", b"2", rng.choice((b"T", b"n", b"")), rng.choice((b"C", b"I", b"s", b"C"))]
        for _ in range(rng.choice((0, 0, 1, 2))):
            types.insert(rng.randrange(len(types) + 1), rng.choice((b"D", b"N", b"A", b"E", b"Z", b"3", b"t")))
        if rng.random() < 0.2:
            types.pop(rng.randrange(len(types)))
        data = b"".join(m.message(t, rng.randbytes(rng.choice((0, 1, 5, 300)))) for t in types if t) + m.READY_IDLE
        last = len(data) - 6 - rng.choice((0, 0, 0, 0, 1))
        want = _reference_types(data, last)
        for described in (False, True):
            shape = b"12[Tn][CIs]" if described else b"12[CIs]"
            ok = want is not None and re.fullmatch(shape, want) is not None
            got = unnamed_answer_completes(data, last, described)
            assert got == (int(want.endswith(b"C")) if ok else -1)
            seen.add(got)
    assert seen == {-1, 0, 1}


def test_unnamed_batch_declines_lengths_past_the_limits():
    from unpinned.wire.framing import unnamed_batch
    parse = m.message(b"P", b"\x00SELECT 1\x00\x00\x00")
    bind = m.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    execute = m.message(b"E", b"\x00\x00\x00\x00\x00")
    assert unnamed_batch(parse + bind + execute + m.SYNC_MSG) == (b"SELECT 1", False)
    # An Execute that says it is 10,001 bytes long (the limit of a small message is 10,000).
    huge = b"E" + struct.pack("!I", 10001) + b"\x00" * 10000
    assert unnamed_batch(parse + bind + huge + m.SYNC_MSG) is None
    # A length with its high bit set is read as the large number it is, not as a small one.
    high = b"P" + struct.pack("!I", 0x80000006) + b"\x00SELECT 1\x00\x00\x00"
    assert unnamed_batch(high + bind + execute + m.SYNC_MSG) is None
