"""`unpinned demo`: the first five minutes (SPEC 7).

An embedded PostgreSQL, two proxies in front of it (one behaving like RDS Proxy, one
in smart mode), the seeds' cases run through each with real drivers, and a side-by-side
table of what pinned and why. Then many clients over few server connections. Leaves
nothing running when it exits, Ctrl-C included.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from unpinned.config import load
from unpinned.dev.demo_failover import run_failover
from unpinned.dev.embedded import EmbeddedPostgres
from unpinned.proxy import Proxy

console = Console()
PASSWORD = "demo"


@dataclass
class Outcome:
    text: str = ""
    pins: list[str] = field(default_factory=list)
    unpins: list[str] = field(default_factory=list)
    error: str = ""

    def render(self) -> str:
        if self.error:
            return f"[red]rejected[/red]: {self.error}"
        if not self.pins:
            return "[green]no pin[/green]" + (f" ({self.text})" if self.text else "")
        out = "[red]pinned[/red] (" + ", ".join(self.pins) + ")"
        if self.unpins:
            out += ", [green]unpinned[/green] when the state was gone"
        return out


def _dsn(proxy: Proxy, driver: str = "postgresql") -> str:
    return f"{driver}://postgres:{PASSWORD}@127.0.0.1:{proxy.port}/postgres"


# ------------------------------------------------------------------ the seeds' cases

def case_options(proxy: Proxy) -> str:
    import psycopg2
    conn = psycopg2.connect(_dsn(proxy), options="-c statement_timeout=5000")
    try:
        cur = conn.cursor()
        cur.execute("SHOW statement_timeout")
        return f"statement_timeout = {cur.fetchone()[0]}"
    finally:
        conn.close()


def _run(proxy: Proxy, *statements: str, autocommit: bool = True) -> str:
    import psycopg2
    conn = psycopg2.connect(_dsn(proxy))
    conn.autocommit = autocommit
    try:
        cur = conn.cursor()
        for sql in statements:
            cur.execute(sql)
        if not autocommit:
            conn.commit()
        return ""
    finally:
        conn.close()


def case_set(proxy):
    return _run(proxy, "SET lock_timeout = 3000", "SELECT 1")


def case_set_local(proxy):
    return _run(proxy, "SET LOCAL lock_timeout = 3000", "SELECT 1", autocommit=False)


def case_nextval(proxy):
    return _run(proxy, "SELECT nextval('demo_seq')")


def case_long_in_list(proxy):
    ids = ",".join(str(i) for i in range(1, 4001))
    return _run(proxy, f"SELECT count(*) FROM demo_items WHERE id IN ({ids})")


def case_temp_table(proxy):
    return _run(proxy, "CREATE TEMP TABLE demo_scratch (x int)", "INSERT INTO demo_scratch VALUES (1)",
                "DROP TABLE demo_scratch")


def case_advisory(proxy):
    return _run(proxy, "SELECT pg_advisory_lock(42)", "SELECT pg_advisory_unlock(42)")


async def case_enum(proxy, kit: bool = False) -> str:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine
    engine = create_async_engine(_dsn(proxy, "postgresql+asyncpg"))
    if kit:
        from unpinned.kit.sqla import make_pin_safe  # needs SQLAlchemy, an optional dependency
        make_pin_safe(engine)
    try:
        async with engine.connect() as conn:
            mood = (await conn.execute(sa.text("SELECT mood FROM demo_people LIMIT 1"))).scalar()
        return f"read mood = {mood}"
    finally:
        await engine.dispose()


def _kit_available() -> bool:
    try:
        from unpinned.kit.sqla import make_pin_safe  # noqa: F401
        return True
    except ImportError:
        return False


async def case_enum_with_kit(proxy) -> str:
    return await case_enum(proxy, kit=True)


# (title, function, runs on the event loop?) — blocking drivers run in a thread.
CASES = [
    ("psycopg2, options='-c statement_timeout=5000'", case_options, False),
    ("SET lock_timeout = 3000", case_set, False),
    ("SET LOCAL lock_timeout = 3000 (in a transaction)", case_set_local, False),
    ("SELECT nextval('demo_seq')", case_nextval, False),
    ("SELECT ... WHERE id IN (4000 ids), > 16 KB", case_long_in_list, False),
    ("asyncpg via SQLAlchemy reads an enum column", case_enum, True),
    ("the same, with unpinned.sqlalchemy.make_pin_safe", case_enum_with_kit, True),
    ("CREATE TEMP TABLE ... then DROP it", case_temp_table, False),
    ("pg_advisory_lock then pg_advisory_unlock", case_advisory, False),
]


async def _run_case(proxy: Proxy, fn, on_loop: bool) -> Outcome:
    before = len(proxy.pinlog.recent)
    outcome = Outcome()
    try:
        outcome.text = await fn(proxy) if on_loop else await asyncio.to_thread(fn, proxy)
    except Exception as e:   # a rejection is an outcome to show, not a crash
        outcome.error = str(e).strip().splitlines()[0].split("FATAL:")[-1].strip()
    await asyncio.sleep(0.05)   # let the proxy see the client go
    for ev in list(proxy.pinlog.recent)[before:]:
        if ev.event == "pin":
            outcome.pins.append(ev.reason)
        elif ev.event == "unpin":
            outcome.unpins.append(ev.reason)
    return outcome


async def _cases(rds: Proxy, smart: Proxy) -> list[tuple[str, Outcome, Outcome]]:
    rows = []
    for title, fn, on_loop in CASES:
        if fn is case_enum_with_kit and not _kit_available():
            continue
        rows.append((title, await _run_case(rds, fn, on_loop), await _run_case(smart, fn, on_loop)))
    return rows


# ------------------------------------------------------------------ many clients, few server connections

async def _workload(proxy: Proxy, pg: EmbeddedPostgres, clients: int, seconds: float) -> dict:
    import asyncpg

    conns = []
    for start in range(0, clients, 50):
        conns += await asyncio.gather(*(asyncpg.connect(_dsn(proxy)) for _ in range(start, min(clients, start + 50))))
    stats = {"transactions": 0, "errors": 0, "max_servers": 0, "max_backends": 0}
    deadline = time.monotonic() + seconds
    pool = proxy.pools[("postgres", "postgres")]

    async def client(i: int, conn) -> None:
        a, b = i % 100 + 1, (i * 7) % 100 + 1
        # Session state that smart mode carries instead of pinning.
        await conn.execute(f"SET application_name = 'demo-client-{i}'")
        while time.monotonic() < deadline:
            try:
                async with conn.transaction():
                    await conn.execute("UPDATE demo_accounts SET balance = balance - 1 WHERE id = $1", a)
                    await conn.execute("UPDATE demo_accounts SET balance = balance + 1 WHERE id = $1", b)
                stats["transactions"] += 1
            except Exception:  # counted and shown; the demo keeps going
                stats["errors"] += 1
            await asyncio.sleep(0.01)

    async def watch() -> None:
        watcher = await asyncpg.connect(pg.dsn())
        try:
            while time.monotonic() < deadline:
                stats["max_servers"] = max(stats["max_servers"], pool.size)
                n = await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                           "'client backend' AND pid <> pg_backend_pid()")
                stats["max_backends"] = max(stats["max_backends"], n)
                await asyncio.sleep(0.1)
        finally:
            await watcher.close()

    await asyncio.gather(watch(), *(client(i, c) for i, c in enumerate(conns)))
    stats["total_balance"] = await conns[0].fetchval("SELECT sum(balance) FROM demo_accounts")
    await asyncio.gather(*(c.close() for c in conns))
    return stats


def _reasons_table(proxy: Proxy) -> Table:
    """Pins by reason for one proxy, with the first statement that caused each."""
    by_reason: dict[str, dict] = {}
    for x in proxy.pinlog.reason_rows():
        row = by_reason.setdefault(x.reason, {"pin": 0, "would_pin_rds": 0, "unpin": 0, "sample": ""})
        for event in ("pin", "would_pin_rds", "unpin"):
            row[event] += x.events.get(event, 0)
        if not row["sample"] and (x.events.get("pin") or x.events.get("would_pin_rds")):
            row["sample"] = " ".join(x.sample.split())
    t = Table(title=f"{proxy.config.mode} mode: pins by reason, with a statement that caused each")
    for col in ("reason", "pins", "would pin on RDS", "unpins", "statement"):
        t.add_column(col, overflow="fold")
    for reason, row in by_reason.items():
        sample = row["sample"]
        if len(sample) > 120:
            sample = sample[:100] + f"... ({len(sample)} bytes, full text in the pin log)"
        t.add_row(reason, str(row["pin"]), str(row["would_pin_rds"]), str(row["unpin"]), sample)
    return t


async def _setup(pg: EmbeddedPostgres) -> None:
    import asyncpg
    conn = await asyncpg.connect(pg.dsn())
    try:
        await conn.execute("""
            CREATE SEQUENCE demo_seq;
            CREATE TABLE demo_items (id int PRIMARY KEY);
            INSERT INTO demo_items SELECT generate_series(1, 10000);
            CREATE TYPE demo_mood AS ENUM ('sad', 'ok', 'happy');
            CREATE TABLE demo_people (name text, mood demo_mood);
            INSERT INTO demo_people VALUES ('ann', 'happy');
            CREATE TABLE demo_accounts (id int PRIMARY KEY, balance bigint NOT NULL);
            INSERT INTO demo_accounts SELECT g, 1000 FROM generate_series(1, 100) g;
        """)
    finally:
        await conn.close()


async def _main(clients: int, pool_size: int, seconds: float, keep: bool) -> int:
    with console.status("Starting an embedded PostgreSQL (pip-installed, no system install)..."):
        pg = await asyncio.to_thread(lambda: EmbeddedPostgres(password=PASSWORD, name="demo",
                                                              settings={"max_connections": "100"}).start())
    proxies: list[Proxy] = []
    try:
        await _setup(pg)
        for mode in ("rds", "smart"):
            cfg = load(None, listen="127.0.0.1:0", upstream=pg.dsn(), auth="trust", pool_size=pool_size,
                       max_client_connections=clients + 10, mode=mode, http_listen="127.0.0.1:0")
            proxy = Proxy(cfg)
            await proxy.start()
            proxies.append(proxy)
        rds, smart = proxies
        console.print(f"PostgreSQL 17 on port {pg.port}; [bold]rds[/bold]-mode proxy on {rds.port}, "
                      f"[bold]smart[/bold]-mode proxy on {smart.port}")
        console.print(f"Live page: http://127.0.0.1:{smart.http.port}/ (smart)   "
                      f"http://127.0.0.1:{rds.http.port}/ (rds)")

        with console.status("Running the seeds' cases through both proxies..."):
            rows = await _cases(rds, smart)
        table = Table(title="The seeds' cases, through RDS Proxy's rules and through smart mode", show_lines=True)
        table.add_column("case")
        table.add_column("rds mode (what RDS Proxy does)")
        table.add_column("smart mode")
        for title, r, s in rows:
            table.add_row(title, r.render(), s.render())
        console.print(table)

        for proxy in proxies:
            console.print(_reasons_table(proxy))

        with console.status(f"{clients} clients, each with its own SET, running transactions for {seconds:.0f} s "
                            f"through the smart proxy..."):
            stats = await _workload(smart, pg, clients, seconds)
        table = Table(title="Transaction pooling in smart mode")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("client connections", str(clients))
        table.add_row("server connections used (max)", str(stats["max_servers"]))
        table.add_row("server backends seen by PostgreSQL (max)", str(stats["max_backends"]))
        table.add_row("transactions committed", str(stats["transactions"]))
        table.add_row("errors", str(stats["errors"]))
        table.add_row("clients pinned", str(sum(1 for c in smart.clients if c.relay and c.relay.pinned)))
        table.add_row("money conserved (sum of balances = 100000)", "yes" if stats["total_balance"] == 100000 else "NO")
        console.print(table)
        console.print("Under RDS Proxy each of those clients' SET would have pinned it to its own server "
                      "connection; here they shared a pool of "
                      f"{pool_size}.")
        ok = stats["errors"] == 0 and stats["total_balance"] == 100000 and stats["max_servers"] <= pool_size
        ok = await run_failover(console, clients=min(clients, 40), seconds=min(seconds, 2.0)) and ok
        if keep:
            console.print("Proxies keep running; Ctrl-C to stop.")
            await asyncio.Event().wait()
        return 0 if ok else 1
    finally:
        for proxy in proxies:
            await proxy.stop()
        await asyncio.to_thread(pg.stop)


def run_demo(clients: int = 200, pool_size: int = 10, seconds: float = 5.0, keep: bool = False) -> int:
    try:
        return asyncio.run(_main(clients, pool_size, seconds, keep))
    except KeyboardInterrupt:
        console.print("interrupted; everything stopped")
        return 130
