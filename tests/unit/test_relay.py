"""Pure unit tests of unpinned.relay.Relay: protocol bytes in, protocol bytes out, no sockets.

The client side is what a driver would send; the server side is what PostgreSQL would
answer to the bytes the relay passed on. What the client sees is the relay's synthesized
`to_client` bytes followed by what `from_server` returns.
"""
from __future__ import annotations

import struct

import pytest

from unpinned.telemetry.pinlog import ClientInfo
from unpinned.wire import messages as m
from unpinned.relay.relay import Relay
from unpinned.sql.text import param_sync_sql
from unpinned.state.server_state import ServerPrepared, ServerState
from unpinned.state.session import Session, SessionOptions
from unpinned.relay.statements import StatementRegistry

# ---------------------------------------------------------------- frontend message builders


def parse(name: bytes, sql: bytes, types: tuple[int, ...] = ()) -> bytes:
    return m.message(b"P", name + b"\x00" + sql + b"\x00" + struct.pack("!H", len(types))
                     + b"".join(struct.pack("!I", t) for t in types))


def bind(portal: bytes, stmt: bytes, params: tuple[bytes, ...] = ()) -> bytes:
    body = portal + b"\x00" + stmt + b"\x00" + struct.pack("!H", 0) + struct.pack("!H", len(params))
    for p in params:
        body += struct.pack("!I", len(p)) + p
    return m.message(b"B", body + struct.pack("!H", 0))


def execute(portal: bytes = b"") -> bytes:
    return m.message(b"E", portal + b"\x00" + struct.pack("!I", 0))


def describe_stmt(name: bytes) -> bytes:
    return m.message(b"D", b"S" + name + b"\x00")


def close_portal(name: bytes) -> bytes:
    return m.message(b"C", b"P" + name + b"\x00")


SYNC = m.SYNC_MSG
FLUSH = m.message(b"H")

# ---------------------------------------------------------------- backend message builders

P1, B2, C3 = m.PARSE_COMPLETE, m.BIND_COMPLETE, m.CLOSE_COMPLETE
ZI, ZT, ZE = m.ready_for_query(b"I"), m.ready_for_query(b"T"), m.ready_for_query(b"E")
# The server's answer to the proxy's Describe of a statement it prepares (no parameters, no rows).
SHAPED = m.message(b"t", b"\x00\x00") + m.NO_DATA
# The server's answer to a Parse the proxy sends: its Close first, the ParseComplete, the Describe.
PREPARED = C3 + P1 + SHAPED


def prepare(name: bytes, sql: bytes, types: tuple[int, ...] = ()) -> bytes:
    """What the proxy sends to prepare a server-side statement: Close, Parse, Describe."""
    return m.close_statement(name) + parse(name, sql, types) + describe_stmt(name)


def row(*values) -> bytes:
    return m.data_row(list(values))


def cc(tag: str) -> bytes:
    return m.command_complete(tag)


def err(code: str = "42703", text: str = "boom") -> bytes:
    return m.error_response(code, text)


def split(data: bytes) -> list[tuple[bytes, bytes]]:
    """Whole messages (type, body); fails on a trailing fragment."""
    out, pos = [], 0
    while pos < len(data):
        ln = struct.unpack_from("!I", data, pos + 1)[0]
        assert pos + 1 + ln <= len(data), "truncated message"
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + ln]))
        pos += 1 + ln
    return out


def types(data: bytes) -> bytes:
    return b"".join(t for t, _ in split(data))


def error_code(data: bytes) -> list[str]:
    return [m.parse_error_fields(body)["C"] for t, body in split(data) if t == b"E"]


def parse_names(data: bytes) -> list[bytes]:
    return [body[:body.index(b"\x00")] for t, body in split(data) if t == b"P"]


def bind_statements(data: bytes) -> list[bytes]:
    out = []
    for t, body in split(data):
        if t == b"B":
            nul = body.index(b"\x00")
            out.append(body[nul + 1:body.index(b"\x00", nul + 1)])
    return out


def drained(relay: Relay) -> bytes:
    out = b"".join(relay.to_client)
    relay.to_client.clear()
    return out


@pytest.fixture
def registry():
    return StatementRegistry()


def make_relay(registry, params: dict | None = None, mode: str = "smart") -> Relay:
    session = Session(dict(params or {}), ClientInfo(1, "127.0.0.1:1", "u", "db"), None, SessionOptions(mode=mode))
    return Relay(registry, session)


def new_relay(registry, server: ServerState | None = None, params=None, mode: str = "smart") -> Relay:
    relay = make_relay(registry, params, mode)
    assert relay.attach(server if server is not None else ServerState()) == b""
    return relay


def prepared_then_detached(registry, server: ServerState, name: bytes, sql: bytes,
                           types: tuple[int, ...] = ()) -> Relay:
    """A relay whose client prepared `name` on `server`, then gave the connection back."""
    relay = new_relay(registry, server)
    relay.from_client(parse(name, sql, types) + SYNC)
    relay.from_server(PREPARED + ZI)
    relay.detach()
    return relay


def moved_relay(registry, sql: bytes, types: tuple[int, ...] = ()) -> Relay:
    """A relay whose client prepared `q` (sql) on one server connection and now holds
    another one that lacks it."""
    relay = prepared_then_detached(registry, ServerState(), b"q", sql, types)
    relay.attach(ServerState())
    return relay


def server_name(registry: StatementRegistry, sql: bytes, types: tuple[int, ...] = ()) -> bytes:
    """The server-side name the registry gives this statement (creating it if new)."""
    return registry.get(parse(b"", sql, types)[6:]).name


# ---------------------------------------------------------------- renaming and sharing

def test_named_parse_is_renamed_to_the_server_name(registry):
    server = ServerState()
    relay = new_relay(registry, server)
    out = relay.from_client(parse(b"my_stmt", b"SELECT $1::int", (23,)) + SYNC)
    name = server_name(registry, b"SELECT $1::int", (23,))
    assert name.startswith(b"U_")
    assert out == prepare(name, b"SELECT $1::int", (23,)) + SYNC
    assert b"my_stmt" not in out
    assert server.prepared.has(name)
    assert relay.from_server(PREPARED + ZI) == P1 + ZI     # the proxy's Close and Describe are its own
    assert relay.releasable

def test_unnamed_statements_pass_through_unchanged(registry):
    relay = new_relay(registry)
    batch = parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + SYNC
    assert relay.from_client(batch) == batch
    reply = P1 + B2 + row(1) + cc("SELECT 1") + ZI
    assert relay.from_server(reply) == reply
    assert len(registry) == 0


def test_same_text_and_types_share_one_server_name_different_types_do_not(registry):
    a = server_name(registry, b"SELECT $1", (23,))
    assert server_name(registry, b"SELECT $1", (23,)) == a
    assert server_name(registry, b"SELECT $1", (25,)) != a
    assert server_name(registry, b"SELECT $1 ", (23,)) != a


def test_second_clients_parse_reaches_the_server_under_the_shared_name(registry):
    # Parsed now, as on a fresh connection (the schema may have changed since the first
    # client's); the same shape keeps the one shared statement.
    server = ServerState()
    prepared_then_detached(registry, server, b"a", b"SELECT 42")
    name = server_name(registry, b"SELECT 42")

    second = new_relay(registry, server)
    out = second.from_client(parse(b"b", b"SELECT 42") + SYNC)
    assert out == prepare(name, b"SELECT 42") + SYNC
    assert second.from_server(PREPARED + ZI) == P1 + ZI
    assert registry.renewals == 0

    # And the statement is usable under the second client's own name.
    out = second.from_client(bind(b"", b"b") + execute() + SYNC)
    assert bind_statements(out) == [name]
    assert types(out) == b"BES"


def test_parse_with_another_shape_than_the_shared_statement_renews_it(registry):
    # Client A prepared "SELECT * FROM r6" before ALTER TABLE r6 ADD COLUMN b; client B's
    # Parse of the same text now describes two columns.
    server, other = ServerState(), ServerState()
    sql = b"SELECT * FROM r6"
    one, two = m.row_description(["a"]), m.row_description(["a", "b"])
    params = m.message(b"t", b"\x00\x00")
    a = new_relay(registry, other)
    a.from_client(parse(b"s", sql) + SYNC)
    a.from_server(C3 + P1 + params + one + ZI)
    old = server_name(registry, sql)
    a.detach()

    b = new_relay(registry, server)
    b.from_client(parse(b"s", sql) + SYNC)
    assert b.from_server(C3 + P1 + params + two + ZI) == P1 + ZI
    new = server_name(registry, sql)
    assert new != old and registry.renewals == 1
    assert b.statements[b"s"].name == new                 # B's statement is the new generation
    assert not server.prepared.has(old) and server.to_close == [old]
    out = b.from_client(bind(b"", b"s") + execute() + SYNC)
    assert parse_names(out) == [new] and bind_statements(out) == [new]
    assert m.close_statement(old) in out                  # the copy under the old name goes
    b.from_server(C3 + C3 + P1 + params + two + B2 + cc("SELECT 0") + ZI)
    b.detach()

    # A still holds the old generation: where a server connection lacks it, the proxy answers
    # what PostgreSQL answers on A's own connection, and A's driver prepares it again.
    a.attach(server)
    out = a.from_client(bind(b"", b"s") + execute() + SYNC)
    assert bind_statements(out) == [b"U_0"] and old not in out
    seen = a.from_server(C3 + err("22P02", "invalid input syntax for type integer") + ZI)   # at its Parse
    assert error_code(seen) == ["0A000"] and b"cached plan must not change result type" in seen
    a.from_client(m.close_statement(b"s") + parse(b"s", sql) + SYNC)
    assert a.statements[b"s"].name == new


def test_error_binding_a_stale_copy_renews_the_statement(registry):
    # DDL straight on the server: the copy on this connection answers 0A000 (or "cache lookup
    # failed"). The error stands, as on the client's own connection; the next Parse of the
    # text gets a new statement, and the stale copy is closed.
    server = ServerState()
    relay = prepared_then_detached(registry, server, b"s", b"SELECT * FROM r7")
    old = server_name(registry, b"SELECT * FROM r7")
    relay.attach(server)
    relay.from_client(bind(b"", b"s") + execute() + SYNC)
    seen = relay.from_server(err("0A000", "cached plan must not change result type") + ZI)
    assert error_code(seen) == ["0A000"]
    new = server_name(registry, b"SELECT * FROM r7")
    assert new != old and server.to_close == [old] and not server.prepared.has(old)
    out = relay.from_client(m.close_statement(b"s") + parse(b"s", b"SELECT * FROM r7") + SYNC)
    assert parse_names(out) == [new] and m.close_statement(old) in out

def test_bind_on_server_lacking_the_statement_injects_parse_and_swallows_its_reply(registry):
    relay = moved_relay(registry, b"SELECT $1::text", (25,))
    name = server_name(registry, b"SELECT $1::text", (25,))
    out = relay.from_client(bind(b"", b"q", (b"hi",)) + execute() + SYNC)
    assert out == prepare(name, b"SELECT $1::text", (25,)) + bind(b"", name, (b"hi",)) + execute() + SYNC
    assert relay.server.prepared.has(name)
    seen = relay.from_server(PREPARED + B2 + row("hi") + cc("SELECT 1") + ZI)
    assert seen == B2 + row("hi") + cc("SELECT 1") + ZI   # the injected ParseComplete is not shown
    assert relay.releasable

    # The next Bind on the same server connection needs no injection.
    out = relay.from_client(bind(b"", b"q", (b"again",)) + execute() + SYNC)
    assert types(out) == b"BES"


def test_describe_on_server_lacking_the_statement_injects_parse(registry):
    relay = moved_relay(registry, b"SELECT 1 AS one")
    name = server_name(registry, b"SELECT 1 AS one")
    out = relay.from_client(describe_stmt(b"q") + SYNC)
    assert out == prepare(name, b"SELECT 1 AS one") + describe_stmt(name) + SYNC
    t_param = m.message(b"t", struct.pack("!H", 0))
    rd = m.row_description(["one"])
    assert relay.from_server(C3 + P1 + t_param + rd + t_param + rd + ZI) == t_param + rd + ZI


def test_lru_eviction_closes_on_the_server_and_hides_the_close_complete(registry):
    server = ServerState(prepared=ServerPrepared(limit=1))
    relay = new_relay(registry, server)
    relay.from_client(parse(b"a", b"SELECT 'a'") + SYNC)
    relay.from_server(PREPARED + ZI)
    out = relay.from_client(parse(b"b", b"SELECT 'b'") + SYNC)
    a, b = server_name(registry, b"SELECT 'a'"), server_name(registry, b"SELECT 'b'")
    assert out == m.close_statement(a) + prepare(b, b"SELECT 'b'") + SYNC
    assert relay.from_server(C3 + PREPARED + ZI) == P1 + ZI
    assert not server.prepared.has(a) and server.prepared.has(b)


# ---------------------------------------------------------------- Close

def test_close_of_named_statement_is_answered_locally_in_order(registry):
    server = ServerState()
    relay = new_relay(registry, server)
    out = relay.from_client(parse(b"s", b"SELECT 7") + bind(b"", b"s") + execute()
                            + m.close_statement(b"s") + SYNC)
    assert types(out) == b"CPDBES"            # no Close of the client's reaches the server
    assert drained(relay) == b""
    seen = relay.from_server(PREPARED + B2 + row(7) + cc("SELECT 1") + ZI)
    assert types(seen) == b"12DC3Z"
    assert relay.releasable
    # The server keeps the statement for others; this client's name is gone.
    assert server.prepared.has(server_name(registry, b"SELECT 7"))
    # Binding the closed name goes to the server under the client's own name, which the
    # server has never had: PostgreSQL itself answers 26000 and fails the transaction.
    out = relay.from_client(bind(b"", b"s") + execute() + SYNC)
    assert types(out) == b"BES" and b"\x00s\x00" in out
    assert drained(relay) == b""


def test_close_with_nothing_pending_is_answered_at_once(registry):
    relay = new_relay(registry)
    relay.from_client(parse(b"s", b"SELECT 8") + SYNC)
    relay.from_server(PREPARED + ZI)
    out = relay.from_client(m.close_statement(b"s") + SYNC)
    assert out == SYNC
    assert drained(relay) == C3
    assert relay.from_server(ZI) == ZI


def test_close_of_portal_and_unnamed_statement_go_to_the_server(registry):
    relay = new_relay(registry)
    batch = close_portal(b"p") + m.message(b"C", b"S\x00") + SYNC
    assert relay.from_client(batch) == batch
    assert relay.from_server(C3 + C3 + ZI) == C3 + C3 + ZI


# ---------------------------------------------------------------- errors

def test_error_drops_the_failed_parse_name(registry):
    server = ServerState()
    relay = new_relay(registry, server)
    bad_name = server_name(registry, b"SELECT nope")
    out = relay.from_client(parse(b"bad", b"SELECT nope") + describe_stmt(b"bad")
                            + bind(b"", b"w_unknown_to_this_client") + SYNC)
    # Close + Parse + the proxy's Describe + the client's go out; the Bind of a name this client
    # never prepared goes out under that name, for the server to refuse (it is skipped here,
    # after the Parse's error).
    assert types(out) == b"CPDDBS"
    seen = drained(relay) + relay.from_server(C3 + err("42703", 'column "nope" does not exist') + ZI)
    assert types(seen) == b"EZ"
    assert error_code(seen) == ["42703"]
    assert b"bad" not in relay.statements
    assert not server.prepared.has(bad_name)
    assert relay.releasable

    # The name is free again, and the statement text is really parsed this time.
    out = relay.from_client(parse(b"bad", b"SELECT nope") + SYNC)
    assert parse_names(out) == [bad_name]
    assert types(drained(relay) + relay.from_server(PREPARED + ZI)) == b"1Z"

def test_parse_skipped_after_an_error_leaves_no_name_even_if_the_server_had_it(registry):
    # PostgreSQL skips every message after an error up to Sync, so "ok" was never created.
    # Re-sending the same batch (what a driver does after fixing the first statement)
    # must not fail with 42P05 "already exists".
    server = ServerState()
    warm = new_relay(registry, server)
    warm.from_client(parse(b"w", b"SELECT 'warm'") + SYNC)
    warm.from_server(PREPARED + ZI)
    warm.detach()

    relay = new_relay(registry, server)
    relay.from_client(parse(b"bad", b"SELECT nope") + parse(b"ok", b"SELECT 'warm'") + SYNC)
    relay.from_server(C3 + err() + ZI)
    assert b"ok" not in relay.statements

    out = relay.from_client(parse(b"bad", b"SELECT 'fixed'") + parse(b"ok", b"SELECT 'warm'") + SYNC)
    # The server still has the shared statement (its Close was skipped too): closed first again.
    assert m.close_statement(server_name(registry, b"SELECT 'warm'")) in out
    seen = drained(relay) + relay.from_server(PREPARED + PREPARED + ZI)
    assert error_code(seen) == []
    assert types(seen) == b"11Z"


def test_close_skipped_after_an_error_keeps_the_statement(registry):
    # PostgreSQL skips a Close that follows an error in the same batch: the statement still exists.
    relay = new_relay(registry)
    relay.from_client(parse(b"keep", b"SELECT 'keep'") + SYNC)
    relay.from_server(P1 + ZI)

    relay.from_client(parse(b"", b"SELECT nope") + m.close_statement(b"keep") + SYNC)
    seen = drained(relay) + relay.from_server(err() + ZI)
    assert types(seen) == b"EZ"               # no CloseComplete for the skipped Close
    out = relay.from_client(bind(b"", b"keep") + execute() + SYNC)
    assert error_code(drained(relay)) == []
    assert types(out) == b"BES"


def test_messages_after_an_error_before_sync_get_no_made_up_answers(registry):
    # Parse + Flush fails; the server now ignores everything up to Sync, so a Parse of a
    # statement it already has must not be answered by the proxy either.
    server = ServerState()
    warm = new_relay(registry, server)
    warm.from_client(parse(b"w", b"SELECT 'warm'") + SYNC)
    warm.from_server(P1 + ZI)
    warm.detach()

    relay = new_relay(registry, server)
    relay.from_client(parse(b"", b"SELECT nope") + FLUSH)
    assert types(relay.from_server(err())) == b"E"
    relay.from_client(parse(b"w", b"SELECT 'warm'") + bind(b"", b"w") + execute() + SYNC)
    seen = drained(relay) + relay.from_server(ZI)
    assert types(seen) == b"Z"
    assert b"w" not in relay.statements


def test_bind_of_unknown_statement_is_raised_on_the_server(registry):
    # Never forwarded under its own name: "U_1" could be another client's server-side statement.
    # The proxy has the server raise 26000, so the batch is skipped and a transaction fails.
    relay = new_relay(registry)
    other = new_relay(registry)
    other.from_client(parse(b"secret", b"SELECT 'not yours'") + SYNC)
    batch = bind(b"", b"U_1") + describe_stmt(b"") + execute() + parse(b"later", b"SELECT 1") + SYNC
    out = relay.from_client(batch)
    msgs = split(out)
    assert [t for t, _ in msgs[:4]] == [b"C", b"P", b"B", b"E"]
    assert b"::pg_catalog.int4" in msgs[1][1] and b"26000" in msgs[1][1] and b"DO " not in out
    assert b"\x00U_1\x00" not in out
    seen = relay.from_server(C3 + P1 + B2 + err("22P02", "invalid input syntax for type integer") + ZI)
    # The client gets the proxy's error in PostgreSQL's words, not the server's 22P02.
    assert types(seen) == b"EZ" and error_code(seen) == ["26000"]
    assert b'prepared statement "U_1" does not exist' in seen and b"integer" not in seen
    assert b"later" not in relay.statements   # skipped by the server, so not created
    assert relay.releasable
    batch = parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + SYNC
    assert relay.from_client(batch) == batch


def test_unknown_statement_names_go_to_the_server_for_its_own_26000(registry):
    relay = new_relay(registry)
    out = relay.from_client(describe_stmt(b"ghost") + bind(b"", b"ghost") + SYNC)
    assert types(out) == b"DBS" and b"ghost" in out
    seen = relay.from_server(err("26000", 'prepared statement "ghost" does not exist') + ZI)
    assert error_code(seen) == ["26000"]


def test_flush_after_sync_does_not_hold_the_connection(registry):
    relay = new_relay(registry)
    relay.from_client(parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + SYNC + FLUSH)
    relay.from_server(P1 + B2 + row(1) + cc("SELECT 1") + ZI)
    assert relay.releasable


def test_duplicate_parse_name_is_raised_by_the_server_as_42P05(registry):
    relay = new_relay(registry)
    relay.from_client(parse(b"dup", b"SELECT 1") + SYNC)
    relay.from_server(PREPARED + ZI)
    out = relay.from_client(parse(b"dup", b"SELECT 2") + bind(b"", b"dup") + execute() + SYNC)
    # A statement that fails runs on the server, so a transaction fails as it would.
    msgs = split(out)
    assert [t for t, _ in msgs[:4]] == [b"C", b"P", b"B", b"E"]
    assert b"42P05" in msgs[1][1] and b'"dup" already exists' in msgs[1][1]
    seen = relay.from_server(C3 + P1 + B2 + err("22P02", "invalid input syntax for type integer") + ZI)
    assert types(seen) == b"EZ" and error_code(seen) == ["42P05"]   # the proxy's Parse/Bind answers are its own
    assert b"dup" in relay.statements                                 # the first one still exists


def test_proxy_refusal_in_an_aborted_transaction_is_the_servers_25P02(registry):
    # In a failed transaction block the server refuses the proxy's statement itself (25P02),
    # as it would have refused the client's: that error stands.
    relay = new_relay(registry)
    relay.from_client(parse(b"dup", b"SELECT 1") + SYNC)
    relay.from_server(PREPARED + ZI)
    relay.from_client(parse(b"dup", b"SELECT 2") + SYNC)
    seen = relay.from_server(C3 + err("25P02", "current transaction is aborted") + m.ready_for_query(b"E"))
    assert types(seen) == b"EZ" and error_code(seen) == ["25P02"]


def test_injected_parse_failure_reaches_the_client(registry):
    # The statement was fine on the first server, but the table is gone on the second.
    relay = moved_relay(registry, b"SELECT * FROM t")
    name = server_name(registry, b"SELECT * FROM t")
    relay.from_client(bind(b"", b"q") + execute() + SYNC)
    seen = relay.from_server(err("42P01", 'relation "t" does not exist') + ZI)
    assert types(seen) == b"EZ" and error_code(seen) == ["42P01"]
    assert not relay.server.prepared.has(name)          # next time it is injected again
    out = relay.from_client(bind(b"", b"q") + execute() + SYNC)
    assert parse_names(out) == [name]


# ---------------------------------------------------------------- transaction boundaries

def test_releasable_only_after_ready_for_query_idle_with_nothing_outstanding(registry):
    relay = new_relay(registry)
    relay.from_client(parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + SYNC
                      + bind(b"", b"") + execute() + SYNC)
    relay.from_server(P1 + B2 + row(1))
    assert not relay.releasable
    relay.from_server(cc("SELECT 1") + ZI)
    assert not relay.releasable               # the second Sync is still unanswered
    relay.from_server(B2 + row(1) + cc("SELECT 1") + ZI)
    assert relay.releasable

    relay.from_client(m.query("BEGIN"))
    relay.from_server(cc("BEGIN") + ZT)
    assert not relay.releasable and relay.status == b"T"
    relay.from_client(m.query("SELECT 1/0"))
    relay.from_server(err("22012", "division by zero") + ZE)
    assert not relay.releasable and relay.status == b"E"
    relay.from_client(m.query("ROLLBACK"))
    assert not relay.releasable
    relay.from_server(cc("ROLLBACK"))
    assert not relay.releasable
    relay.from_server(ZI)
    assert relay.releasable


def test_flush_alone_does_not_make_releasable(registry):
    # After Parse + Flush the server holds the unnamed statement (and after Execute + Flush, an
    # implicit transaction) until Sync: the connection must stay with this client.
    relay = new_relay(registry)
    relay.from_client(parse(b"", b"SELECT 1") + FLUSH)
    relay.from_server(P1)
    assert not relay.releasable               # no ReadyForQuery yet
    relay.from_client(bind(b"", b"") + execute() + FLUSH)
    relay.from_server(B2 + row(1) + cc("SELECT 1"))
    assert not relay.releasable
    relay.from_client(SYNC)
    relay.from_server(ZI)
    assert relay.releasable


def test_multi_statement_simple_query(registry):
    relay = new_relay(registry)
    relay.from_client(m.query("SELECT 1; SELECT 2"))
    relay.from_server(m.row_description(["a"]) + row(1) + cc("SELECT 1"))
    assert not relay.releasable
    relay.from_server(m.row_description(["a"]) + row(2) + cc("SELECT 1") + ZI)
    assert relay.releasable


def test_pinned_client_is_never_releasable(registry):
    relay = new_relay(registry, mode="rds")
    relay.from_client(m.query("SET work_mem = '8MB'"))
    relay.from_server(cc("SET") + ZI)
    assert relay.pinned
    assert not relay.releasable


def test_notices_and_parameter_status_outside_requests_are_forwarded(registry):
    server = ServerState()
    relay = new_relay(registry, server)
    unsolicited = m.notice_response("hello") + m.message(b"A", struct.pack("!I", 1) + b"ch\x00pl\x00") \
        + m.parameter_status("TimeZone", "UTC")
    assert relay.from_server(unsolicited) == unsolicited


def test_copy_in_and_out_pass_through(registry):
    relay = new_relay(registry)
    relay.from_client(m.query("COPY t FROM STDIN"))
    g = m.message(b"G", b"\x00" + struct.pack("!H", 0))
    assert relay.from_server(g) == g
    data = m.message(b"d", b"1\n") * 3 + m.message(b"c")
    assert relay.from_client(data) == data
    relay.from_server(cc("COPY 3") + ZI)
    assert relay.releasable


# ---------------------------------------------------------------- parameter sync

def test_attach_prelude_syncs_parameters_and_hides_its_replies(registry):
    server = ServerState()
    relay = make_relay(registry, {"search_path": "app, public", "application_name": "x"})
    prelude = relay.attach(server)
    assert split(prelude)[0][0] == b"Q"
    assert server.params == {"search_path": "app, public", "application_name": "x"}
    out = relay.from_client(m.query("SELECT 1"))
    status = m.parameter_status("application_name", "x")
    reply_prelude = (m.row_description(["set_config", "set_config"]) + status + row("app, public", "x")
                     + cc("SELECT 1") + ZI)
    reply = m.row_description(["?column?"]) + row(1) + cc("SELECT 1") + ZI
    assert out == m.query("SELECT 1")
    seen = relay.from_server(reply_prelude + reply)
    # The sync's rows are the proxy's business; the ParameterStatus is the client's own value.
    assert seen == status + reply
    relay.detach()
    # Same parameters on the same server: nothing to send.
    assert make_relay(registry, {"search_path": "app, public", "application_name": "x"}).attach(server) == b""


def test_attach_prelude_error_is_fatal(registry):
    relay = make_relay(registry, {"work_mem": "lots"})
    relay.attach(ServerState())
    relay.from_client(m.query("SELECT 1"))
    seen = relay.from_server(err("22023", 'invalid value for parameter "work_mem": "lots"') + ZI)
    assert relay.fatal is not None
    fields = m.parse_error_fields(relay.fatal[5:])
    assert fields["S"] == "FATAL" and fields["C"] == "22023"
    assert b"lots" not in seen                # the client gets it as the FATAL, not as an answer


@pytest.mark.parametrize("have, want, sql", [
    ({}, {}, ""),
    ({"a": "1"}, {"a": "1"}, ""),
    # set_config reads a list value as a list (SET search_path TO 'a, b' would make one schema).
    ({}, {"search_path": "app, public"}, "SELECT pg_catalog.set_config('search_path', 'app, public', false)"),
    ({"work_mem": "4MB"}, {}, "RESET work_mem"),
    ({"work_mem": "4MB"}, {"work_mem": "8MB"}, "SELECT pg_catalog.set_config('work_mem', '8MB', false)"),
    ({"a": "1", "b": "2"}, {"b": "2", "c": "3"}, "RESET a;SELECT pg_catalog.set_config('c', '3', false)"),
    ({"x": "1"}, {"y": "it's"}, "RESET x;SELECT pg_catalog.set_config('y', 'it''s', false)"),
    ({}, {"DateStyle": "ISO, MDY"}, "SELECT pg_catalog.set_config('DateStyle', 'ISO, MDY', false)"),
    ({}, {"myapp.tenant": "a\\b"}, "SELECT pg_catalog.set_config('myapp.tenant', E'a\\\\b', false)"),
    # Changing the session authorization resets the role: set it again, after.
    ({"session_authorization": "x", "role": "r"}, {"role": "r"},
     "RESET session_authorization;SELECT pg_catalog.set_config('role', 'r', false)"),
    ({}, {"role": "r", "session_authorization": "x", "a": "1"},
     "SELECT pg_catalog.set_config('a', '1', false), pg_catalog.set_config('session_authorization', 'x', false), "
     "pg_catalog.set_config('role', 'r', false)"),
    # A superuser-only setting under a restricted role: as the login user, then the role again.
    ({"role": "r"}, {"role": "r", "session_replication_role": "replica"},
     "RESET role;SELECT pg_catalog.set_config('session_replication_role', 'replica', false), "
     "pg_catalog.set_config('role', 'r', false)"),
])
def test_param_sync_sql(have, want, sql):
    assert param_sync_sql(have, want) == sql


# ---------------------------------------------------------------- framing

@pytest.mark.parametrize("header", [
    b"Q" + struct.pack("!I", 2 ** 31),
    b"Q" + struct.pack("!I", 0xFFFFFFFF),
    b"P" + struct.pack("!I", 3),
    b"d" + struct.pack("!I", 0),
])
def test_bad_message_length_raises_protocol_error(registry, header):
    relay = new_relay(registry)
    with pytest.raises(m.ProtocolError) as ei:
        relay.from_client(header)
    assert ei.value.sqlstate == "08P01"


def test_bad_length_after_a_good_message_and_across_calls(registry):
    relay = new_relay(registry)
    with pytest.raises(m.ProtocolError):
        relay.from_client(m.query("SELECT 1") + b"Q" + struct.pack("!I", 2 ** 31))
    relay = new_relay(registry)
    relay.from_client(b"Q\x80")
    with pytest.raises(m.ProtocolError):
        relay.from_client(b"\x00\x00\x00")


def test_unknown_message_type_raises_protocol_error(registry):
    relay = new_relay(registry)
    with pytest.raises(m.ProtocolError):
        relay.from_client(m.message(b"!", b"abc"))


def test_unknown_message_type_is_rejected_before_its_body_arrives(registry):
    # PostgreSQL rejects an unknown type byte at once; waiting for the body lets garbage with a
    # plausible length hold the connection open.
    relay = new_relay(registry)
    with pytest.raises(m.ProtocolError):
        relay.from_client(b"\x00\x01\x02\x03\x04\x05\x06\x07")


def test_password_message_after_login_raises_protocol_error(registry):
    # 'p' belongs to authentication; PostgreSQL answers it after login with FATAL 08P01.
    relay = new_relay(registry)
    with pytest.raises(m.ProtocolError):
        relay.from_client(m.password_message(b"letmein\x00"))


def _scenario(registry):
    """A relay on a server lacking its statement, plus the client and server byte streams."""
    relay = moved_relay(registry, b"SELECT generate_series(1, $1::int)")
    client = (bind(b"", b"q", (b"3",)) + execute() + m.close_statement(b"q") + SYNC
              + m.query("SELECT 'x'") + parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + SYNC)
    server = (PREPARED + B2 + row(1) + m.notice_response("careful") + row(2) + row("three" * 1000) + cc("SELECT 3")
              + ZI + m.row_description(["?column?"]) + row("x") + cc("SELECT 1") + ZI
              + P1 + B2 + row(1) + cc("SELECT 1") + ZI)
    return relay, client, server


def test_split_messages_give_the_same_output_as_whole():
    relay, client, server = _scenario(StatementRegistry())
    to_server = relay.from_client(client)
    to_client = drained(relay) + relay.from_server(server)
    assert types(to_client) == b"2DNDDC3ZTDCZ12DCZ"

    # Byte by byte, both ways.
    relay2, client2, server2 = _scenario(StatementRegistry())
    got_server = b"".join(relay2.from_client(client2[i:i + 1]) for i in range(len(client2)))
    got_client = drained(relay2)
    for i in range(len(server2)):
        got_client += relay2.from_server(server2[i:i + 1])
        got_client += drained(relay2)
    assert got_server == to_server
    assert got_client == to_client
    assert relay2.releasable

    # Split into two calls at many positions.
    for cut in range(0, len(server), 7):
        r, c, s = _scenario(StatementRegistry())
        assert r.from_client(c[:cut % len(c)]) + r.from_client(c[cut % len(c):]) == to_server
        out = drained(r) + r.from_server(s[:cut]) + r.from_server(s[cut:])
        assert out == to_client, cut


# ---------------------------------------------------------------- startup values after a reset

def startup_relay(registry, params: dict) -> tuple[Relay, ServerState]:
    server = ServerState(params=dict(params))
    return new_relay(registry, server, params), server


def test_reset_of_a_startup_parameter_is_followed_by_its_value_in_the_same_string(registry):
    relay, server = startup_relay(registry, {"work_mem": "32MB"})
    out = relay.from_client(m.query("RESET work_mem; SHOW work_mem"))
    assert out == m.query("RESET work_mem;SELECT pg_catalog.set_config('work_mem', '32MB', false); SHOW work_mem")
    seen = relay.from_server(cc("RESET") + m.row_description(["set_config"]) + row("32MB") + cc("SELECT 1")
                             + m.row_description(["work_mem"]) + row("32MB") + cc("SHOW") + ZI)
    # The proxy's statement is not seen; the client's go on as they were.
    assert seen == cc("RESET") + m.row_description(["work_mem"]) + row("32MB") + cc("SHOW") + ZI
    assert relay.session.params == server.params == {"work_mem": "32MB"}
    assert relay.releasable


def test_reset_at_the_end_of_a_string_with_a_comment(registry):
    relay, _ = startup_relay(registry, {"work_mem": "32MB"})
    out = relay.from_client(m.query("SELECT 1; RESET ALL -- the end"))
    assert out == m.query("SELECT 1; RESET ALL -- the end\n;SELECT pg_catalog.set_config('work_mem', '32MB', false)")
    # Other statements and other clients' strings are left alone.
    assert relay.from_client(m.query("RESET lock_timeout")) == m.query("RESET lock_timeout")
    plain, _ = startup_relay(registry, {})
    assert plain.from_client(m.query("RESET ALL")) == m.query("RESET ALL")


def test_discard_all_is_followed_by_a_query_of_the_proxy_own(registry):
    relay, server = startup_relay(registry, {"work_mem": "32MB"})
    relay.from_client(m.query("SET work_mem = '1MB'"))
    relay.from_server(cc("SET") + ZI)
    out = relay.from_client(m.query("DISCARD ALL"))
    # DISCARD ALL must be alone in its string.
    assert out == m.query("DISCARD ALL") + m.query("SELECT pg_catalog.set_config('work_mem', '32MB', false)")
    # The client's ReadyForQuery waits for the proxy's Query; only its ParameterStatus shows.
    assert relay.from_server(cc("DISCARD ALL") + ZI) == cc("DISCARD ALL")
    assert not relay.releasable
    status = m.parameter_status("application_name", "x")
    seen = relay.from_server(m.row_description(["set_config"]) + row("32MB") + cc("SELECT 1") + status + ZI)
    assert seen == status
    # ... and for the check of what DISCARD ALL may have dropped.
    assert len(relay.to_server) == 1
    relay.to_server.clear()
    seen = relay.from_server(m.row_description(["a"] * 5) + row(*["0"] * 5) + cc("SELECT 1") + ZI)
    assert seen == ZI
    assert relay.session.params == server.params == {"work_mem": "32MB"}
    assert relay.releasable
    # In a transaction block it fails, and so does the proxy's Query, unseen.
    relay.from_client(m.query("BEGIN"))
    relay.from_server(cc("BEGIN") + ZT)
    relay.from_client(m.query("DISCARD ALL"))
    seen = relay.from_server(err("25001", "DISCARD ALL cannot run inside a transaction block") + ZE
                             + err("25P02", "current transaction is aborted") + ZE)
    assert error_code(seen) == ["25001"] and types(seen) == b"EZ" and relay.fatal is None


def test_set_config_null_becomes_the_startup_value(registry):
    relay, server = startup_relay(registry, {"work_mem": "32MB"})
    out = relay.from_client(m.query("SELECT set_config('work_mem', NULL::text, false), current_setting('work_mem')"))
    assert out == m.query("SELECT set_config('work_mem', '32MB'::text, false), current_setting('work_mem')")
    relay.from_server(m.row_description(["a", "b"]) + row("32MB", "32MB") + cc("SELECT 1") + ZI)
    assert relay.session.params == server.params == {"work_mem": "32MB"}
    # In a Parse too, unnamed or named.
    out = relay.from_client(parse(b"", b"SELECT set_config('work_mem', NULL, false)"))
    assert split(out)[0][1] == b"\x00SELECT set_config('work_mem', '32MB', false)\x00\x00\x00"
    out = relay.from_client(parse(b"n", b"SELECT set_config('work_mem', null, $1::bool)", (16,)))
    assert b"'32MB'" in out and b"null" not in out


def test_error_position_is_mapped_back_to_the_client_text(registry):
    relay, _ = startup_relay(registry, {"work_mem": "32MB"})
    sent = relay.from_client(m.query("RESET work_mem; SELECT nope"))
    text = split(sent)[0][1][:-1].decode()
    where = text.index("nope") + 1
    error = m.message(b"E", b"SERROR\x00C42703\x00Mcolumn \"nope\" does not exist\x00P%d\x00\x00" % where)
    seen = relay.from_server(cc("RESET") + m.row_description(["s"]) + row("32MB") + cc("SELECT 1") + error + ZI)
    fields = m.parse_error_fields(split(seen)[1][1])
    assert fields["P"] == str("RESET work_mem; SELECT nope".index("nope") + 1)


def test_extended_reset_is_followed_by_the_proxy_own_statement(registry):
    relay, server = startup_relay(registry, {"work_mem": "32MB"})
    out = relay.from_client(parse(b"", b"RESET ALL") + bind(b"", b"") + execute()
                            + parse(b"", b"SHOW work_mem") + bind(b"", b"") + execute() + SYNC)
    assert types(out) == b"PBE" + b"CPBECC" + b"PBES"
    own = split(out)[4][1]
    assert own.startswith(b"U_0\x00SELECT pg_catalog.set_config('work_mem', '32MB', false)")
    seen = relay.from_server(P1 + B2 + cc("RESET") + C3 + P1 + B2 + row("32MB") + cc("SELECT 1") + C3 + C3
                             + P1 + B2 + row("32MB") + cc("SHOW") + ZI)
    assert seen == P1 + B2 + cc("RESET") + P1 + B2 + row("32MB") + cc("SHOW") + ZI
    assert relay.session.params == server.params == {"work_mem": "32MB"}
    assert relay.releasable


def test_error_position_after_a_replaced_null_and_inside_the_proxy_statement(registry):
    relay, _ = startup_relay(registry, {"work_mem": "32MB"})
    original = "SELECT set_config('work_mem', NULL, false), nope; RESET ALL"
    sent = split(relay.from_client(m.query(original)))[0][1][:-1].decode()

    def error_at(where: int) -> bytes:
        return m.message(b"E", b"SERROR\x00C42703\x00Mboom\x00P%d\x00\x00" % where)
    seen = relay.from_server(error_at(sent.index("nope") + 1) + ZI)
    assert m.parse_error_fields(split(seen)[0][1])["P"] == str(original.index("nope") + 1)
    relay.from_client(m.query(original))
    seen = relay.from_server(error_at(sent.index("pg_catalog") + 1) + ZI)   # in the proxy's own text
    assert "P" not in m.parse_error_fields(split(seen)[0][1])


def test_statement_with_a_backslash_is_not_shared_and_its_reprepare_notices_are_dropped(registry):
    # Its text is lexed by standard_conforming_strings of the moment, and warned about when
    # that is off: each client's Parse reaches the server.
    s1, s2 = ServerState(), ServerState()
    a = prepared_then_detached(registry, s1, b"x", b"SET application_name = 'a\\b'")
    b = new_relay(registry, s1)
    out = b.from_client(parse(b"y", b"SET application_name = 'a\\b'") + SYNC)
    assert types(out) == b"CPDS" and parse_names(out) != parse_names(a.statements[b"x"].parse_msg)
    warning = m.notice_response("nonstandard use of \\\\ in a string literal", code="22P06")
    assert b.from_server(C3 + warning + P1 + SHAPED + ZI) == warning + P1 + ZI
    b.detach()
    # Prepared again on another server connection: the client saw that warning at its Parse.
    b.attach(s2)
    out = b.from_client(bind(b"", b"y") + execute() + SYNC)
    assert types(out) == b"CPDBES"
    assert b.from_server(C3 + warning + P1 + SHAPED + B2 + cc("SET") + ZI) == B2 + cc("SET") + ZI


def test_set_config_value_that_may_be_null_falls_back_to_the_startup_value(registry):
    relay, _ = startup_relay(registry, {"work_mem": "32MB"})
    out = relay.from_client(m.query("SELECT set_config('work_mem', (SELECT NULL), false)"))
    assert out == m.query("SELECT set_config('work_mem', COALESCE((SELECT NULL), '32MB'), false)")
    out = relay.from_client(parse(b"", b"SELECT set_config('work_mem', $1, false)"))
    assert split(out)[0][1] == b"\x00SELECT set_config('work_mem', COALESCE($1, '32MB'), false)\x00\x00\x00"
    out = relay.from_client(parse(b"", b"SELECT set_config('lock_timeout', $1, false)"))   # not a startup value
    assert b"COALESCE" not in out


# ---------------------------------------------------------------- the fast walk of a plain answer

_TRICK_ROW = row("x" * 10 + "Z\x00\x00\x00\x05I")   # a DataRow whose bytes end like a ReadyForQuery

PLAIN_CASES = [
    # (query, server answer in reads, what each try of the fast walk gave: True = taken)
    ("SELECT 1", [m.row_description(["a"]) + row(1) + row(2) + cc("SELECT 2") + ZI], [True]),
    ("SELECT 1", [m.row_description(["a"]) + m.notice_response("careful") + row(1) + cc("SELECT 1") + ZI],
     [True]),
    ("", [m.message(b"I") + ZI], [True]),
    ("SELECT 1", [m.row_description(["a"]) + row(1) + cc("SELECT 1") + ZT], [True]),
    ("SELECT 1; SELECT 2", [m.row_description(["a"]) + row(1) + cc("SELECT 1") + m.row_description(["b"])
                            + row(2) + cc("SELECT 1") + ZI], [True]),
    ("SELECT x", [err() + ZI], [False]),
    ("SELECT 1", [m.parameter_status("TimeZone", "UTC") + m.row_description(["a"]) + row(1) + cc("SELECT 1")
                  + ZI], [False]),
    # A read that ends inside a row whose bytes look like a ReadyForQuery: declined, buffered.
    ("SELECT 1", [m.row_description(["a"]) + _TRICK_ROW, cc("SELECT 1") + ZI], [False, True]),
    ("SELECT 1", [m.row_description(["a"]) + row(1), cc("SELECT 1") + ZI], [True]),
    # Transaction control alone: only when its CommandComplete is all the answer.
    ("BEGIN", [cc("BEGIN") + ZT], [True]),
    ("start transaction isolation level serializable", [cc("BEGIN") + ZT], [True]),
    ("COMMIT", [cc("COMMIT") + ZI], [True]),
    ("END", [cc("ROLLBACK") + ZI], [True]),
    ("BEGIN", [m.notice_response("there is already a transaction in progress") + cc("BEGIN") + ZT], [False]),
    ("ROLLBACK", [m.parameter_status("TimeZone", "UTC") + cc("ROLLBACK") + ZI], [False]),
    ("COMMIT", [err("40001", "could not serialize") + ZI], [False]),
    ("BEGIN; SELECT 1", [cc("BEGIN") + m.row_description(["a"]) + row(1) + cc("SELECT 1") + ZT], []),
]


def _watch_fast_walk(monkeypatch, name: str, general_only: bool) -> list[bool]:
    """Patch Relay.<name> (a fast walk) to record whether each try was taken; with
    general_only it always declines, so the general walk does everything."""
    taken: list[bool] = []
    real = getattr(Relay, name)

    def walk(self, *args):
        out = None if general_only else real(self, *args)
        taken.append(out is not None)
        return out
    monkeypatch.setattr(Relay, name, walk)
    return taken


def _run_plain(query, reads, general_only, monkeypatch=None, verify=False):
    relay = make_relay(StatementRegistry(), mode="smart")
    if verify:
        relay.session.seen = []
    relay.attach(ServerState())
    fast = _watch_fast_walk(monkeypatch, "_plain_answer", general_only)
    to_server = relay.from_client(m.query(query))
    out = drained(relay) + b"".join(relay.from_server(r) + drained(relay) for r in reads)
    monkeypatch.undo()
    state = (relay.status, relay.releasable, list(relay.queue), relay.session._query_failed,
             relay.session.pinned, relay.sbuf, relay.to_server)
    return to_server, out, state, fast


@pytest.mark.parametrize("query,reads,tries", PLAIN_CASES)
def test_fast_walk_of_a_plain_answer_gives_what_the_general_walk_gives(query, reads, tries, monkeypatch):
    fast_run = _run_plain(query, reads, False, monkeypatch)
    general = _run_plain(query, reads, True, monkeypatch)
    assert fast_run[:3] == general[:3]
    assert fast_run[3] == tries
    assert split(fast_run[1])       # whole messages only
    assert fast_run[1].endswith(ZI) or fast_run[1].endswith(ZT)


def test_fast_walk_holds_ready_for_query_while_a_check_runs(registry, monkeypatch):
    # A check is due at this ReadyForQuery (an advisory lock was asked for): the client's
    # ReadyForQuery waits until the proxy's own question is answered, on both walks.
    from unpinned.sql.effects import Reason
    outs = []
    for general_only in (False, True):
        relay = new_relay(StatementRegistry())
        taken = _watch_fast_walk(monkeypatch, "_plain_answer", general_only)
        relay.from_client(m.query("SELECT 2"))
        relay.session._checks[Reason.ADVISORY_LOCK] = (None, "simple")
        out = relay.from_server(m.row_description(["a"]) + row(2) + cc("SELECT 1") + ZI)
        assert types(out) == b"TDC" and b"pg_locks" in b"".join(relay.to_server)
        assert not relay.releasable
        relay.to_server.clear()
        out2 = relay.from_server(m.row_description(["held"]) + row(1) + cc("SELECT 1") + ZI)
        assert types(out2) == b"Z" and relay.session.pinned
        assert taken[0] is not general_only
        outs.append((out, out2))
        monkeypatch.undo()
    assert outs[0] == outs[1]


_SET8 = ("SET work_mem = '8MB'", cc("SET") + ZT)
TXN_SCRIPTS = [
    # (client's queries, with each answer; work_mem the session has at the end): a parameter set
    # in a transaction that commits, rolls back, or fails and is ended by COMMIT (tag ROLLBACK);
    # a savepoint rolled back to.
    ([("BEGIN", cc("BEGIN") + ZT), _SET8, ("COMMIT", cc("COMMIT") + ZI)], "8MB"),
    ([("BEGIN", cc("BEGIN") + ZT), _SET8, ("ROLLBACK", cc("ROLLBACK") + ZI)], None),
    ([("BEGIN", cc("BEGIN") + ZT), _SET8, ("SELECT x", err() + ZE), ("COMMIT", cc("ROLLBACK") + ZI)], None),
    ([("BEGIN", cc("BEGIN") + ZT), _SET8, ("SAVEPOINT a", cc("SAVEPOINT") + ZT),
      ("SET work_mem = '9MB'", cc("SET") + ZT), ("ROLLBACK TO a", cc("ROLLBACK") + ZT), ("END", cc("COMMIT") + ZI)],
     "8MB"),
]


def _as_batch(query: str, answer: bytes) -> tuple[bytes, bytes]:
    """The same statement through the extended protocol, as most drivers send it."""
    return (parse(b"", query.encode()) + bind(b"", b"") + DESCRIBE_PORTAL + execute() + SYNC,
            P1 + B2 + NO_DATA + answer if answer[:1] != b"E" else P1 + B2 + answer)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("script,work_mem", TXN_SCRIPTS)
def test_fast_walk_of_transaction_control_keeps_the_session_as_the_general_walk(script, work_mem, protocol,
                                                                              monkeypatch):
    results = []
    for general_only in (False, True):
        relay = make_relay(StatementRegistry(), mode="smart")
        server = ServerState()
        relay.attach(server)
        taken = _watch_fast_walk(monkeypatch, "_plain_answer" if protocol == "simple" else "_plain_batch",
                                 general_only)
        outs = []
        for query, answer in script:
            request, answer = (m.query(query), answer) if protocol == "simple" else _as_batch(query, answer)
            outs.append((relay.from_client(request), relay.from_server(answer) + drained(relay)))
        monkeypatch.undo()
        results.append((outs, relay.status, relay.releasable, relay.session.params, server.params,
                        relay.session._savepoints, list(relay.queue)))
        if not general_only:
            assert taken[0] and taken[-1]       # BEGIN and the last statement took the fast walk
    assert results[0] == results[1]
    assert results[0][3].get("work_mem") == work_mem and results[0][1] == b"I" and results[0][2]


def test_verify_mode_still_sees_every_statement(registry, monkeypatch):
    _, _, _, fast = _run_plain("SELECT 42", [m.row_description(["a"]) + row(42) + cc("SELECT 1") + ZI],
                               False, monkeypatch, verify=True)
    assert fast == []       # the fast walk is not used: verify mode records the statement text


DESCRIBE_PORTAL = m.message(b"D", b"P\x00")
T_A = m.row_description(["a"])
NO_DATA = m.message(b"n")

BATCH_CASES = [
    # (client bytes, server answer in reads, what each try of the fast walk gave)
    (parse(b"", b"SELECT $1") + bind(b"", b"", (b"1",)) + DESCRIBE_PORTAL + execute() + SYNC,
     [P1 + B2 + T_A + row(1) + cc("SELECT 1") + ZI], [True]),
    (parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + parse(b"", b"SELECT 2") + bind(b"", b"")
     + execute() + SYNC, [P1 + B2 + row(1) + cc("SELECT 1") + P1 + B2 + row(2) + cc("SELECT 1") + ZI], [True]),
    (parse(b"s1", b"SELECT 1") + bind(b"", b"s1") + DESCRIBE_PORTAL + execute() + SYNC,
     [PREPARED + B2 + T_A + m.notice_response("careful") + row(1) + cc("SELECT 1") + ZT], [False]),
    (parse(b"", b"INSERT INTO t VALUES (1)") + bind(b"", b"") + DESCRIBE_PORTAL + execute() + SYNC,
     [P1 + B2 + NO_DATA + cc("INSERT 0 1") + ZI], [True]),
    (parse(b"", b"") + bind(b"", b"") + execute() + SYNC, [P1 + B2 + m.message(b"I") + ZI], [True]),
    # The answer in two reads: the general walk takes the first, the fast one the rest.
    (parse(b"", b"SELECT 1") + bind(b"", b"") + DESCRIBE_PORTAL + execute() + SYNC,
     [P1 + B2 + T_A + row(1), cc("SELECT 1") + ZI], [True]),
    # Declined: an error, a parameter report, a statement with effects, a Describe of a statement.
    (parse(b"", b"SELECT x") + bind(b"", b"") + execute() + SYNC, [err() + ZI], [False]),
    (parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + SYNC,
     [P1 + B2 + m.parameter_status("TimeZone", "UTC") + row(1) + cc("SELECT 1") + ZI], [False]),
    (parse(b"", b"SET work_mem = '8MB'") + bind(b"", b"") + execute() + SYNC, [P1 + B2 + cc("SET") + ZI],
     [False]),
    (parse(b"s2", b"SELECT 1") + describe_stmt(b"s2") + SYNC,
     [PREPARED + m.message(b"t", b"\x00\x00") + T_A + ZI], [False]),
    # Transaction control alone: only when its CommandComplete is all the Execute's answer.
    (parse(b"", b"BEGIN") + bind(b"", b"") + DESCRIBE_PORTAL + execute() + SYNC, [P1 + B2 + NO_DATA + cc("BEGIN") + ZT],
     [True]),
    (parse(b"", b"COMMIT") + bind(b"", b"") + execute() + SYNC, [P1 + B2 + cc("ROLLBACK") + ZI], [True]),
    (parse(b"", b"BEGIN") + bind(b"", b"") + DESCRIBE_PORTAL + execute() + SYNC,
     [P1 + B2 + NO_DATA + m.notice_response("there is already a transaction in progress") + cc("BEGIN") + ZT], [False]),
    (parse(b"", b"ROLLBACK") + bind(b"", b"") + execute() + SYNC,
     [P1 + B2 + m.parameter_status("TimeZone", "UTC") + cc("ROLLBACK") + ZI], [False]),
]


@pytest.mark.parametrize("client,reads,tries", BATCH_CASES)
def test_fast_walk_of_a_batch_gives_what_the_general_walk_gives(client, reads, tries, monkeypatch):
    runs = []
    for general_only in (False, True):
        relay = make_relay(StatementRegistry())
        server = ServerState()
        relay.attach(server)
        taken = _watch_fast_walk(monkeypatch, "_plain_batch", general_only)
        to_server = relay.from_client(client)
        out = drained(relay) + b"".join(relay.from_server(r) + drained(relay) for r in reads)
        monkeypatch.undo()
        runs.append((to_server, out, relay.status, relay.releasable, list(relay.queue),
                     relay.session._query_failed, relay.session.params, sorted(relay.statements),
                     list(server.prepared.names), taken))
    assert runs[0][:-1] == runs[1][:-1]
    assert runs[0][-1] == tries
    assert split(runs[0][1])[-1][0] == b"Z"


def test_fast_walk_of_a_batch_holds_ready_for_query_while_a_check_runs(monkeypatch):
    from unpinned.sql.effects import Reason
    outs = []
    for general_only in (False, True):
        relay = new_relay(StatementRegistry())
        taken = _watch_fast_walk(monkeypatch, "_plain_batch", general_only)
        relay.from_client(parse(b"", b"SELECT 2") + bind(b"", b"") + execute() + SYNC)
        relay.session._checks[Reason.ADVISORY_LOCK] = (None, "extended")
        out = relay.from_server(P1 + B2 + row(2) + cc("SELECT 1") + ZI)
        assert types(out) == b"12DC" and b"pg_locks" in b"".join(relay.to_server)
        relay.to_server.clear()
        out2 = relay.from_server(m.row_description(["held"]) + row(1) + cc("SELECT 1") + ZI)
        assert types(out2) == b"Z" and relay.session.pinned and not relay.releasable
        assert taken[0] is not general_only
        outs.append((out, out2))
        monkeypatch.undo()
    assert outs[0] == outs[1]


PGBENCH_BATCH = (parse(b"", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;", (23,))
                 + bind(b"", b"", (b"4711",)) + DESCRIBE_PORTAL + execute() + SYNC)
_ONE = parse(b"", b"SELECT 1") + bind(b"", b"")
REQUEST_BATCHES = [
    # (client bytes, whether the fast walk takes them)
    *((client, fast) for (client, _, _), fast in zip(BATCH_CASES, (True, False, False, True, True, True, True,
                                                                   True, False, False))),
    (PGBENCH_BATCH, True),
    (_ONE + execute() + SYNC, True),
    # Not one whole batch on the unnamed statement and portal without effects: the message loop.
    (PGBENCH_BATCH + PGBENCH_BATCH, False),
    (PGBENCH_BATCH[:-1], False),
    (_ONE + execute() + FLUSH, False),
    (_ONE + execute(b"p") + SYNC, False),
    (parse(b"", b"SELECT 1") + bind(b"p", b"") + DESCRIBE_PORTAL + execute(b"p") + SYNC, False),
    (_ONE + m.message(b"D", b"S\x00") + execute() + SYNC, False),
    (_ONE + execute() + m.message(b"S", b"\x00"), False),
    (parse(b"", b"SELECT pg_advisory_lock(1)") + bind(b"", b"") + execute() + SYNC, False),
    (parse(b"", b"SET search_path = x") + bind(b"", b"") + DESCRIBE_PORTAL + execute() + SYNC, False),
]


@pytest.mark.parametrize("client,fast", REQUEST_BATCHES)
def test_fast_walk_of_a_request_batch_gives_what_the_message_loop_gives(client, fast, monkeypatch):
    runs = []
    for general_only in (False, True):
        relay = make_relay(StatementRegistry())
        relay.attach(ServerState())
        taken = _watch_fast_walk(monkeypatch, "_unnamed_batch", general_only)
        to_server = relay.from_client(client)
        monkeypatch.undo()
        runs.append((to_server, list(relay.queue), relay.unnamed_c, dict(relay.portal_c), relay.batch_open,
                     relay.skip_to_sync, relay.stats.query_requests, dict(relay.session.pins), taken))
    assert runs[0][:-1] == runs[1][:-1]
    assert runs[0][-1] == [fast] and runs[1][-1] == [False]


def test_sequence_values_of_another_client_are_discarded_at_hand_off(registry):
    server = ServerState()
    a = new_relay(registry, server)
    assert a.from_client(m.query("SELECT abalance FROM t WHERE aid = 1")) is not None
    assert server.seq_owner is None                     # a plain read sets no sequence value
    a.from_server(cc("SELECT 1") + ZI)
    a.from_client(m.query("INSERT INTO t(v) VALUES (1)"))   # a serial default may call nextval()
    assert server.seq_owner is a.session
    a.from_server(cc("INSERT 0 1") + ZI)
    a.detach()
    assert a.attach(server) == b""                      # its own values: kept for it
    a.from_client(m.query("SELECT lastval()"))
    a.from_server(row(1) + cc("SELECT 1") + ZI)
    a.detach()
    b = make_relay(registry)
    prelude = b.attach(server)
    assert prelude == m.query("DISCARD SEQUENCES") and server.seq_owner is None
    b.from_client(m.query("SELECT lastval()"))
    # Nothing of the proxy's statement reaches the client; the server's 55000 does.
    seen = b.from_server(cc("DISCARD SEQUENCES") + ZI + err("55000", "lastval is not yet defined in this session") + ZI)
    assert types(seen) == b"EZ" and error_code(seen) == ["55000"]
    assert b.releasable


def _after_another_clients_insert(registry) -> Relay:
    """A relay attached to a server connection where another client's INSERT ran: its
    DISCARD SEQUENCES goes first."""
    server = ServerState()
    a = new_relay(registry, server)
    a.from_client(m.query("INSERT INTO t(v) VALUES (1)"))
    a.from_server(cc("INSERT 0 1") + ZI)
    a.detach()
    b = make_relay(registry)
    assert b.attach(server) == m.query("DISCARD SEQUENCES")
    return b


def test_a_made_up_answer_behind_the_hand_off_discard_goes_out(registry):
    """A held LISTEN/UNLISTEN's answer (relay/carried.resume) queued behind the proxy's DISCARD
    SEQUENCES goes out when that is answered (it hung the client when the DISCARD's answer was
    taken off the front without looking behind it)."""
    b = _after_another_clients_insert(registry)
    b._synth(m.command_complete("UNLISTEN"))
    b._synth(None)
    out = b.from_server(cc("DISCARD SEQUENCES") + ZI)
    assert out == m.command_complete("UNLISTEN") + ZI and not b.queue and b.releasable


@pytest.mark.parametrize("reads", ["one read", "two reads"])
@pytest.mark.parametrize("request_kind", ["simple", "extended"])
def test_the_hand_off_discard_leaves_the_client_answer_to_the_fast_walks(reads, request_kind, monkeypatch):
    """The answer to the proxy's DISCARD SEQUENCES ahead of a client's request is taken off the
    front (it is always the same), so the client's own answer behind it is walked fast, and
    the client sees exactly what the general walk gives."""
    runs = []
    for general_only in (False, True):
        b = _after_another_clients_insert(StatementRegistry())
        if request_kind == "simple":
            taken = _watch_fast_walk(monkeypatch, "_plain_answer", general_only)
            b.from_client(m.query("SELECT 1"))
            answer = m.row_description(["x"]) + row(1) + cc("SELECT 1") + ZI
        else:
            taken = _watch_fast_walk(monkeypatch, "_plain_batch", general_only)
            b.from_client(parse(b"", b"SELECT 1") + bind(b"", b"") + execute() + SYNC)
            answer = P1 + B2 + row(1) + cc("SELECT 1") + ZI
        discarded = cc("DISCARD SEQUENCES") + ZI
        parts = [discarded + answer] if reads == "one read" else [discarded, answer]
        out = b"".join(b.from_server(p) for p in parts)
        monkeypatch.undo()
        runs.append((out, b.status, b.releasable, list(b.queue), b.server.seq_owner, taken))
    assert runs[0][:-1] == runs[1][:-1]
    assert runs[0][0].endswith(ZI) and b"DISCARD" not in runs[0][0] and runs[0][2]
    assert runs[0][-1] == [True]        # the client's answer took the fast walk


@pytest.mark.parametrize("sql,owner", [("INSERT INTO t(v) VALUES ($1)", True), ("SELECT abalance FROM t WHERE aid = $1", False)])
def test_a_statement_in_an_unnamed_batch_marks_the_connection_for_the_hand_off(registry, sql, owner):
    """The unnamed-batch fast path (psycopg 3, libpq, pgbench -M extended) marks a connection
    whose sequence values the next client must not see, as the message loop does."""
    server = ServerState()
    a = new_relay(registry, server)
    batch = parse(b"", sql.encode(), (23,)) + bind(b"", b"", (b"1",)) + DESCRIBE_PORTAL + execute() + SYNC
    assert a.from_client(batch) == batch
    assert (server.seq_owner is a.session) is owner
    a.from_server(P1 + B2 + m.message(b"n", b"") + cc("INSERT 0 1" if owner else "SELECT 0") + ZI)
    a.detach()
    b = make_relay(registry)
    assert b.attach(server) == (m.query("DISCARD SEQUENCES") if owner else b"")
