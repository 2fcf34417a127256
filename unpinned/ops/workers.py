"""Several worker processes behind one listening port (`[proxy] workers`).

One Python process moves bytes on one core. With `workers = N` the supervisor forks N
workers; each binds the same port with SO_REUSEPORT (the kernel spreads new clients
over them) and owns an equal share of every pool, so the server never sees more than
`pool_size` connections in all. A client stays in the worker that accepted it.

What must look like one proxy is stitched together over a small peer channel (an
abstract unix socket per worker, JSON lines):
  - cancel requests: a cancel key's pid names its worker (pid % N); a cancel that
    lands elsewhere is passed on;
  - the admin console and the HTTP API/metrics: whichever worker is asked gathers every
    worker's view and merges it (admin.merge_view, merge_metrics);
  - PAUSE / RESUME / RELOAD / KILL reach every worker.
The supervisor forwards SIGTERM/SIGINT/SIGHUP and restarts a worker that dies.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from multiprocessing.sharedctypes import RawArray

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from unpinned.config import Config, WorkerInfo, effective_workers
from unpinned.ops import admin
from unpinned.ops.cluster_ops import switch_here
from unpinned.ops.live_state import ProxyView
from unpinned.ops.metrics import make_registry, render


log = logging.getLogger("unpinned.ops.workers")

PEER_TIMEOUT = 3.0


# ------------------------------------------------------------------ the supervisor

def supervise(cfg: Config, config_path: str | None, overrides: dict, start_worker) -> int:
    """Fork the workers and keep them running until SIGINT/SIGTERM. `start_worker(info)`
    runs in the child and returns its exit status."""
    n = effective_workers(cfg)
    me = os.getpid()
    children: dict[int, int] = {}
    stopping = False
    started: dict[int, float] = {}
    counts = RawArray("q", n)

    def spawn(index: int) -> None:
        counts[index] = 0           # a worker that died took its clients with it
        # (a memoryview: summed at every login, ~5x cheaper than indexing the ctypes array)
        info = WorkerInfo(index, n, me, memoryview(counts).cast("B").cast("q"))
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM):
                    signal.signal(sig, signal.SIG_DFL)
                code = start_worker(info)
            except BaseException:   # a worker must never return into the supervisor's loop
                log.exception("worker %d failed", index)
            finally:
                sys.stderr.flush()
                os._exit(code or 0)
        children[pid] = index
        started[index] = time.monotonic()

    def stop(signum, frame) -> None:
        nonlocal stopping
        if stopping and signum is not None:
            force(signum, frame)        # a second signal: no more waiting
            return
        stopping = True
        # Each worker drains (stops accepting, waits for transactions in flight) for up to
        # shutdown_timeout; whatever is still running a little after that is killed.
        signal.signal(signal.SIGALRM, force)
        signal.alarm(int(cfg.shutdown_timeout) + 5)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def force(signum, frame) -> None:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def hup(signum, frame) -> None:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, hup)
    # The caller has loaded the proxy (and pglast, the biggest part) already: the workers
    # share those pages copy-on-write instead of each holding its own copy.
    gc.collect()
    gc.freeze()
    log.info("unpinned supervisor %d starting %d workers", me, n)
    for i in range(n):
        spawn(i)
    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(raw)
        if stopping:
            continue
        if code == 3:   # could not start at all (e.g. the port is taken): no point retrying
            log.error("worker %d could not start; stopping", index)
            status = 1
            stop(None, None)
            continue
        log.error("worker %d (pid %d) exited with status %s; starting a new one", index, pid, code)
        if time.monotonic() - started.get(index, 0) < 1.0:
            time.sleep(1.0)     # do not spin if it dies at once
        if not stopping:
            spawn(index)
    log.info("unpinned stopped (supervisor %d)", me)
    return status


# ------------------------------------------------------------------ the peer channel (in a worker)

class Peers:
    """This worker's end of the channel to the others."""

    def __init__(self, proxy: ProxyView, info: WorkerInfo):
        self.proxy = proxy
        self.info = info
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.info.address(self.info.index))
        sock.setblocking(False)
        self.server = await asyncio.start_unix_server(self._serve, sock=sock)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def owner(self, pid: int) -> int:
        return pid % self.info.count

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), PEER_TIMEOUT)
            if line:
                answer = await self.answer(json.loads(line))
                writer.write(json.dumps(answer, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError, TimeoutError, ValueError) as e:
            log.debug("peer request failed: %s", e)
        finally:
            writer.close()

    async def answer(self, req: dict):
        """What this worker says to one request (from a peer, or from itself)."""
        proxy = self.proxy
        op = req.get("op")
        if op == "view":
            return admin.worker_view(proxy, req["name"])
        if op == "history":
            return list(proxy.history)
        if op == "metrics":
            if proxy.metrics_registry is None:
                proxy.metrics_registry = make_registry(proxy)
            return render(proxy.metrics_registry).decode()
        if op == "control":
            return admin.control(proxy, req["sql"], None)
        if op == "switchover":
            cluster = getattr(proxy, "cluster", None)
            if cluster is None:
                return {"code": "55000", "message": "this worker has no cluster of hosts"}
            return await switch_here(cluster, req["target"], req["timeout"])
        if op == "cancel":
            await proxy.cancel(int(req["pid"]), int(req["secret"]), forward=False)
            return True
        return None

    async def ask(self, index: int, req: dict, wait: float = PEER_TIMEOUT):
        """`wait`: how long the answer may take (a switchover takes as long as it takes)."""
        if index == self.info.index:
            return await self.answer(req)
        # A socket made here: uvloop cannot connect to an abstract address by name.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self.info.address(index)),
                                   PEER_TIMEOUT)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            writer.write(json.dumps(req).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), wait)
            if not line:
                raise ConnectionError(f"worker {index} closed the channel")
            return json.loads(line)
        finally:
            writer.close()

    async def ask_all(self, req: dict, wait: float = PEER_TIMEOUT) -> list:
        """Every worker's answer (this one's first); a worker that cannot answer is left out
        and logged: a worker being restarted must not break the console."""
        order = [self.info.index] + [i for i in range(self.info.count) if i != self.info.index]
        results = await asyncio.gather(*(self.ask(i, req, wait) for i in order), return_exceptions=True)
        out = []
        for i, r in zip(order, results):
            if isinstance(r, BaseException):
                log.warning("worker %d did not answer %s: %s", i, req.get("op"), r)
            else:
                out.append(r)
        return out


# ------------------------------------------------------------------ merging

def merge_metrics(texts: list[str]) -> bytes:
    """Prometheus text from several workers → one exposition, samples with the same name and
    labels added up (every metric the proxy exports is a count or a sum)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            acc = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                acc[key] = acc.get(key, 0.0) + s.value

    class _Merged:
        def collect(self):
            for name, fam in families.items():
                for (sample, labels), value in values[name].items():
                    fam.add_sample(sample, dict(labels), value)
                yield fam

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def merge_history(histories: list[list[dict]]) -> list[dict]:
    """The live page's one-sample-a-second history, added up across workers (newest aligned)."""
    if not histories:
        return []
    n = min(len(h) for h in histories)
    out = []
    for i in range(n):
        samples = [h[len(h) - n + i] for h in histories]
        merged = dict(samples[0])
        for key in merged:
            if key != "t":
                merged[key] = sum(s.get(key, 0) for s in samples)
        out.append(merged)
    return out
