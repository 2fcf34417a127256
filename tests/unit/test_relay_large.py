"""Large client messages: framed in linear time, streamed to the server when longer than the
relay's buffer limit, classified without being held (pinned when the pre-check cannot clear
them), and PostgreSQL's per-type length limits applied as soon as a length is read."""
from __future__ import annotations

import random
import struct
import time

import pytest

from test_relay import B2, P1, PREPARED, SYNC, ZI, bind, bind_statements, cc, execute, make_relay, parse, registry  # noqa: F401
from unpinned.relay.relay import Relay
from unpinned.sql.classifier import EffectScan, _may_have_effects
from unpinned.state.server_state import ServerState
from unpinned.wire import messages as m

LIMIT = 64 * 1024


def relay_with_limit(registry, mode: str = "smart") -> Relay:
    relay = make_relay(registry, mode=mode)
    relay.buffer_limit = LIMIT
    relay.attach(ServerState())
    return relay


def feed(relay: Relay, data: bytes, piece: int) -> tuple[bytes, int]:
    """Client bytes in reads of `piece` bytes: (all forwarded, the most held by the relay at once)."""
    out = []
    most = 0
    for i in range(0, len(data), piece):
        out.append(relay.from_client(data[i:i + piece]))
        cin = relay.cin
        if cin is not None and hasattr(cin, "have"):
            most = max(most, cin.have)
    return b"".join(out), most


def big_query(size: int, sql: bytes = b"SELECT length('%s')") -> bytes:
    return m.query((sql % (b"x" * size)).decode())


# ---------------------------------------------------------------- the scanner

WORDS = [b"select", b"x", b"settings", b"offset", b"set", b"reset", b"temp1", b"pg_temp", b"u&", b"nextval",
         b"advisory", b"'", b"$1", b"1set", b"_set", b"setval", b"close", b"closed", b"(", b")", b";", b"\n"]


@pytest.mark.parametrize("seed", range(40))
def test_scan_in_pieces_never_misses_what_the_whole_text_check_finds(seed):
    rnd = random.Random(seed)
    text = b" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 60)))
    text = text.replace(b" ", b"" if seed % 3 == 0 else b" ")     # words glued together too
    scan = EffectScan()
    cuts = sorted(rnd.sample(range(1, max(2, len(text))), min(5, max(0, len(text) - 2))))
    prev = 0
    for c in cuts + [len(text)]:
        scan.feed(text[prev:c], final=c == len(text))
        prev = c
    if _may_have_effects(text):
        assert scan.hit, text


def test_scan_in_pieces_clears_a_long_text_without_effects():
    text = b"INSERT INTO t VALUES " + b",".join(b"(%d, 'offset settings')" % i for i in range(20000))
    scan = EffectScan()
    for i in range(0, len(text), 1000):
        scan.feed(text[i:i + 1000], final=i + 1000 >= len(text))
    assert not _may_have_effects(text) and not scan.hit


def test_a_keyword_cut_in_two_is_found():
    scan = EffectScan()
    scan.feed(b"SELECT 1; RES")
    scan.feed(b"ET ALL", final=True)
    assert scan.hit


# ---------------------------------------------------------------- framing

def test_a_message_in_many_small_reads_is_framed_in_linear_time(registry):
    # 8 MB in 4 KB reads: re-concatenating on each read would copy ~8 GB.
    relay = make_relay(registry)
    relay.buffer_limit = 16 * 1024 * 1024
    relay.attach(ServerState())
    msg = big_query(8 * 1024 * 1024)
    start = time.perf_counter()
    out, _ = feed(relay, msg, 4096)
    assert out == msg
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("piece", [1, 7, 4096, 65536])
def test_a_long_query_is_streamed_and_memory_stays_under_the_limit(registry, piece):
    relay = relay_with_limit(registry)
    msg = big_query(1024 * 1024 if piece > 1 else 100_000)
    out, most = feed(relay, msg + m.query("SELECT 1"), piece)
    assert out == msg + m.query("SELECT 1")
    assert most <= LIMIT + 5
    # Answered as a plain statement: nothing in it can change the session.
    relay.from_server(cc("SELECT 1") + ZI + cc("SELECT 1") + ZI)
    assert not relay.session.pins and relay.releasable


def test_a_streamed_query_the_precheck_cannot_clear_pins_as_unparsed(registry):
    relay = relay_with_limit(registry)
    msg = big_query(200_000, b"SET application_name = 'a'; SELECT length('%s')")
    out, most = feed(relay, msg, 8192)
    assert out == msg and most <= LIMIT + 5
    relay.from_server(m.command_complete("SET") + cc("SELECT 1") + ZI)
    assert list(relay.session.pins) == ["unparsed"]
    assert "not held by the proxy" in relay.session.pins["unparsed"]
    assert not relay.releasable


def test_rds_mode_pins_a_streamed_query_as_too_long(registry):
    relay = relay_with_limit(registry, mode="rds")
    feed(relay, big_query(200_000), 8192)
    relay.from_server(cc("SELECT 1") + ZI)
    assert list(relay.session.pins) == ["statement_too_long"]


def test_the_server_connection_is_not_released_in_the_middle_of_a_streamed_message(registry):
    relay = relay_with_limit(registry)
    msg = big_query(200_000)
    relay.from_client(msg[:100_000])
    assert not relay.can_release
    relay.from_client(msg[100_000:])
    relay.from_server(cc("SELECT 1") + ZI)
    assert relay.releasable


def test_the_server_connection_is_kept_while_copy_data_streams_even_after_an_error(registry):
    # COPY fails on the server while the client is still sending a large CopyData: the
    # rest of that message must reach the same server connection, so it is not released
    # before the message ends (releasing it would hand half a message to another client).
    relay = relay_with_limit(registry)
    relay.from_client(m.query("COPY t FROM STDIN"))
    relay.from_server(m.message(b"G", b"\x00\x00\x00"))
    data = m.message(b"d", b"r" * 300_000)
    relay.from_client(data[:100_000])
    relay.from_server(m.error_response("22P02", "bad row") + ZI)
    assert not relay.releasable and not relay.can_release
    assert relay.from_client(data[100_000:]) == data[100_000:]
    assert relay.can_release


def test_a_large_bind_to_a_named_statement_is_renamed_and_streamed(registry):
    relay = relay_with_limit(registry)
    relay.from_client(parse(b"ins", b"INSERT INTO t VALUES ($1)") + SYNC)
    relay.from_server(PREPARED + ZI)
    value = b"v" * 300_000
    batch = bind(b"", b"ins", (value,)) + execute() + SYNC
    out, most = feed(relay, batch, 16384)
    assert most <= LIMIT + 5
    assert bind_statements(out) == [relay.statements[b"ins"].name]
    assert value in out and len(out) == len(batch) - 3 + len(relay.statements[b"ins"].name)
    relay.from_server(B2 + cc("INSERT 0 1") + ZI)
    assert relay.releasable and not relay.session.pins


def test_a_large_unnamed_parse_with_effects_pins_at_its_execute(registry):
    relay = relay_with_limit(registry)
    sql = b"SELECT set_config('application_name', 'x', false), length('" + b"y" * 200_000 + b"')"
    batch = parse(b"", sql) + bind(b"", b"") + execute() + SYNC
    out, most = feed(relay, batch, 10000)
    assert out == batch and most <= LIMIT + 5
    relay.from_server(P1 + B2 + cc("SELECT 1") + ZI)
    assert list(relay.session.pins) == ["unparsed"]


def test_a_large_named_parse_is_held_whole(registry):
    # Its text is what the proxy prepares again on other server connections.
    relay = relay_with_limit(registry)
    msg = parse(b"big", b"SELECT '" + b"z" * 200_000 + b"'")
    out, _ = feed(relay, msg + SYNC, 8192)
    assert parse(relay.statements[b"big"].name, b"SELECT '" + b"z" * 200_000 + b"'") in out


# ---------------------------------------------------------------- PostgreSQL's limits per type

@pytest.mark.parametrize("t", [b"S", b"H", b"E", b"D", b"C", b"c", b"f", b"X"])
def test_a_small_type_declaring_more_than_10000_bytes_is_refused_as_soon_as_its_length_is_read(registry, t):
    relay = relay_with_limit(registry)
    with pytest.raises(m.ProtocolError) as info:
        relay.from_client(t + struct.pack("!I", 34_000))
    assert info.value.sqlstate == "08P01"
    relay = relay_with_limit(registry)
    relay.from_client(t)     # the length comes in the next read
    with pytest.raises(m.ProtocolError):
        relay.from_client(struct.pack("!I", 10_001))


def test_a_small_type_at_the_limit_and_a_large_type_above_it_are_waited_for(registry):
    relay = relay_with_limit(registry)
    assert relay.from_client(b"H" + struct.pack("!I", 10_000)) == b""     # PostgreSQL waits for it too
    relay = relay_with_limit(registry)
    assert relay.from_client(b"d" + struct.pack("!I", 10_001)) == b""     # CopyData may be large


def test_a_large_bind_to_a_name_shaped_like_the_proxys_own_is_refused_and_not_forwarded(registry):
    relay = relay_with_limit(registry)
    value = b"w" * 200_000
    out, _ = feed(relay, bind(b"", b"U_99", (value,)) + execute() + SYNC, 16384)
    assert value not in out                      # none of it reached the server
    assert b"26000" in out or b"does not exist" in out    # raised on the server instead


def test_a_large_message_after_an_error_in_its_batch_is_skipped(registry):
    relay = relay_with_limit(registry)
    relay.from_client(parse(b"", b"SELECT 1/0") + bind(b"", b"") + execute())
    relay.from_server(P1 + B2 + m.error_response("22012", "division by zero"))
    assert relay.skip_to_sync
    value = b"s" * 200_000
    out, _ = feed(relay, bind(b"", b"", (value,)) + execute() + SYNC, 16384)
    assert out == SYNC                           # PostgreSQL would skip them too
    relay.from_server(ZI)
    assert relay.releasable
