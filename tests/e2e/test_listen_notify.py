"""LISTEN/NOTIFY without a pin (SPEC 2, issue 14): the proxy listens on a connection of its
own and delivers each notification to its subscribers between their transactions, with
PostgreSQL's semantics, through psycopg2, psycopg 3 and asyncpg."""
from __future__ import annotations

import asyncio
import select
import time

import asyncpg
import psycopg
import psycopg2
import pytest
from support.scrape import metric


def pinned(h) -> int:
    return h.call(lambda: sum(1 for c in h.proxy.clients if c.relay is not None and c.relay.pinned))


class P2:
    """psycopg2: notifications read with poll()."""
    kind = "psycopg2"

    def __init__(self, h):
        self.conn = psycopg2.connect(**h.kwargs())
        self.conn.autocommit = True
        self.got: list[tuple[str, str]] = []

    async def execute(self, sql: str):
        cur = self.conn.cursor()
        cur.execute(sql)
        self._take()
        return cur.fetchall() if cur.description else None

    def _take(self) -> None:
        self.got += [(n.channel, n.payload) for n in self.conn.notifies]
        self.conn.notifies.clear()

    async def drain(self, wait: float) -> None:
        select.select([self.conn], [], [], wait)
        self.conn.poll()
        self._take()

    async def close(self) -> None:
        self.conn.close()


class P3:
    """psycopg 3: notifications read with conn.notifies()."""
    kind = "psycopg"

    def __init__(self, h):
        self.conn = psycopg.connect(h.dsn(), autocommit=True)
        self.got: list[tuple[str, str]] = []

    async def execute(self, sql: str):
        cur = self.conn.execute(sql)
        return cur.fetchall() if cur.description else None

    async def drain(self, wait: float) -> None:
        self.got += [(n.channel, n.payload) for n in self.conn.notifies(timeout=wait)]

    async def close(self) -> None:
        self.conn.close()


class APG:
    """asyncpg: notifications through add_listener callbacks."""
    kind = "asyncpg"

    def __init__(self, conn):
        self.conn = conn
        self.got: list[tuple[str, str]] = []

    @classmethod
    async def open(cls, h):
        return cls(await asyncpg.connect(h.dsn()))

    def _on(self, conn, pid, channel, payload) -> None:
        self.got.append((channel, payload))

    async def listen(self, channel: str) -> None:
        await self.conn.add_listener(channel, self._on)

    async def execute(self, sql: str):
        if sql.lstrip().upper().startswith("SELECT"):
            return [tuple(r) for r in await self.conn.fetch(sql)]
        await self.conn.execute(sql)

    async def drain(self, wait: float) -> None:
        await asyncio.sleep(wait)

    async def close(self) -> None:
        await self.conn.close()


async def listen(client, channel: str) -> None:
    if isinstance(client, APG):
        await client.listen(channel)
    else:
        await client.execute(f"LISTEN {channel}")


async def test_twenty_clients_three_drivers_pool_of_two(make_proxy):
    h = make_proxy(pool_size=2, http_listen="127.0.0.1:0")
    clients = []
    for i in range(20):
        if i % 3 == 0:
            clients.append(P2(h))
        elif i % 3 == 1:
            clients.append(P3(h))
        else:
            clients.append(await APG.open(h))
    notifier = P2(h)
    expected: list[list[tuple[str, str]]] = [[] for _ in clients]
    try:
        for i, c in enumerate(clients):
            await listen(c, f"own_{i}")
            await listen(c, "shared")
        assert pinned(h) == 0
        for rnd in range(6):
            # One client at a time sits inside a transaction (the pool has two connections: one
            # for it, one for everyone else) while notifications are sent.
            inside = clients[rnd * 3 % 20]
            inside_i = clients.index(inside)
            await inside.execute("BEGIN")
            await inside.execute("SELECT 1")
            before = len(inside.got)
            await notifier.execute(f"NOTIFY shared, 'r{rnd}'")
            for j in range(20):
                expected[j].append(("shared", f"r{rnd}"))
            for j in range(20):
                if (j + rnd) % 4 == 0:
                    await notifier.execute(f"NOTIFY own_{j}, 'r{rnd}-{j}'")
                    expected[j].append((f"own_{j}", f"r{rnd}-{j}"))
            # A client notifies itself through its own pooled connection (PostgreSQL delivers a
            # backend's own notifications to it as well).
            s = (rnd * 7 + 1) % 20
            if clients[s] is not inside:
                await clients[s].execute(f"NOTIFY own_{s}, 'self-{rnd}'")
                expected[s].append((f"own_{s}", f"self-{rnd}"))
            # Nothing reaches the client inside its transaction, however long it waits or reads.
            await inside.drain(0.3)
            await inside.execute("SELECT 1")
            await inside.drain(0.2)
            assert len(inside.got) == before, f"{inside.kind} client {inside_i} got a notification in a transaction"
            await inside.execute("COMMIT")
            assert pinned(h) == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for c in clients:
                await c.drain(0.02)
            if all(len(c.got) >= len(e) for c, e in zip(clients, expected)):
                break
        await asyncio.sleep(0.3)
        for c in clients:
            await c.drain(0.05)
        for i, (c, e) in enumerate(zip(clients, expected)):
            assert c.got == e, f"{c.kind} client {i}: got {c.got} expected {e}"
        assert pinned(h) == 0
        assert metric(h, "unpinned_clients_pinned") == 0
        assert metric(h, "unpinned_carried_total") >= 40
    finally:
        for c in clients:
            await c.close()
        await notifier.close()



def p2(h):
    conn = psycopg2.connect(**h.kwargs())
    conn.autocommit = True
    return conn


def wait_notifies(conn, n: int, timeout: float = 5.0) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while len(conn.notifies) < n and time.monotonic() < deadline:
        select.select([conn], [], [], 0.05)
        conn.poll()
    out = [(x.channel, x.payload) for x in conn.notifies]
    conn.notifies.clear()
    return out


@pytest.fixture
def small(make_proxy):
    return make_proxy(pool_size=2)


def test_listen_in_a_transaction_applies_at_commit(small):
    a, b = p2(small), p2(small)
    try:
        ca, cb = a.cursor(), b.cursor()
        ca.execute("BEGIN")
        ca.execute("LISTEN later")
        assert ca.statusmessage == "LISTEN"
        cb.execute("NOTIFY later, 'before commit'")
        time.sleep(0.3)     # it reached the proxy (a notification just before the commit may pass)
        ca.execute("COMMIT")
        assert wait_notifies(a, 1, 0.5) == []
        cb.execute("NOTIFY later, 'after commit'")
        assert wait_notifies(a, 1) == [("later", "after commit")]
        # Rolled back: never listened.
        ca.execute("BEGIN")
        ca.execute("LISTEN never")
        ca.execute("ROLLBACK")
        cb.execute("NOTIFY never, 'x'")
        assert wait_notifies(a, 1, 0.5) == []
        # A savepoint rolled back takes its LISTEN with it; the one before it stays.
        ca.execute("BEGIN")
        ca.execute("LISTEN kept")
        ca.execute("SAVEPOINT s")
        ca.execute("LISTEN dropped")
        ca.execute("ROLLBACK TO SAVEPOINT s")
        ca.execute("COMMIT")
        cb.execute("NOTIFY dropped, 'x'")
        cb.execute("NOTIFY kept, 'y'")
        assert wait_notifies(a, 1) == [("kept", "y")]
        # UNLISTEN inside a failed transaction is undone too.
        ca.execute("BEGIN")
        ca.execute("UNLISTEN kept")
        with pytest.raises(psycopg2.errors.DivisionByZero):
            ca.execute("SELECT 1/0")
        # In an aborted transaction PostgreSQL refuses LISTEN, and so does the proxy.
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            ca.execute("LISTEN whatever")
        ca.execute("ROLLBACK")
        cb.execute("NOTIFY kept, 'still'")
        assert wait_notifies(a, 1) == [("kept", "still")]
        ca.execute("UNLISTEN *")
        assert ca.statusmessage == "UNLISTEN"
        cb.execute("NOTIFY kept, 'gone'")
        cb.execute("NOTIFY later, 'gone'")
        assert wait_notifies(a, 1, 0.5) == []
        assert pinned(small) == 0
    finally:
        a.close()
        b.close()


def test_notifications_wait_for_the_end_of_the_transaction(small):
    a, b = p2(small), p2(small)
    try:
        ca, cb = a.cursor(), b.cursor()
        ca.execute("LISTEN tx")
        ca.execute("BEGIN")
        ca.execute("SELECT 1")
        for k in range(3):
            cb.execute(f"NOTIFY tx, '{k}'")
        assert wait_notifies(a, 1, 0.5) == []
        ca.execute("SELECT 2")
        assert list(a.notifies) == []
        ca.execute("COMMIT")
        assert wait_notifies(a, 3) == [("tx", "0"), ("tx", "1"), ("tx", "2")]
        # The sender's pid is the server's, as PostgreSQL gives it.
        cb.execute("NOTIFY tx, 'pid'")
        select.select([a], [], [], 5)
        a.poll()
        assert a.notifies[0].pid > 0
    finally:
        a.close()
        b.close()


def test_a_client_that_does_not_read_is_closed_not_the_others(make_proxy, monkeypatch, caplog):
    from unpinned.state import notifications
    monkeypatch.setattr(notifications, "QUEUE_LIMIT", 64 * 1024)
    h = make_proxy(pool_size=2)
    slow, fast, sender = p2(h), p2(h), p2(h)
    try:
        slow.cursor().execute("LISTEN flood")
        fast.cursor().execute("LISTEN flood")
        # The slow client sits in a transaction: its notifications queue up in the proxy.
        slow.cursor().execute("BEGIN")
        payload = "x" * 4000
        cur = sender.cursor()
        for k in range(40):
            cur.execute(f"NOTIFY flood, '{k}{payload}'")
        got = wait_notifies(fast, 40)
        assert len(got) == 40
        # Closed with a FATAL error (the client may only see the socket close, having not read).
        with pytest.raises(psycopg2.OperationalError):
            slow.cursor().execute("SELECT 1")
        assert any("notifications are waiting for this client" in r.getMessage() for r in caplog.records)
        # The others go on, and the slow client's server connection went back to the pool.
        for _ in range(3):
            fast.cursor().execute("SELECT 1")
            sender.cursor().execute("NOTIFY flood, 'after'")
            assert wait_notifies(fast, 1) == [("flood", "after")]
    finally:
        for c in (slow, fast, sender):
            c.close()


# asyncpg warns that the connection goes back with a listener: its reset (UNLISTEN *) is the point.
@pytest.mark.filterwarnings("ignore:.*active notification listener")
async def test_asyncpg_pool_reset_unlisten_keeps_working(make_proxy):
    h = make_proxy(pool_size=2)
    pool = await asyncpg.create_pool(h.dsn(), min_size=3, max_size=3)
    got = []
    try:
        for _ in range(5):
            async with pool.acquire() as conn:
                await conn.add_listener("poolch", lambda *a: got.append(a[3]))
                await conn.execute("NOTIFY poolch, 'x'")
                for _ in range(50):
                    if got:
                        break
                    await asyncio.sleep(0.02)
                assert got == ["x"]
                got.clear()
            # Released: asyncpg's reset ran UNLISTEN * (with other statements), unpinned.
        assert pinned(h) == 0
        async with pool.acquire() as conn:
            await conn.execute("NOTIFY poolch, 'nobody'")
        await asyncio.sleep(0.3)
        assert got == []
        listeners = h.call(lambda: {k: len(v.targets) for k, v in h.proxy.shared.listeners.items()})
        assert all(n == 0 for n in listeners.values())
    finally:
        await pool.close()


def test_rds_mode_still_pins_listen(make_proxy):
    h = make_proxy(mode="rds", pool_size=2)
    a, b = p2(h), p2(h)
    try:
        a.cursor().execute("LISTEN r")
        assert pinned(h) == 1
        b.cursor().execute("NOTIFY r, 'direct'")
        assert wait_notifies(a, 1) == [("r", "direct")]
        assert h.call(lambda: len(h.proxy.shared.listeners)) == 0
    finally:
        a.close()
        b.close()


def test_own_notifications_arrive_before_ready_for_query(small):
    """PostgreSQL sends a session's own notifications before the ReadyForQuery of the
    transaction that sent them; the proxy holds that ReadyForQuery until they have come
    back through its listening connection."""
    a, b = p2(small), p2(small)
    try:
        ca, cb = a.cursor(), b.cursor()
        ca.execute("LISTEN mine")
        for k in range(20):
            ca.execute(f"NOTIFY mine, '{k}'")
            # No poll, no wait: psycopg2 collected it while reading the answer.
            assert [(n.channel, n.payload) for n in a.notifies] == [("mine", str(k))]
            a.notifies.clear()
        ca.execute("BEGIN")
        ca.execute("SELECT pg_notify('mine', 'in tx')")
        assert list(a.notifies) == []
        ca.execute("COMMIT")
        assert [n.payload for n in a.notifies] == ["in tx"]
        a.notifies.clear()
        # What was committed before an UNLISTEN still reaches the client, before its answer.
        for k in range(10):
            cb.execute(f"NOTIFY mine, 'other {k}'")
            ca.execute("UNLISTEN mine")
            assert [n.payload for n in a.notifies] == [f"other {k}"]
            a.notifies.clear()
            ca.execute("LISTEN mine")
        assert pinned(small) == 0
    finally:
        a.close()
        b.close()


def test_pg_listening_channels_answers_the_clients_own(small):
    a, b = p2(small), p2(small)
    try:
        ca, cb = a.cursor(), b.cursor()
        ca.execute("LISTEN one")
        ca.execute('LISTEN "Two"')
        cb.execute("LISTEN other")
        ca.execute("SELECT pg_listening_channels()")
        assert [d[0] for d in ca.description] == ["pg_listening_channels"]
        assert sorted(r[0] for r in ca.fetchall()) == ["Two", "one"]
        ca.execute("SELECT c FROM pg_catalog.pg_listening_channels() c ORDER BY 1")
        assert ca.fetchall() == [("Two",), ("one",)]
        ca.execute("SELECT count(*) FROM pg_listening_channels()")
        assert ca.fetchone() == (2,)
        ca.execute("BEGIN")
        ca.execute("LISTEN three")
        ca.execute("SELECT array(SELECT pg_listening_channels() ORDER BY 1)::text")
        assert ca.fetchone() == ("{Two,one}",)       # a LISTEN counts from its commit
        ca.execute("COMMIT")
        ca.execute("SELECT * FROM pg_listening_channels() ORDER BY 1")
        assert [d[0] for d in ca.description] == ["pg_listening_channels"]
        assert ca.fetchall() == [("Two",), ("one",), ("three",)]
        cb.execute("SELECT array(SELECT pg_listening_channels())::text")
        assert cb.fetchone() == ("{other}",)
        ca.execute("UNLISTEN *")
        ca.execute("SELECT count(*) FROM pg_listening_channels()")
        assert ca.fetchone() == (0,)
    finally:
        a.close()
        b.close()
