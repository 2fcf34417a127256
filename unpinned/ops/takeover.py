"""Takeover restart: a new proxy process takes the listening sockets and the live client
connections of the running one, with their session state, over a unix socket.

    unpinned serve --takeover /run/unpinned/takeover.sock ...

Started with `--takeover PATH` (or `[proxy] takeover_socket`), a proxy first connects to
PATH: when an older proxy listens there, the new one takes over from it; either way it then
listens on PATH itself, for the next restart. So an upgrade is: start the new version with
the same command line; the old one hands everything over and exits.

The exchange, old -> new, each message a length-prefixed JSON frame whose descriptors ride
on its first byte (SCM_RIGHTS):
  1. "listeners": the client listener and the HTTP listener. The new process serves them at
     once; the old closes its copies, so no connection attempt is refused in between.
  2. "clients": sockets and their sessions (frontend/handover.snapshot), each sent the
     moment its client is at rest between transactions (up to BATCH in one frame when
     several are ready together). The old process stops
     reading from it first, so whatever the client sends next waits in the kernel for the
     new process. A client mid-transaction moves when its transaction ends.
  3. "done": nothing left; the old process exits.
What cannot move (TLS clients, the admin console) is closed at rest with 57P01 and a detail
saying why; a pinned client stays with the old process until its session ends or unpins,
then moves; at shutdown_timeout whatever remains is closed, as in a graceful shutdown.
"""
from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
import stat
import struct
import time

from unpinned.frontend.login import Login
from unpinned.frontend.handover import (at_rest, close_gently, let_go, restore, shutdown_error, snapshot, watch,
                                        why_not_movable)

log = logging.getLogger("unpinned")

POLL = 0.02          # seconds between looks at clients the idle hook has not reported
BATCH = 32           # clients (descriptors) in one frame at most
HELLO_TIMEOUT = 10.0


# ------------------------------------------------------------------ frames with descriptors

def send_frame(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    """Blocking (run in a thread): one frame, with `fds` attached to its first byte."""
    data = json.dumps(obj).encode()
    data = struct.pack("!I", len(data)) + data
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sent = sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


class FrameReader:
    """Blocking (run in a thread): frames in order, and the descriptors that came with them."""

    MAX_FDS = 64

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []

    def _fill(self) -> None:
        data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(self.MAX_FDS * 4))
        if not data:
            raise ConnectionError("the other process closed the takeover channel")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        self.buf += data

    def read(self) -> tuple[dict, list[int]]:
        while len(self.buf) < 4:
            self._fill()
        n = struct.unpack_from("!I", self.buf)[0]
        while len(self.buf) < 4 + n:
            self._fill()
        obj = json.loads(self.buf[4:4 + n])
        del self.buf[:4 + n]
        count = obj.get("fds", 0)
        # A frame's descriptors arrive with its first byte, so they are all here by now.
        fds, self.fds = self.fds[:count], self.fds[count:]
        return obj, fds


def _check_alive(conn: socket.socket) -> None:
    """Raise if the other process closed the channel (read without taking anything)."""
    try:
        if conn.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
            raise ConnectionError("the other process closed the takeover channel")
    except BlockingIOError:
        pass


# ------------------------------------------------------------------ the new process

class Taker:
    """The new process's side: connect to the old one and receive what it hands over."""

    def __init__(self, proxy, path: str):
        self.proxy = proxy
        self.path = path
        self.sock: socket.socket | None = None
        self.reader: FrameReader | None = None
        self.moved = 0
        self.started = 0.0

    async def connect(self) -> dict[str, socket.socket] | None:
        """The old process's listeners, or None when no proxy listens at the path."""
        try:
            if not stat.S_ISSOCK(os.stat(self.path).st_mode):
                return None
        except FileNotFoundError:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HELLO_TIMEOUT)
            sock.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None         # a socket file left by a proxy that is gone
        sock.settimeout(None)
        self.sock, self.reader = sock, FrameReader(sock)
        self.started = time.monotonic()
        await asyncio.to_thread(send_frame, sock, {"op": "hello", "pid": os.getpid()})
        frame, fds = await asyncio.to_thread(self.reader.read)
        if frame.get("op") != "listeners":
            raise ConnectionError(f"unexpected takeover message {frame.get('op')!r}")
        out = {}
        for name, fd in zip(frame["names"], fds):
            out[name] = socket.socket(fileno=fd)
        log.info("takeover: took the listeners %s from pid %s", ", ".join(out), frame.get("pid"))
        return out

    async def receive(self) -> None:
        """Clients until the old process says it is done; each is served as soon as it arrives."""
        loop = asyncio.get_running_loop()
        shared = self.proxy.shared
        try:
            while True:
                frame, fds = await asyncio.to_thread(self.reader.read)
                op = frame.get("op")
                if op == "done":
                    break
                states = frame.get("states", []) if op == "clients" else []
                if len(states) != len(fds):
                    log.error("takeover: a frame with %d descriptors for %d clients; dropped", len(fds), len(states))
                    states = []
                for state, fd in zip(states, fds):
                    sock = socket.socket(fileno=fd)
                    try:
                        client = restore(shared, state)
                        await loop.connect_accepted_socket(lambda: client, sock)
                        self.moved += 1
                    except Exception:   # one client that cannot be restored must not stop the others
                        log.exception("takeover: could not restore a client; closing it")
                        sock.close()
                for fd in fds[len(states):]:
                    os.close(fd)
            await asyncio.to_thread(send_frame, self.sock, {"op": "bye"})
            log.info("takeover: %d client(s) moved in %.3f s", self.moved, time.monotonic() - self.started)
        except (ConnectionError, OSError, ValueError) as e:
            log.error("takeover: channel to the old process broke after %d client(s): %s", self.moved, e)
        finally:
            self.sock.close()


# ------------------------------------------------------------------ the old process

class Giver:
    """The running process's side: listen at the path and hand everything to whoever connects."""

    def __init__(self, proxy, path: str, on_done):
        self.proxy = proxy
        self.path = path
        self.on_done = on_done           # called when everything is handed over (the process exits)
        self.listener: socket.socket | None = None
        self.task: asyncio.Task | None = None
        self.queue: asyncio.Queue | None = None
        self.queued: set = set()
        self.moved = 0
        self.closed = 0

    def listen(self) -> None:
        try:
            os.unlink(self.path)     # the previous process's, now ours
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)   # whoever connects gets every client: the proxy's own user only
        sock.listen(1)
        sock.setblocking(False)
        self.listener = sock
        self.task = asyncio.get_running_loop().create_task(self._accept())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            conn.setblocking(True)
            try:
                hello, _ = await asyncio.wait_for(asyncio.to_thread(FrameReader(conn).read), HELLO_TIMEOUT)
                if hello.get("op") != "hello":
                    raise ValueError("not a takeover request")
            except (OSError, ValueError, ConnectionError, TimeoutError) as e:
                log.warning("takeover: refused a connection on %s: %s", self.path, e)
                conn.close()
                continue
            log.info("takeover: pid %s takes over", hello.get("pid"))
            self.listener.close()
            self.listener = None
            try:
                done = await self._hand_over(conn)
            except Exception:       # a bug here must not leave this process serving nobody, silently
                log.exception("takeover: handing over failed; closing the clients left")
                done = True
            finally:
                conn.close()
            if done:
                self.on_done()
            else:
                self.listen()       # serving again: ready for the next attempt
            return

    async def _hand_over(self, conn: socket.socket) -> bool:
        """True when everything was handed over (or closed); False when the new process went
        away before it said it was done: then this one serves again."""
        proxy = self.proxy
        shared = proxy.shared
        started = time.monotonic()
        names, socks = ["clients"], [proxy.listeners[0].sockets[0]]
        for ep, srv in zip(proxy.config.all_endpoints()[1:], proxy.listeners[1:]):
            names.append(f"endpoint:{ep.name}")
            socks.append(srv.sockets[0])
        if proxy.http is not None and proxy.http.server is not None:
            names.append("http")
            socks.append(proxy.http.server.sockets[0])
        fds = [s.fileno() for s in socks]
        # Copies of the listeners, to serve again if the new process dies before it is done.
        kept = {name: socket.socket(fileno=os.dup(fd)) for name, fd in zip(names, fds)}
        await asyncio.to_thread(send_frame, conn, {"op": "listeners", "names": names, "fds": len(fds),
                                                   "pid": os.getpid()}, fds)
        # The new process accepts from now on; this one only finishes what it has.
        shared.draining = True
        for srv in proxy.listeners:
            srv.close()
        if proxy.http is not None:
            proxy.http.close()
        self.queue = asyncio.Queue()
        shared.on_idle = self._at_rest
        sender = asyncio.get_running_loop().create_task(self._send(conn))
        deadline = started + proxy.config.shutdown_timeout
        try:
            while True:
                for client in list(shared.clients):
                    if client in self.queued:
                        continue
                    if not client.active or client.admin:
                        if client.admin:
                            self._close(client, "the admin console is not handed over; reconnect")
                        continue    # a login in progress finishes, then moves
                    watch(client)
                    if at_rest(client):
                        self._at_rest(client)
                if not shared.clients and self.queue.empty():
                    break
                if time.monotonic() >= deadline:
                    log.warning("takeover: shutdown_timeout reached; closing %d client(s) that could not move",
                                len(shared.clients) - len(self.queued))
                    for client in list(shared.clients):
                        if client not in self.queued:
                            client.shutdown(shutdown_error("the proxy restarted; this session could not be moved"))
                    await asyncio.sleep(0)
                    break
                if sender.done():
                    sender.result()     # the channel broke: raise it
                _check_alive(conn)
                self._shed_idle()
                await asyncio.sleep(POLL)
            shared.on_idle = None       # nothing more joins the queue behind its end
            await self.queue.put(None)
            await sender
            await asyncio.to_thread(send_frame, conn, {"op": "done"})
            try:
                await asyncio.wait_for(asyncio.to_thread(FrameReader(conn).read), HELLO_TIMEOUT)
            except (OSError, ConnectionError, TimeoutError, ValueError):
                pass
        except (OSError, ConnectionError) as e:
            log.error("takeover: the new process went away (%s) after %d client(s); serving again", e, self.moved)
            shared.on_idle = None
            if not sender.done():
                sender.cancel()
            await self._serve_again(kept)
            return False
        finally:
            shared.on_idle = None
            if not sender.done():
                sender.cancel()
        for sock in kept.values():
            sock.close()
        log.info("takeover: %d client(s) handed over, %d closed, in %.3f s", self.moved, self.closed,
                 time.monotonic() - started)
        return True

    async def _serve_again(self, kept: dict[str, socket.socket]) -> None:
        """The takeover failed: accept on our copies of the listeners again, and read again
        from the clients that were waiting to move."""
        proxy = self.proxy
        shared = proxy.shared
        loop = asyncio.get_running_loop()
        proxy.listeners = [await loop.create_server(lambda: Login(shared), sock=kept["clients"], backlog=4096)]
        for ep in proxy.config.all_endpoints()[1:]:
            proxy.listeners.append(await loop.create_server(lambda ep=ep: Login(shared, ep),
                                                            sock=kept[f"endpoint:{ep.name}"], backlog=4096))
        if "http" in kept:
            await proxy.http.start("", 0, sock=kept["http"])
        for client in self.queued:
            if not client.closing and client.transport is not None and not client.transport.is_closing():
                client.transport.resume_reading()
        self.queued.clear()
        self.queue = None
        shared.draining = False

    def _shed_idle(self) -> None:
        """Close the server connections no client of ours uses now: the new process opens its
        own, and the two together should hold little more than one proxy's share."""
        for pool in self.proxy.shared.pools.values():
            while pool.idle:
                pool.idle.popleft().close()

    def _close(self, client, detail: str) -> None:
        if client.closing or client.transport is None or client.transport.is_closing():
            return
        self.closed += 1
        close_gently(client, shutdown_error(detail))

    def _at_rest(self, client) -> None:
        """A client between transactions: hand it over, close it, or wait (pinned)."""
        if client in self.queued:
            return
        why = why_not_movable(client)
        if why is None:
            client.transport.pause_reading()    # its next bytes are the new process's to read
            self.queued.add(client)
            self.queue.put_nowait((client, snapshot(client)))
        elif why == "tls":
            self._close(client, "the proxy restarted and TLS sessions cannot be handed over; reconnect")

    async def _send(self, conn: socket.socket) -> None:
        queue = self.queue
        while True:
            items = [await queue.get()]
            while len(items) < BATCH and not queue.empty():
                items.append(queue.get_nowait())
            last = items[-1] is None
            batch = []
            for item in items:
                if item is None:
                    continue
                client, state = item
                if client.closing or client.transport is None or client.transport.is_closing():
                    self.queued.discard(client)     # it went away while waiting
                else:
                    batch.append((client, state))
            if batch:
                self._shed_idle()
                fds = [client.transport.get_extra_info("socket").fileno() for client, _ in batch]
                await asyncio.to_thread(send_frame, conn, {"op": "clients", "fds": len(fds),
                                                           "states": [state for _, state in batch]}, fds)
                for client, _ in batch:
                    let_go(client)
                    self.queued.discard(client)
                self.moved += len(batch)
            if last:
                return
