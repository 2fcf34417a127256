"""A pool of server connections for one (database, user): limits, waiting, idling."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from unpinned.backend import server as server_mod
from unpinned.config import Config
from unpinned.backend.server import ServerConnection, ServerError
from unpinned.telemetry.buckets import bucket

log = logging.getLogger("unpinned.backend.pool")


class BorrowTimeout(Exception):
    detail: str | None = None      # why no connection came (the server unreachable, ...), for the DETAIL field


class Borrower:
    """What waits for a server connection: the pool calls `borrowed(conn)` or
    `borrow_failed(exc)` exactly once, unless `closing` is true by then."""
    closing = False
    # A connection to give this borrower in preference to others when it is idle, or None.
    preferred = None
    # The custom parameter placeholders the borrower's session would have on a server of its own:
    # it gets only connections whose placeholders are among them (see ServerState.placeholders).
    customs: frozenset | set = frozenset()

    def borrowed(self, conn: ServerConnection) -> None: ...

    def borrow_failed(self, exc: Exception) -> None: ...


class FutureBorrower(Borrower):
    """Adapter for the few places that want `await pool.acquire()` (login, checks)."""

    def __init__(self, fut: asyncio.Future):
        self.fut = fut

    @property
    def closing(self) -> bool:
        return self.fut.done()

    def borrowed(self, conn) -> None:
        self.fut.set_result(conn)

    def borrow_failed(self, exc) -> None:
        self.fut.set_exception(exc)


class Pool:
    """Server connections for one (database, user).

    Borrowing is callback-based on purpose: a client waiting for a connection is handed
    one directly from `release()`, with no task, future or timer per borrow (these cost
    more than the forwarding itself under contention). One timer per pool enforces the
    borrow timeout of the oldest waiter.
    """

    def __init__(self, config: Config, database: str, user: str, server_user: str, server_password: str | None,
                 stats=None):
        self.config = config
        self.stats = stats
        self.database = database
        self.user = user
        self.server_user = server_user
        self.server_password = server_password
        self.idle: deque[ServerConnection] = deque()   # right end = most recently used
        self.busy: set[ServerConnection] = set()
        self.opening = 0
        self.checking = 0
        self.waiters: deque[list] = deque()            # [borrower, deadline, start]
        self._timer: asyncio.TimerHandle | None = None
        self.reported: dict[str, str] | None = None    # ParameterStatus of a fresh server connection
        self.checked_params: dict[frozenset, dict[str, str]] = {}
        self.login_messages: dict = {}      # startup parameters -> encoded AuthenticationOk + ParameterStatus
        self.paused = False
        # No idle connection has custom placeholders or is kept for a client (issue 12's hand-off
        # hygiene): true until one is put back that has (release, _hand), then for good. While
        # true, borrow() takes the most recent idle connection without matching.
        self.plain = True
        # While borrow() looks for a connection among the waiters' (see there): that borrower,
        # and the connection _hand found for it, which borrow() returns instead of a callback.
        self._lending_to: Borrower | None = None
        self._lent: ServerConnection | None = None
        self._tasks: set[asyncio.Task] = set()
        # Where new connections go (backend/cluster_pools.py moves it on a failover); None = the
        # configured upstream. `hold`: no host to go to now, waiters wait (a failover under way).
        self.host = None
        self.hold = False
        # Told when a connect fails as an unreachable or restarting server does (not a refused
        # login); returns whether the waiters should keep waiting (retried with backoff) rather
        # than hear the error. Unset: they keep waiting, up to the borrow timeout (an outage).
        self.on_unreachable = None
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = 0.0
        self.outage: str | None = None     # why connects fail now (the last error), None when they work
        self._outage_since = 0.0
        # Counters (SHOW POOLS / metrics).
        self.borrows = 0
        self.borrow_wait_total = 0.0
        self.connects = 0
        self.connect_failures = 0
        self.retired = 0        # closed because of what a client left in them (see ServerState.retire)

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.opening

    # ------------------------------------------------------------------ borrowing

    def _stale(self, conn: ServerConnection, now: float) -> bool:
        after = self.config.health_check_after
        return bool(after) and now - conn.last_used > after

    def borrow(self, borrower: Borrower, now: float = 0.0) -> ServerConnection | None:
        """A connection now, or None: then `borrower` is called back later (never from inside this call).
        `now`: time.monotonic() if the caller has just read it."""
        idle = self.idle
        if not now:
            now = time.monotonic()
        if idle and not self.paused and not self.waiters:
            after = self.config.health_check_after
            prev = borrower.preferred
            if prev is not None and prev is not idle[-1] and not (after and now - prev.last_used > after):
                self._prefer(prev)
            while idle:
                conn = idle[-1]
                if conn.closed:
                    idle.pop()
                    continue
                if after and now - conn.last_used > after:
                    break       # stale: checked first, below
                if self.plain:
                    idle.pop()      # (every borrower fits every idle connection)
                else:
                    state = conn.state
                    placeholders = state.placeholders
                    if state.reserved_for is not None and state.reserved_for is not borrower:
                        conn = self._take_fitting(borrower, now)
                        if conn is None:
                            break   # none fits: a new one, below
                    elif not placeholders:
                        if borrower.customs and conn is not prev:
                            # Connections without placeholders are the ones every client fits: one
                            # with placeholders this session has anyway is used first, if idle.
                            conn = self._take_fitting(borrower, now, marked=True) or idle.pop()
                        else:
                            idle.pop()
                    elif placeholders <= borrower.customs:
                        idle.pop()
                    else:
                        conn = self._take_fitting(borrower, now)
                        if conn is None:
                            break   # none fits: a new one, below
                self.busy.add(conn)
                self.borrows += 1
                if self.stats is not None:
                    h = self.stats.borrow_latency      # observe(0.0), inlined: this is every transaction
                    h.counts[0] += 1
                    h.count += 1
                conn.last_used = now        # (handed out now: see _hand)
                return conn
        timeout = self.config.borrow_timeout
        self.waiters.append([borrower, now + timeout if timeout else None, now])
        if self._timer is None and timeout:
            self._arm_timer()
        if not idle and len(self.busy) + self.opening >= self.config.pool_size:
            return None     # (what _supply would find: nothing idle, no room for a new one)
        # _supply may find this very borrower a connection (an idle one the waiters ahead of it
        # do not fit): it is returned, not called back from inside borrow(), where the borrower
        # does not know yet that it waits.
        self._lending_to = borrower
        try:
            self._supply(now)
        finally:
            self._lending_to = None
        conn, self._lent = self._lent, None
        return conn

    def _take_fitting(self, borrower: Borrower, now: float, marked: bool = False) -> ServerConnection | None:
        """An idle connection, not stale, whose custom placeholders the borrower's session would
        have too (so it cannot tell them from its own), taken out of the idle list; or None.
        `marked`: only one with placeholders."""
        after = self.config.health_check_after
        for conn in reversed(self.idle):
            p = conn.state.placeholders
            if not conn.closed and (p or not marked) and (not p or p <= borrower.customs) \
                    and (conn.state.reserved_for is None or conn.state.reserved_for is borrower) \
                    and not (after and now - conn.last_used > after):
                self.idle.remove(conn)
                return conn
        return None

    def _prefer(self, conn: ServerConnection) -> None:
        """Put an idle connection next in line (the borrower's previous one; see Borrower.preferred)."""
        try:
            self.idle.remove(conn)
        except ValueError:
            return          # busy with someone else, or gone
        self.idle.append(conn)

    def withdraw(self, borrower: Borrower) -> None:
        """`borrower` no longer wants a connection (its request was canceled)."""
        self.waiters = deque(w for w in self.waiters if w[0] is not borrower)

    async def acquire(self) -> ServerConnection:
        fut = asyncio.get_running_loop().create_future()
        conn = self.borrow(FutureBorrower(fut))
        return conn if conn is not None else await fut

    def _supply(self, now: float = 0.0) -> None:
        """Find connections for waiters: idle ones (checked first if stale), or new ones."""
        if self.paused:
            return
        idle = self.idle
        if idle and self.waiters:
            # (Not read when nothing is idle: a full pool's borrow() on every transaction.)
            if not now:
                now = time.monotonic()
            tries = len(idle)
            while self.waiters and idle and tries:
                tries -= 1
                conn = idle.pop()
                if conn.closed:
                    continue
                self.busy.add(conn)
                if self._stale(conn, now):
                    self.checking += 1
                    self._spawn(self._check_then_hand(conn))
                elif not self._hand(conn, now):
                    idle.appendleft(idle.pop())     # fits no waiter: the others are tried
            if self.waiters and idle and self.size >= self.config.pool_size and \
                    self.opening + self.checking < len(self.waiters):
                # Waiters that no idle connection fits (custom placeholders they must not see, or
                # kept for another client), and no room for a new one: the oldest idle connection
                # makes room.
                conn = idle.popleft()
                conn.close()
                self.retired += 1
        # Open only as many as there are waiters not already covered by openings in flight (the
        # pool size written out: a full pool's borrow() comes here on every transaction).
        waiters = self.waiters
        while waiters and len(idle) + len(self.busy) + self.opening < self.config.pool_size and not self.hold and \
                self._retry is None and self.opening + self.checking < len(waiters):
            self.opening += 1
            self._spawn(self._open())

    def _hand(self, conn: ServerConnection, now: float = 0.0) -> bool:
        """Give a busy-booked connection to the first live waiter it fits, or put it back (False).
        `now`: time.monotonic() if the caller has just read it."""
        if not now:
            now = time.monotonic()
        waiters = self.waiters
        placeholders = conn.state.placeholders
        owner = conn.state.reserved_for
        while waiters:
            if owner is not None:
                waiter = next((w for w in waiters if w[0] is owner and not owner.closing), None)
                if waiter is None:
                    break
                waiters.remove(waiter)
                borrower, _, start = waiter
            elif placeholders:
                waiter = next((w for w in waiters if not w[0].closing and placeholders <= w[0].customs), None)
                if waiter is None:
                    break
                waiters.remove(waiter)
                borrower, _, start = waiter
            else:
                borrower, _, start = waiters.popleft()
            if borrower.closing:
                continue
            self.borrows += 1
            waited = now - start
            self.borrow_wait_total += waited
            if self.stats is not None:
                h = self.stats.borrow_latency      # observe(waited), inlined: most transactions of a busy pool
                h.counts[bucket(waited)] += 1
                h.sum += waited
                h.count += 1
            # The time it was handed out, as in borrow(): the borrower reads it rather than the clock
            # again (it is set anew when the connection comes back, and not read while it is busy).
            conn.last_used = now
            if borrower is self._lending_to:
                self._lent = conn
            else:
                borrower.borrowed(conn)
            return True
        self.busy.discard(conn)
        conn.last_used = now
        if placeholders or owner is not None:
            self.plain = False
        self.idle.append(conn)
        return False

    def _fail_one(self, exc: Exception) -> None:
        while self.waiters:
            borrower = self.waiters.popleft()[0]
            if not borrower.closing:
                borrower.borrow_failed(exc)
                return

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self) -> None:
        try:
            conn = await server_mod.connect(self.config, self.server_user, self.server_password, self.database,
                                            self.forget, self.host)
        except Exception as e:
            self.connect_failures += 1
            self.opening -= 1
            if _unreachable(e) and self._keep_waiting(e):
                return
            # The waiter that caused this attempt hears why; the others try again.
            self._fail_one(e if isinstance(e, ServerError) else
                           ServerError({"S": "FATAL", "C": "08006", "M": f"could not connect to the server: {e}"}))
            self._supply()
            return
        except BaseException:
            self.opening -= 1
            raise
        self.opening -= 1
        self.connects += 1
        self._backoff = 0.0
        if self.outage is not None:
            log.warning("pool %s/%s: the server answers again, %.2f s after connects started failing",
                        self.database, self.user, time.monotonic() - self._outage_since)
            self.outage = None
        if self.reported is None:
            self.reported = dict(conn.state.reported)
        self.busy.add(conn)
        self._hand(conn)

    def _keep_waiting(self, e: Exception) -> bool:
        """A connect failed because the server is down or restarting: waiters stay queued (their
        borrow timeout still runs) and the pool tries again after a growing pause."""
        hook = self.on_unreachable
        if hook is not None and not hook(self, e):
            return False
        if self.outage is None:
            self._outage_since = time.monotonic()
            log.warning("pool %s/%s: %s; waiting clients wait up to borrow_timeout (%g s) while it is retried",
                        self.database, self.user, e, self.config.borrow_timeout)
        self.outage = f"no server connection could be opened: {e}"
        if self._retry is None:
            self._backoff = min(1.0, self._backoff * 2) if self._backoff else 0.05
            self._retry = asyncio.get_running_loop().call_later(self._backoff, self._retry_now)
        return True

    def _retry_now(self) -> None:
        self._retry = None
        self._supply()

    async def _check_then_hand(self, conn: ServerConnection) -> None:
        try:
            healthy = await self._healthy(conn)
        finally:
            self.checking -= 1
        if not healthy or not self._hand(conn):
            self._supply()

    async def _healthy(self, conn: ServerConnection) -> bool:
        try:
            async with asyncio.timeout(self.config.connect_timeout or 10):
                _, error = await conn.simple_query("")
            if error is None and conn.state.status == b"I":
                return True
        except (ConnectionError, TimeoutError, OSError):
            pass
        log.info("server connection %d failed its health check; closing it", conn.id)
        self.discard(conn)
        return False

    def _arm_timer(self) -> None:
        head = next((w for w in self.waiters if w[1] is not None), None)
        if head is None:
            self._timer = None
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + max(0.0, head[1] - time.monotonic()), self._expire)

    def _expire(self) -> None:
        now = time.monotonic()
        while self.waiters and self.waiters[0][1] is not None and self.waiters[0][1] <= now:
            borrower = self.waiters.popleft()[0]
            if not borrower.closing:
                exc = BorrowTimeout("Timed-out waiting to acquire database connection.")
                if self._retry is not None or self.hold:
                    exc.detail = self.outage
                borrower.borrow_failed(exc)
        self._arm_timer()

    # ------------------------------------------------------------------ giving back

    def release(self, conn: ServerConnection, now: float = 0.0) -> None:
        """Return a clean, idle connection (status I, nothing in flight). `now`: time.monotonic()
        if the caller has just read it."""
        conn.client = None
        if not now:
            now = time.monotonic()
        conn.last_used = now
        if conn.closed:
            self.forget(conn)
            return
        state = conn.state
        if state.placeholders or state.retire is not None:
            self.plain = False      # (before it is idle: borrow() matches from now on)
            if state.retire is not None and state.reserved_for is None:
                # What its last client did cannot be undone on it (temp buffers allocated,
                # PL/pgSQL loaded), and that client is gone: closed, a new one opens when someone
                # needs it.
                log.debug("retiring server connection %d: %s", conn.id, state.retire)
                self.retired += 1
                self.discard(conn)
                return
        if conn.host is not self.host:     # opened to a host that is no longer this pool's (failover)
            self.discard(conn)
            return
        if self.waiters and not self.paused:
            if not self._hand(conn, now):
                self._supply(now)
            return
        self.busy.discard(conn)
        self.idle.append(conn)

    def discard(self, conn: ServerConnection) -> None:
        """Close a connection whose state cannot be trusted, and make room for a new one."""
        conn.close()
        self.forget(conn)

    def forget(self, conn: ServerConnection) -> None:
        """Drop a connection from the books (it closed); waiters may now get a new one."""
        was_known = conn in self.busy or conn in self.idle
        self.busy.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if was_known and self.waiters:
            self._supply()

    # ------------------------------------------------------------------ housekeeping

    def reap(self, now: float) -> None:
        """Close idle connections beyond max_idle or idle longer than server_idle_timeout."""
        cfg = self.config
        while self.idle and (len(self.idle) > cfg.max_idle or
                             (cfg.server_idle_timeout and now - self.idle[0].last_used > cfg.server_idle_timeout)):
            conn = self.idle.popleft()
            conn.close()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._supply()

    def close_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._retry is not None:
            self._retry.cancel()
        for conn in list(self.idle) + list(self.busy):
            conn.close()
        self.idle.clear()
        for task in list(self._tasks):
            task.cancel()


# What a starting or stopping server answers (not a refused login, database or TLS setting).
_OUTAGE_STATES = frozenset(("57P01", "57P02", "57P03"))


def _unreachable(e: Exception) -> bool:
    if isinstance(e, ServerError):
        return e.unreachable or e.sqlstate in _OUTAGE_STATES
    return isinstance(e, (ConnectionError, OSError, TimeoutError))   # the server hung up during login


__all__ = ["Pool", "Borrower", "BorrowTimeout", "ServerError"]
