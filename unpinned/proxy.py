"""The proxy: it puts the parts together (listener, pools, the operator's views) and
runs them until told to stop.

Clients are served by the frontend (frontend/login.py, then frontend/client.py), which
sees only the narrow `Shared` state; what serves the operator (admin commands, HTTP,
metrics, the worker peer channel) lives in ops/ and is plugged in here.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections import deque

from unpinned import __version__
from unpinned.backend.cluster_pools import Cluster, needs_cluster
from unpinned.config import Config, WorkerInfo, load, parse_hostport, per_process
from unpinned.frontend.login import Login
from unpinned.frontend.shared import Shared
from unpinned.frontend.handover import shutdown_error
from unpinned.ops import admin
from unpinned.ops.drain import drain
from unpinned.ops.http_api import HttpServer
from unpinned.ops.live_state import history_sample
from unpinned.ops.takeover import Giver, Taker
from unpinned.ops.workers import Peers
from unpinned.state.server_state import number_servers_from
from unpinned.telemetry.pinlog import PinLog, open_stream
from unpinned.wire import messages as m

log = logging.getLogger("unpinned")


class Proxy:
    def __init__(self, config: Config, config_path: str | None = None, overrides: dict | None = None,
                 worker: WorkerInfo | None = None):
        self.worker = worker                    # one of several processes (ops/workers.py), or None
        self.total_config = config
        config = per_process(config, worker)
        self.config_path = config_path          # for RELOAD / SIGHUP
        self.overrides = overrides or {}        # command-line flags, kept across reloads
        self.shared = Shared(config, worker, PinLog(open_stream(config.pin_log), mode=config.mode,
                                                    max_sql=config.pin_log_max_sql, redact=config.pin_log_redact))
        self.shared.admin_command = self._admin_command
        self.shared.cancel = self.cancel
        self.peers: Peers | None = None
        self.metrics_registry = None
        self.history: deque = deque(maxlen=600)   # one sample a second for the live page
        self.http: HttpServer | None = None
        self.listeners: list[asyncio.base_events.Server] = []
        self.endpoint_ports: dict[str, int] = {}    # endpoint name -> the port it listens on
        self._housekeeper: asyncio.Task | None = None
        self.started = time.time()
        self.handed_over = False                # a takeover took the clients: no drain at exit
        self.upstream_seen = float("-inf")      # when /ready last reached the server (ops/health.py)

    # What the operator's views read (ops/ takes the proxy as it is).
    @property
    def config(self) -> Config:
        return self.shared.config

    @property
    def stats(self):
        return self.shared.stats

    @property
    def pinlog(self) -> PinLog:
        return self.shared.pinlog

    @property
    def pools(self) -> dict:
        return self.shared.pools

    @property
    def notify_listeners(self) -> dict:
        return self.shared.listeners

    @property
    def clients(self) -> set:
        return self.shared.clients

    @property
    def registry(self):
        return self.shared.registry

    @property
    def cluster(self) -> Cluster | None:
        return self.shared.cluster

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sockets: dict | None = None) -> None:
        """Listen, or serve the listening `sockets` handed over by a process being replaced."""
        sockets = sockets or {}
        loop = asyncio.get_running_loop()
        host, port = self.config.listen_address()
        if self.worker is not None:
            self.peers = Peers(self, self.worker)
            await self.peers.start()
        shared = self.shared
        if needs_cluster(self.config):
            shared.cluster = Cluster(self.config, shared.stats)
            await shared.cluster.start()
        if "clients" in sockets:
            srv = await loop.create_server(lambda: Login(shared), sock=sockets.pop("clients"), backlog=4096)
        else:
            srv = await loop.create_server(lambda: Login(shared), host, port, reuse_address=True,
                                           reuse_port=self.worker is not None, backlog=4096)
        self.listeners.append(srv)
        self.endpoint_ports["default"] = srv.sockets[0].getsockname()[1]
        for ep in self.config.all_endpoints()[1:]:
            ep_host, ep_port = parse_hostport(ep.listen, f"endpoint {ep.name} listen")
            if f"endpoint:{ep.name}" in sockets:     # handed over by the process being replaced
                ep_srv = await loop.create_server(lambda ep=ep: Login(shared, ep),
                                                  sock=sockets.pop(f"endpoint:{ep.name}"), backlog=4096)
            else:
                ep_srv = await loop.create_server(lambda ep=ep: Login(shared, ep), ep_host, ep_port, reuse_address=True,
                                                  reuse_port=self.worker is not None, backlog=4096)
            self.listeners.append(ep_srv)
            self.endpoint_ports[ep.name] = ep_srv.sockets[0].getsockname()[1]
            log.info("endpoint %s (%s) listening on %s", ep.name, ep.role, ep.listen)
        if self.config.http_listen:
            self.http = HttpServer(self)
            http_host, http_port = parse_hostport(self.config.http_listen, "http_listen")
            await self.http.start(http_host, http_port, reuse_port=self.worker is not None, sock=sockets.pop("http", None))
            log.info("metrics and live page on http://%s:%d/", http_host, self.http.port)
            if not self.config.http_token and http_host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("the HTTP listener on %s has no http_token: /api/* (pins, clients) and the live "
                            "page are open to anyone who can reach it", self.config.http_listen)
        for unused in sockets.values():
            unused.close()
        self._housekeeper = loop.create_task(self._housekeeping())
        if self.config.auth == "trust":
            log.warning("client authentication is 'trust': anyone who can reach %s logs in. Development only.",
                        self.config.listen)
        log.info("unpinned %s listening on %s, mode %s, upstream %s:%s%s", __version__, self.config.listen,
                 self.config.mode, self.config.upstream.host, self.config.upstream.port,
                 f" (worker {self.worker.index + 1} of {self.worker.count}, pid {os.getpid()})"
                 if self.worker else "")

    @property
    def port(self) -> int:
        return self.listeners[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for srv in self.listeners:
            srv.close()
        if self.http is not None:
            self.http.close()
        if self.peers is not None:
            self.peers.close()
        if self._housekeeper:
            self._housekeeper.cancel()
        for client in list(self.clients):
            client.shutdown(shutdown_error("the proxy is shutting down"))
        for pool in self.pools.values():
            pool.close_all()
        for listener in self.shared.listeners.values():
            listener.close()
        if self.cluster is not None:
            await self.cluster.stop()
        for t in list(self.shared.tasks):
            t.cancel()
        await asyncio.sleep(0)

    def spawn(self, coro) -> asyncio.Task:
        return self.shared.spawn(coro)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for pool in self.pools.values():
                pool.reap(now)
            if self.cluster is not None:
                self.cluster.reap(now)
            limit = self.config.client_idle_timeout
            login_limit = self.config.login_timeout
            for client in list(self.clients):
                if not client.active:
                    # Logins are timed here, not with a timer each: connect-per-request clients.
                    if now - client.last_active > login_limit:
                        client.login_timed_out()
                elif limit and client.server is None and now - client.last_active > limit:
                    client.shutdown(m.fatal("57P05", "terminating connection due to idle-session timeout"))
            self.history.append(history_sample(self))

    def pool_for(self, database: str, user: str):
        return self.shared.pool_for(database, user)

    def reload(self) -> None:
        """Re-read the config file; new settings apply to new borrows and logins, nobody is dropped."""
        new = load(self.config_path, **self.overrides)
        self.total_config = new
        new = per_process(new, self.worker)
        if new.listen != self.config.listen:
            log.warning("listen address changes need a restart; keeping %s", self.config.listen)
            new.listen = self.config.listen
        self.shared.config = new
        self.shared.tls_context = new.tls_context()     # a renewed certificate applies to new clients
        for client in self.clients:
            client.config = new
        for pool in self.pools.values():
            pool.config = new
            pool.server_user, pool.server_password = new.server_credentials(pool.user)
        if self.cluster is not None:
            self.cluster.reload(new)
        log.info("configuration reloaded")

    def _admin_command(self, sql: str, client):
        if admin.is_switchover(sql):
            return self.spawn(admin.switchover(self, sql))
        if self.peers is not None:
            # Several workers: the answer is gathered from all of them, in order.
            return self.spawn(admin.execute_everywhere(self, sql, client))
        return admin.execute(self, sql, client)

    async def cancel(self, pid: int, secret: int, forward: bool = True) -> None:
        if self.peers is not None and forward and self.peers.owner(pid) != self.worker.index:
            # The client is another worker's (the kernel chose a worker for this connection).
            try:
                await self.peers.ask(self.peers.owner(pid), {"op": "cancel", "pid": pid, "secret": secret})
            except (OSError, ConnectionError, TimeoutError, ValueError) as e:
                log.warning("could not pass a cancel request to worker %d: %s", self.peers.owner(pid), e)
            return
        client = self.shared.by_key.get((pid, secret))
        if client is None or not client.active or client.admin:
            return
        client.cancel()


async def run(config: Config, config_path: str | None = None, overrides: dict | None = None,
              ready: asyncio.Event | None = None, worker: WorkerInfo | None = None) -> None:
    """Serve until SIGINT/SIGTERM (drain, then exit; a second signal exits at once) or until a
    newer process took everything over (ops/takeover.py); SIGHUP reloads the configuration."""
    proxy = Proxy(config, config_path, overrides, worker)
    stop = asyncio.Event()
    taker = giver = None
    path = proxy.config.takeover_socket
    if path:
        taker = Taker(proxy, path)
        await proxy.start(await taker.connect())
    else:
        await proxy.start()
    # Latency: what was built at start-up (modules, pglast's tables) is never garbage, so keep
    # the collector from walking it again, and collect the young generation less often (the
    # hot path's short-lived lists would otherwise trigger it every few hundred requests).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    loop = asyncio.get_running_loop()
    signals = asyncio.Event()

    def handed_over() -> None:
        proxy.handed_over = True
        stop.set()

    if path:
        receiving = loop.create_task(taker.receive()) if taker.sock is not None else None
        giver = Giver(proxy, path, handed_over)

        async def listen_when_received() -> None:
            # The path is the old process's until it is done; then ours, for the next restart.
            if receiving is not None:
                await receiving
            giver.listen()
        proxy.spawn(listen_when_received())

    def on_signal() -> None:
        if signals.is_set():
            stop.set()          # a second signal: no more waiting
        signals.set()

    def reload() -> None:
        try:
            proxy.reload()
        except Exception as e:   # keep serving with the old configuration
            log.error("reload failed, old configuration kept: %s", e)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError):
        pass
    if ready is not None:
        ready.set()
    first_signal, done = loop.create_task(signals.wait()), loop.create_task(stop.wait())
    try:
        await asyncio.wait((first_signal, done), return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            # SIGTERM: drain (ops/drain.py); a second signal ends the wait sooner.
            draining = loop.create_task(drain(proxy, proxy.config.shutdown_timeout))
            await asyncio.wait((draining, done), return_when=asyncio.FIRST_COMPLETED)
            draining.cancel()
    finally:
        first_signal.cancel()
        done.cancel()
        if giver is not None:
            giver.close()
        await proxy.stop()
    log.info("unpinned stopped (pid %d)", os.getpid())



def install_uvloop() -> None:
    try:
        import uvloop   # a dependency; the proxy still runs on asyncio's own loop without it
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(cfg: Config, config_path: str | None, overrides: dict, info: WorkerInfo) -> int:
    """A worker's life (in the forked child): serve until SIGTERM. Status 3: could not start."""
    number_servers_from(info.index + 1, info.count)   # server ids unique across workers
    install_uvloop()
    try:
        asyncio.run(run(cfg, config_path, overrides, worker=info))
    except OSError as e:
        log.error("worker %d cannot serve on %s: %s", info.index, cfg.listen, e)
        return 3
    return 0
