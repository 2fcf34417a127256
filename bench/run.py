"""SPEC 8 figures: unpinned side by side with PgBouncer and a direct connection, in one run.

    python bench/run.py [--quick] [--rounds N] [--duration S] [--json OUT] [--no-record] [--note TEXT]

`make bench` runs the full set (scale 10, 3 rounds); `make bench-quick` a short one (scale 1,
1 round). Prints a table of medians and ratios against SPEC 8's goals, writes JSON
(bench-results/latest.json by default) and appends the run to docs/benchmarks.md.
Every process it starts is stopped when it ends, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))

import procs  # noqa: E402
import report  # noqa: E402
import scenarios  # noqa: E402

POOL_SIZE = 20
MAX_CLIENTS = 11000
TARGETS = report.TARGETS


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu, "memory_gb": round(mem, 1),
            "kernel": platform.release(), "load_before": _load()}


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def rotated(round_no: int, salt: int, targets: list[str]) -> list[str]:
    k = (round_no + salt) % len(targets)
    return targets[k:] + targets[:k]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="scale 1, 1 round, 3 s runs (under two minutes)")
    p.add_argument("--rounds", type=int, help="rounds per scenario [3; quick: 1]")
    p.add_argument("--duration", type=int, help="seconds per pgbench run [6; quick: 3]")
    p.add_argument("--scale", type=int, help="pgbench -i scale [10; quick: 1]")
    p.add_argument("--idle-clients", type=int, default=10000, help="idle client connections [10000]")
    p.add_argument("--json", dest="json_path", default=str(REPO / "bench-results" / "latest.json"),
                   help="where to write the results [bench-results/latest.json]")
    p.add_argument("--no-record", action="store_true", help="do not append the run to docs/benchmarks.md")
    p.add_argument("--no-pgbouncer", action="store_true", help="leave PgBouncer out (its columns show n/a)")
    p.add_argument("--note", default="", help="a note recorded with the run in docs/benchmarks.md")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="unpinned's worker processes [one per CPU]; -S simple and -C also run with 1 for reference")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.duration = a.duration or (3 if a.quick else 6)
    a.scale = a.scale or (1 if a.quick else 10)
    if a.rounds < 1 or a.duration < 1 or a.scale < 1 or a.idle_clients < 1:
        p.error("--rounds, --duration, --scale and --idle-clients must be at least 1")
    return a


def _command_line(argv: list[str]) -> str:
    """The command as typed: `make bench-quick BENCH_ARGS=...` when make ran us."""
    via = os.environ.get("UNPINNED_BENCH_VIA", "")
    if via:
        extra = [a for a in argv if not (a == "--quick" and via.endswith("bench-quick"))]
        return via + (f' BENCH_ARGS="{shlex.join(_hide_note(extra))}"' if extra else "")
    return shlex.join(["python", "bench/run.py", *_hide_note(argv)])


def _hide_note(argv: list[str]) -> list[str]:
    """The note is recorded on its own line; the command shows it as …"""
    out, skip = [], False
    for a in argv:
        if skip:
            out.append("…")
            skip = False
        elif a == "--note":
            out.append(a)
            skip = True
        elif a.startswith("--note="):
            out.append("--note=…")
        else:
            out.append(a)
    return out


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C stops everything cleanly, even when started in the background (where SIGINT is ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    shown_cmd = _command_line(argv if argv is not None else sys.argv[1:])
    res: dict = {"meta": {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": shown_cmd.strip(),
        "quick": args.quick, "rounds": args.rounds, "duration": args.duration, "scale": args.scale,
        "pool_size": POOL_SIZE, "idle_clients": args.idle_clients, "machine": machine(),
        "skipped": [], "problems": []}, "runs": {}, "idle": {}, "classifier": {}}
    meta = res["meta"]
    nofile = procs.raise_nofile(args.idle_clients + 2000)
    if nofile < args.idle_clients + 100:
        meta["skipped"].append(f"open-file limit {nofile} is below {args.idle_clients} idle clients; "
                               f"that row may show failed connections")

    from unpinned import __version__ as unpinned_version
    from unpinned import build_description
    from unpinned.dev.embedded import EmbeddedPostgres

    if args.no_pgbouncer:
        pgbouncer_path, why = None, "PgBouncer left out (--no-pgbouncer): its columns show n/a"
    else:
        pgbouncer_path, why = procs.find_pgbouncer(say)
    if why:
        say(why)
        meta["skipped"].append(why)
    meta["versions"] = {"unpinned": unpinned_version, "unpinned_build": build_description(),
                        "python": platform.python_version(),
                        "pgbouncer": procs.pgbouncer_version(pgbouncer_path) if pgbouncer_path else "PgBouncer n/a"}

    say("classifier micro-benchmark")
    res["classifier"] = scenarios.run_classifier(number=20000 if args.quick else 100000)

    pg = EmbeddedPostgres(auth="trust", name="bench",
                          settings={"max_connections": "300", "shared_buffers": "128MB", "fsync": "off"})
    try:
        run_all(args, res, pg, pgbouncer_path)
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        procs.stop_all()
        pg.stop()
        return 130
    finally:
        procs.stop_all()
        pg.stop()

    meta["machine"]["load_after"] = _load()
    meta["total_seconds"] = round(time.monotonic() - started, 1)
    rows = report.build_rows(res)
    res["rows"] = [{k: v for k, v in r.items()} for r in rows]
    print()
    report.print_table(rows, f"unpinned vs PgBouncer vs direct — medians of {args.rounds} round(s), "
                             f"{args.duration} s runs, scale {args.scale}")
    for s in meta["skipped"]:
        print(f"skipped: {s}")
    for p in meta["problems"]:
        print(f"problem: {p}")
    out = Path(args.json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    say(f"results written to {out}")
    if not args.no_record:
        report.record(REPO / "docs" / "benchmarks.md", res, rows, args.note)
        say("run appended to docs/benchmarks.md")
    say(f"total {meta['total_seconds']:.0f} s")
    return 0


def run_all(args, res: dict, pg, pgbouncer_path: str | None) -> None:
    meta, runs = res["meta"], res["runs"]
    say("starting PostgreSQL")
    pg.start()
    meta["versions"]["postgresql"] = pg.psql("SHOW server_version")
    pgbench = pg.tool("pgbench")
    env = pg.env()
    # No SSL or GSS probe on any connection: the three targets would answer them differently.
    env.update(PGSSLMODE="disable", PGGSSENCMODE="disable")
    say(f"pgbench -i -s {args.scale}")
    r = subprocess.run([pgbench, "-i", "-q", "-s", str(args.scale), "-h", procs.HOST, "-p", str(pg.port),
                        "-U", "postgres", "postgres"], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{r.stderr}")
    pg.psql("VACUUM ANALYZE")

    ports = {"direct": pg.port}
    pids: dict[str, int | list[int]] = {}
    targets = ["direct"]
    if pgbouncer_path:
        say("starting PgBouncer")
        for name, processes in (("pgbouncer", 1), ("pgbouncer-2", 2)):
            bouncers = procs.start_pgbouncer(pgbouncer_path, pg.port, POOL_SIZE, MAX_CLIENTS, processes)
            try:
                for b in bouncers:
                    b.wait_ready()
                ports[name], pids[name] = bouncers[0].port, [b.pid for b in bouncers]
                targets.append(name)
            except RuntimeError as e:
                msg = f"PgBouncer ({processes} process(es)) did not start, its rows show n/a: {e}"
                say(msg)
                meta["skipped"].append(msg.splitlines()[0])
                for b in bouncers:
                    b.stop()
    say(f"starting unpinned ({args.workers} worker(s)), and unpinned with 1 for reference")
    proxy, info = procs.start_unpinned(REPO, pg.dsn(), POOL_SIZE, MAX_CLIENTS, workers=args.workers)
    proxy.wait_ready()
    _wait_workers(proxy, args.workers)
    ports["unpinned"], pids["unpinned"] = proxy.port, proxy.pid
    targets.append("unpinned")
    meta["unpinned_command"] = info["command"]
    meta["unpinned_workers"] = args.workers
    single = None
    if args.workers != 1:
        single, info1 = procs.start_unpinned(REPO, pg.dsn(), POOL_SIZE, MAX_CLIENTS, workers=1)
        single.wait_ready()
        ports["unpinned-1"], pids["unpinned-1"] = single.port, single.pid
        meta["unpinned_1_command"] = info1["command"]
    # The floor: -S simple through a byte pump (bench/pump.py), for the CPU row's comparison.
    pump = procs.start_pump(REPO, pg.port)
    pump.wait_ready()
    ports["pump"], pids["pump"] = pump.port, pump.pid
    reference = {"select_simple", "churn"}      # the scenarios the 1-worker reference runs
    workdir = procs.make_tempdir("unpinned-bench-work-")

    say("warm-up")
    for t in targets + (["unpinned-1"] if single else []):
        scenarios.run_pgbench(pgbench, env, ports[t], ["-S", "-n", "-c", "10", "-j", "2"], 1)
        scenarios.run_pgbench(pgbench, env, ports[t], ["-S", "-n", "-c", "10", "-j", "2", "-M", "extended"], 1)

    def note(scenario: str, target: str, out: dict) -> None:
        runs.setdefault(scenario, {}).setdefault(target, []).append(out)
        for e in out.get("errors", []):
            meta["problems"].append(f"{scenario} via {target}: {e}")

    pg_names = list(scenarios.PGBENCH)
    for rnd in range(args.rounds):
        for i, scenario in enumerate(pg_names):
            these = targets + (["unpinned-1"] if single and scenario in reference else []) \
                + (["pump"] if scenario == "select_simple" else [])
            for t in rotated(rnd, i, these):
                if scenario == "select_prepared" and t.startswith("pgbouncer"):
                    continue   # PgBouncer 1.18 cannot do protocol-level prepared statements in transaction mode
                if scenario == "latency":
                    out = scenarios.run_latency(pgbench, env, ports[t], args.duration, workdir, t)
                    extra = f"p50 {out.get('p50_us', 0):.0f} µs, p99 {out.get('p99_us', 0):.0f} µs"
                else:
                    cpu_pid = pids.get(t) if scenario == "select_simple" else None
                    out = scenarios.run_pgbench(pgbench, env, ports[t], scenarios.PGBENCH[scenario],
                                                args.duration, cpu_pid=cpu_pid)
                    extra = f"{out['tps'] or 0:,.0f} TPS"
                    if "proxy_cpu_us_per_txn" in out:
                        extra += f", proxy CPU {out['proxy_cpu_us_per_txn']:.1f} µs/txn"
                say(f"round {rnd + 1}/{args.rounds} {scenario:16} {t:11} {extra}"
                    + (f"  !! {out['errors'][0]}" if out["errors"] else ""))
                note(scenario, t, out)
            _check_alive(proxy, pids, meta)
        for j, kind in enumerate(scenarios.LARGE):
            for t in rotated(rnd, j, [t for t in targets if t != "pgbouncer-2"]):
                out = scenarios.run_large(ports[t], kind)
                say(f"round {rnd + 1}/{args.rounds} large_{kind:10} {t:10} {out['mb_per_s'] or 0:,.1f} MB/s"
                    + (f"  !! {out['errors'][0]}" if out["errors"] else ""))
                note(f"large_{kind}", t, out)

    for t in ("pgbouncer", "unpinned"):
        if t not in pids:
            continue
        say(f"{args.idle_clients:,} idle clients via {t}")
        out = scenarios.run_idle(ports[t], pids[t] if isinstance(pids[t], int) else pids[t][0], args.idle_clients)
        say(f"  {t}: RSS {out['rss_before_mb']:.1f} → {out['rss_after_mb']:.1f} MB, "
            f"{out['connected']:,} connected in {out['open_seconds']:.1f} s"
            + (f"  !! {out['errors'][0]}" if out["errors"] else ""))
        res["idle"][t] = out
        for e in out["errors"]:
            meta["problems"].append(f"idle clients via {t}: {e}")

    _check_alive(proxy, pids, meta)
    # What the proxy itself said: errors in its log, pins in its pin log (pgbench should cause none).
    try:
        log_lines = Path(proxy.log_path).read_text(errors="replace").splitlines()
    except OSError:
        log_lines = []
    bad = [ln for ln in log_lines if " ERROR " in ln or "Traceback" in ln or " CRITICAL " in ln]
    meta["unpinned_log_errors"] = len(bad)
    if bad:
        meta["problems"].append(f"unpinned logged {len(bad)} error line(s), first: {bad[0][:200]}")
    try:
        pins = sum(1 for _ in open(info["pin_log"]))
    except OSError:
        pins = 0
    meta["unpinned_pins_logged"] = pins
    if pins:
        meta["problems"].append(f"unpinned's pin log has {pins} entries (pgbench should pin nothing)")


def _wait_workers(proxy, n: int, timeout: float = 20.0) -> None:
    """Every worker listening (each logs a line), not just the first."""
    if n == 1:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path(proxy.log_path).read_text(errors="replace")
        if text.count(" listening on ") >= n:
            return
        time.sleep(0.1)
    raise RuntimeError(f"unpinned's {n} workers did not all start\n{proxy.log_tail()}")


def _check_alive(proxy, pids: dict, meta: dict) -> None:
    if not proxy.alive():
        raise RuntimeError(f"unpinned exited during the bench\n{proxy.log_tail()}")


if __name__ == "__main__":
    sys.exit(main())
