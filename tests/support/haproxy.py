"""HAProxy for tests: a real TCP load balancer in front of several proxies (or any TCP servers).

    with HAProxy([port1, port2], ready_ports=[http1, http2]) as lb:
        connect to ("127.0.0.1", lb.port) ...

Debian's haproxy is installed when it is missing and that is possible (root with apt-get);
otherwise the test is skipped with the reason. Health checks are what a fleet's load balancer
uses: an HTTP GET /ready against each backend's HTTP port when one is given (so a draining
proxy stops getting new clients), else a plain TCP connect.
"""
from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# How often a backend is checked, and how many results flip its state: fast enough for tests
# to see a backend go DOWN or UP within a second or two.
CHECK_INTERVAL_MS = 200
FALL, RISE = 2, 1


def haproxy_binary() -> str:
    """The haproxy executable, installing Debian's package first when missing; skips the
    calling test when it cannot be had."""
    found = _find()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("haproxy is not installed, and installing it needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "haproxy"]]
    for step in steps:
        out = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            pytest.skip(f"could not install haproxy ({' '.join(step)} failed): {out.stderr.strip()[-300:]}")
    # Where an init system runs, the package starts its own service (with no listener in
    # Debian's default config); the tests start their own haproxy, so that one is stopped.
    if shutil.which("service"):
        subprocess.run(["service", "haproxy", "stop"], capture_output=True, timeout=60)
    found = _find()
    if not found:
        pytest.skip("apt-get installed haproxy but no haproxy executable was found")
    return found


def _find() -> str | None:
    # /usr/sbin is not on every user's PATH.
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HAProxy:
    """haproxy in TCP mode on a free loopback port, round-robin over `backends` (ports on
    127.0.0.1), with health checks. Backends are named p0, p1, ... in the given order."""

    def __init__(self, backends: list[int], ready_ports: list[int] | None = None,
                 ready_path: str = "/ready", balance: str = "roundrobin"):
        if ready_ports is not None and len(ready_ports) != len(backends):
            raise ValueError("one ready port per backend")
        self.backends = list(backends)
        self.ready_ports = ready_ports
        self.ready_path = ready_path
        self.balance = balance
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="unpinned-haproxy-"))
        self.stats_socket = self.dir / "stats.sock"
        self.process: subprocess.Popen | None = None

    def config(self) -> str:
        lines = [
            "global",
            f"    stats socket {self.stats_socket} mode 600 level admin",
            "    maxconn 4096",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            # A pooled client may sit idle between transactions far longer than a web request.
            "    timeout client 1h",
            "    timeout server 1h",
            # A connection refused by a backend that has just gone (not yet marked DOWN) is
            # retried on another instead of failing the client.
            "    retries 2",
            "    option redispatch",
            "frontend clients",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend proxies",
            "backend proxies",
            f"    balance {self.balance}",
            f"    default-server inter {CHECK_INTERVAL_MS}ms fall {FALL} rise {RISE}",
        ]
        if self.ready_ports is not None:
            lines += [f"    option httpchk GET {self.ready_path}", "    http-check expect status 200"]
        for i, port in enumerate(self.backends):
            check = f"check port {self.ready_ports[i]}" if self.ready_ports is not None else "check"
            lines.append(f"    server p{i} 127.0.0.1:{port} {check}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15, wait_up: bool = True) -> "HAProxy":
        binary = haproxy_binary()
        self.port = free_port()
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(self.config())
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects its config:\n{check.stdout}{check.stderr}\n{self.config()}")
        # -db: foreground, no daemon, so the process is ours to stop.
        self.process = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.dir / "haproxy.log", "wb"))
        deadline = time.monotonic() + timeout
        while not self._accepting():
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited ({self.process.returncode}): {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"haproxy did not listen within {timeout}s: {self.log()}")
            time.sleep(0.05)
        if wait_up:
            try:
                self.wait_states({f"p{i}": "UP" for i in range(len(self.backends))}, timeout)
            except TimeoutError:
                self.stop()
                raise
        return self

    def _accepting(self) -> bool:
        # haproxy binds every listener before it serves its runtime API, so an answer there
        # means the frontend is listening; connecting to the frontend instead would send a
        # connection to a backend.
        if not self.stats_socket.exists():
            return False
        try:
            return "Pid:" in self.command("show info")
        except OSError:
            return False

    def log(self) -> str:
        try:
            return (self.dir / "haproxy.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def command(self, cmd: str) -> str:
        """A command on haproxy's runtime API (the stats socket): "show stat", "disable server proxies/p0"..."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each backend server's state as haproxy sees it: "UP", "DOWN", "UP 1/2" (going down)..."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(text.splitlines())
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "proxies" and r["svname"].startswith("p")}

    def sessions(self) -> dict[str, int]:
        """Connections each backend server has taken since the start (stot)."""
        rows = csv.DictReader(self.command("show stat").lstrip("# ").splitlines())
        return {r["svname"]: int(r["stot"] or 0) for r in rows
                if r["pxname"] == "proxies" and r["svname"].startswith("p")}

    def wait_states(self, wanted: dict[str, str], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            now = self.states()
            if all(now.get(name) == state for name, state in wanted.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"haproxy backends are {now}, waited for {wanted}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()     # SIGTERM: haproxy's hard stop, connections closed
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "HAProxy":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
