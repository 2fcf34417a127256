"""A fleet on one machine: three `unpinned serve` processes (fleet_size = 3) behind HAProxy
(tests/support/haproxy.py, health-checking each proxy's /ready) in front of one PostgreSQL,
under a workload of money transfers from clients that reconnect when they lose their
connection, as applications behind a load balancer do.

What it shows: the server never sees more than the budget (pool_size for the whole fleet);
killing one proxy costs only its own clients' connections; a rolling restart of all three
(SIGTERM, which drains, then start again) loses no acknowledged transaction, and every
transfer is whole (the balances are exactly what the ledger says); a rolling takeover
restart (serve --takeover) of all three costs the clients nothing at all.

fleet_size is 4 for 3 proxies, as docs/production.md advises: a takeover runs two processes
for one proxy for a moment, as a rolling update runs maxSurge extra pods. So the budget of
12 holds throughout, and 9 (three shares of 3) whenever no takeover runs.
"""
from __future__ import annotations

import csv
import re
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import SUPERUSER_PASSWORD
from support.haproxy import HAProxy, haproxy_binary
from support.serve import Served

BUDGET, FLEET, PROXIES = 12, 4, 3
SHARE = BUDGET // FLEET
ROLE, ROLE_PASSWORD = "fleet_app", "fleet-secret"
ACCOUNTS, START_BALANCE = 10, 1000
CLIENTS = 12


@pytest.fixture
def fleet_db(pg, tmp_path):
    haproxy_binary()        # skips, with the reason, where HAProxy cannot be had
    su = dict(user="postgres", password=SUPERUSER_PASSWORD)
    pg.psql(f"DROP TABLE IF EXISTS fleet_accounts, fleet_ledger; DROP ROLE IF EXISTS {ROLE}", **su)
    pg.create_role(ROLE, ROLE_PASSWORD)
    pg.psql("CREATE TABLE fleet_accounts (id int PRIMARY KEY, balance bigint NOT NULL); "
            "CREATE TABLE fleet_ledger (id uuid PRIMARY KEY, src int, dst int, amount int); "
            f"INSERT INTO fleet_accounts SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g; "
            f"GRANT SELECT, INSERT, UPDATE ON fleet_accounts, fleet_ledger TO {ROLE}", **su)
    users = tmp_path / "users.toml"
    users.write_text(f'[users.{ROLE}]\npassword = "{ROLE_PASSWORD}"\n')
    yield pg, str(users)
    pg.psql(f"DROP TABLE fleet_accounts, fleet_ledger; DROP ROLE {ROLE}", **su)


class Budget(threading.Thread):
    """The most server backends the fleet's role ever had at once, polled from pg_stat_activity."""

    def __init__(self, pg):
        super().__init__(daemon=True)
        self.conn = psycopg.connect(pg.dsn("postgres", SUPERUSER_PASSWORD), autocommit=True)
        self.most: dict[str, int] = {}     # phase -> most connections seen
        self.phase = "steady"
        self.samples = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            n = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (ROLE,)).fetchone()[0]
            self.most[self.phase] = max(self.most.get(self.phase, 0), n)
            self.samples += 1
            time.sleep(0.02)

    def stop(self):
        self.halt.set()
        self.join(5)
        self.conn.close()


class Workload:
    """Clients moving money between accounts through the load balancer, reconnecting on any
    connection error. A transfer is acknowledged when its COMMIT returned."""

    def __init__(self, port: int, clients: int = CLIENTS):
        self.port = port
        self.acked: set[str] = set()
        self.uncertain: list[tuple[float, str]] = []     # COMMIT sent, no answer: committed or not
        self.errors: list[tuple[float, int, str]] = []      # (when, client, what)
        # Errors after a transaction's first statement had run: work in flight was cut.
        self.mid_transaction: list[tuple[float, int, str]] = []
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.halt.set()
        for t in self.threads:
            t.join(30)

    def errors_since(self, t0: float) -> list[tuple[float, int, str]]:
        with self.lock:
            return [e for e in self.errors if e[0] >= t0]

    def _connect(self):
        return psycopg.connect(host="127.0.0.1", port=self.port, user=ROLE, password=ROLE_PASSWORD,
                               dbname="postgres", connect_timeout=5)

    def _client(self, i: int) -> None:
        rng = random.Random(i)
        conn = None
        while not self.halt.is_set():
            if conn is None:
                try:
                    conn = self._connect()
                except psycopg.OperationalError as e:
                    with self.lock:
                        self.errors.append((time.monotonic(), i, f"connect: {e}"))
                    time.sleep(0.05)
                    continue
            src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
            amount = rng.randint(1, 50)
            tid = str(uuid.uuid4())
            committing = False
            ran = 0
            try:
                # Rows locked in id order: transfers never deadlock each other.
                for acc, delta in sorted(((src, -amount), (dst, amount))):
                    conn.execute("UPDATE fleet_accounts SET balance = balance + %s WHERE id = %s", (delta, acc))
                    ran += 1
                conn.execute("INSERT INTO fleet_ledger VALUES (%s, %s, %s, %s)", (tid, src, dst, amount))
                committing = True
                conn.commit()
                with self.lock:
                    self.acked.add(tid)
            except psycopg.Error as e:
                with self.lock:
                    self.errors.append((time.monotonic(), i, f"{e.sqlstate or ''} {e}".strip()))
                    if committing:
                        self.uncertain.append((time.monotonic(), tid))
                    if ran:
                        self.mid_transaction.append(self.errors[-1])
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def current_sessions(lb: HAProxy) -> dict[str, int]:
    rows = csv.DictReader(lb.command("show stat").lstrip("# ").splitlines())
    return {r["svname"]: int(r["scur"] or 0) for r in rows if r["pxname"] == "proxies" and r["svname"].startswith("p")}


def test_three_proxies_behind_haproxy_budget_kill_and_rolling_restart(fleet_db):
    pg, users = fleet_db
    upstream = pg.dsn("postgres", SUPERUSER_PASSWORD)
    takeover = [str(Path(users).parent / f"takeover-{i}.sock") for i in range(PROXIES)]

    def serve(i: int, like: Served | None = None, wait: bool = True) -> Served:
        ports = dict(port=like.port, http_port=like.http_port) if like else {}
        return Served(upstream, users, takeover=takeover[i], pool_size=BUDGET, fleet_size=FLEET,
                      shutdown_timeout=10, **ports).start(wait=wait)

    proxies = [serve(i) for i in range(PROXIES)]
    lb = HAProxy([p.port for p in proxies], ready_ports=[p.http_port for p in proxies])
    budget = Budget(pg)
    work = None
    try:
        lb.start()
        budget.start()
        work = Workload(lb.port).start()
        time.sleep(3)
        assert len(work.acked) > 50, "the workload runs"
        assert not work.errors, work.errors[:5]

        # Kill one proxy outright: only the clients it served lose their connection.
        on_victim = current_sessions(lb)["p1"]
        killed_at = time.monotonic()
        proxies[1].signal(signal.SIGKILL)
        proxies[1].wait(10)
        lb.wait_states({"p1": "DOWN"})
        time.sleep(2)
        hit = {c for _, c, _ in work.errors_since(killed_at)}
        assert 1 <= len(hit) <= on_victim, (on_victim, work.errors_since(killed_at)[:10])
        acked = len(work.acked)
        time.sleep(1)
        assert len(work.acked) > acked, "the clients carry on through the other two"
        proxies[1].stop()
        proxies[1] = serve(1, like=proxies[1])
        lb.wait_states({"p1": "UP"})

        # Rolling restart: each proxy in turn drains on SIGTERM and starts again.
        rolling_from = time.monotonic()
        for i, old in enumerate(list(proxies)):
            old.terminate()
            assert old.wait(20) == 0, old.log()
            assert "drained" in old.log(), old.log()
            old.stop()
            proxies[i] = serve(i, like=old)
            lb.wait_states({f"p{i}": "UP"})
            time.sleep(1)
        rolling_errors = work.errors_since(rolling_from)
        rolling_cut = [e for e in work.mid_transaction if e[0] >= rolling_from]
        time.sleep(1)

        # Rolling takeover restart: each proxy's clients move to a new process, unnoticed.
        takeover_from = time.monotonic()
        acked = len(work.acked)
        moved = []
        for i, old in enumerate(list(proxies)):
            budget.phase = "takeover"
            proxies[i] = serve(i, like=old, wait=False)
            assert old.wait(20) == 0, old.log()
            old.stop()
            proxies[i].wait_ready()
            deadline = time.monotonic() + 5
            while not (found := re.search(r"takeover: (\d+) client\(s\) moved", proxies[i].log())):
                assert time.monotonic() < deadline, proxies[i].log()
                time.sleep(0.05)
            moved.append(int(found.group(1)))
            time.sleep(0.5)
            budget.phase = "steady"
            time.sleep(0.5)
        takeover_errors = work.errors_since(takeover_from)
        assert len(work.acked) > acked
    finally:
        if work is not None:
            work.stop()
        budget.stop()
        lb.stop()
        for p in proxies:
            p.stop()

    # The drain closes clients only between transactions: no COMMIT was left without answer,
    # and no error came after a transaction's first statement had run (what the clients saw
    # is their connection closed at rest, when they next sent something, or a refused connect).
    assert not [t for when, t in work.uncertain if when >= rolling_from], "a commit was left in doubt"
    assert not rolling_cut, rolling_cut[:5]
    # A client is closed when it starts its next request (the FATAL answers it) or after a
    # moment at rest, so drivers read PostgreSQL's shutdown message rather than a bare close.
    told = sum("57P01" in w or "administrator command" in w for _, _, w in rolling_errors)
    closed = sum(not w.startswith("connect:") for _, _, w in rolling_errors)
    assert told * 2 >= closed, rolling_errors
    su = dict(user="postgres", password=SUPERUSER_PASSWORD)
    ledger = set(pg.psql("SELECT id FROM fleet_ledger", **su).split())
    missing = work.acked - ledger
    assert not missing, f"{len(missing)} acknowledged transfers lost"
    total = int(pg.psql("SELECT sum(balance) FROM fleet_accounts", **su))
    assert total == ACCOUNTS * START_BALANCE
    # Every transfer is whole: each balance is the start plus what the ledger moved.
    wrong = pg.psql(
        "SELECT count(*) FROM fleet_accounts a WHERE balance <> "
        f"{START_BALANCE} + coalesce((SELECT sum(amount) FROM fleet_ledger WHERE dst = a.id), 0) "
        "- coalesce((SELECT sum(amount) FROM fleet_ledger WHERE src = a.id), 0)", **su)
    assert wrong == "0"
    assert budget.samples > 100
    assert max(budget.most.values()) <= BUDGET, f"the server saw {budget.most} connections of the fleet, budget {BUDGET}"
    assert budget.most["steady"] <= PROXIES * SHARE, budget.most
    assert not takeover_errors, takeover_errors[:5]
    assert sum(moved) == CLIENTS, f"clients moved by the takeovers: {moved}"
    print(f"\nfleet: {len(work.acked)} transfers acknowledged, all present; most server connections "
          f"{budget.most} (budget {BUDGET}); clients hit by the kill {len(hit)}/{on_victim} on it; "
          f"clients moved by the rolling takeover {moved}, errors {len(takeover_errors)}; "
          f"errors during the rolling restart {len(rolling_errors)} (none in a transaction: "
          f"{told} with 57P01's message)")
