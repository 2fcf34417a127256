"""The benchmark's child processes: PgBouncer and the unpinned proxy.

Every child runs in its own session (the terminal's Ctrl-C reaches only the bench, which
then stops them in order) and is registered for an atexit stop, so nothing outlives a run.
PgBouncer refuses to run as root; when we are root it runs as `nobody`, like the embedded
PostgreSQL does.
"""
from __future__ import annotations

import atexit
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import wire

IS_ROOT = os.geteuid() == 0
HOST = "127.0.0.1"
_children: list[Child] = []
_tempdirs: list[str] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE (children inherit it); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want and IS_ROOT:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def make_tempdir(prefix: str) -> str:
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)   # `nobody` must read the configuration in it
    _tempdirs.append(d)
    return d


def proc_tree(pid: int) -> list[int]:
    """`pid` and its children (unpinned's workers), from /proc/<pid>/task/*/children."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for child in task.read_text().split():
                out += proc_tree(int(child))
        except OSError:
            pass
    return out


def _cpu(pid: int) -> tuple[float, float]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()   # fields[0] is field 3 (state)
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_split(pid: int | list[int]) -> tuple[float, float]:
    """(utime, stime) in seconds of the process and its children (all threads), from
    /proc/<pid>/stat; of several processes when given a list (the two-process PgBouncer).
    Workers keep running for the whole bench, so their counters only grow between reads.
    User time is the pooler's own code; system time mostly the kernel's loopback TCP work,
    about the same for any pooler making the same system calls."""
    user = system = 0.0
    for p in [t for one in (pid if isinstance(pid, list) else [pid]) for t in proc_tree(one)]:
        try:
            u, s = _cpu(p)
        except OSError:
            continue
        user += u
        system += s
    return user, system


def proc_cpu_seconds(pid: int | list[int]) -> float:
    """utime + stime (see proc_cpu_split)."""
    return sum(proc_cpu_split(pid))


def proc_rss_mb(pid: int) -> float:
    """Memory of the process and its children: the sum of their PSS (proportional set size:
    a page shared by n processes counts 1/n in each), so forked workers' shared pages are
    counted once. For a single process that is its RSS less its share of shared libraries."""
    total = 0
    for p in proc_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    if not total:
        raise RuntimeError(f"no memory figures for pid {pid}")
    return total / 1024


class Child:
    def __init__(self, name: str, argv: list[str], *, cwd: str, log_path: str,
                 env: dict[str, str] | None = None, as_nobody: bool = False) -> None:
        self.name, self.argv, self.cwd, self.log_path = name, argv, cwd, log_path
        self.env, self.as_nobody = env, as_nobody
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> Child:
        kw: dict[str, object] = {}
        if self.as_nobody and IS_ROOT:
            pw = pwd.getpwnam("nobody")
            kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        _children.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            wire.wait_ready(HOST, self.port, timeout, self.alive)
        except wire.WireError as e:
            raise RuntimeError(f"{self.name} did not come up: {e}\n{self.log_tail()}") from None

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None if proc.poll() is not None else proc

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return f"({self.name}: no log)"
        return f"{self.name} log tail ({self.log_path}):\n" + "\n".join(text.splitlines()[-lines:])


@atexit.register
def stop_all() -> None:
    for child in reversed(_children):
        try:
            child.stop()
        except Exception:
            pass
    _children.clear()
    for d in _tempdirs:
        shutil.rmtree(d, ignore_errors=True)
    _tempdirs.clear()


# --------------------------------------------------------------------------- PgBouncer

def find_pgbouncer(log=print) -> tuple[str | None, str]:
    """(path, "") or (None, why it is skipped). Installs it with apt when missing and possible."""
    def look() -> str | None:
        for p in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
            if p and os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        return None

    path = look()
    if path:
        return path, ""
    if not IS_ROOT:
        return None, "PgBouncer is not installed and we are not root, so not installing it: PgBouncer rows show n/a"
    if not shutil.which("apt-get"):
        return None, "PgBouncer is not installed and there is no apt-get: PgBouncer rows show n/a"
    log("PgBouncer not found: running apt-get install -y pgbouncer")
    try:
        r = subprocess.run(["apt-get", "install", "-y", "pgbouncer"], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"apt-get install pgbouncer failed ({e}): PgBouncer rows show n/a"
    path = look()
    if r.returncode != 0 or not path:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        return None, f"apt-get install pgbouncer failed (exit {r.returncode}: {last[0]}): PgBouncer rows show n/a"
    return path, ""


def pgbouncer_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def start_pgbouncer(path: str, pg_port: int, pool_size: int, max_clients: int, processes: int = 1) -> list[Child]:
    """PgBouncer as one process, or as `processes` processes on one port with so_reuseport
    (PgBouncer's own way to use several cores; the kernel spreads the connections). The pool
    is split between them, as unpinned splits it between its workers. PgBouncer 1.19 adds
    peer_id and [peers] so that a cancel request reaches the right process; 1.18 (Debian 12)
    has only so_reuseport, and pgbench sends no cancel requests, so the figures are the same."""
    port = free_port()
    return [_start_one_pgbouncer(path, pg_port, max(1, pool_size // processes), max_clients, port,
                                 reuseport=processes > 1, name="pgbouncer" if processes == 1 else f"pgbouncer-{processes}.{i}")
            for i in range(processes)]


def _start_one_pgbouncer(path: str, pg_port: int, pool_size: int, max_clients: int, port: int,
                         reuseport: bool, name: str) -> Child:
    d = make_tempdir("unpinned-bench-pgbouncer-")
    Path(d, "userlist.txt").write_text('"postgres" ""\n')   # trust still wants the user listed
    Path(d, "pgbouncer.ini").write_text(f"""\
[databases]
postgres = host={HOST} port={pg_port} dbname=postgres user=postgres

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {d}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_clients}
max_db_connections = 0
ignore_startup_parameters = extra_float_digits
so_reuseport = {int(reuseport)}
""")
    for f in ("userlist.txt", "pgbouncer.ini"):
        os.chmod(os.path.join(d, f), 0o644)
    child = Child(name, [path, os.path.join(d, "pgbouncer.ini")], cwd=d,
                  log_path=os.path.join(d, "pgbouncer.log"), as_nobody=True)
    child.port = port
    return child.start()


# --------------------------------------------------------------------------- unpinned

def start_unpinned(repo: Path, upstream_dsn: str, pool_size: int, max_clients: int,
                   workers: int = 1) -> tuple[Child, dict]:
    """`unpinned serve` in smart mode with the HTTP endpoint and the pin log on."""
    d = make_tempdir("unpinned-bench-proxy-")
    port, http_port = free_port(), free_port()
    cfg = os.path.join(d, "unpinned.toml")
    # max_client_connections has no flag; everything else is given on the command line.
    Path(cfg).write_text(f"[proxy]\nmax_client_connections = {max_clients}\n")
    pin_log = os.path.join(d, "pins.jsonl")
    argv = [sys.executable, "-m", "unpinned.cli", "serve", "--config", cfg,
            "--listen", f"{HOST}:{port}", "--upstream", upstream_dsn, "--auth", "trust",
            "--pool-size", str(pool_size), "--mode", "smart",
            "--http", f"{HOST}:{http_port}", "--pin-log", pin_log, "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "UNPINNED_"))}
    child = Child("unpinned" if workers != 1 else "unpinned-1", argv, cwd=str(repo), log_path=os.path.join(d, "unpinned.log"), env=env)
    child.port = port
    shown = [a if not a.startswith("postgresql://") else "postgresql://postgres@127.0.0.1:PGPORT/postgres"
             for a in argv]
    shown[0] = "python"
    return child.start(), {"http_port": http_port, "pin_log": pin_log, "command": " ".join(shown)}


def start_pump(repo: Path, pg_port: int) -> Child:
    """bench/pump.py: a uvloop byte pump, the floor of a Python proxy (see there)."""
    d = make_tempdir("unpinned-bench-pump-")
    port = free_port()
    child = Child("pump", [sys.executable, str(repo / "bench" / "pump.py"), str(port), str(pg_port)],
                  cwd=str(repo), log_path=os.path.join(d, "pump.log"))
    child.port = port
    return child.start()
