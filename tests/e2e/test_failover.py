"""Writer and reader endpoints over a real primary and streaming replicas (issue 11, SPEC 3.4):
routing, monotonic reads, lag ejection, writer failover, a one-host outage, a switchover.

The proxy is started in-process (conftest.start_proxy) with a multi-host --upstream URL and
trust client auth: clients log in as the cluster's superuser, whose password the proxy has.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import psycopg
import psycopg2
import pytest

from conftest import start_proxy
from support.serve import Served, free_port
from unpinned.config import load
from unpinned.dev.cluster import ClusterNode, PostgresCluster
from unpinned.ops.metrics import make_registry, render

FAST = dict(health_check_interval=0.2, borrow_timeout=30)


class _NoPg:
    """start_proxy's `pg`, when every test here gives its own upstream."""
    def dsn(self, *args) -> str:
        return ""


NO_PG = _NoPg()


def connect(port: int, node: ClusterNode, **kw):
    conn = psycopg2.connect(host="127.0.0.1", port=port, user=node.superuser, password=node.password,
                            dbname="postgres", connect_timeout=10, **kw)
    return conn


def one(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0] if cur.description else None


def admin(handle, node: ClusterNode, sql: str) -> list[tuple]:
    conn = psycopg2.connect(host="127.0.0.1", port=handle.port, user=node.superuser, password=node.password,
                            dbname="unpinned")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            cols = [d[0] for d in cur.description] if cur.description else []
            return [dict(zip(cols, row)) for row in cur.fetchall()] if cols else []
    finally:
        conn.close()


def hosts(handle, node) -> dict[int, dict]:
    return {int(r["host"].rsplit(":", 1)[1]): r for r in admin(handle, node, "SHOW HOSTS")}


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster(replicas=2, name="topo", password="topo-pw") as c:
        c.primary.psql("CREATE TABLE items (id int PRIMARY KEY, note text)")
        yield c


@pytest.fixture(scope="module")
def proxy(cluster):
    reader = free_port()
    h = start_proxy(NO_PG, upstream=cluster.url(), auth="trust", reader_listen=f"127.0.0.1:{reader}",
                    max_replica_lag=1.0, **FAST)
    h.reader_port = h.proxy.endpoint_ports["reader"]
    yield h
    h.stop()


def test_reader_endpoint_reads_replicas_and_writer_endpoint_writes_the_primary(cluster, proxy) -> None:
    p, r1, r2 = cluster.primary, *cluster.replicas
    w = connect(proxy.port, p)
    w.autocommit = True
    assert one(w, "SELECT pg_is_in_recovery()") is False
    assert one(w, "SELECT inet_server_port()") == p.port
    one(w, "INSERT INTO items VALUES (1, 'through the writer endpoint')")
    assert p.psql("SELECT note FROM items WHERE id = 1") == "through the writer endpoint"
    readers = [connect(proxy.reader_port, p) for _ in range(6)]
    try:
        ports = set()
        for rc in readers:
            rc.autocommit = True
            assert one(rc, "SELECT pg_is_in_recovery()") is True
            ports.add(one(rc, "SELECT inet_server_port()"))
            # Replicated rows are read (replication is asynchronous: they arrive shortly).
            wait_for(lambda: one(rc, "SELECT note FROM items WHERE id = 1"), what="the row on a replica")
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                one(rc, "INSERT INTO items VALUES (2, 'no')")
        # Balanced by load: six clients at once land on both replicas.
        assert ports == {r1.port, r2.port}
        rows = hosts(proxy, p)
        assert rows[p.port]["role"] == "writer" and rows[p.port]["writer"] in (True, "True", "t")
        assert rows[r1.port]["role"] == rows[r2.port]["role"] == "reader"
    finally:
        for rc in readers:
            rc.close()
        w.close()


def test_listen_through_either_endpoint_hears_notify_on_the_writer(cluster, proxy) -> None:
    # LISTEN is carried by the proxy's listening connection: on the writer's host, where NOTIFY
    # runs, also for a client of the reader endpoint (a replica cannot LISTEN at all).
    p = cluster.primary
    sender = connect(proxy.port, p)
    sender.autocommit = True
    for port in (proxy.reader_port, proxy.port):     # the reader first: it makes the listener
        lc = connect(port, p)
        try:
            lc.autocommit = True
            one(lc, "LISTEN topo_events")
            one(sender, f"NOTIFY topo_events, 'via {port}'")

            def heard():
                lc.poll()
                return [n.payload for n in lc.notifies]
            assert wait_for(heard, timeout=10, what="the notification") == [f"via {port}"]
        finally:
            lc.close()
    sender.close()


def test_reader_never_reads_from_a_replica_older_than_it_has_read(cluster, proxy) -> None:
    """Monotonic reads: a client that read a row on one replica is not sent to a replica that
    has not replayed it yet, even when its replica goes away; it waits for one that has."""
    p, r1, r2 = cluster.primary, *cluster.replicas
    rc = connect(proxy.reader_port, p)
    rc.autocommit = True
    try:
        on = one(rc, "SELECT inet_server_port()")
        mine, other = (r1, r2) if on == r1.port else (r2, r1)
        other.pause_replay()
        one_w = connect(proxy.port, p)
        one_w.autocommit = True
        one(one_w, "INSERT INTO items VALUES (10, 'monotonic')")
        one_w.close()
        mine.wait_replayed(p.current_lsn())
        assert one(rc, "SELECT note FROM items WHERE id = 10") == "monotonic"
        assert other.psql("SELECT count(*) FROM items WHERE id = 10") == "0"
        mine.halt("immediate")
        try:
            # Its replica is gone and the other one is behind what it read: it waits...
            threading.Timer(1.5, other.resume_replay).start()
            t0 = time.monotonic()
            assert one(rc, "SELECT note FROM items WHERE id = 10") == "monotonic"
            assert time.monotonic() - t0 >= 1.0
            assert one(rc, "SELECT inet_server_port()") == other.port
        finally:
            mine.start()
            wait_for(lambda: hosts(proxy, p)[mine.port]["healthy"] in (True, "True"), what="replica back")
    finally:
        rc.close()


def test_a_lagging_replica_leaves_the_rotation_and_comes_back(cluster, proxy) -> None:
    p, r1, r2 = cluster.primary, *cluster.replicas
    wait_for(lambda: all(r["healthy"] == "True" for r in hosts(proxy, p).values()), what="all healthy")
    r2.pause_replay()
    try:
        w = connect(proxy.port, p)
        w.autocommit = True
        # Lag counts while the replica has WAL it has not replayed: keep writing.
        for i in range(40):
            one(w, "INSERT INTO items VALUES (%s, 'lag') ON CONFLICT DO NOTHING", (100 + i,))
            time.sleep(0.05)
            if hosts(proxy, p)[r2.port]["ejected_for_lag"] == "True":
                break
        rows = hosts(proxy, p)
        assert rows[r2.port]["ejected_for_lag"] == "True", rows[r2.port]
        assert float(rows[r2.port]["lag_s"]) > 1.0
        # New readers all go to the replica in rotation.
        conns = [connect(proxy.reader_port, p) for _ in range(4)]
        for c in conns:
            c.autocommit = True
            assert one(c, "SELECT inet_server_port()") == r1.port
            c.close()
        w.close()
    finally:
        r2.resume_replay()
    wait_for(lambda: hosts(proxy, p)[r2.port]["ejected_for_lag"] == "False", what="readmitted")
    stats = admin(proxy, p, "SHOW HOSTS")
    assert all(r["healthy"] == "True" for r in stats)
    # Counted for the operator: the ejection and the readmission.
    metrics = proxy.call(lambda: render(make_registry(proxy.proxy))).decode()
    counts = proxy.proxy.cluster.counts
    assert counts["ejected"] >= 1 and counts["readmitted"] == counts["ejected"]
    assert f'unpinned_cluster_events_total{{kind="ejected"}} {counts["ejected"]:.1f}' in metrics
    assert f'unpinned_cluster_events_total{{kind="readmitted"}} {counts["readmitted"]:.1f}' in metrics
    assert f'unpinned_host_writer{{host="127.0.0.1:{p.port}"}} 1.0' in metrics


def test_endpoints_from_the_config_file_have_their_own_pools(cluster, tmp_path, monkeypatch) -> None:
    p = cluster.primary
    reporting, batch = free_port(), free_port()
    path = tmp_path / "unpinned.toml"
    path.write_text(f'''
[upstream]
url = "{cluster.url()}"
health_check_interval = 0.2

[[endpoints]]
name = "reporting"
listen = "127.0.0.1:{reporting}"
role = "read_only"

[[endpoints]]
name = "batch"
listen = "127.0.0.1:{batch}"
role = "read_write"
''')
    import conftest
    monkeypatch.setattr(conftest, "load", lambda _path, **options: load(str(path), **options))
    options = dict(upstream=None, auth="trust")
    h = start_proxy(NO_PG, **options)
    try:
        assert h.proxy.endpoint_ports == {"default": h.port, "reporting": reporting, "batch": batch}
        r = connect(reporting, p)
        b = connect(batch, p)
        w = connect(h.port, p)
        for c in (r, b, w):
            c.autocommit = True
        assert one(r, "SELECT pg_is_in_recovery()") is True
        assert one(b, "SELECT pg_is_in_recovery()") is False
        assert one(w, "SELECT pg_is_in_recovery()") is False
        cl = h.proxy.cluster
        assert set(cl.readers) == {("reporting", "postgres", p.superuser)}
        assert set(cl.endpoint_writers) == {("batch", "postgres", p.superuser)}
        assert h.pool("postgres", p.superuser) is not cl.endpoint_writers[("batch", "postgres", p.superuser)]
        for c in (r, b, w):
            c.close()
    finally:
        h.stop()


def test_takeover_keeps_reader_endpoint_clients_on_the_readers(cluster, tmp_path) -> None:
    """A takeover restart hands over the reader endpoint's listener too, and a client that came
    through it stays a reader client in the new process: it reads replicas, cannot write."""
    p = cluster.primary
    users = tmp_path / "users.toml"
    users.write_text(f'[users.{p.superuser}]\npassword = "{p.password}"\nadmin = true\n')
    sock, reader = str(tmp_path / "takeover.sock"), free_port()
    opts = dict(takeover=sock, reader_listen=f"127.0.0.1:{reader}", pool_size=4)
    old = Served(cluster.url(), str(users), **opts).start()
    new = Served(cluster.url(), str(users), port=old.port, http_port=old.http_port, **opts)
    try:
        readers = [connect(reader, p) for _ in range(4)]
        writers = [connect(old.port, p) for _ in range(4)]
        for i, conn in enumerate(readers + writers):
            conn.autocommit = True
            one(conn, "SET application_name = %s", (f"client-{i}",))
            assert one(conn, "SELECT pg_is_in_recovery()") is (conn in readers)
        new.start(wait=False)
        assert old.wait(30) == 0, old.log()
        wait_for(lambda: "takeover: 8 client(s) moved" in new.log(), what="the new process to report the move")
        for i, conn in enumerate(readers + writers):
            assert one(conn, "SHOW application_name") == f"client-{i}"
            assert one(conn, "SELECT pg_is_in_recovery()") is (conn in readers)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            one(readers[0], "INSERT INTO items VALUES (900, 'through the reader endpoint')")
        fresh = connect(reader, p)        # the reader listener now belongs to the new process
        assert one(fresh, "SELECT pg_is_in_recovery()") is True
        fresh.close()
        for conn in readers + writers:
            conn.close()
    finally:
        new.stop()
        old.stop()


def test_no_replica_configured_is_an_immediate_clear_error(cluster) -> None:
    """Only the primary behind the reader endpoint: RDS Proxy's rule, fail at once."""
    p = cluster.primary
    url = f"postgresql://{p.superuser}:{p.password}@127.0.0.1:{p.port}/postgres"
    h = start_proxy(NO_PG, upstream=url, auth="trust", reader_listen=f"127.0.0.1:{free_port()}", **FAST)
    try:
        t0 = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match="no reader instance is available"):
            c = connect(h.proxy.endpoint_ports["reader"], p)
            one(c, "SELECT 1")
        assert time.monotonic() - t0 < 2
    finally:
        h.stop()


def test_replicas_configured_but_none_answering_makes_readers_wait(cluster) -> None:
    """A replica is listed but does not answer: reader clients wait their borrow timeout
    (it may come back), then hear why; the writer endpoint is unaffected."""
    p = cluster.primary
    url = f"postgresql://{p.superuser}:{p.password}@127.0.0.1:{p.port},127.0.0.1:{free_port()}/postgres"
    h = start_proxy(NO_PG, upstream=url, auth="trust", reader_listen=f"127.0.0.1:{free_port()}",
                    health_check_interval=0.2, borrow_timeout=1.5)
    try:
        w = connect(h.port, p)
        assert one(w, "SELECT pg_is_in_recovery()") is False
        w.close()
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(f"host=127.0.0.1 port={h.proxy.endpoint_ports['reader']} user={p.superuser} "
                            f"password={p.password} dbname=postgres", connect_timeout=10)
        assert 1.4 < time.monotonic() - t0 < 5
        assert "Timed-out waiting to acquire database connection.\nDETAIL:  no replica answers its health " \
               "check" in str(e.value), str(e.value)
    finally:
        h.stop()


def test_a_down_upstream_makes_clients_wait_then_says_why() -> None:
    """Nothing listening upstream: the client waits its borrow timeout (the server may be
    restarting), then hears RDS Proxy's timeout text with the reason in DETAIL."""
    port = free_port()
    h = start_proxy(NO_PG, upstream=f"postgresql://postgres:pw@127.0.0.1:{port}/postgres", auth="trust",
                    borrow_timeout=1.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(f"host=127.0.0.1 port={h.port} user=postgres password=pw dbname=postgres",
                            connect_timeout=10)
        waited = time.monotonic() - t0
        # (A failed login has no diagnostics object in psycopg: the text is the message.)
        text = str(e.value)
        assert "FATAL:  Timed-out waiting to acquire database connection.\nDETAIL:  no server connection could " \
               f"be opened: could not connect to the database server at 127.0.0.1:{port}: [Errno 111] " \
               "Connection refused" in text, text
        assert 1.4 < waited < 5
        # Retried meanwhile, with backoff: several attempts, not one per millisecond.
        pool = h.pool("postgres", "postgres")
        assert 3 <= pool.connect_failures <= 20, pool.connect_failures
    finally:
        h.stop()


# ---------------------------------------------------------------------- failover


def test_failover_keeps_idle_clients_and_their_session_state() -> None:
    with PostgresCluster(replicas=1, name="fo", password="fo-pw") as c:
        p, r = c.primary, c.replicas[0]
        p.psql("CREATE TABLE log (client int, port int)")
        h = start_proxy(NO_PG, upstream=c.url(), auth="trust", **FAST)
        try:
            idle = []
            for i in range(20):
                conn = connect(h.port, p)
                conn.autocommit = True
                one(conn, f"SET application_name = 'client-{i}'")
                one(conn, "SET statement_timeout = %s", (f"{10001 + i}ms",))
                idle.append(conn)
            # psycopg 3 for these two: it reports the proxy's FATAL text where psycopg2 (libpq's
            # connection-level message) says only "server closed the connection unexpectedly".
            dsn = f"host=127.0.0.1 port={h.port} user={p.superuser} password={p.password} dbname=postgres"
            mid = psycopg.connect(dsn)
            mid.execute("INSERT INTO log VALUES (-1, 0)")      # a transaction left open
            pinned = psycopg.connect(dsn, autocommit=True)
            pinned.execute("CREATE TEMP TABLE mine (x int)")   # pins it to its server connection
            r.wait_replayed(p.current_lsn())
            p.halt("immediate")
            t_promote = time.monotonic()
            r.promote()
            promoted = time.monotonic()
            # The first write after the promotion, through an idle client's same connection.
            one(idle[0], "INSERT INTO log VALUES (0, inet_server_port())")
            first_write = time.monotonic() - promoted
            for i, conn in enumerate(idle[1:], 1):
                one(conn, "INSERT INTO log VALUES (%s, inet_server_port())", (i,))
            for i, conn in enumerate(idle):
                assert one(conn, "SHOW application_name") == f"client-{i}"
                assert one(conn, "SHOW statement_timeout") == f"{10001 + i}ms"
                assert one(conn, "SELECT inet_server_port()") == r.port
                assert one(conn, "SELECT pg_is_in_recovery()") is False
            # The transaction in flight on the lost primary fails, once, and is not replayed.
            with pytest.raises(psycopg.OperationalError) as lost:
                mid.commit()
            assert lost.value.diag.message_primary == "the server connection was lost; the transaction, if any, is gone"
            assert r.psql("SELECT count(*) FROM log WHERE client = -1") == "0"
            # A pinned session's state died with the old primary: it is told so.
            with pytest.raises(psycopg.OperationalError, match=r"pinned to it \(temp_object\)"):
                pinned.execute("SELECT count(*) FROM mine")
            assert r.psql(f"SELECT count(*) FROM log WHERE port = {r.port}") == "20"
            rows = admin(h, r, "SHOW HOSTS")
            assert [x["writer"] for x in rows if x["host"].endswith(f":{r.port}")] == ["True"]
            fo = h.proxy.cluster.last_failover
            print(f"\nfailover: promote took {promoted - t_promote:.2f} s; first write through the proxy "
                  f"{first_write:.3f} s after promotion; proxy without a writer {fo['seconds']:.2f} s")
            assert first_write < 5
            assert h.proxy.cluster.counts["failover"] == 1
            for conn in idle:
                conn.close()
        finally:
            h.stop()


# ---------------------------------------------------------------------- outage and switchover


class Transfers:
    """A money-transfer workload: `n` clients moving amounts between accounts, one
    transaction each time, counting errors and the longest wait."""

    def __init__(self, port: int, node: ClusterNode, n: int, accounts: int = 20):
        self.port, self.node, self.n, self.accounts = port, node, n, accounts
        self.errors: list[str] = []
        self.done = 0
        self.longest = 0.0
        self.stop = threading.Event()
        self.gate = threading.Condition()    # the outage test stops the server between transactions
        self.in_flight = 0
        self.closed = False
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> "Transfers":
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, i: int) -> None:
        rnd = random.Random(i)
        try:
            conn = connect(self.port, self.node)
        except psycopg2.Error as e:
            self.errors.append(f"connect: {e}")
            return
        try:
            while not self.stop.is_set():
                a, b = rnd.sample(range(self.accounts), 2)
                with self.gate:
                    while self.closed:
                        self.gate.wait()
                    self.in_flight += 1
                t0 = time.monotonic()
                try:
                    with conn.cursor() as cur:
                        # Accounts locked in id order: transfers never deadlock each other.
                        amount = 7 if a < b else -7
                        lo, hi = min(a, b), max(a, b)
                        cur.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, lo))
                        cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, hi))
                    conn.commit()
                    self.done += 1
                except psycopg2.Error as e:
                    self.errors.append(f"{type(e).__name__}: {e}".strip())
                    try:
                        conn.rollback()
                    except psycopg2.Error:
                        return
                finally:
                    self.longest = max(self.longest, time.monotonic() - t0)
                    with self.gate:
                        self.in_flight -= 1
                        self.gate.notify_all()
                time.sleep(rnd.uniform(0, 0.01))
        finally:
            conn.close()

    def between_transactions(self):
        """Hold new transactions back until none is running (then release_gate)."""
        with self.gate:
            self.closed = True
            while self.in_flight:
                self.gate.wait()

    def release_gate(self) -> None:
        with self.gate:
            self.closed = False
            self.gate.notify_all()


def test_one_host_restart_costs_latency_not_errors() -> None:
    """A single upstream stopped 5 s: transactions that start while it is down wait for it
    (the server is stopped between transactions: one running at that instant would fail,
    which test_failover covers) and the money is all there afterwards."""
    with PostgresCluster(replicas=0, name="one", password="one-pw") as c:
        p = c.primary
        p.psql("CREATE TABLE accounts (id int PRIMARY KEY, balance int); "
               "INSERT INTO accounts SELECT g, 1000 FROM generate_series(0, 19) g")
        h = start_proxy(NO_PG, upstream=p.dsn(), auth="trust", borrow_timeout=30)
        assert h.proxy.cluster is None      # one host: no health checks, as before
        work = Transfers(h.port, p, 8).start()
        try:
            time.sleep(1.0)
            work.between_transactions()
            p.halt("fast")
            stopped = time.monotonic()
            done_before = work.done
            work.release_gate()
            time.sleep(5.0)
            assert work.done == done_before    # nothing got through: they are waiting
            p.start()
            back = time.monotonic()
            wait_for(lambda: work.done > done_before + 50, what="transfers after the restart")
            time.sleep(0.5)
        finally:
            work.finish()
            h.stop()
        assert work.errors == []
        assert p.psql("SELECT sum(balance) FROM accounts") == "20000"
        print(f"\noutage: down {back - stopped:.1f} s; longest transaction {work.longest:.2f} s; "
              f"{work.done} transfers, 0 errors")
        assert work.longest >= 5.0


def switch_over_under(work: "Transfers", h, p: ClusterNode, r: ClusterNode) -> list[str]:
    """SWITCHOVER to `r` on `h`'s admin console while `work` runs: promote `r` once SHOW HOSTS
    says every worker drained, wait for the answer and for transfers on the new writer.
    Returns the console's notices."""
    result: dict = {}

    def switch():
        conn = psycopg2.connect(host="127.0.0.1", port=h.port, user=p.superuser, password=p.password,
                                dbname="unpinned")
        try:
            conn.autocommit = True
            conn.cursor().execute(f"SWITCHOVER 127.0.0.1:{r.port} 60")
            result["notices"] = list(conn.notices)
        except Exception as e:   # reported by the assertion below
            result["error"] = e
        finally:
            conn.close()
    t = threading.Thread(target=switch)
    t.start()
    wait_for(lambda: hosts(h, p)[r.port]["switchover"] == "waiting", what="the drain")
    # Drained: nothing more reaches the old primary. Promote once the replica has it all.
    r.wait_replayed(p.current_lsn())
    done_paused = work.done
    r.promote()
    t.join(60)
    assert "error" not in result, result
    wait_for(lambda: work.done > done_paused + 200, what="transfers on the new writer")
    return result["notices"]


def test_planned_switchover_under_load_has_no_client_errors() -> None:
    with PostgresCluster(replicas=1, name="sw", password="sw-pw") as c:
        p, r = c.primary, c.replicas[0]
        p.psql("CREATE TABLE accounts (id int PRIMARY KEY, balance int); "
               "INSERT INTO accounts SELECT g, 1000 FROM generate_series(0, 49) g")
        h = start_proxy(NO_PG, upstream=c.url(), auth="trust", pool_size=21, **FAST)
        dsn = f"host=127.0.0.1 port={h.port} user={p.superuser} password={p.password} dbname=postgres"
        pinned = psycopg.connect(dsn, autocommit=True)
        pinned.execute("CREATE TEMP TABLE mine (x int)")     # holds its server connection on the old primary
        work = Transfers(h.port, p, 100, accounts=50).start()
        try:
            wait_for(lambda: work.done > 300, what="the workload to run")
            switch_over_under(work, h, p, r)
            # The pinned session did not hold the switchover up; its state stayed behind, and it is told.
            with pytest.raises(psycopg.OperationalError, match=r"pinned to it \(temp_object\)"):
                pinned.execute("SELECT count(*) FROM mine")
        finally:
            work.finish()
            h.stop()
        assert work.errors == [], work.errors[:5]
        assert r.psql("SELECT sum(balance) FROM accounts") == "50000"
        assert h.proxy.cluster.counts["switchover"] == 1
        print(f"\nswitchover: 100 clients, {work.done} transfers, 0 errors, longest {work.longest:.2f} s")


def test_switchover_with_two_workers_moves_every_worker(tmp_path) -> None:
    """Each worker process has its own pools: SWITCHOVER pauses, drains and moves all of them,
    and answers once every one serves from the new writer."""
    with PostgresCluster(replicas=1, name="sw2", password="sw2-pw") as c:
        p, r = c.primary, c.replicas[0]
        p.psql("CREATE TABLE accounts (id int PRIMARY KEY, balance int); "
               "INSERT INTO accounts SELECT g, 1000 FROM generate_series(0, 49) g")
        users = tmp_path / "users.toml"
        users.write_text(f'[users.{p.superuser}]\npassword = "{p.password}"\nadmin = true\n')
        with Served(c.url(), str(users), workers=2, pool_size=10) as h:
            work = Transfers(h.port, p, 20, accounts=50).start()
            try:
                wait_for(lambda: work.done > 200, what="the workload to run")
                notices = switch_over_under(work, h, p, r)
                assert any("2 workers: writer is now" in n for n in notices), notices
            finally:
                work.finish()
            fresh = [connect(h.port, p) for _ in range(8)]
            for conn in fresh:
                conn.autocommit = True      # eight open transactions would need eight server connections
            assert {one(conn, "SELECT inet_server_port()") for conn in fresh} == {r.port}
            for conn in fresh:
                conn.close()
            assert h.log().count("switchover: writer is now") == 2, h.log()
        assert work.errors == [], work.errors[:5]
        assert r.psql("SELECT sum(balance) FROM accounts") == "50000"

