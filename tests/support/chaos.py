"""A money-transfer workload through the proxy while faults are injected, and the checks
that nothing was lost, made up or left hanging. Used by tests/e2e/test_chaos.py (a short
run in `make test`), `make chaos` (longer; CHAOS_SECONDS) and `make soak` (an hour, memory
sampled; SOAK_SECONDS).

Each client moves money between two accounts in one transaction and writes the transfer's
id in a ledger in the same transaction. It records, for each transfer, what it was told:
committed (COMMIT answered), failed before COMMIT was sent (must not be applied), or in
doubt (the connection broke while COMMIT was on its way: either outcome is right). At the
end, PostgreSQL is asked: the total is what it was, every acknowledged transfer is in the
ledger, no failed one is, and every balance equals its start plus the ledger's movements.

Faults: backends terminated (pg_terminate_backend), PostgreSQL stopped cleanly and started
(a restart), PostgreSQL SIGKILLed and started after a pause (a crash: the proxy sees every
server connection die at once and cannot connect until it is back), and raw-socket clients
that vanish in the middle of a transaction (after moving money they never commit) or in
the middle of a message.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from unpinned.dev.embedded import EmbeddedPostgres
from unpinned.wire import messages as m

ACCOUNTS = 20
START_BALANCE = 1000
OP_TIMEOUT = 30          # seconds a client operation may take before the run counts as hung


@dataclass
class Ledger:
    acked: set = field(default_factory=set)
    failed: set = field(default_factory=set)
    in_doubt: set = field(default_factory=set)
    errors: dict = field(default_factory=dict)        # exception class name -> count
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, kind: str, tid: str, exc: BaseException | None = None) -> None:
        with self.lock:
            getattr(self, kind).add(tid)
            if exc is not None:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1


def setup_schema(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS accounts, transfers")
        c.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
        c.execute("CREATE TABLE transfers (id uuid PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount int NOT NULL)")
        c.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g", (START_BALANCE, ACCOUNTS))


def client_loop(dsn: str, ledger: Ledger, stop: threading.Event, progress: dict, key: int, seed: int) -> None:
    rnd = random.Random(seed)
    conn = None
    while not stop.is_set():
        progress[key] = time.monotonic()
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(dsn, connect_timeout=5, prepare_threshold=rnd.choice([None, 0, 5]))
        except psycopg.Error:
            time.sleep(0.1)
            continue
        a, b = rnd.sample(range(1, ACCOUNTS + 1), 2)
        amount = rnd.randint(1, 50)
        tid = str(uuid.uuid4())
        try:
            # Lower id first: transfers never deadlock on each other.
            for acc, delta in sorted([(a, -amount), (b, amount)]):
                conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (delta, acc))
            conn.execute("INSERT INTO transfers VALUES (%s, %s, %s, %s)", (tid, a, b, amount))
        except psycopg.Error as e:
            ledger.note("failed", tid, e)
            _drop(conn)
            conn = None
            continue
        try:
            conn.commit()
        except psycopg.Error as e:
            # A COMMIT that got an error from PostgreSQL did not commit; one whose connection
            # broke on the way may have.
            ledger.note("failed" if e.sqlstate and not isinstance(e, psycopg.OperationalError) else "in_doubt", tid, e)
            _drop(conn)
            conn = None
            continue
        ledger.note("acked", tid)
    if conn is not None:
        _drop(conn)


def mixed_loop(dsn: str, stop: threading.Event, progress: dict, key: int, seed: int, counts: dict) -> None:
    """Other traffic beside the transfers (soak): reads, session settings, pins (temp tables,
    advisory locks) that end with the client, large statements streamed through the proxy,
    short-lived connections. Errors from the faults are expected; only hangs count."""
    rnd = random.Random(seed)
    big = "SELECT length('" + "x" * 3_000_000 + "')"
    while not stop.is_set():
        progress[key] = time.monotonic()
        what = rnd.choice(["read", "set", "temp", "advisory", "big", "reconnect"])
        try:
            with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as c:
                for _ in range(rnd.randint(1, 20)):
                    if what == "read":
                        c.execute("SELECT sum(balance) FROM accounts").fetchone()
                    elif what == "set":
                        c.execute("SET application_name = %s" % _lit(f"soak-{rnd.randint(1, 9)}"))
                        c.execute("SELECT current_setting('application_name')").fetchone()
                    elif what == "temp":
                        c.execute("CREATE TEMP TABLE IF NOT EXISTS soak_t (x int)")
                        c.execute("INSERT INTO soak_t VALUES (1)")
                    elif what == "advisory":
                        c.execute("SELECT pg_advisory_lock(%s)", (rnd.randint(1, 1000) + key * 1000,))
                    elif what == "big":
                        c.execute(big).fetchone()
                    else:
                        break
                    if stop.is_set():
                        break
            counts[what] = counts.get(what, 0) + 1
        except psycopg.Error:
            counts["errors"] = counts.get("errors", 0) + 1
            time.sleep(0.1)


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _drop(conn) -> None:
    try:
        conn.close()
    except Exception:
        pass


# ---------------------------------------------------------------- faults

def terminate_backends(pg: EmbeddedPostgres, user: str, share: float = 0.5) -> int:
    """pg_terminate_backend on about `share` of `user`'s backends (the proxy's server connections)."""
    try:
        with psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=5) as c:
            pids = [r[0] for r in c.execute(
                "SELECT pid FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()", (user,))]
            chosen = [p for p in pids if random.random() < share] or pids[:1]
            for p in chosen:
                c.execute("SELECT pg_terminate_backend(%s)", (p,))
            return len(chosen)
    except psycopg.Error:
        return 0


def restart(pg: EmbeddedPostgres) -> None:
    pg.restart()


def crash_and_start(pg: EmbeddedPostgres, down: float) -> None:
    pg.kill()
    time.sleep(down)
    pg.start()


class Raw:
    """A client on a raw socket through the proxy (trust authentication)."""

    def __init__(self, port: int, user: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(m.startup_message({"user": user, "database": "postgres"}))
        self._until(b"Z")

    def _until(self, t: bytes) -> list[bytes]:
        buf, seen = b"", []
        while True:
            while len(buf) >= 5 and len(buf) >= 1 + struct.unpack_from("!I", buf, 1)[0]:
                ln = struct.unpack_from("!I", buf, 1)[0]
                seen.append(buf[:1])
                if buf[:1] == b"E" and t != b"E":
                    raise ConnectionError(m.parse_error_fields(buf[5:1 + ln]).get("M", "error"))
                if buf[:1] == t:
                    return seen
                buf = buf[1 + ln:]
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk

    def query(self, sql: str) -> None:
        self.sock.sendall(m.query(sql))
        self._until(b"Z")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def vanish(self) -> None:
        # RST rather than FIN: the harshest way to go.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def vanishing_client(port: int, user: str, how: str) -> bool:
    """A client that goes away at a bad moment. True if it got as far as the bad moment."""
    try:
        raw = Raw(port, user)
        if how == "mid-transaction":
            # Money moved into account 1 from nowhere, never committed: must not stay.
            raw.query("BEGIN; UPDATE accounts SET balance = balance + 1000000 WHERE id = 1")
        elif how == "mid-message":
            raw.query("BEGIN")
            msg = m.query("UPDATE accounts SET balance = balance + 1000000 WHERE id = 2; COMMIT")
            raw.send(msg[:len(msg) // 2])
        elif how == "mid-batch":
            # An extended-protocol transfer half done, no Sync: PostgreSQL must never run it.
            body = b"\x00UPDATE accounts SET balance = balance + 1000000 WHERE id = 3\x00\x00\x00"
            raw.send(m.message(b"P", body) + m.message(b"B", b"\x00\x00" + b"\x00\x00" * 3)
                     + m.message(b"E", b"\x00" + b"\x00" * 4))
        time.sleep(random.random() * 0.05)
        raw.vanish()
        return True
    except (OSError, ConnectionError):
        return False


# ---------------------------------------------------------------- the proxy, as a process

def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class ServedProxy:
    """`unpinned serve` in a process of its own, trust authentication, short timeouts."""

    def __init__(self, upstream: str, pool_size: int = 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="unpinned-chaos-")
        conf = Path(self.dir) / "unpinned.toml"
        conf.write_text(f'[proxy]\nlisten = "127.0.0.1:{self.port}"\nauth = "trust"\n\n'
                        f'[pool]\npool_size = {pool_size}\nborrow_timeout = 10\nconnect_timeout = 5\n'
                        f'health_check_after = 1\n\n[upstream]\nurl = "{upstream}"\n')
        self.log = open(Path(self.dir) / "proxy.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "unpinned.cli", "serve", "--config", str(conf)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"unpinned serve exited: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("unpinned serve did not start") from None
                time.sleep(0.05)

    def dsn(self, user: str) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    def log_tail(self) -> str:
        self.log.flush()
        return (Path(self.dir) / "proxy.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- a run

@dataclass
class Outcome:
    seconds: float
    ledger: Ledger
    faults: dict
    total: int
    in_ledger: set
    balances_match_ledger: bool
    hung: list
    rss: list                    # (seconds since start, MB) samples of the proxy
    proxy_alive: bool
    mixed: dict = field(default_factory=dict)     # the other traffic's sessions by kind (soak)

    def problems(self) -> list[str]:
        out = []
        if self.total != ACCOUNTS * START_BALANCE:
            out.append(f"total is {self.total}, not {ACCOUNTS * START_BALANCE}")
        lost = self.ledger.acked - self.in_ledger
        if lost:
            out.append(f"{len(lost)} acknowledged transfers missing")
        applied = self.ledger.failed & self.in_ledger
        if applied:
            out.append(f"{len(applied)} failed transfers applied")
        made_up = self.in_ledger - self.ledger.acked - self.ledger.in_doubt
        if made_up:
            out.append(f"{len(made_up)} transfers in the ledger that no client sent to COMMIT")
        if not self.balances_match_ledger:
            out.append("balances differ from what the ledger says")
        if self.hung:
            out.append(f"clients hung: {self.hung}")
        if not self.proxy_alive:
            out.append("the proxy died")
        if not self.ledger.acked:
            out.append("no transfer was acknowledged at all")
        return out

    def summary(self) -> str:
        rss = [mb for _, mb in self.rss]
        mem = f"proxy RSS first {rss[0]:.1f} MB, min {min(rss):.1f}, max {max(rss):.1f}, last {rss[-1]:.1f}" if rss else ""
        return (f"{self.seconds:.0f} s: {len(self.ledger.acked)} acknowledged, {len(self.ledger.failed)} failed, "
                f"{len(self.ledger.in_doubt)} in doubt ({len(self.in_ledger & self.ledger.in_doubt)} of them applied); "
                f"client errors {dict(sorted(self.ledger.errors.items()))}; faults {self.faults}; "
                f"total {self.total} (expected {ACCOUNTS * START_BALANCE}); {mem}"
                + (f"; other sessions {dict(sorted(self.mixed.items()))}" if self.mixed else ""))


def run(seconds: float, clients: int = 8, fault_every: float = 2.0, seed: int = 1,
        rss_every: float = 10.0, report=None, mixed: int = 0) -> Outcome:
    """One run on a PostgreSQL of its own, faults in turn every `fault_every` seconds."""
    rnd = random.Random(seed)
    user = "postgres"
    # synchronous_commit on: an acknowledged commit must survive the crash (a SIGKILL of the
    # server, not of the machine, so fsync may stay off: written WAL is in the OS's cache).
    pg = EmbeddedPostgres(name="chaos", auth="trust",
                          settings={"max_connections": "100", "synchronous_commit": "on"}).start()
    proxy = None
    try:
        setup_schema(pg)
        proxy = ServedProxy(pg.dsn(), pool_size=4)
        ledger = Ledger()
        stop = threading.Event()
        progress: dict = {}
        threads = [threading.Thread(target=client_loop, args=(proxy.dsn(user), ledger, stop, progress, i, seed * 100 + i),
                                    daemon=True) for i in range(clients)]
        mixed_counts: dict = {}
        threads += [threading.Thread(target=mixed_loop, args=(proxy.dsn(user), stop, progress, clients + i,
                                                              seed * 100 + clients + i, mixed_counts), daemon=True)
                    for i in range(mixed)]
        start = time.monotonic()
        for t in threads:
            t.start()
        faults = {"terminate": 0, "restart": 0, "crash": 0, "vanish": 0}
        kinds = ["terminate", "vanish", "terminate", "restart", "vanish", "crash"]
        rss: list = [(0.0, rss_mb(proxy.proc.pid))]
        next_rss = start + rss_every
        next_fault = start + fault_every
        k = 0
        hung: list = []
        while time.monotonic() - start < seconds:
            time.sleep(max(0.0, min(next_fault, next_rss, start + seconds) - time.monotonic()))
            now = time.monotonic()
            if now >= next_rss:
                rss.append((now - start, rss_mb(proxy.proc.pid)))
                next_rss = now + rss_every
                if report:
                    report(f"{now - start:6.0f} s  proxy RSS {rss[-1][1]:.1f} MB  acked {len(ledger.acked)}  "
                           f"faults {faults}")
            if now - start >= seconds - 1:
                break
            stale = [key for key, t in progress.items() if now - t > OP_TIMEOUT]
            if stale:
                hung = stale
                break
            if now < next_fault:
                continue
            next_fault = now + fault_every
            kind = kinds[k % len(kinds)]
            k += 1
            if kind == "terminate":
                terminate_backends(pg, user)
            elif kind == "restart":
                restart(pg)
            elif kind == "crash":
                crash_and_start(pg, down=rnd.uniform(0.5, 2.0))
            else:
                how = rnd.choice(["mid-transaction", "mid-message", "mid-batch"])
                if not vanishing_client(proxy.port, user, how):
                    continue        # (PostgreSQL still coming back: it did not get that far)
            faults[kind] += 1
        # A calm end: PostgreSQL up, every client finishes its transfer in flight.
        stop.set()
        for t in threads:
            t.join(OP_TIMEOUT)
        hung += [i for i, t in enumerate(threads) if t.is_alive()]
        rss.append((time.monotonic() - start, rss_mb(proxy.proc.pid)))
        elapsed = time.monotonic() - start
        alive = proxy.proc.poll() is None
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            total = c.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
            in_ledger = {str(r[0]) for r in c.execute("SELECT id FROM transfers")}
            mismatch = c.execute(
                "SELECT count(*) FROM accounts a WHERE a.balance <> %s "
                "- coalesce((SELECT sum(amount) FROM transfers WHERE src = a.id), 0) "
                "+ coalesce((SELECT sum(amount) FROM transfers WHERE dst = a.id), 0)", (START_BALANCE,)).fetchone()[0]
        out = Outcome(elapsed, ledger, faults, int(total), in_ledger, mismatch == 0, sorted(set(hung)), rss, alive)
        out.mixed = mixed_counts
        return out
    finally:
        if proxy is not None:
            proxy.stop()
        pg.stop()


def main() -> None:
    """`make chaos` / `make soak`: python tests/support/chaos.py SECONDS [--soak]."""
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 120
    soak = "--soak" in sys.argv
    say = lambda msg: print(msg, flush=True)    # noqa: E731
    say(f"{'soak' if soak else 'chaos'}: {seconds:.0f} s of transfers through unpinned with faults")
    out = run(seconds, clients=12 if soak else 8, fault_every=15.0 if soak else 2.0,
              rss_every=10.0, report=say, mixed=6 if soak else 0)
    say(out.summary())
    problems = out.problems()
    for p in problems:
        say(f"PROBLEM: {p}")
    say("OK: total conserved, no acknowledged transfer lost, no failed one applied, nothing hung"
        if not problems else "FAILED")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
