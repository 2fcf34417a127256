"""Pure tests of what smart mode carries instead of pinning (issue 14): a client's channels
(state/notifications.py) and the relay's handling of LISTEN and SQL PREPARE
(relay/carried.py), bytes in, bytes out, with a hub that answers when told to."""
from __future__ import annotations

from unpinned.relay import carried
from unpinned.relay.relay import Relay
from unpinned.relay.statements import StatementRegistry
from unpinned.state.notifications import LISTEN, UNLISTEN, Subscriptions
from unpinned.state.server_state import ServerState
from unpinned.state.session import Session
from unpinned.sql.text import RAISE_SQLSTATE
from unpinned.telemetry.pinlog import ClientInfo, PinLog
from unpinned.wire import messages as m


class Hub:
    """Listens on what it is told at once, unless `slow`; barriers pass when `release()`d."""

    def __init__(self, slow: bool = False):
        self.slow = slow
        self.interest: dict = {}
        self.targets: dict = {}
        self.listening: set = set()
        self.waiting: list = []

    def update(self, sub, interest, committed):
        self.interest[sub] = set(interest)
        self.targets[sub] = set(committed)
        if not self.slow:
            self.listening |= set(interest)

    def ready(self, channel):
        return channel in self.listening

    def when_ready(self, channel, callback):
        self.waiting.append(callback)

    def barrier(self, callback):
        self.waiting.append(callback)

    def release(self):
        self.listening |= {ch for s in self.interest.values() for ch in s}
        waiting, self.waiting = self.waiting, []
        for cb in waiting:
            cb()


class Client:
    def __init__(self, idle: bool = True):
        self.idle = idle
        self.written: list[bytes] = []
        self.closed_with = None
        self.resumed = 0

    def notify_idle(self):
        return self.idle

    def notify_write(self, data):
        self.written.append(data)

    def notify_buffered(self):
        return 0

    def notify_server_pid(self):
        return 7

    def notify_overflow(self, text, code="54000"):
        self.closed_with = (code, text)

    def notify_resume(self):
        self.resumed += 1


def note(channel: str, payload: str = "", pid: int = 7) -> bytes:
    body = m.pack_i32(pid) + channel.encode() + b"\x00" + payload.encode() + b"\x00"
    return m.message(b"A", body)


# ---------------------------------------------------------------- subscriptions


def test_listen_outside_a_transaction_counts_at_once():
    hub, client = Hub(), Client()
    s = Subscriptions(hub, client)
    s.op(LISTEN, "a", now=True)
    assert s.channels == {"a"} and hub.targets[s] == {"a"}
    s.deliver(note("a", "x"))
    assert client.written == [note("a", "x")]


def test_transaction_commit_rollback_and_savepoints():
    hub, client = Hub(), Client()
    s = Subscriptions(hub, client)
    s.op(LISTEN, "a", now=False)
    assert s.channels == set() and hub.interest[s] == {"a"}
    # What arrives for it meanwhile waits (the client is in its transaction), dropped on rollback.
    client.idle = False
    s.deliver(note("a", "tentative"))
    assert len(s.queue) == 1 and client.written == []
    s.discard()
    assert hub.interest[s] == set() and not s.queue
    client.idle = True
    s.op(LISTEN, "a", now=False)
    mark = s.mark()
    s.op(LISTEN, "b", now=False)
    s.rollback_to(mark)
    s.commit()
    assert s.channels == {"a"}
    client.idle = False
    s.deliver(note("a", "during the transaction"))
    s.op(UNLISTEN, None, now=False)
    s.op(LISTEN, "c", now=False)
    s.commit()
    # At a commit PostgreSQL reads what came during the transaction with the new channels only.
    assert s.channels == {"c"} and hub.targets[s] == {"c"} and not s.queue
    client.idle = True
    # Outside a transaction, what was committed before the UNLISTEN still arrives: "c" is given
    # up, but still delivered until a barrier says everything committed before has been read.
    s.op(UNLISTEN, "c", now=True)
    assert s.channels == set() and s.barrier_due and hub.targets[s] == {"c"}
    s.barrier_passed()
    assert hub.targets[s] == set()


def test_notifications_wait_while_the_client_is_busy_and_keep_their_order():
    hub, client = Hub(), Client(idle=False)
    s = Subscriptions(hub, client)
    s.op(LISTEN, "a", now=True)
    for k in range(3):
        s.deliver(note("a", str(k)))
    assert client.written == []
    client.idle = True
    s.deliver(note("a", "3"))       # behind the queue, not ahead of it
    assert client.written == []
    assert s.take() == b"".join(note("a", str(k)) for k in range(4))


def test_a_client_that_does_not_read_is_closed():
    hub, client = Hub(), Client(idle=False)
    s = Subscriptions(hub, client, limit=1000)
    s.op(LISTEN, "a", now=True)
    for k in range(100):
        s.deliver(note("a", "x" * 50))
        if client.closed_with:
            break
    assert client.closed_with[0] == "54000" and "notifications" in client.closed_with[1]
    assert s.closed and s.queue == type(s.queue)() and hub.targets[s] == set()


# ---------------------------------------------------------------- the relay


def relay_for(hub: Hub, client: Client, mode: str = "smart") -> Relay:
    from unpinned.state.session import SessionOptions
    session = Session({}, ClientInfo(1, "test", "app", "db"), PinLog(mode=mode), SessionOptions(mode=mode, sql_prepare="carry"))
    session.subscribe = lambda: Subscriptions(hub, client)
    r = Relay(StatementRegistry(), session)
    r.attach(ServerState())
    return r


def test_listen_is_answered_by_the_proxy_once_the_hub_listens():
    hub, client = Hub(slow=True), Client()
    r = relay_for(hub, client)
    # A LISTEN and a query pipelined behind it: nothing goes anywhere until the hub listens.
    assert r.from_client(m.query("LISTEN jobs") + m.query("SELECT 1")) == b""
    assert r.to_client == [] and r.held is not None and not r.can_release
    hub.release()
    assert client.resumed == 1
    carried.resume(r)
    assert r.from_client(b"") == m.query("SELECT 1")
    assert b"".join(r.to_client) == m.command_complete("LISTEN") + m.ready_for_query(b"I")
    assert r.session.listening.channels == {"jobs"}
    events = [(e.event, e.reason) for e in r.session.pinlog.recent]
    assert ("carried", "listen") in events and not r.session.pins


def test_rds_mode_forwards_listen():
    r = relay_for(Hub(), Client(), mode="rds")
    assert r.from_client(m.query("LISTEN jobs")) == m.query("LISTEN jobs")


def test_sql_prepare_names_are_renamed_per_text():
    hub, client = Hub(), Client()
    a, b = relay_for(hub, client), relay_for(hub, client)
    b.registry = a.registry
    out_a = a.from_client(m.query("PREPARE q (int) AS SELECT $1"))
    out_b = b.from_client(m.query("PREPARE q (int) AS SELECT $1 + 1"))
    name_a = out_a[5:-1].decode().split()[1]
    name_b = out_b[5:-1].decode().split()[1]
    assert name_a != name_b and name_a.startswith('"U_') and out_a[5:-1].decode().endswith("(int) AS SELECT $1")
    # Success is known from its CommandComplete.
    a.from_server(m.command_complete("PREPARE") + m.ready_for_query(b"I"))
    a.detach()
    assert "q" in a.carried.names
    # On another server connection, EXECUTE is renamed and the PREPARE runs first, swallowed.
    a.attach(ServerState())
    out = a.from_client(m.query("EXECUTE q(5)"))
    assert out == m.query(f"PREPARE {name_a} (int) AS SELECT $1") + m.query(f"EXECUTE {name_a}(5)")
    reply = a.from_server(m.command_complete("PREPARE") + m.ready_for_query(b"I") +
                          m.data_row(["5"]) + m.command_complete("SELECT 1") + m.ready_for_query(b"I"))
    assert reply == m.data_row(["5"]) + m.command_complete("SELECT 1") + m.ready_for_query(b"I")
    assert not a.session.pins


def test_duplicate_and_unknown_names_get_postgresqls_errors():
    r = relay_for(Hub(), Client())
    r.from_client(m.query("PREPARE q AS SELECT 1"))
    r.from_server(m.command_complete("PREPARE") + m.ready_for_query(b"I"))
    out = r.from_client(m.query("PREPARE q AS SELECT 2"))
    assert b"42P05" in out and b'prepared statement "q" already exists' in out   # raised by the server
    r.from_server(m.error_response("42P05", 'prepared statement "q" already exists') + m.ready_for_query(b"I"))
    out = r.from_client(m.query('EXECUTE "U_1"'))
    assert b"26000" in out          # shaped like the proxy's own names: never another client's


def test_pg_listening_channels_is_the_clients_own():
    q = carried.listening_query(m.query("SELECT pg_listening_channels()"), {"a"})
    assert q == m.query("SELECT pg_catalog.unnest(ARRAY['a']::text[]) AS pg_listening_channels")
    q = carried.listening_query(m.query("SELECT c FROM pg_catalog.pg_listening_channels() c"), set())
    assert q == m.query("SELECT c FROM pg_catalog.unnest(ARRAY[]::text[]) c")
    q = carried.listening_query(m.query("SELECT 'pg_listening_channels()'"), {"a"})
    assert q == m.query("SELECT 'pg_listening_channels()'")     # a string literal stays as it is


def test_what_the_client_sends_while_a_listen_waits_follows_it_in_order():
    hub, client = Hub(slow=True), Client()
    r = relay_for(hub, client)
    second = m.query("SELECT 2")
    # Later reads, one ending inside a message, wait behind the LISTEN too.
    assert r.from_client(m.query("LISTEN jobs") + m.query("SELECT 1") + second[:3]) == b""
    assert r.from_client(second[3:]) == b""
    assert r.from_client(m.query("SELECT 3")[:7]) == b""
    hub.release()
    carried.resume(r)
    assert r.from_client(b"") == m.query("SELECT 1") + second
    assert r.from_client(m.query("SELECT 3")[7:]) == m.query("SELECT 3")
    assert b"".join(r.to_client) == m.command_complete("LISTEN") + m.ready_for_query(b"I")


def _error(code: str, text: str, position: int | None = None, context: str | None = None) -> bytes:
    body = b"SERROR\x00VERROR\x00C" + code.encode() + b"\x00M" + text.encode() + b"\x00"
    if position is not None:
        body += b"P" + str(position).encode() + b"\x00"
    if context is not None:
        body += b"W" + context.encode() + b"\x00"
    return m.message(b"E", body + b"\x00")


def test_errors_about_a_renamed_text_point_into_the_clients_and_name_its_statement():
    r = relay_for(Hub(), Client())
    r.from_client(m.query("PREPARE long_name (int, text) AS SELECT $1"))
    r.from_server(m.command_complete("PREPARE") + m.ready_for_query(b"I"))
    r.carried.settle(r.queue)       # (as the next statement or the detach would)
    server_name = r.carried.names["long_name"][0]
    sent = r.from_client(m.query("EXECUTE long_name(true, 'x')"))
    assert sent == m.query(f'EXECUTE "{server_name}"(true, \'x\')')
    # The server points at `true` in its text; the client's text has it elsewhere.
    at = sent[5:-1].decode().index("true") + 1
    reply = r.from_server(_error("42804", f'wrong number of parameters for prepared statement "{server_name}"', at)
                          + m.ready_for_query(b"I"))
    fields = m.parse_error_fields(reply[5:reply.index(b"Z")])
    assert fields["P"] == str("EXECUTE long_name(true, 'x')".index("true") + 1)
    assert fields["M"] == 'wrong number of parameters for prepared statement "long_name"'


def test_a_refusal_raised_on_the_server_reaches_the_client_as_postgresql_words_it():
    r = relay_for(Hub(), Client())
    r.from_client(m.query("PREPARE q AS SELECT 1"))
    r.from_server(m.command_complete("PREPARE") + m.ready_for_query(b"I"))
    sent = r.from_client(m.query("PREPARE q AS SELECT 2"))
    assert b"PREPARE" not in sent, "the server runs the proxy's failing statement instead (sql/text.py raise_sql)"
    # The server fails that statement with its own error; the client gets the refusal in its place.
    reply = r.from_server(_error(RAISE_SQLSTATE, 'invalid input syntax for type integer: "x"')
                          + m.ready_for_query(b"I"))
    fields = m.parse_error_fields(reply[5:reply.index(b"Z")])
    assert (fields["C"], fields["M"]) == ("42P05", 'prepared statement "q" already exists') and "W" not in fields


def test_pg_prepared_statements_becomes_the_clients_own():
    r = relay_for(Hub(), Client())
    r.server.reported["server_version"] = "16.4"
    sent = r.from_client(m.query("SELECT name FROM pg_prepared_statements"))
    assert sent == m.query("SELECT name FROM (SELECT * FROM pg_catalog.pg_prepared_statements WHERE false) "
                           "AS pg_prepared_statements")
    r.from_server(m.row_description(["name"]) + m.command_complete("SELECT 0") + m.ready_for_query(b"I"))
    r.from_client(m.query("PREPARE q1 AS SELECT 1;"))
    r.from_server(m.command_complete("PREPARE") + m.ready_for_query(b"I"))
    r.carried.settle(r.queue)
    server_name = r.carried.names["q1"][0]
    text = r.from_client(m.query("select count(*) from pg_catalog.pg_prepared_statements p"))[5:-1].decode()
    assert text.startswith("select count(*) from (SELECT c.name, c.statement, s.prepare_time, s.parameter_types, "
                           "s.result_types, s.from_sql, s.generic_plans, s.custom_plans FROM "
                           "pg_catalog.pg_prepared_statements s JOIN (VALUES ")
    assert f"(0, '{server_name}', 'q1', 'PREPARE q1 AS SELECT 1;')" in text and text.endswith(" p")


def _extended(text: str) -> bytes:
    return (m.message(b"P", b"\x00" + m.cstr(text) + b"\x00\x00")
            + m.message(b"B", b"\x00\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
            + m.message(b"E", b"\x00" + m.pack_i32(0)) + m.SYNC_MSG)


def test_prepare_through_the_extended_protocol_is_renamed_and_counts_at_its_execute():
    r = relay_for(Hub(), Client())
    sent = r.from_client(_extended("PREPARE ext (int) AS SELECT $1"))
    parse = sent[:1 + m.unpack_i32(sent, 1)[0]]
    assert b'PREPARE "U_' in parse and b"ext" not in parse
    r.carried.settle(r.queue)
    assert "ext" not in r.carried.names         # not before its Execute completed
    r.from_server(m.PARSE_COMPLETE + m.BIND_COMPLETE + m.command_complete("PREPARE") + m.ready_for_query(b"I"))
    # (the session engine's check that no SQL-prepared statement of the client's own name is left)
    r.from_server(m.data_row(["0"]) + m.command_complete("SELECT 1") + m.ready_for_query(b"I"))
    assert not r.queue
    r.carried.settle(r.queue)
    server_name = r.carried.names["ext"][0]
    assert parse[5:].split(b"\x00")[1].decode() == f'PREPARE "{server_name}" (int) AS SELECT $1'
    # A PREPARE of a name it has is PostgreSQL's 42P05; DEALLOCATE forgets it once it has run.
    assert b"42P05" in r.from_client(_extended("PREPARE ext AS SELECT 2"))
    r.from_server(m.PARSE_COMPLETE + m.BIND_COMPLETE
                  + _error("42P05", 'prepared statement "ext" already exists') + m.ready_for_query(b"I"))
    sent = r.from_client(_extended("DEALLOCATE ext"))
    assert f'DEALLOCATE "{server_name}"'.encode() in sent
    r.from_server(m.PARSE_COMPLETE + m.BIND_COMPLETE + m.command_complete("DEALLOCATE") + m.ready_for_query(b"I"))
    r.carried.settle(r.queue)
    assert "ext" not in r.carried.names and not r.session.pins
