"""From raw measurements to SPEC 8's rows: medians, ratios, goals, pass/miss; table, JSON, docs."""
from __future__ import annotations

import statistics
from pathlib import Path

TARGETS = ("direct", "pgbouncer", "pgbouncer-2", "unpinned", "unpinned-1", "pump")
# pgbouncer-2: two PgBouncer processes sharing the port (so_reuseport), PgBouncer's own multi-core
# answer, pool split between them; unpinned-1: unpinned with one worker, for reference; pump: a
# uvloop byte pump (bench/pump.py), the floor of a Python proxy, -S simple only.


def med(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def _verdict(*checks: bool | None) -> str:
    if any(c is None for c in checks):
        return "n/a"
    return "pass" if all(checks) else "MISS"


def build_rows(res: dict) -> list[dict]:
    """res["runs"][scenario][target] = list of per-round dicts."""
    runs = res["runs"]
    rows: list[dict] = []

    def per_target(scenario: str, key: str) -> dict[str, float | None]:
        return {t: med(r.get(key) for r in runs.get(scenario, {}).get(t, [])) for t in TARGETS}

    def tps_row(scenario: str, what: str, goal: str, check) -> None:
        v = per_target(scenario, "tps")
        rp, rd = ratio(v["unpinned"], v["pgbouncer"]), ratio(v["unpinned"], v["direct"])
        rows.append({"key": scenario, "what": what, "unit": "TPS",
                     "direct": _fmt(v["direct"]), "pgbouncer": _fmt(v["pgbouncer"]), "unpinned": _fmt(v["unpinned"]),
                     "pgbouncer2": _fmt(v["pgbouncer-2"]), "vs_pgbouncer2": ratio(v["unpinned"], v["pgbouncer-2"]),
                     "vs_pgbouncer": rp, "vs_direct": rd, "goal": goal, "result": check(rp, rd),
                     "values": v})

    tps_row("select_simple", "pgbench -S simple, 50 clients: TPS", "≥ 1.0× PgBouncer",
            lambda rp, rd: _verdict(None if rp is None else rp >= 1.0))
    tps_row("select_extended", "pgbench -S -M extended, 50 clients: TPS", "≥ 1.0× PgBouncer",
            lambda rp, rd: _verdict(None if rp is None else rp >= 1.0))
    tps_row("select_prepared", "pgbench -S -M prepared, 50 clients: TPS (PgBouncer 1.18: n/a)",
            "≥ 1.0× direct", lambda rp, rd: _verdict(None if rd is None else rd >= 1.0))
    tps_row("churn", "pgbench -S -C (connect per txn), 10 clients: TPS",
            "≥ 1.0× PgBouncer, ≥ 10× direct",
            lambda rp, rd: _verdict(None if rp is None else rp >= 1.0, None if rd is None else rd >= 10.0))
    tps_row("tpcb", "pgbench TPC-B-like, 20 clients: TPS", "≥ 1.0× PgBouncer (issue 17)",
            lambda rp, rd: _verdict(None if rp is None else rp >= 1.0))

    # The same proxy as one process: what the workers add.
    workers = res["meta"].get("unpinned_workers", 1)
    for scenario, what in (("select_simple", "-S simple"), ("churn", "-S -C")):
        v = per_target(scenario, "tps")
        if v["unpinned-1"] is None:
            continue
        rows.append({"key": f"{scenario}_1worker", "what": f"{what} with 1 worker instead of {workers}: TPS",
                     "unit": "TPS", "direct": _fmt(v["direct"]), "pgbouncer": _fmt(v["pgbouncer"]),
                     "unpinned": _fmt(v["unpinned-1"]), "vs_pgbouncer": ratio(v["unpinned-1"], v["pgbouncer"]),
                     "pgbouncer2": _fmt(v["pgbouncer-2"]), "vs_pgbouncer2": ratio(v["unpinned-1"], v["pgbouncer-2"]),
                     "vs_direct": ratio(v["unpinned-1"], v["direct"]), "goal": "— (reference)", "result": "info",
                     "values": v})

    lat = {q: per_target("latency", f"{q}_us") for q in ("p50", "p99")}
    for q in ("p50", "p99"):
        v = lat[q]
        added = {t: (None if v[t] is None or v["direct"] is None else v[t] - v["direct"])
                 for t in ("pgbouncer", "pgbouncer-2", "unpinned")}
        r = ratio(added["unpinned"], added["pgbouncer"])
        if added["pgbouncer"] is not None and added["pgbouncer"] <= 0:
            r = None
        r2 = ratio(added["unpinned"], added["pgbouncer-2"])
        if added["pgbouncer-2"] is not None and added["pgbouncer-2"] <= 0:
            r2 = None
        cell = lambda t: "n/a" if v[t] is None else f"{v[t]:,.0f} ({added[t]:+,.0f})"  # noqa: E731
        rows.append({"key": f"latency_{q}", "what": f"1 client, {q} latency µs (added vs direct)", "unit": "µs",
                     "direct": _fmt(v["direct"]), "pgbouncer": cell("pgbouncer"), "unpinned": cell("unpinned"),
                     "pgbouncer2": cell("pgbouncer-2"), "vs_pgbouncer2": r2,
                     "vs_pgbouncer": r, "vs_direct": None, "goal": "added ≤ 1.5× PgBouncer's",
                     "result": _verdict(None if r is None else r <= 1.5),
                     "values": {**v, "added_pgbouncer": added["pgbouncer"], "added_unpinned": added["unpinned"]}})

    cpu = per_target("select_simple", "proxy_cpu_us_per_txn")
    r = ratio(cpu["unpinned"], cpu["pgbouncer"])
    rows.append({"key": "cpu", "what": "proxy CPU µs per transaction (-S simple run)", "unit": "µs",
                 "direct": "—", "pgbouncer": _fmt(cpu["pgbouncer"], 1), "unpinned": _fmt(cpu["unpinned"], 1),
                 "pgbouncer2": _fmt(cpu["pgbouncer-2"], 1), "vs_pgbouncer2": ratio(cpu["unpinned"], cpu["pgbouncer-2"]),
                 "vs_pgbouncer": r, "vs_direct": None, "goal": "≤ 1.5× PgBouncer",
                 "result": _verdict(None if r is None else r <= 1.5), "values": cpu})
    if cpu.get("unpinned-1") is not None:
        rows.append({"key": "cpu_1worker", "what": "proxy CPU µs per transaction, 1 worker", "unit": "µs",
                     "direct": "—", "pgbouncer": _fmt(cpu["pgbouncer"], 1), "unpinned": _fmt(cpu["unpinned-1"], 1),
                     "vs_pgbouncer": ratio(cpu["unpinned-1"], cpu["pgbouncer"]), "vs_direct": None,
                     "goal": "— (reference)", "result": "info", "values": cpu})

    # The same CPU split: user time is the pooler's own code, system time the kernel's (loopback
    # TCP, the same four system calls per transaction for any pooler).
    user, system = per_target("select_simple", "proxy_user_us_per_txn"), per_target("select_simple", "proxy_sys_us_per_txn")
    split = lambda t: "n/a" if user[t] is None else f"{user[t]:.1f} / {system[t]:.1f}"  # noqa: E731
    if user["unpinned"] is not None:
        rows.append({"key": "cpu_split", "what": "of which user / system µs per transaction", "unit": "µs",
                     "direct": "—", "pgbouncer": split("pgbouncer"), "unpinned": split("unpinned"),
                     "pgbouncer2": split("pgbouncer-2"), "vs_pgbouncer2": ratio(user["unpinned"], user["pgbouncer-2"]),
                     "vs_pgbouncer": ratio(user["unpinned"], user["pgbouncer"]), "vs_direct": None,
                     "goal": "— (user time ratio)", "result": "info", "values": {"user": user, "system": system}})
    if cpu["pump"] is not None:
        # In the unpinned column: the pump. What any Python proxy on uvloop pays before its own work.
        rows.append({"key": "cpu_pump", "what": "the floor: a uvloop byte pump in Python (bench/pump.py), "
                     "-S simple: CPU µs per transaction (user / system)", "unit": "µs",
                     "direct": "—", "pgbouncer": _fmt(cpu["pgbouncer"], 1),
                     "unpinned": f"{cpu['pump']:.1f} ({split('pump')})",
                     "pgbouncer2": _fmt(cpu["pgbouncer-2"], 1), "vs_pgbouncer2": ratio(cpu["pump"], cpu["pgbouncer-2"]),
                     "vs_pgbouncer": ratio(cpu["pump"], cpu["pgbouncer"]), "vs_direct": None,
                     "goal": "— (reference)", "result": "info", "values": cpu})

    for kind, what in (("select", "1M-row SELECT: MB/s"), ("copy", "1M-row COPY TO STDOUT: MB/s")):
        v = per_target(f"large_{kind}", "mb_per_s")
        rp, rd = ratio(v["unpinned"], v["pgbouncer"]), ratio(v["unpinned"], v["direct"])
        rows.append({"key": f"large_{kind}", "what": what, "unit": "MB/s",
                     "direct": _fmt(v["direct"], 1), "pgbouncer": _fmt(v["pgbouncer"], 1),
                     "unpinned": _fmt(v["unpinned"], 1), "vs_pgbouncer": rp, "vs_direct": rd,
                     "goal": "≥ 0.8× direct", "result": _verdict(None if rd is None else rd >= 0.8), "values": v})

    idle = res.get("idle", {})
    n = res["meta"].get("idle_clients", 10000)

    def idle_cell(t: str) -> str:
        d = idle.get(t)
        if not d:
            return "n/a"
        s = f"{d['rss_after_mb']:.0f} ({d['rss_added_mb']:+.0f})"
        return s if d["connected"] == d["wanted"] else s + f" [{d['connected']} connected]"

    u, p = idle.get("unpinned"), idle.get("pgbouncer")
    ok = None if not u else (u["rss_after_mb"] <= 150 and u["connected"] == u["wanted"])
    rows.append({"key": "idle", "what": f"{n:,} idle clients: proxy memory MB, PSS of all its processes (added)",
                 "unit": "MB",
                 "direct": "—", "pgbouncer": idle_cell("pgbouncer"), "unpinned": idle_cell("unpinned"),
                 "vs_pgbouncer": ratio(u and u["rss_after_mb"], p and p["rss_after_mb"]), "vs_direct": None,
                 "goal": "≤ 150 MB resident", "result": _verdict(ok), "values": idle})

    cl = res.get("classifier") or {}
    for key, what in (("cached_select_us", "classify, seen before: pgbench SELECT ($1) µs"),
                      ("cached_select_simple_us", "classify, seen before: pgbench SELECT (literal) µs"),
                      ("cached_set_us", "classify, seen before: SET µs")):
        v = cl.get(key)
        rows.append({"key": key, "what": what, "unit": "µs", "direct": "—", "pgbouncer": "—",
                     "unpinned": _fmt(v, 2), "vs_pgbouncer": None, "vs_direct": None, "goal": "≤ 5 µs",
                     "result": _verdict(None if v is None else v <= 5.0), "values": {"unpinned": v}})
    po = cl.get("parsed_once")
    rows.append({"key": "new_statement",
                 "what": "classify, new SET: parse µs (new SELECT µs; new literal, known shape µs)", "unit": "µs",
                 "direct": "—", "pgbouncer": "—",
                 "unpinned": "n/a" if not cl else f"{cl['new_set_parse_us']:.1f} ({cl['new_select_us']:.1f}; "
                                                  f"{cl.get('new_literal_us', float('nan')):.2f})",
                 "vs_pgbouncer": None, "vs_direct": None, "goal": "parsed once",
                 "result": _verdict(po), "values": {k: cl.get(k) for k in ("new_set_parse_us", "new_select_us",
                                                                               "new_literal_us", "parsed_once")}})
    for row in rows:    # rows the two-process PgBouncer does not run
        row.setdefault("pgbouncer2", "—")
        row.setdefault("vs_pgbouncer2", None)
    return rows


COLUMNS = ("what", "direct", "PgBouncer", "PgBouncer ×2", "unpinned", "unpinned / PgBouncer",
           "unpinned / PgBouncer ×2", "unpinned / direct", "goal", "")
_GOAL = COLUMNS.index("goal")


def _cells(row: dict) -> list[str]:
    return [row["what"], row["direct"], row["pgbouncer"], row["pgbouncer2"], row["unpinned"],
            _x(row["vs_pgbouncer"]), _x(row["vs_pgbouncer2"]), _x(row["vs_direct"]), row["goal"], row["result"]]


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for i, c in enumerate(COLUMNS):
        t.add_column(c, justify="left" if i in (0, _GOAL) else "right", no_wrap=i not in (0, _GOAL))
    colour = {"pass": "green", "MISS": "bold red", "n/a": "yellow", "info": "dim"}
    for row in rows:
        cells = _cells(row)
        cells[-1] = f"[{colour.get(cells[-1], 'white')}]{cells[-1]}[/]"
        t.add_row(*cells)
    Console(width=200).print(t)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c or "result" for c in COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (_GOAL - 1) + ["---", "---"]) + "|"]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in _cells(row)]
        if cells[-1] == "MISS":
            cells[-1] = "**MISS**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


INTRO = """\
# Benchmarks

Figures for SPEC section 8, produced by `make bench` (full) or `make bench-quick` (a
shorter check), which run `bench/run.py`. Benchmarks are not tests: nothing here runs in
`make test`, and a figure only counts when it was measured side by side in one run.

## Method

- One embedded PostgreSQL 17 (the pip-packaged server the tests use; `fsync` off,
  `shared_buffers` 128MB, `max_connections` 300, trust authentication everywhere), a
  `pgbench -i` database (scale 10 for `make bench`, 1 for `make bench-quick`), and three
  ways to reach it over TCP on 127.0.0.1: **direct**, **PgBouncer** (the Debian package,
  transaction mode) and **unpinned** (`unpinned serve`, smart mode, with the HTTP endpoint
  and the pin log on, so the figures are with all features on). Both proxies have a pool of
  20 server connections and reach PostgreSQL the same way.
- After a short warm-up of each target, every scenario runs against the three targets in
  **alternating order**: the target that goes first changes from round to round and from
  scenario to scenario, so a slow moment on the machine does not always hit the same one.
  `make bench`: 3 rounds of 6 s pgbench runs (about six minutes in all); `make bench-quick`:
  1 round of 3 s runs (under two minutes). The table shows **medians** over the rounds.
- Flags go through `BENCH_ARGS`, e.g. `make bench BENCH_ARGS="--rounds 5 --duration 10"`;
  see `python bench/run.py --help` (`--json`, `--no-record`, `--note`). The full results,
  every round included, go to `bench-results/latest.json` (not committed).
- On a shared 2-core machine single absolute figures are noise: read the **ratios**. The
  absolute numbers are there to show the scale.
- PgBouncer is installed with apt when missing and possible; otherwise its columns are n/a.

## What each row means

| row | how it is measured |
|---|---|
| pgbench -S simple / extended / prepared | `pgbench -S -n -c 50 -j 2 -T t -M …`, TPS. PgBouncer 1.18 cannot run `-M prepared` in transaction mode, so that row compares with direct. Direct uses 50 backends, the proxies 20. |
| pgbench -S -C | `pgbench -S -n -C -c 10 -j 2 -T t`: a new connection per transaction. Against direct every transaction pays a backend fork. |
| TPC-B-like | `pgbench -n -c 20 -j 2 -T t`, the default script: seven statements per transaction, each with new literals. No SPEC goal; issue 17 sets ≥ 1.0× PgBouncer. |
| 1 client latency | `pgbench -S -n -c 1 -T t --log`: p50 and p99 of the per-transaction latencies (third column of the log). The proxy's *added* latency is its p50 (p99) minus direct's; the ratio is unpinned's added latency over PgBouncer's. |
| proxy CPU per transaction | utime + stime of the proxy's processes (`/proc/<pid>/stat` of the process and its workers, all threads) over the `-S` simple run, divided by the transactions. |
| 1M-row SELECT / COPY | `SELECT g, md5(g::text) FROM generate_series(1, 1000000) g` and the same as `COPY … TO STDOUT` (simple protocol), read by a minimal wire client that counts bytes and discards them: bytes / seconds. One backend producing the rows is usually the slowest part, so this row shows whether a proxy slows the stream down, not its own ceiling. |
| idle clients | After all the other scenarios, 10,000 connections log in (trust) and stay idle; the proxy's memory with them open (the sum of the PSS in `/proc/<pid>/smaps_rollup` over its processes, so forked workers' shared pages count once), and in brackets the growth from before they opened. |
| classify | `unpinned.sql.classifier.classify` in-process, best of 5 `timeit` runs: a statement seen before (a cache hit), and first sights of new statements (a SET is parsed by PostgreSQL's parser; a SELECT without session effects skips the parser). "Parsed once": the second sight returns the cached result. |

## Runs

Newest last. Each run records the date, the machine, the command and the versions.
"""


def record(doc: Path, res: dict, rows: list[dict], note: str) -> None:
    meta = res["meta"]
    if not doc.exists() or not doc.read_text().strip():
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(INTRO)
    m, v = meta["machine"], meta["versions"]
    kind = "quick run" if meta["quick"] else "full run"
    lines = [
        "", f"### {meta['date']} — {kind}", "",
        f"- **machine**: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB RAM, Linux {m['kernel']}; "
        f"load average {m['load_before']} before, {m['load_after']} after",
        f"- **command**: `{meta['command']}` ({meta['rounds']} round(s) of {meta['duration']} s per pgbench run, "
        f"scale {meta['scale']}, pool size {meta['pool_size']}, unpinned with {meta.get('unpinned_workers', 1)} "
        f"worker(s); total {meta['total_seconds']:.0f} s)",
        f"- **versions**: PostgreSQL {v['postgresql']}, {v['pgbouncer']} (also as two processes with so_reuseport), "
        f"unpinned {v['unpinned']} ({v.get('unpinned_build', '?')}), "
        f"Python {v['python']}",
    ]
    if note:
        lines.append(f"- **note**: {note}")
    for s in meta.get("skipped", []):
        lines.append(f"- **skipped**: {s}")
    if meta.get("problems"):
        lines.append("- **problems seen**: " + "; ".join(meta["problems"][:10]))
    lines += ["", markdown_table(rows), ""]
    with open(doc, "a") as f:
        f.write("\n".join(lines))
