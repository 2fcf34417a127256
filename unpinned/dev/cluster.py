"""A real primary with streaming replicas, from the embedded PostgreSQL's own binaries.

For the topology tests (issue 11): writer and reader endpoints, replica lag, failover.
Every node is an `EmbeddedPostgres` (same version, same root handling: the server runs
as `nobody` when we are root) whose pg_hba also admits replication connections. A
replica is cloned with `pg_basebackup -R` (which writes standby.signal and
primary_conninfo) and streams through its own physical replication slot, so a replica
halted for a while still finds the WAL it missed.

    with PostgresCluster(replicas=1) as c:
        c.primary.psql("CREATE TABLE t AS SELECT 1 AS x")
        c.replicas[0].wait_replayed(c.primary.current_lsn())
        c.primary.halt("immediate")          # pg_ctl stop -m immediate, data kept
        c.replicas[0].promote()              # pg_ctl promote, waits until writable

`stop()` ends a node and deletes its files (as for EmbeddedPostgres); `halt(mode)` only
stops the server, and `start()` brings it back with its data.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from urllib.parse import quote
from pathlib import Path

from unpinned.dev.embedded import EmbeddedPostgres, _literal

REPLICATION_SETTINGS = {
    # PostgreSQL 17's defaults already allow streaming (wal_level replica, 10 senders);
    # they are spelled out so a reader of the config sees why replicas can connect.
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    # The embedded server runs with synchronous_commit off: the WAL writer then flushes (and
    # the walsender ships) at most every wal_writer_delay, 200 ms by default. 10 ms keeps the
    # replicas close behind without fsync cost (fsync is off).
    "wal_writer_delay": "10ms",
    # Replicas report their replay position often, so pg_stat_replication is fresh.
    "wal_receiver_status_interval": "1s",
    "hot_standby_feedback": "on",
}

_LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
PROMOTE_TIMEOUT = 60.0


class ClusterNode(EmbeddedPostgres):
    """A server that can be a primary (allows replication) or a replica of `primary`.

    A replica node is cloned from its primary by pg_basebackup on its first start(); its
    superuser and password are the primary's (they come with the copy).
    """

    def __init__(self, base_dir: str | None = None, port: int | None = None, *,
                 primary: ClusterNode | None = None, slot: str | None = None,
                 settings: dict[str, str] | None = None, name: str = "pg", **kwargs) -> None:
        if primary is not None:
            kwargs.setdefault("superuser", primary.superuser)
            kwargs.setdefault("password", primary.password)
            kwargs.setdefault("auth", primary.auth)
        super().__init__(base_dir, port, settings={**REPLICATION_SETTINGS, **(settings or {})},
                         name=name, **kwargs)
        self.primary = primary
        # One slot per replica: the primary keeps the WAL a halted or paused replica still needs.
        self.slot = slot if slot is not None else re.sub(r"[^a-z0-9_]", "_", name.lower())[:60]

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> ClusterNode:
        with self._lock:
            if self.running:
                return self
            if self.primary is not None and not os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
                self._basebackup()
            super().start()
            return self

    def halt(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """`pg_ctl stop -m MODE` (smart, fast or immediate); the data stays and start() resumes.

        immediate is a crash as far as PostgreSQL is concerned: no shutdown checkpoint, crash
        recovery on the next start, clients cut off at once.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"mode must be smart, fast or immediate, not {mode!r}")
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                self._proc = None
                return
            r = self._pg_ctl("stop", "-m", mode, "-t", str(int(timeout)))
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:   # pg_ctl gave up: fall back to the signals EmbeddedPostgres uses
                self._shutdown()
                raise RuntimeError(f"pg_ctl stop -m {mode} did not stop {self.name}: {r.stderr}")
            self._proc = None
            self._wait_group_gone(proc.pid, 5.0)

    def promote(self, timeout: float = PROMOTE_TIMEOUT) -> float:
        """`pg_ctl promote`, then wait until pg_is_in_recovery() is false; returns the seconds taken."""
        t0 = time.monotonic()
        r = self._pg_ctl("promote", "-t", str(int(timeout)))
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl promote failed on {self.name} (exit {r.returncode}): {r.stdout}{r.stderr}")
        # pg_ctl returns when the control file says "in production"; a new session must also
        # see it (it is what the proxy's probe asks).
        while self.in_recovery():
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{self.name} still in recovery {timeout}s after promote\n{self._log_tail()}")
            time.sleep(0.01)
        self.primary = None
        return time.monotonic() - t0

    def follow(self, primary: ClusterNode) -> None:
        """Stream from another primary (the one just promoted), as Aurora's readers do.

        Its timeline must have branched at or after this replica's position, which holds
        when this replica followed the promoted one's old primary and was not ahead of it.
        No slot on the new primary: it has none for us.
        """
        self.psql(f"ALTER SYSTEM SET primary_conninfo = {_literal(self._conninfo(primary))}")
        self.psql("ALTER SYSTEM SET primary_slot_name = ''")
        self.psql("SELECT pg_reload_conf()")
        self.primary = primary

    def rejoin(self, primary: ClusterNode) -> float:
        """Become a replica of `primary` (an old primary after a failover): the data is
        thrown away and cloned again, as the simplest sure way; returns the seconds taken."""
        t0 = time.monotonic()
        with self._lock:
            self.halt("fast")
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.primary = primary
            self.start()
        return time.monotonic() - t0

    # -- replication state ------------------------------------------------------

    def in_recovery(self) -> bool:
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    def current_lsn(self) -> str:
        """On a primary the WAL write position; on a replica what it has replayed."""
        return self.psql("SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                         "ELSE pg_current_wal_lsn() END")

    def replay_lsn(self) -> str:
        return self.psql("SELECT pg_last_wal_replay_lsn()")

    def pause_replay(self, timeout: float = 10.0) -> None:
        """pg_wal_replay_pause(), and wait until replay has actually stopped."""
        self.psql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + timeout
        while self.psql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise RuntimeError(f"replay on {self.name} did not pause within {timeout}s")
            time.sleep(0.01)

    def resume_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_resume()")

    def wait_replayed(self, lsn: str, timeout: float = 30.0) -> float:
        """Wait until this replica has replayed up to `lsn` ("16/B374D848"); returns the seconds waited."""
        if not _LSN.match(lsn):
            raise ValueError(f"not an LSN: {lsn!r}")
        t0 = time.monotonic()
        sql = f"SELECT pg_last_wal_replay_lsn() >= {_literal(lsn)}::pg_lsn"
        while self.psql(sql) != "t":
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.name} replayed only up to {self.replay_lsn()}, "
                                   f"not {lsn}, after {timeout}s")
            time.sleep(0.01)
        return time.monotonic() - t0

    # -- internals ---------------------------------------------------------

    def _conninfo(self, primary: ClusterNode) -> str:
        def kv(k: str, v: object) -> str:
            return f"{k}='" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"
        # application_name names this replica in the primary's pg_stat_replication.
        return " ".join(kv(k, v) for k, v in (
            ("host", primary.host), ("port", primary.port), ("user", primary.superuser),
            ("password", primary.password), ("application_name", self.name)))

    def _basebackup(self) -> None:
        primary = self.primary
        assert primary is not None
        os.makedirs(self.base_dir, exist_ok=True)
        self._chown(self.base_dir)
        kw = self._server_kwargs()   # as `nobody` when root: the server must own its data dir
        cmd = [self.tool("pg_basebackup"), "-D", self.data_dir, "-d", self._conninfo(primary),
               "-R",                   # standby.signal + primary_conninfo (password included)
               "-X", "stream", "-c", "fast", "--no-sync",
               "-C", "-S", self.slot]  # create the slot and stream through it
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
        if r.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise RuntimeError(f"pg_basebackup of {self.name} from {primary.name} failed "
                               f"(exit {r.returncode}):\n{r.stderr}")

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        # pg_ctl refuses root, like postgres; it runs as the server's user.
        return subprocess.run([self.tool("pg_ctl"), "-D", self.data_dir, *args],
                              capture_output=True, text=True, timeout=300, **self._server_kwargs())

    def _write_config(self) -> None:
        super()._write_config()
        hba = Path(self.data_dir, "pg_hba.conf")
        with open(hba, "a") as f:
            f.write(f"host replication all 127.0.0.1/32 {self.auth}\n"
                    f"host replication all ::1/128 {self.auth}\n")


class PostgresCluster:
    """A primary and `replicas` streaming replicas, started together; stop() ends them all."""

    def __init__(self, replicas: int = 1, *, name: str = "cluster", password: str = "postgres",
                 auth: str = "scram-sha-256", settings: dict[str, str] | None = None) -> None:
        self.name = name
        self.primary = ClusterNode(name=f"{name}_primary", password=password, auth=auth, settings=settings)
        self.replicas = [ClusterNode(name=f"{name}_replica{i + 1}", primary=self.primary, settings=settings)
                         for i in range(replicas)]
        self.timings: dict[str, float] = {}

    @property
    def nodes(self) -> list[ClusterNode]:
        return [self.primary, *self.replicas]

    def start(self) -> PostgresCluster:
        try:
            t0 = time.monotonic()
            self.primary.start()
            self.timings["primary_start"] = time.monotonic() - t0
            for r in self.replicas:
                t0 = time.monotonic()
                r.start()
                self.timings[f"{r.name}_start"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Replicas first: a replica whose primary vanished only logs reconnect attempts.
        for node in reversed(self.nodes):
            node.stop()

    def url(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        """libpq's multi-host URL over every node, primary first."""
        user = user or self.primary.superuser
        password = self.primary.password if password is None else password
        hosts = ",".join(f"{n.host}:{n.port}" for n in self.nodes)
        return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{hosts}/{quote(dbname, safe='')}"

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
