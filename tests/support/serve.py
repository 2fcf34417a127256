"""`unpinned serve` as a real process, as an operator runs it: start, probe, signal, wait.

    with Served(pg, users_file, http=True, fleet_size=3) as p:
        psycopg2.connect(host="127.0.0.1", port=p.port, ...)
        p.get("/ready") -> (200, {...})
        p.terminate()           # SIGTERM: the drain
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

UNPINNED = [sys.executable, "-m", "unpinned.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Served:
    """One `unpinned serve` process. Options become [proxy]/[pool] keys of its config file;
    `port` and `http_port` may be given to start again on the same ports."""

    def __init__(self, upstream: str, users_file: str, port: int | None = None, http_port: int | None = None,
                 takeover: str | None = None, **options):
        self.upstream = upstream
        self.users_file = users_file
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.takeover = takeover
        self.options = options
        self.dir = Path(tempfile.mkdtemp(prefix="unpinned-serve-"))
        self.log_path = self.dir / "serve.log"
        self.process: subprocess.Popen | None = None
        self.final_log = ""         # the log, kept when stop() removes the directory

    def config(self) -> str:
        proxy = {"listen": f"127.0.0.1:{self.port}", "http_listen": f"127.0.0.1:{self.http_port}",
                 "users_file": self.users_file}
        pool = {}
        for key, value in self.options.items():
            (pool if key in ("pool_size", "max_idle", "borrow_timeout", "server_idle_timeout") else proxy)[key] = value
        lines = ["[proxy]"] + [f"{k} = {json.dumps(v)}" for k, v in proxy.items()]
        lines += ["[pool]"] + [f"{k} = {json.dumps(v)}" for k, v in pool.items()]
        lines += ["[upstream]", f"url = {json.dumps(self.upstream)}"]
        return "\n".join(lines) + "\n"

    def start(self, wait: bool = True, timeout: float = 20) -> "Served":
        cfg = self.dir / "unpinned.toml"
        cfg.write_text(self.config())
        args = UNPINNED + ["serve", "--config", str(cfg), "-v"]
        if self.takeover:
            args += ["--takeover", self.takeover]
        self.log_file = open(self.log_path, "ab")
        # A session of its own: stop() kills the whole group, workers included.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log_file,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"unpinned serve exited ({self.process.returncode}):\n{self.log()}")
            try:
                if self.get("/ready")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"unpinned serve not ready within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def get(self, path: str) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=3) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return self.final_log

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)     # the process and any workers it forked
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.log_file.close()
        self.final_log = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Served":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
