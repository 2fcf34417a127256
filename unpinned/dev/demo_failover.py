"""The demo's failover act (issue 11): a primary and a streaming replica, clients running
transfers through the proxy, the primary killed and the replica promoted mid-run, and
what the clients saw, with its timings."""
from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.table import Table

from unpinned.config import load
from unpinned.dev.cluster import PostgresCluster
from unpinned.proxy import Proxy

PASSWORD = "demo"


async def run_failover(console: Console, clients: int = 40, seconds: float = 2.0) -> bool:
    import asyncpg

    with console.status("Failover: starting a primary and a streaming replica (initdb, pg_basebackup -R)..."):
        cluster = await asyncio.to_thread(
            lambda: PostgresCluster(replicas=1, name="demo_fo", password=PASSWORD).start())
    proxy = None
    try:
        p, r = cluster.primary, cluster.replicas[0]
        await asyncio.to_thread(p.psql, "CREATE TABLE fo_accounts (id int PRIMARY KEY, balance bigint NOT NULL); "
                                        "INSERT INTO fo_accounts SELECT g, 1000 FROM generate_series(1, 100) g")
        cfg = load(None, listen="127.0.0.1:0", upstream=cluster.url(), auth="trust", pool_size=10,
                   max_client_connections=clients + 10, borrow_timeout=30)
        proxy = Proxy(cfg)
        await proxy.start()
        dsn = f"postgresql://{p.superuser}:{PASSWORD}@127.0.0.1:{proxy.port}/postgres"
        stats = {"commits": 0, "failed": 0, "reconnects": 0, "first_after": None}
        promoted_at: list[float] = []
        stop = asyncio.Event()
        conns: list = [None] * clients

        async def open_(i: int):
            c = await asyncpg.connect(dsn)
            await c.execute(f"SET application_name = 'fo-client-{i}'")
            return c

        async def client(i: int) -> None:
            a, b = sorted((i % 100 + 1, (i * 7 + 3) % 100 + 1))
            if a == b:
                b = a % 100 + 1
                a, b = sorted((a, b))
            while not stop.is_set():
                try:
                    async with conns[i].transaction():
                        await conns[i].execute("UPDATE fo_accounts SET balance = balance - 1 WHERE id = $1", a)
                        await conns[i].execute("UPDATE fo_accounts SET balance = balance + 1 WHERE id = $1", b)
                    stats["commits"] += 1
                    if promoted_at and stats["first_after"] is None:
                        stats["first_after"] = time.monotonic() - promoted_at[0]
                except Exception:   # a transaction in flight on the killed primary: counted, not retried
                    stats["failed"] += 1
                    if conns[i].is_closed():
                        conns[i] = await open_(i)
                        stats["reconnects"] += 1
                await asyncio.sleep(0.01)

        conns[:] = await asyncio.gather(*(open_(i) for i in range(clients)))
        originals = list(conns)
        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        with console.status(f"Failover: {clients} clients running transfers; the primary is killed in {seconds:.0f} s..."):
            await asyncio.sleep(seconds)
            t0 = time.monotonic()
            await asyncio.to_thread(p.halt, "immediate")
            killed = time.monotonic()
            took_promote = await asyncio.to_thread(r.promote)
            promoted_at.append(time.monotonic())
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        kept = 0
        for i, c in enumerate(conns):
            if c is originals[i] and await c.fetchval("SHOW application_name") == f"fo-client-{i}" \
                    and await c.fetchval("SELECT inet_server_port()") == r.port:
                kept += 1
        total = await conns[0].fetchval("SELECT sum(balance) FROM fo_accounts")
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        fo = proxy.cluster.last_failover or {}
        table = Table(title="Failover: the primary killed (pg_ctl stop -m immediate), the replica promoted")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("kill (pg_ctl stop -m immediate)", f"{killed - t0:.2f} s")
        table.add_row("promotion (pg_ctl promote, until writable)", f"{took_promote:.2f} s")
        first = stats["first_after"]
        table.add_row("first commit through the proxy after the promotion",
                      f"{first:.3f} s" if first is not None else "none")
        table.add_row("proxy without a writer", f"{fo.get('seconds', 0):.2f} s")
        table.add_row("transactions committed", str(stats["commits"]))
        table.add_row("transactions in flight at the kill: failed once, never replayed", str(stats["failed"]))
        table.add_row("clients that kept their connection, their SET, now on the new primary",
                      f"{kept} of {clients}")
        table.add_row("money conserved (sum of balances = 100000)", "yes" if total == 100000 else "NO")
        console.print(table)
        return total == 100000 and first is not None and kept + stats["reconnects"] >= clients
    finally:
        if proxy is not None:
            await proxy.stop()
        await asyncio.to_thread(cluster.stop)
