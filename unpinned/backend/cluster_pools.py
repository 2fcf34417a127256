"""Pools on a cluster of hosts (SPEC 3.4): the writer endpoint follows the writer, the reader
endpoint spreads over the replicas, failovers and switchovers move the pools.

`Cluster` owns the `Topology` (pure decisions, backend/topology.py) and its `HealthChecker`
(backend/probe.py) and acts on what they decide:

- Writer pools (one per (database, user), the proxy's ordinary pools) open connections to
  `topology.writer()`. With no writer (the old one stopped answering, no replica promoted
  yet) they hold: clients stay connected, new transactions wait up to `borrow_timeout`.
  When a writer appears, idle connections to the old one are closed and waiting and idle
  clients continue on the new one; their session state is carried because the relay's
  parameter sync replays it on every server connection that lacks it.
- Reader pools (`ReaderPools`, one per (database, user), one `Pool` per replica inside):
  each borrow picks a replica. A client stays on the replica it used last while that one
  serves (RDS Proxy: "where practical, the same reader"); otherwise the least loaded.
  Monotonic reads: after each reader transaction the proxy asks the replica
  `pg_last_wal_replay_lsn()` on that connection before it goes back to the pool (off the
  client's path: the client already has its answer), and a client is only ever sent to a
  replica that has replayed that far. The probe's LSN would not do: it is older than what
  the client's snapshot may have seen, so it is no bound.
- `switchover(target)`: pause new writer transactions, let running ones finish, wait until
  the target is the writer, resume there.

Every event is logged (with timings) and counted (`counts`, shown by /metrics).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque

from unpinned.backend.pool import BorrowTimeout, Pool, FutureBorrower
from unpinned.backend.probe import HealthChecker, probe_for
from unpinned.backend.server import ServerConnection, ServerError
from unpinned.backend.topology import ALL_LAGGING, BEHIND_CLIENT, NO_REPLICAS, NONE_HEALTHY, Event, Topology, parse_lsn
from unpinned.config import Config
from unpinned.hosts import Host

log = logging.getLogger("unpinned.cluster")

TIMED_OUT = "Timed-out waiting to acquire database connection."
_LSN_SQL = "SELECT pg_last_wal_replay_lsn()"
HURRY = 0.1     # seconds between checks while there is no writer


def needs_cluster(config: Config) -> bool:
    """A single host with only `listen` runs exactly as before: no checks, no routing."""
    return len(config.upstream.all_hosts) > 1 or len(config.all_endpoints()) > 1


class Cluster:
    def __init__(self, config: Config, stats=None, probe_fn=None):
        self.config = config
        self.stats = stats
        up = config.upstream
        self.topology = Topology(list(up.all_hosts), max_replica_lag=config.max_replica_lag)
        if probe_fn is None:
            probe_fn = probe_for(up.user, up.password, up.database,
                                 timeout=min(config.connect_timeout or 5.0, 5.0), sslmode=up.sslmode,
                                 tls_context=up.tls_context() if up.sslmode != "disable" else None)
        self.checker = HealthChecker(self.topology, probe_fn, config.health_check_interval, self._on_events)
        self.writer_pools: list[Pool] = []
        self.readers: dict[tuple[str, str, str], ReaderPools] = {}    # (endpoint, database, user)
        self.endpoint_writers: dict[tuple[str, str, str], Pool] = {}  # read_write endpoints besides `listen`
        self.counts: Counter = Counter()     # events by kind; "failover", "switchover" too
        self.writer_lost_at: float | None = None
        self._last_writer: Host | None = None   # the latest writer seen, kept while there is none
        self.last_failover: dict | None = None   # {"from", "to", "seconds"} of the latest
        self.switchover_phase = ""           # "", "draining", "waiting", for SHOW HOSTS
        self._switching: Host | None = None
        self._tasks: set[asyncio.Task] = set()
        self._hurry: asyncio.Task | None = None
        self._down_since: dict[Host, float] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """One round of checks before clients come (so roles are known), then checks forever."""
        await self.checker.check_now()
        self.checker.start()
        w = self.topology.writer()
        log.info("upstream hosts: %s; writer %s", ", ".join(
            f"{s.host} ({s.role.value}{'' if s.healthy else ', unreachable'})" for s in self.topology.states.values()),
            w or "none yet")

    async def stop(self) -> None:
        await self.checker.stop()
        for r in self.readers.values():
            r.close_all()
        for p in self.endpoint_writers.values():
            p.close_all()
        for t in list(self._tasks):
            t.cancel()

    def reload(self, config: Config) -> None:
        self.config = config
        for p in self.endpoint_writers.values():
            p.config = config
            p.server_user, p.server_password = config.server_credentials(p.user)
        for r in self.readers.values():
            r.config = config
            for p in r.pools.values():
                p.config = config
                p.server_user, p.server_password = config.server_credentials(p.user)

    def reap(self, now: float) -> None:
        for r in self.readers.values():
            r.reap(now)
        for p in self.endpoint_writers.values():
            p.reap(now)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ pools

    def adopt_writer_pool(self, pool: Pool) -> None:
        """A new (database, user) pool of the writer endpoint: it goes where the writer is."""
        w = self.topology.writer()
        pool.host, pool.hold = w, w is None
        pool.on_unreachable = self._unreachable
        self.writer_pools.append(pool)

    def endpoint_pool(self, database: str, user: str, endpoint) -> "Pool | ReaderPools":
        """The pools of an endpoint other than `listen` (config.Endpoint): each has its own."""
        key = (endpoint.name, database, user)
        if endpoint.role == "read_only":
            r = self.readers.get(key)
            if r is None:
                r = self.readers[key] = ReaderPools(self, database, user)
            return r
        p = self.endpoint_writers.get(key)
        if p is None:
            server_user, password = self.config.server_credentials(user)
            p = self.endpoint_writers[key] = Pool(self.config, database, user, server_user, password, self.stats)
            self.adopt_writer_pool(p)
        return p

    def _unreachable(self, pool: Pool, e: Exception) -> bool:
        """A connect to `pool.host` failed as a down server's does: count it as a failed check
        (so a dead writer is dropped now, not at the next tick) and check everything again."""
        if pool.host is not None:
            self._on_events(self.topology.report_failure(pool.host, str(e), time.monotonic()))
        self.checker.wake()
        return True

    # ------------------------------------------------------------------ events

    def _on_events(self, events: list[Event]) -> None:
        readers_may_serve = False
        for e in events:
            self.counts[e.kind] += 1
            where = f" {e.host}" if e.host is not None else ""
            if e.kind == "writer":
                self._writer_changed(e)
            elif e.kind == "unhealthy":
                self._down_since[e.host] = e.at
                log.warning("host%s unhealthy (out of rotation): %s", where, e.detail)
            elif e.kind == "healthy" and e.host in self._down_since:
                log.warning("host%s healthy again after %.2f s: %s", where, e.at - self._down_since.pop(e.host),
                            e.detail)
            elif e.kind in ("ejected", "writer_conflict"):
                log.warning("host%s %s: %s", where, e.kind, e.detail)
            else:
                log.info("host%s %s: %s", where, e.kind, e.detail)
            readers_may_serve |= e.kind in ("healthy", "readmitted", "role")
        if readers_may_serve:
            for r in self.readers.values():
                r.retry()

    def _writer_changed(self, e: Event) -> None:
        new = self.topology.writer()
        if new is None:
            self.writer_lost_at = e.at
            log.warning("no writer (%s): new writer transactions wait up to %g s while the hosts are checked",
                        e.detail, self.config.borrow_timeout)
            if self._hurry is None:
                self._hurry = self.spawn(self._look_for_writer())
        elif self.writer_lost_at is not None or (self._last_writer not in (None, new) and self._switching is None):
            # The second case: the promoted host was seen before the old writer's failed check,
            # so the writer moved in one step; the time without one counts from that host's loss.
            lost = self.writer_lost_at if self.writer_lost_at is not None \
                else self._down_since.get(self._last_writer, e.at)
            took = e.at - lost
            self.counts["failover"] += 1
            self.last_failover = {"to": str(new), "seconds": round(took, 3), "at": time.time()}
            log.warning("failover: writer is now %s, %.2f s after the old one was lost", new, took)
            self.writer_lost_at = None
        else:
            log.info("writer: %s", e.detail)
        self._last_writer = new or self._last_writer
        self._move_writer_pools(new)

    async def _look_for_writer(self) -> None:
        """With no writer, check every HURRY seconds instead of every health_check_interval:
        the moment a replica is promoted is the moment waiting clients can go on."""
        try:
            while self.topology.writer() is None:
                self.checker.wake()
                await asyncio.sleep(min(HURRY, self.config.health_check_interval))
        finally:
            self._hurry = None

    def _move_writer_pools(self, new: Host | None) -> None:
        for pool in self.writer_pools:
            old, pool.host, pool.hold = pool.host, new, new is None
            if old is not new:
                # Idle connections to the old writer are useless (dead, or read-only after a
                # switchover); busy ones are dropped when given back (Pool.release).
                for conn in list(pool.idle):
                    if conn.host is not new:
                        conn.close()
            if new is not None and pool.waiters:
                pool._supply()

    # ------------------------------------------------------------------ switchover

    async def switchover(self, target: Host, timeout: float | None = None) -> str:
        """Move the writer endpoint to `target`: pause new transactions, let the running ones
        finish, wait until `target` is the writer (someone promotes it), resume there."""
        if target not in self.topology.states:
            raise ValueError(f"{target} is not one of the upstream hosts")
        if self._switching is not None:
            raise ValueError(f"a switchover to {self._switching} is under way")
        timeout = timeout or self.config.borrow_timeout or 120.0
        t0 = time.monotonic()
        deadline = t0 + timeout
        self._switching = target
        self.switchover_phase = "draining"
        pools = list(self.writer_pools)
        for p in pools:
            p.pause()
        try:
            # Running transactions finish where they are. A pinned client never gives its
            # connection back: it is told why below instead of holding the switchover up.
            drain_until = min(deadline, t0 + max(1.0, timeout / 4))
            while any(c.client is not None and not _pinned(c) for p in pools for c in p.busy) \
                    and time.monotonic() < drain_until:
                await asyncio.sleep(0.005)
            drained = time.monotonic()
            self.switchover_phase = "waiting"
            log.info("switchover to %s: running transactions finished in %.3f s; waiting for it to be the writer",
                     target, drained - t0)
            while self.topology.writer() != target:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target} did not become the writer within {timeout:g} s; "
                                       f"the writer stays {self.topology.writer() or 'unknown'}")
                self.checker.wake()
                await asyncio.sleep(min(0.05, self.config.health_check_interval))
            self._move_writer_pools(target)
            # Pinned sessions still on the old writer: their state cannot move. Closing their
            # server connection tells each client so at its next request (frontend/client.py
            # server_lost), with its pin reasons.
            left = [c for p in pools for c in p.busy if c.host is not target and c.client is not None]
            for conn in left:
                conn.close()
            if left:
                log.warning("switchover to %s: %d pinned session(s) on the old writer closed", target, len(left))
        finally:
            self._switching = None
            self.switchover_phase = ""
            for p in pools:
                p.resume()
        took = time.monotonic() - t0
        self.counts["switchover"] += 1
        log.warning("switchover: writer is now %s; new transactions paused %.3f s (drain %.3f s)",
                    target, took, drained - t0)
        return f"writer is now {target}, transactions paused {took:.3f} s"

    # ------------------------------------------------------------------ views

    def hosts_view(self) -> list[dict]:
        """SHOW HOSTS / /api/hosts: each host's role, health, lag and connections."""
        conns: Counter = Counter()
        busy: Counter = Counter()
        for p in self.writer_pools:
            for c in list(p.idle) + list(p.busy):
                if not c.closed:
                    conns[c.host] += 1
            for c in p.busy:
                busy[c.host] += 1
        for r in self.readers.values():
            for h, p in r.pools.items():
                conns[h] += len(p.idle) + len(p.busy)
                busy[h] += len(p.busy)
        rows = []
        for s in self.topology.snapshot():
            h = next(x for x in self.topology.hosts if str(x) == s["host"])
            st = self.topology.states[h]
            rows.append({
                "host": s["host"], "role": s["role"], "writer": s["is_writer"], "healthy": s["healthy"],
                "lag_s": s["lag_seconds"], "lag_bytes": s["lag_bytes"], "ejected_for_lag": s["ejected_for_lag"],
                "lsn": s["lsn"], "timeline": s["timeline"], "connections": conns[h], "busy": busy[h],
                "checked_ago_s": round(time.monotonic() - st.checked_at, 3) if st.checked_at else None,
                "last_error": s["last_error"] or "",
                "switchover": self.switchover_phase if h == self._switching else "",
            })
        return rows


def _pinned(conn: ServerConnection) -> bool:
    relay = getattr(conn.client, "relay", None)
    return relay is not None and relay.pinned


class ReaderPools:
    """What a reader endpoint's client sees as its pool, for one (database, user): one Pool
    per replica, a replica chosen per borrow. Same methods as Pool's that clients use."""

    def __init__(self, cluster: Cluster, database: str, user: str):
        self.cluster = cluster
        self.config = cluster.config
        self.database, self.user = database, user
        self.pools: dict[Host, Pool] = {}
        self.waiters: deque[list] = deque()          # [borrower, deadline] waiting for a replica
        self._timer: asyncio.TimerHandle | None = None
        self.seen: dict[object, int] = {}            # client -> the newest replay LSN it has read at
        self.last: dict[object, Host] = {}           # client -> the replica it used last
        self.checked_params: dict = {}
        self.login_messages: dict = {}
        self._reported: dict[str, str] | None = None
        self.paused = False

    # Login asks for a fresh server connection's report; while no replica exists at all it
    # gets None, so the login goes on to borrow and hears why.
    @property
    def reported(self) -> dict[str, str] | None:
        if self.cluster.topology.reader_unavailable() == NO_REPLICAS:
            return None
        return self._reported

    @reported.setter
    def reported(self, value) -> None:
        self._reported = value

    def _pool(self, host: Host) -> Pool:
        p = self.pools.get(host)
        if p is None:
            user, password = self.config.server_credentials(self.user)
            p = self.pools[host] = Pool(self.config, self.database, self.user, user, password, self.cluster.stats)
            p.host = host
            p.on_unreachable = self._unreachable
        return p

    def _load(self, host: Host) -> int:
        n = 0
        for r in self.cluster.readers.values():
            p = r.pools.get(host)
            if p is not None:
                n += len(p.busy) + len(p.waiters) + p.opening
        return n

    def _pick(self, borrower) -> Host | None:
        t = self.cluster.topology
        min_lsn = self.seen.get(borrower, 0)
        serving = t.readers(min_lsn)
        if not serving:
            return None
        last = self.last.get(borrower)
        if last in serving:
            return last
        for h in serving:
            t.states[h].borrowed = self._load(h)
        host = t.pick_reader(min_lsn)
        if host is not None and not isinstance(borrower, FutureBorrower):
            self.last[borrower] = host
        return host

    # ------------------------------------------------------------------ Pool's interface

    def borrow(self, borrower, now: float = 0.0) -> ServerConnection | None:
        host = self._pick(borrower)
        if host is not None:
            return self._pool(host).borrow(borrower, now)
        why = self.cluster.topology.reader_unavailable(self.seen.get(borrower, 0))
        if why == NO_REPLICAS:
            hosts = ", ".join(str(h) for h in self.cluster.topology.hosts)
            err = ServerError({"S": "FATAL", "C": "08006",
                               "M": "no reader instance is available for the read-only endpoint: "
                                    f"every upstream host is a writer ({hosts})"})
            asyncio.get_running_loop().call_soon(_fail, borrower, err)
            return None
        timeout = self.config.borrow_timeout
        self.waiters.append([borrower, time.monotonic() + timeout if timeout else None])
        self._arm()
        return None

    async def acquire(self) -> ServerConnection:
        fut = asyncio.get_running_loop().create_future()
        conn = self.borrow(FutureBorrower(fut))
        conn = conn if conn is not None else await fut
        if self._reported is None:
            self._reported = dict(conn.state.reported)
        return conn

    def withdraw(self, borrower) -> None:
        self.waiters = deque(w for w in self.waiters if w[0] is not borrower)
        for p in self.pools.values():
            p.withdraw(borrower)

    def release(self, conn: ServerConnection, now: float = 0.0) -> None:
        pool = self.pools.get(conn.host)
        if pool is None:
            conn.close()
            return
        client = conn.client
        if client is None or conn.closed:
            pool.release(conn, now)
            return
        conn.client = None
        self.last[client] = conn.host
        self.cluster.spawn(self._note_position(client, pool, conn))

    def discard(self, conn: ServerConnection) -> None:
        pool = self.pools.get(conn.host)
        if pool is None:
            conn.close()
        else:
            pool.discard(conn)

    def forget(self, conn: ServerConnection) -> None:
        pool = self.pools.get(conn.host)
        if pool is not None:
            pool.forget(conn)

    def reap(self, now: float) -> None:
        for p in self.pools.values():
            p.reap(now)
        # Forget clients that left (kept by identity: a client object has no room for it).
        for d in (self.seen, self.last):
            for c in [c for c in d if getattr(c, "closing", False)]:
                del d[c]

    def close_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for p in self.pools.values():
            p.close_all()

    # ------------------------------------------------------------------ internals

    async def _note_position(self, client, pool: Pool, conn: ServerConnection) -> None:
        """Read how far this replica has replayed, now that the client's transaction is over:
        everything the client read is at or before it."""
        try:
            async with asyncio.timeout(5):
                msgs, error = await conn.simple_query(_LSN_SQL)
            row = next((body for t, body in msgs if t == b"D"), None)
            if error is None and row is not None and conn.state.status == b"I":
                n = int.from_bytes(row[2:6], "big", signed=True)
                if n > 0:
                    lsn = parse_lsn(row[6:6 + n].decode())
                    if lsn > self.seen.get(client, 0):
                        self.seen[client] = lsn
                    self.cluster.topology.note_lsn(conn.host, lsn)
                pool.release(conn)
                return
        except (ConnectionError, TimeoutError, OSError, ValueError):
            pass
        pool.discard(conn)

    def _unreachable(self, pool: Pool, e: Exception) -> bool:
        """A replica refused a connection: it leaves the rotation, and the clients waiting on
        it pick again (another replica, or wait for one)."""
        self.cluster._unreachable(pool, e)
        moved = [w[0] for w in pool.waiters]
        pool.waiters.clear()
        for b in moved:
            if not b.closing:
                self.last.pop(b, None)
                conn = self.borrow(b)
                if conn is not None:
                    b.borrowed(conn)
        return True

    def retry(self) -> None:
        """Hand replicas to waiting clients; fail those past their borrow timeout."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        waiting, self.waiters = self.waiters, deque()
        while waiting:
            borrower, deadline = waiting.popleft()
            if borrower.closing:
                continue
            host = self._pick(borrower)
            if host is not None:
                conn = self._pool(host).borrow(borrower)
                if conn is not None:
                    borrower.borrowed(conn)
            elif deadline is not None and deadline <= now:
                exc = BorrowTimeout(TIMED_OUT)
                exc.detail = _WHY.get(self.cluster.topology.reader_unavailable(self.seen.get(borrower, 0)))
                _fail(borrower, exc)
            else:
                self.waiters.append([borrower, deadline])
        self._arm()

    def _arm(self) -> None:
        # While clients wait, look again often: a replica catching up (its LSN passing what a
        # client has seen) raises no event.
        if self.waiters and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(0.05, self.retry)


_WHY = {
    NONE_HEALTHY: "no replica answers its health check",
    ALL_LAGGING: "every healthy replica lags beyond max_replica_lag",
    BEHIND_CLIENT: "no replica has replayed as far as this client has already read",
}


def _fail(borrower, exc: Exception) -> None:
    if not borrower.closing:
        borrower.borrow_failed(exc)


__all__ = ["Cluster", "ReaderPools", "needs_cluster", "TIMED_OUT"]
