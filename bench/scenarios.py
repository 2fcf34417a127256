"""The measurements: pgbench runs, latency logs, large results, idle clients, the classifier."""
from __future__ import annotations

import asyncio
import glob
import os
import re
import subprocess
import time
import timeit
import uuid

import procs
import wire

# SPEC 8's pgbench runs. -j 1 where there is one client (pgbench wants threads <= clients).
PGBENCH = {
    "select_simple": ["-S", "-n", "-c", "50", "-j", "2", "-M", "simple"],
    "select_extended": ["-S", "-n", "-c", "50", "-j", "2", "-M", "extended"],
    "select_prepared": ["-S", "-n", "-c", "50", "-j", "2", "-M", "prepared"],
    "churn": ["-S", "-n", "-C", "-c", "10", "-j", "2"],
    "tpcb": ["-n", "-c", "20", "-j", "2"],
    "latency": ["-S", "-n", "-c", "1", "-j", "1", "-M", "simple"],
}

LARGE = {
    "select": ("SELECT g, md5(g::text) FROM generate_series(1, 1000000) g", "SELECT 1000000"),
    "copy": ("COPY (SELECT g, md5(g::text) FROM generate_series(1, 1000000) g) TO STDOUT", "COPY 1000000"),
}

_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_TXNS = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")


def run_pgbench(tool: str, env: dict[str, str], port: int, args: list[str], seconds: int,
                cwd: str | None = None, cpu_pid: int | None = None) -> dict:
    cmd = [tool, "-h", procs.HOST, "-p", str(port), "-U", "postgres", *args, "-T", str(seconds), "postgres"]
    cpu0 = procs.proc_cpu_split(cpu_pid) if cpu_pid else None
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=seconds + 120)
    elapsed = time.perf_counter() - start
    cpu1 = procs.proc_cpu_split(cpu_pid) if cpu_pid else None
    out = {"tps": None, "transactions": 0, "failed": 0, "seconds": round(elapsed, 2), "errors": []}
    if m := _TPS.search(r.stdout):
        out["tps"] = float(m.group(1))
    if m := _TXNS.search(r.stdout):
        out["transactions"] = int(m.group(1))
    if m := _FAILED.search(r.stdout):
        out["failed"] = int(m.group(1))
    problems = [ln for ln in r.stderr.splitlines()
                if "abort" in ln or "error" in ln.lower() or "fatal" in ln.lower()]
    if r.returncode != 0 or out["tps"] is None:
        problems.insert(0, f"pgbench exit {r.returncode}")
    if out["failed"]:
        problems.insert(0, f"{out['failed']} failed transactions")
    out["errors"] = problems[:10]
    if cpu0 is not None and out["transactions"]:
        user, system = ((b - a) * 1e6 / out["transactions"] for a, b in zip(cpu0, cpu1))
        out["proxy_cpu_us_per_txn"] = round(user + system, 2)
        out["proxy_user_us_per_txn"] = round(user, 2)
        out["proxy_sys_us_per_txn"] = round(system, 2)
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def run_latency(tool: str, env: dict[str, str], port: int, seconds: int, workdir: str, label: str) -> dict:
    """One client, a per-transaction log; p50/p99 from its third column (latency, µs)."""
    prefix = os.path.join(workdir, f"lat-{label}-{uuid.uuid4().hex[:8]}")
    out = run_pgbench(tool, env, port, [*PGBENCH["latency"], "--log", f"--log-prefix={prefix}"],
                      seconds, cwd=workdir)
    latencies: list[float] = []
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                cols = line.split()
                if len(cols) >= 3 and cols[2].isdigit():
                    latencies.append(float(cols[2]))
        os.unlink(path)
    latencies.sort()
    if latencies:
        out.update(p50_us=percentile(latencies, 50), p99_us=percentile(latencies, 99), samples=len(latencies))
    else:
        out["errors"].append("no per-transaction log")
    return out


def run_large(port: int, kind: str) -> dict:
    sql, tag = LARGE[kind]
    try:
        conn = wire.Conn(procs.HOST, port, timeout=120.0)
        try:
            nbytes, seconds = conn.stream(sql, tag)
        finally:
            conn.close()
    except (OSError, wire.WireError) as e:
        return {"mb_per_s": None, "errors": [f"{type(e).__name__}: {e}"]}
    return {"mb_per_s": round(nbytes / seconds / 1e6, 2), "bytes": nbytes, "seconds": round(seconds, 3), "errors": []}


def run_idle(port: int, pid: int, count: int) -> dict:
    """Open `count` idle logged-in clients and read the proxy's resident memory."""
    async def go():
        before = procs.proc_rss_mb(pid)
        start = time.perf_counter()
        transports, failures = await wire.open_idle(procs.HOST, port, count)
        opened = time.perf_counter() - start
        await asyncio.sleep(2.0)   # let the proxy settle its buffers
        after = procs.proc_rss_mb(pid)
        for t in transports:
            t.close()
        await asyncio.sleep(1.0)
        return {"rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
                "rss_added_mb": round(after - before, 1), "connected": len(transports), "wanted": count,
                "open_seconds": round(opened, 2),
                "errors": [f"{n}× {msg}" for msg, n in failures.most_common(5)]}

    try:
        import uvloop
        return uvloop.run(go())
    except ImportError:
        return asyncio.run(go())


def run_classifier(number: int) -> dict:
    """µs per classify() call of a statement seen before; a new statement's parse time."""
    from unpinned.sql import classifier

    select = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    select_simple = b"SELECT abalance FROM pgbench_accounts WHERE aid = 4711;"
    set_stmt = b"SET statement_timeout = 5000"
    out = {}
    for key, stmt in (("cached_select_us", select), ("cached_select_simple_us", select_simple),
                      ("cached_set_us", set_stmt)):
        classifier.classify(stmt)
        best = min(timeit.repeat(lambda: classifier.classify(stmt), number=number, repeat=5))
        out[key] = round(best / number * 1e6, 3)
    # A new statement: unique text each time, so every call is a first sight (a real parse for SET).
    nonce = uuid.uuid4().hex[:8]
    new_stmts = [f"SET application_name = 'bench_{nonce}_{i}'".encode() for i in range(2000)]
    start = time.perf_counter()
    firsts = [classifier.classify(s) for s in new_stmts]
    out["new_set_parse_us"] = round((time.perf_counter() - start) / len(new_stmts) * 1e6, 2)
    # New SELECT texts of new shapes (a different identifier each time): the pre-check runs.
    letters = "abcdefghijklmnopqrstuvwxyz"
    new_selects = [f"SELECT abalance FROM pgbench_accounts WHERE aid = 1 /* {nonce} {letters[i % 26]}"
                   f"{letters[i // 26 % 26]}{letters[i // 676]} */".encode() for i in range(2000)]
    start = time.perf_counter()
    for s in new_selects:
        classifier.classify(s)
    out["new_select_us"] = round((time.perf_counter() - start) / len(new_selects) * 1e6, 2)
    # New literals in a known shape (pgbench -S in simple mode): served by the shape.
    new_literals = [f"SELECT abalance FROM pgbench_accounts WHERE aid = {i} /* {nonce} */".encode()
                    for i in range(100_000, 102_000)]
    classifier.classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 999999 /* " + nonce.encode() + b" */")
    start = time.perf_counter()
    for s in new_literals:
        classifier.classify(s)
    out["new_literal_us"] = round((time.perf_counter() - start) / len(new_literals) * 1e6, 2)
    # "Parsed once": the second sight of each new statement returns the very same object.
    out["parsed_once"] = all(classifier.classify(bytes(s)) is c for s, c in zip(new_stmts[-500:], firsts[-500:]))
    out["errors"] = []
    return out
