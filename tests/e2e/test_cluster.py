"""A real primary and streaming replicas from the embedded binaries (issue 11), and the
health/role probe against them: what the proxy's writer and reader endpoints will stand on."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator

import psycopg2
import pytest

from unpinned.backend.probe import HealthChecker, probe, probe_for
from unpinned.backend.topology import Host, Role, Topology, parse_lsn
from unpinned.dev.cluster import ClusterNode, PostgresCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster(replicas=2, name="tc", password="cluster-pw") as c:
        c.primary.psql("CREATE TABLE items (id int PRIMARY KEY, note text)")
        yield c


def host(node: ClusterNode) -> Host:
    return Host(node.host, node.port)


async def check(node: ClusterNode, **kw):
    return await probe(host(node), node.superuser, node.password, timeout=kw.pop("timeout", 5.0), **kw)


def fetch(node: ClusterNode, sql: str):
    conn = psycopg2.connect(node.dsn())
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def test_rows_written_on_the_primary_are_read_on_the_replicas(cluster: PostgresCluster) -> None:
    p = cluster.primary
    p.psql("INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 100) g")
    lsn = p.current_lsn()
    for r in cluster.replicas:
        r.wait_replayed(lsn)
        assert fetch(r, "SELECT count(*), max(note) FROM items WHERE id <= 100") == [(100, "row 99")]
        assert r.in_recovery() and parse_lsn(r.replay_lsn()) >= parse_lsn(lsn)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            fetch(r, "INSERT INTO items VALUES (0, 'no')")
    # Each replica streams under its own name through its own slot.
    assert p.psql("SELECT string_agg(application_name || ':' || state, ',' ORDER BY application_name) "
                  "FROM pg_stat_replication") == "tc_replica1:streaming,tc_replica2:streaming"
    assert p.psql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots "
                  "WHERE active") == "tc_replica1,tc_replica2"
    assert not p.in_recovery()


async def test_probe_reports_roles_and_positions(cluster: PostgresCluster) -> None:
    p, r1 = cluster.primary, cluster.replicas[0]
    p.psql("INSERT INTO items VALUES (1001, 'probe')")
    r1.wait_replayed(p.current_lsn())
    w, r = await check(p), await check(r1)
    assert w.ok and w.role is Role.WRITER and w.timeline == 1 and w.lag_seconds == 0
    assert r.ok and r.role is Role.READER and r.timeline is None and r.lag_seconds == 0
    assert r.lsn == parse_lsn(r1.replay_lsn()) and w.lsn >= r.lsn
    assert w.error is None and 0 < w.elapsed < 5
    # Any role that can log in can be checked: nothing in the check needs a superuser.
    p.psql("CREATE ROLE checker LOGIN PASSWORD 'checker-pw'")
    r1.wait_replayed(p.current_lsn())
    plain = await probe(host(r1), "checker", "checker-pw")
    assert plain.ok and plain.role is Role.READER, plain.error


async def test_probe_failures_are_quick_and_clear(cluster: PostgresCluster) -> None:
    p = cluster.primary
    bad = await probe(host(p), p.superuser, "wrong")
    assert not bad.ok and bad.role is Role.UNKNOWN
    assert "password authentication failed" in bad.error and "28P01" in bad.error
    nodb = await probe(host(p), p.superuser, p.password, "no_such_db")
    assert not nodb.ok and 'database "no_such_db" does not exist' in nodb.error
    # The embedded server has no TLS: "prefer" goes on in plain text, "require" says why not.
    assert (await check(p, sslmode="prefer")).ok
    tls = await check(p, sslmode="require")
    assert not tls.ok and "does not support TLS, and upstream sslmode is require" in tls.error
    # Nothing listening: refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    t0 = time.monotonic()
    down = await probe(Host("127.0.0.1", free), "u", "p", timeout=5)
    assert not down.ok and down.error == f"could not check 127.0.0.1:{free}: connection refused"
    assert time.monotonic() - t0 < 1
    # A host that accepts and then says nothing (hung, or a black hole): the timeout bounds it.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        t0 = time.monotonic()
        hung = await probe(Host("127.0.0.1", listener.getsockname()[1]), "u", "p", timeout=0.5)
        took = time.monotonic() - t0
    finally:
        listener.close()
    assert not hung.ok and "did not answer the check within 0.5 s" in hung.error
    assert 0.5 <= took < 1.5 and 0.5 <= hung.elapsed < 1.5


async def test_paused_replay_grows_lag_and_ejects_the_replica(cluster: PostgresCluster) -> None:
    p, r1, r2 = cluster.primary, *cluster.replicas
    topo = Topology([host(p), host(r1), host(r2)], max_replica_lag=0.5)

    async def round_() -> list[str]:
        events = []
        for node in (p, r1, r2):
            events += [f"{e.kind} {e.host.port}" for e in topo.observe(await check(node))]
        return events

    await round_()
    assert topo.writer() == host(p) and topo.readers() == [host(r1), host(r2)]
    await asyncio.to_thread(r1.pause_replay)
    try:
        frozen = parse_lsn(r1.replay_lsn())
        lags = []
        for i in range(4):
            p.psql(f"INSERT INTO items VALUES ({2000 + i}, 'while paused')")
            await asyncio.sleep(0.3)
            lags.append((await check(r1)).lag_seconds)
        # The lag keeps growing while replay stands still; the other replica keeps up.
        assert lags == sorted(lags) and lags[-1] - lags[0] >= 0.6, lags
        assert (await check(r1)).lsn == frozen
        r2.wait_replayed(p.current_lsn())
        assert fetch(r1, "SELECT count(*) FROM items WHERE id >= 2000") == [(0,)]
        assert fetch(r2, "SELECT count(*) FROM items WHERE id >= 2000") == [(4,)]
        events = await round_()
        assert f"ejected {r1.port}" in events and topo.readers() == [host(r2)]
        assert topo.states[host(r1)].lag_bytes > 0
        # A client that has seen r2's position is never sent to the paused r1.
        seen = parse_lsn(r2.replay_lsn())
        assert topo.pick_reader(min_lsn=seen) == host(r2)
    finally:
        r1.resume_replay()
    r1.wait_replayed(p.current_lsn())
    assert fetch(r1, "SELECT count(*) FROM items WHERE id >= 2000") == [(4,)]
    events = await round_()
    assert f"readmitted {r1.port}" in events and topo.readers() == [host(r1), host(r2)]
    assert (await check(r1)).lag_seconds == 0


async def test_replica_stopped_immediately_comes_back_and_catches_up(cluster: PostgresCluster) -> None:
    p, r2 = cluster.primary, cluster.replicas[1]
    port = r2.port
    r2.halt("immediate")
    assert not r2.running
    down = await check(r2)
    assert not down.ok and "connection refused" in down.error and down.elapsed < 1
    # The primary goes on; its slot keeps the WAL the stopped replica has not received.
    p.psql("INSERT INTO items SELECT g, 'while down' FROM generate_series(3000, 3099) g")
    p.psql("CHECKPOINT")
    r2.start()
    assert r2.port == port and r2.in_recovery()
    r2.wait_replayed(p.current_lsn())
    assert fetch(r2, "SELECT count(*) FROM items WHERE note = 'while down'") == [(100,)]
    assert (await check(r2)).role is Role.READER


def test_halt_rejects_unknown_modes(cluster: PostgresCluster) -> None:
    with pytest.raises(ValueError, match="smart, fast or immediate"):
        cluster.replicas[0].halt("now")
    with pytest.raises(ValueError, match="not an LSN"):
        cluster.replicas[0].wait_replayed("0/0'; DROP TABLE items; --")


def test_wait_replayed_times_out_with_the_position(cluster: PostgresCluster) -> None:
    r1 = cluster.replicas[0]
    with pytest.raises(TimeoutError, match=r"replayed only up to [0-9A-F]+/[0-9A-F]+, not FF/0"):
        r1.wait_replayed("FF/0", timeout=0.2)


async def test_failover_promote_follow_and_split_brain() -> None:
    """Primary killed, a replica promoted, the other follows it, and the old primary restarted
    without being rejoined: the health checker follows every step and never picks the stale writer."""
    with PostgresCluster(replicas=2, name="fo", password="fo-pw") as c:
        p, r1, r2 = c.primary, *c.replicas
        p.psql("CREATE TABLE t (id int, origin text); INSERT INTO t VALUES (1, 'old primary')")
        for r in (r1, r2):
            r.wait_replayed(p.current_lsn())
        topo = Topology([host(p), host(r1), host(r2)])
        seen: list[tuple[float, str, str]] = []
        checker = HealthChecker(topo, probe_for(p.superuser, p.password, timeout=1.0), interval=0.1,
                                on_events=lambda evs: seen.extend((time.monotonic(), e.kind, e.detail) for e in evs))
        checker.start()
        try:
            async def until(cond, what: str, timeout: float = 10.0) -> float:
                t0 = time.monotonic()
                while not cond():
                    if time.monotonic() - t0 > timeout:
                        raise AssertionError(f"{what} not seen within {timeout}s: {seen}")
                    await asyncio.sleep(0.02)
                return time.monotonic() - t0

            await until(lambda: topo.writer() == host(p) and len(topo.readers()) == 2, "initial roles")
            assert checker.rounds >= 1

            await asyncio.to_thread(p.halt, "immediate")
            detect = await until(lambda: topo.writer() is None, "writer lost")
            assert detect < 1.0
            assert "could not check" in topo.states[host(p)].last_error

            took = await asyncio.to_thread(r1.promote)
            assert took < 30 and not r1.in_recovery()
            follow = await until(lambda: topo.writer() == host(r1), "promoted writer")
            assert follow < 1.0 and topo.states[host(r1)].timeline == 2
            assert ("writer", f"none -> {host(r1)}") in [(k, d) for _, k, d in seen]
            r1.psql("INSERT INTO t VALUES (2, 'promoted')")

            # The other replica now streams from the new primary (timeline 2).
            await asyncio.to_thread(r2.follow, r1)
            await asyncio.to_thread(r2.wait_replayed, r1.current_lsn())
            assert fetch(r2, "SELECT origin FROM t ORDER BY id") == [("old primary",), ("promoted",)]
            await until(lambda: topo.readers() == [host(r2)], "r2 reader of the new writer")

            # The old primary restarted as it was: writable, on the old timeline. Split brain:
            # the checker keeps the promoted writer and says so.
            await asyncio.to_thread(p.start)
            await until(lambda: topo.states[host(p)].healthy, "old primary back")
            assert topo.states[host(p)].role is Role.WRITER and topo.states[host(p)].timeline == 1
            assert topo.writer() == host(r1)
            assert any(k == "writer_conflict" and "following " + str(host(r1)) in d for _, k, d in seen)
            assert fetch(p, "SELECT count(*) FROM t") == [(1,)]     # it never saw the promoted write

            # Rejoined as a replica of the new primary: a reader again, with the promoted write.
            await asyncio.to_thread(p.rejoin, r1)
            assert p.in_recovery() and p.port == c.nodes[0].port
            await asyncio.to_thread(p.wait_replayed, r1.current_lsn())
            assert fetch(p, "SELECT origin FROM t ORDER BY id") == [("old primary",), ("promoted",)]
            await until(lambda: topo.readers() == [host(p), host(r2)], "old primary a reader")
            assert ("role", "writer -> reader") in [(k, d) for _, k, d in seen]
        finally:
            await checker.stop()


async def test_health_checker_wake_runs_a_round_at_once(cluster: PostgresCluster) -> None:
    topo = Topology([host(n) for n in cluster.nodes])
    checker = HealthChecker(topo, probe_for(cluster.primary.superuser, cluster.primary.password), interval=60)
    checker.start()
    try:
        for _ in range(200):
            if checker.rounds:
                break
            await asyncio.sleep(0.01)
        assert checker.rounds == 1 and topo.writer() == host(cluster.primary)
        checker.wake()
        for _ in range(200):
            if checker.rounds == 2:
                break
            await asyncio.sleep(0.01)
        assert checker.rounds == 2      # long before the 60 s interval
    finally:
        await checker.stop()
    with pytest.raises(ValueError):
        HealthChecker(topo, probe_for("u", "p"), interval=0)


def test_cluster_url_lists_every_node(cluster: PostgresCluster) -> None:
    from unpinned.backend.topology import split_hosts_url
    hosts, _ = split_hosts_url(cluster.url())
    assert hosts == [host(n) for n in cluster.nodes]
    # libpq reads the same format: replicas listed first, target_session_attrs finds the primary.
    listed = ",".join(str(h) for h in reversed(hosts))
    url = f"postgresql://postgres:cluster-pw@{listed}/postgres?target_session_attrs=read-write"
    assert split_hosts_url(url)[0] == hosts[::-1]
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), current_setting('port')::int")
            assert cur.fetchone() == (False, cluster.primary.port)
    finally:
        conn.close()


def test_everything_is_gone_after_stop() -> None:
    c = PostgresCluster(replicas=1, name="gone").start()
    dirs = [n.base_dir for n in c.nodes]
    pids = [n.pid for n in c.nodes]
    c.stop()
    assert not any(os.path.exists(d) for d in dirs)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
