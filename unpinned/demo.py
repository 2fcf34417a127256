"""`unpinned demo`: an embedded PostgreSQL, the proxy in front of it, many clients.

Shows the point of a transaction pooler in one screen: hundreds of client
connections, a handful of server connections, every transaction correct.
Leaves nothing running when it exits, Ctrl-C included.
"""
from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.table import Table

from .config import load
from .embedded import EmbeddedPostgres
from .proxy import Proxy

console = Console()


async def _workload(proxy: Proxy, pg: EmbeddedPostgres, clients: int, seconds: float) -> dict:
    import asyncpg

    dsn = f"postgresql://postgres:demo@127.0.0.1:{proxy.port}/postgres"
    setup = await asyncpg.connect(dsn)
    await setup.execute("DROP TABLE IF EXISTS demo_accounts; "
                        "CREATE TABLE demo_accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
    await setup.execute("INSERT INTO demo_accounts SELECT g, 1000 FROM generate_series(1, 100) g")
    await setup.close()

    conns = []
    for start in range(0, clients, 50):
        conns += await asyncio.gather(*(asyncpg.connect(dsn) for _ in range(start, min(clients, start + 50))))
    stats = {"transactions": 0, "errors": 0, "max_servers": 0, "max_backends": 0}
    deadline = time.monotonic() + seconds
    pool = proxy.pools[("postgres", "postgres")]

    async def client(i: int, conn) -> None:
        a, b = i % 100 + 1, (i * 7) % 100 + 1
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
                n = await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                           "AND pid <> pg_backend_pid()")
                stats["max_backends"] = max(stats["max_backends"], n)
                await asyncio.sleep(0.1)
        finally:
            await watcher.close()

    await asyncio.gather(watch(), *(client(i, c) for i, c in enumerate(conns)))
    check = conns[0]
    stats["total_balance"] = await check.fetchval("SELECT sum(balance) FROM demo_accounts")
    await asyncio.gather(*(c.close() for c in conns))
    return stats


async def _main(clients: int, pool_size: int, seconds: float) -> int:
    with console.status("Starting an embedded PostgreSQL..."):
        pg = await asyncio.to_thread(lambda: EmbeddedPostgres(password="demo", name="demo",
                                                              settings={"max_connections": "100"}).start())
    proxy = None
    try:
        cfg = load(None, listen="127.0.0.1:0", upstream=pg.dsn(), auth="trust", pool_size=pool_size,
                   max_client_connections=clients + 10)
        proxy = Proxy(cfg)
        await proxy.start()
        console.print(f"PostgreSQL {pg.port} ← unpinned 127.0.0.1:{proxy.port} (pool of {pool_size})")
        with console.status(f"{clients} clients running transactions for {seconds:.0f} s..."):
            stats = await _workload(proxy, pg, clients, seconds)
        table = Table(title="Transaction pooling")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("client connections", str(clients))
        table.add_row("server connections used (max)", str(stats["max_servers"]))
        table.add_row("server backends seen by PostgreSQL (max)", str(stats["max_backends"]))
        table.add_row("transactions committed", str(stats["transactions"]))
        table.add_row("errors", str(stats["errors"]))
        table.add_row("money conserved (sum of balances = 100000)", "yes" if stats["total_balance"] == 100000 else "NO")
        console.print(table)
        ok = stats["errors"] == 0 and stats["total_balance"] == 100000 and stats["max_servers"] <= pool_size
        return 0 if ok else 1
    finally:
        if proxy is not None:
            await proxy.stop()
        await asyncio.to_thread(pg.stop)


def run_demo(clients: int = 200, pool_size: int = 10, seconds: float = 5.0) -> int:
    try:
        return asyncio.run(_main(clients, pool_size, seconds))
    except KeyboardInterrupt:
        console.print("interrupted; everything stopped")
        return 130
