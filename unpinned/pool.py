"""A pool of server connections for one (database, user): limits, waiting, idling."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from . import server as server_mod
from .config import Config
from .server import ServerConnection, ServerError

log = logging.getLogger("unpinned.pool")


class BorrowTimeout(Exception):
    pass


class Pool:
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
        self.waiters: deque[asyncio.Future] = deque()
        self.reported: dict[str, str] | None = None    # ParameterStatus of a fresh server connection
        self.checked_params: dict[frozenset, dict[str, str] | dict] = {}
        self.paused = False
        # Counters (SHOW POOLS / metrics).
        self.borrows = 0
        self.borrow_wait_total = 0.0
        self.connects = 0
        self.connect_failures = 0

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.opening

    # ------------------------------------------------------------------ borrowing

    def try_acquire(self) -> ServerConnection | None:
        """The fast path: a fresh idle connection, or None (then use `acquire`)."""
        if self.paused or self.waiters:
            return None
        idle = self.idle
        while idle:
            conn = idle[-1]
            if conn.closed:
                idle.pop()
                continue
            if self.config.health_check_after and time.monotonic() - conn.last_used > self.config.health_check_after:
                return None
            idle.pop()
            self.busy.add(conn)
            self.borrows += 1
            if self.stats is not None:
                self.stats.borrow_latency.observe(0.0)
            return conn
        return None

    async def acquire(self) -> ServerConnection:
        timeout = self.config.borrow_timeout or None
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                conn = await self._acquire()
        except TimeoutError:
            raise BorrowTimeout("Timed-out waiting to acquire database connection.") from None
        self.borrows += 1
        waited = time.monotonic() - start
        self.borrow_wait_total += waited
        if self.stats is not None:
            self.stats.borrow_latency.observe(waited)
        return conn

    async def _acquire(self) -> ServerConnection:
        loop = asyncio.get_running_loop()
        while True:
            if not self.paused:
                while self.idle:
                    conn = self.idle.pop()
                    if conn.closed:
                        continue
                    self.busy.add(conn)
                    if self.config.health_check_after and \
                            time.monotonic() - conn.last_used > self.config.health_check_after:
                        if not await self._healthy(conn):
                            continue
                    return conn
                if self.size < self.config.pool_size:
                    return await self._open()
            fut = loop.create_future()
            self.waiters.append(fut)
            try:
                conn = await fut
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result() is not None:
                    # Handed a connection just as we gave up: give it back.
                    self.release(fut.result())
                raise
            finally:
                if fut in self.waiters:
                    self.waiters.remove(fut)
            if conn is not None:
                return conn
            # None: room appeared (a connection closed or the pool resumed); go round again.

    async def _open(self) -> ServerConnection:
        self.opening += 1
        try:
            conn = await server_mod.connect(self)
        except BaseException:
            self.connect_failures += 1
            self.opening -= 1
            self._wake_one()
            raise
        self.opening -= 1
        self.connects += 1
        if self.reported is None:
            self.reported = dict(conn.state.reported)
        self.busy.add(conn)
        return conn

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

    # ------------------------------------------------------------------ giving back

    def release(self, conn: ServerConnection) -> None:
        """Return a clean, idle connection (status I, nothing in flight)."""
        conn.client = None
        conn.last_used = time.monotonic()
        if conn.closed:
            self.forget(conn)
            return
        if not self.paused:
            while self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_result(conn)
                    return
        self.busy.discard(conn)
        self.idle.append(conn)

    def discard(self, conn: ServerConnection) -> None:
        """Close a connection whose state cannot be trusted, and make room for a new one."""
        conn.close()
        self.forget(conn)

    def forget(self, conn: ServerConnection) -> None:
        """Drop a connection from the books (it closed); a waiter may now open a new one."""
        was_known = conn in self.busy or conn in self.idle
        self.busy.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if was_known:
            self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

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
        for _ in range(len(self.waiters)):
            self._wake_one()

    def close_all(self) -> None:
        for conn in list(self.idle) + list(self.busy):
            conn.close()
        self.idle.clear()


__all__ = ["Pool", "BorrowTimeout", "ServerError"]
