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
