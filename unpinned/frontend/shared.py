"""What a client connection may use of the proxy: a narrow shared state, not the proxy.

The proxy (unpinned/proxy.py) fills it and plugs in what lives above the frontend
(admin commands, cancel routing across workers) as callables, so connections never
import the layers that serve the operator.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from unpinned.backend.listener import Listener
from unpinned.backend.pool import Pool
from unpinned.config import Config, WorkerInfo
from unpinned.relay.statements import StatementRegistry
from unpinned.state.session import SessionOptions
from unpinned.telemetry.counters import Stats
from unpinned.telemetry.pinlog import PinLog


class Shared:
    __slots__ = ("config", "stats", "tls_context", "registry", "pinlog", "session_options", "clients", "by_key",
                 "worker", "pools", "tasks", "admin_command", "cancel", "_next_client", "draining", "on_idle",
                 "on_request", "cluster", "listeners")

    def __init__(self, config: Config, worker: WorkerInfo | None, pinlog: PinLog):
        self.config = config
        self.worker = worker                        # one of several processes, or None
        self.stats = Stats()
        self.tls_context = config.tls_context()
        self.registry = StatementRegistry()
        self.pinlog = pinlog
        self.session_options = SessionOptions(mode=config.mode, set_local_pins=config.set_local_pins,
                                              sequences=config.sequences, verify=config.verify,
                                              sql_prepare=config.sql_prepare)
        self.clients: set = set()                   # every client connection, logging in or logged in
        self.by_key: dict[tuple[int, int], Any] = {}    # cancel key -> client
        self.pools: dict[tuple[str, str], Pool] = {}
        self.listeners: dict[tuple[str, str], Listener] = {}   # LISTEN carried: one per pool
        self.tasks: set[asyncio.Task] = set()
        self._next_client = 0
        # Several upstream hosts or a reader endpoint (backend/cluster_pools.py); None = one host as before.
        self.cluster = None
        # Plugged in by the proxy: an admin console query -> its answer (bytes, or a task
        # when several workers answer), and a cancel request -> routed to its client.
        self.admin_command: Callable[[str, Any], bytes | asyncio.Future] = lambda sql, client: b""
        self.cancel: Callable[[int, int], Awaitable[None]] = _no_cancel
        # Shutting down or handing the clients over (frontend/handover.py): not ready, and each
        # client that comes to rest between transactions is passed to `on_idle`.
        self.draining = False
        self.on_idle: Callable[[Any], None] | None = None
        # While draining: a client at rest starts a new request; True = the hook answered it.
        self.on_request: Callable[[Any], bool] | None = None

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def pool_for(self, database: str, user: str, endpoint=None) -> Pool:
        if endpoint is not None:    # another endpoint than `listen`: its own pools (backend/cluster_pools.py)
            return self.cluster.endpoint_pool(database, user, endpoint)
        key = (database, user)
        pool = self.pools.get(key)
        if pool is None:
            server_user, password = self.config.server_credentials(user)
            pool = self.pools[key] = Pool(self.config, database, user, server_user, password, self.stats)
            if self.cluster is not None:
                self.cluster.adopt_writer_pool(pool)
        return pool

    def listener_for(self, pool: Pool) -> Listener:
        key = (pool.database, pool.user)
        listener = self.listeners.get(key)
        if listener is None:
            # On the writer's host (NOTIFY runs there), whichever endpoint the client came through.
            writer = self.pool_for(pool.database, pool.user)
            listener = self.listeners[key] = Listener(self.config, writer.database, writer.server_user,
                                                      writer.server_password, writer)
        return listener

    def new_client_id(self) -> int:
        self._next_client += 1
        if self.worker is None:
            return self._next_client
        return self._next_client * self.worker.count + self.worker.index   # unique across workers

    def client_count(self) -> int:
        """Clients of the whole proxy (all workers)."""
        return self.worker.total_clients() if self.worker else len(self.clients)

    def count_changed(self) -> None:
        if self.worker is not None:
            self.worker.clients[self.worker.index] = len(self.clients)


async def _no_cancel(pid: int, secret: int) -> None:
    return None
