"""PostgreSQL's regression scripts, run directly and through the proxy, output diffed per script.

    python compat/run.py [NAME ...] [--pool-size N] [--sql-prepare carry|pin] [--out DIR] [--serial]
                         [--include-regress-so]

`make compat` runs every script of the schedule. The scripts come from PostgreSQL's
src/test/regress (shared/compat/pg_regress, see its README): found at ../shared relative to
the repository root, or wherever UNPINNED_PG_REGRESS (or --source) points.

They run the way pg_regress runs them (`psql -X -a -q`, its environment, a `regression`
database made like pg_regress makes it), each side on its own fresh embedded cluster: one
side connects directly, the other through `unpinned serve` in smart mode with a small pool.
Both outputs are compared script by script; a difference is accepted only when
compat/expected_differences.toml lists it (its exact changed lines, after that script's
normalisation rules), so any other change in the same script still fails. Exit status 1 when
some difference is not listed. Every process it starts is stopped when it ends.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXPECTED_FILE = HERE / "expected_differences.toml"
ENV_SOURCE = "UNPINNED_PG_REGRESS"
DEFAULT_POOL_SIZE = 3
SCRIPT_TIMEOUT = 600.0
CONTEXT_LINES = 5      # how far before a listed change its `context` text may be

# What pg_regress's temporary instance adds to postgresql.conf (pg_regress.c); the two
# clusters get the same, so prepared_xacts, for one, runs with two-phase commit enabled.
REGRESS_SETTINGS = {
    "log_autovacuum_min_duration": "0",
    "log_checkpoints": "on",
    "log_lock_waits": "on",
    "log_temp_files": "128kB",
    "max_prepared_transactions": "2",
}
# The `regression` database as pg_regress creates it.
DATABASE = "regression"
DATABASE_SETUP = [
    f'CREATE DATABASE "{DATABASE}" TEMPLATE=template0',
    f"ALTER DATABASE \"{DATABASE}\" SET lc_messages TO 'C'; "
    f"ALTER DATABASE \"{DATABASE}\" SET lc_monetary TO 'C'; "
    f"ALTER DATABASE \"{DATABASE}\" SET lc_numeric TO 'C'; "
    f"ALTER DATABASE \"{DATABASE}\" SET lc_time TO 'C'; "
    f"ALTER DATABASE \"{DATABASE}\" SET bytea_output TO 'hex'; "
    f"ALTER DATABASE \"{DATABASE}\" SET timezone_abbreviations TO 'Default'",
]

IDENTICAL, EXPECTED, BUG, UNEXPECTED = "identical", "expected (pooler)", "expected (bug, to fix)", "UNEXPECTED"


def say(msg: str) -> None:
    print(f"[compat {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- where things are

def find_source(given: str | None = None) -> Path | None:
    """The pg_regress folder (sql/, data/, parallel_schedule), or None when there is none."""
    explicit = given or os.environ.get(ENV_SOURCE)
    cand = Path(explicit) if explicit else REPO.parent / "shared" / "compat" / "pg_regress"
    if (cand / "parallel_schedule").is_file():
        return cand.resolve()
    if explicit:
        raise SystemExit(f"{explicit} has no parallel_schedule: not a pg_regress folder")
    return None


def schedule(source: Path) -> list[str]:
    """Script names in parallel_schedule order (each group run serially, as README allows)."""
    names: list[str] = []
    for line in (source / "parallel_schedule").read_text().splitlines():
        if line.startswith("test:"):
            names += line.split(":", 1)[1].split()
    return names


# --------------------------------------------------------------------------- expected differences

@dataclass
class Hunk:
    """One allowed change: these `direct` lines become these `proxy` lines, exactly, and
    (when `context` is given) that text is in one of the CONTEXT_LINES lines before it."""
    direct: tuple[str, ...]
    proxy: tuple[str, ...]
    bug: bool
    context: str = ""
    why: str = ""

    def allows(self, block: Block, direct_lines: list[str]) -> bool:
        if (block.direct, block.proxy) != (self.direct, self.proxy):
            return False
        before = direct_lines[max(0, block.at - CONTEXT_LINES):block.at]
        return not self.context or any(self.context in ln for ln in before)


@dataclass
class Block:
    """A changed place: lines `at`.. of the direct output replaced by `proxy` lines."""
    at: int
    direct: tuple[str, ...]
    proxy: tuple[str, ...]


@dataclass
class Rule:
    """A normalisation applied to both outputs before comparing: `pattern` -> `replace`
    on every line that matches `lines` (every line when `lines` is empty)."""
    pattern: re.Pattern
    replace: str
    lines: re.Pattern | None = None

    def apply(self, text: str) -> str:
        if self.lines is None:
            return self.pattern.sub(self.replace, text)
        return "\n".join(self.pattern.sub(self.replace, ln) if self.lines.search(ln) else ln
                         for ln in text.split("\n"))


@dataclass
class Listed:
    """One script's entry in expected_differences.toml."""
    name: str
    reason: str
    bug: bool = False
    intermittent: bool = False      # seen in some runs only: its absence says nothing
    normalise: list[Rule] = field(default_factory=list)
    hunks: list[Hunk] = field(default_factory=list)


@dataclass
class Expectations:
    skip: dict[str, str]            # script -> why it is not run
    scripts: dict[str, Listed]


def load_expectations(path: Path = EXPECTED_FILE) -> Expectations:
    raw = tomllib.loads(path.read_text())
    skip = {}
    for entry in raw.get("skip", []):
        for name in entry["scripts"]:
            skip[name] = entry["reason"]
    scripts = {}
    for name, e in raw.get("scripts", {}).items():
        unknown = set(e) - {"reason", "bug", "intermittent", "normalise", "hunks"}
        unknown |= {f"hunks.{k}" for h in e.get("hunks", []) for k in set(h) - {"direct", "proxy", "bug", "context", "why"}}
        if unknown or "reason" not in e:
            raise ValueError(f"{path}: [scripts.{name}] needs a reason and may have bug, intermittent, "
                             f"normalise, hunks (got {sorted(e)})")
        listed = Listed(name, e["reason"].strip(), bool(e.get("bug", False)), bool(e.get("intermittent", False)))
        for rule in e.get("normalise", []):
            lines = re.compile(rule["lines"]) if rule.get("lines") else None
            listed.normalise.append(Rule(re.compile(rule["pattern"]), rule["replace"], lines))
        for h in e.get("hunks", []):
            listed.hunks.append(Hunk(_lines(h.get("direct", "")), _lines(h.get("proxy", "")),
                                     bool(h.get("bug", listed.bug)), h.get("context", ""), h.get("why", "").strip()))
        if not listed.hunks and not listed.normalise:
            raise ValueError(f"{path}: [scripts.{name}] lists neither hunks nor normalise rules")
        scripts[name] = listed
    return Expectations(skip, scripts)


def _lines(text: str) -> tuple[str, ...]:
    return tuple(text.splitlines())


# --------------------------------------------------------------------------- comparing

@dataclass
class Result:
    name: str
    status: str = IDENTICAL
    direct_s: float = 0.0
    proxy_s: float = 0.0
    note: str = ""
    diff: str = ""
    direct_rc: int = 0     # psql's exit status on each side
    proxy_rc: int = 0


def change_blocks(a: list[str], b: list[str]) -> list[Block]:
    """The changed places between two outputs."""
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return [Block(i1, tuple(a[i1:i2]), tuple(b[j1:j2])) for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal"]


def unified(name: str, direct: str, proxy: str) -> str:
    return "".join(difflib.unified_diff(direct.splitlines(keepends=True), proxy.splitlines(keepends=True),
                                        f"direct/{name}.out", f"proxy/{name}.out", n=3))


def compare(name: str, direct: str, proxy: str, listed: Listed | None) -> tuple[str, str, str]:
    """(status, note, unified diff of the raw outputs)."""
    diff = unified(name, direct, proxy)
    if not diff:
        if listed is None:
            return IDENTICAL, "", ""
        return IDENTICAL, ("listed difference not seen this run (intermittent)" if listed.intermittent
                           else "listed difference not seen: fixed? then drop its entry"), ""
    if listed is None:
        return UNEXPECTED, "not listed", diff
    for rule in listed.normalise:
        direct, proxy = rule.apply(direct), rule.apply(proxy)
    lines = direct.splitlines()
    seen: list[Hunk] = []
    stray = 0
    for blk in change_blocks(lines, proxy.splitlines()):
        match = next((h for h in listed.hunks if h.allows(blk, lines)), None)
        if match is None:
            stray += 1
        else:
            seen.append(match)
    if stray:
        return UNEXPECTED, f"{stray} change(s) not listed; see {name}.diff", diff
    # Only normalisation rules at work (no listed hunk seen): the script's own flag decides.
    bug = any(h.bug for h in seen) if seen else listed.bug
    note = listed.reason.splitlines()[0]
    unseen = sum(all(h is not s for s in seen) for h in listed.hunks)
    if unseen:
        note += f"; {unseen} listed change(s) not seen"
    return (BUG if bug else EXPECTED), note, diff


# --------------------------------------------------------------------------- running

class Side:
    """One fresh cluster with a `regression` database, reached directly or through the proxy."""

    def __init__(self, label: str, work: Path, source: Path, pool_size: int | None, sql_prepare: str | None = None):
        self.label, self.work, self.source, self.pool_size = label, work, source, pool_size
        self.sql_prepare = sql_prepare     # the proxy's [pins] sql_prepare, None for its default
        self.pg = None
        self.proxy: subprocess.Popen | None = None
        self.port = 0
        self.out_dir = work / label
        # The writable folder scripts get as PG_ABS_BUILDDIR; the server (as `nobody` when
        # we are root) writes COPY ... TO files into its results/.
        self.builddir = Path(tempfile.mkdtemp(prefix=f"unpinned-compat-{label}-"))

    def start(self) -> None:
        from unpinned.dev.embedded import EmbeddedPostgres
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for old in self.out_dir.glob("*.out"):
            old.unlink()
        (self.builddir / "results").mkdir()
        for d in (self.builddir, self.builddir / "results"):
            os.chmod(d, 0o777)
        self.pg = EmbeddedPostgres(auth="trust", name=f"compat-{self.label}", settings=REGRESS_SETTINGS).start()
        for sql in DATABASE_SETUP:
            self.pg.psql(sql)
        self.port = self.pg.port
        if self.pool_size is not None:
            self._start_proxy()

    def _start_proxy(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        upstream = f"postgresql://{self.pg.superuser}@{self.pg.host}:{self.pg.port}/postgres"
        argv = [sys.executable, "-m", "unpinned.cli", "serve", "--listen", f"127.0.0.1:{port}",
                "--upstream", upstream, "--auth", "trust", "--mode", "smart",
                "--pool-size", str(self.pool_size), "--workers", "1"]
        if self.sql_prepare is not None:
            config = self.work / "proxy.toml"
            config.write_text(f'[pins]\nsql_prepare = "{self.sql_prepare}"\n')
            argv += ["--config", str(config)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "UNPINNED_"))}
        self.proxy_log = self.work / "proxy.log"
        with open(self.proxy_log, "wb") as log:
            self.proxy = subprocess.Popen(argv, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proxy.poll() is not None:
                raise RuntimeError(f"the proxy exited with {self.proxy.returncode}; see {self.proxy_log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                self.port = port
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the proxy did not listen on {port} within 30 s; see {self.proxy_log}")

    def env(self, name: str) -> dict[str, str]:
        """pg_regress's environment for one script."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PG", "LC_")) and k not in ("LANG", "LANGUAGE")}
        env.update(
            LANG="C", LC_MESSAGES="C",
            PGTZ="PST8PDT", PGDATESTYLE="Postgres, MDY", PGOPTIONS="-c intervalstyle=postgres_verbose",
            PGAPPNAME=f"pg_regress/{name}",
            PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER=self.pg.superuser,
            PG_ABS_SRCDIR=str(self.source), PG_ABS_BUILDDIR=str(self.builddir),
            PG_LIBDIR=str(Path(self.pg.tool("psql")).parent.parent / "lib"), PG_DLSUFFIX=".so",
        )
        return env

    def run(self, name: str) -> tuple[str, float, int]:
        out = self.out_dir / f"{name}.out"
        cmd = [self.pg.tool("psql"), "-X", "-a", "-q", "-d", DATABASE,
               "-v", "HIDE_TABLEAM=on", "-v", "HIDE_TOAST_COMPRESSION=on"]
        t0 = time.monotonic()
        with open(self.source / "sql" / f"{name}.sql", "rb") as stdin, open(out, "wb") as stdout:
            try:
                rc = subprocess.run(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.STDOUT, env=self.env(name),
                                    cwd=str(self.builddir), timeout=SCRIPT_TIMEOUT).returncode
            except subprocess.TimeoutExpired:
                rc = -1
                stdout.write(f"\n*** compat: psql killed after {SCRIPT_TIMEOUT:.0f} s ***\n".encode())
            if rc:
                # psql exits 0 after SQL errors; 2 means it lost or never had its connection.
                # Part of the output, so a side that failed where the other did not shows as a change.
                stdout.write(f"\n*** compat: psql exit status {rc} ***\n".encode())
        elapsed = time.monotonic() - t0
        text = out.read_bytes().decode("utf-8", errors="replace")
        # The two sides write into different folders; nothing else about them may differ.
        text = text.replace(str(self.builddir), "@abs_builddir@").replace(str(self.source), "@abs_srcdir@")
        out.write_text(text)
        return text, elapsed, rc

    def stop(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(15)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        self.proxy = None
        if self.pg is not None:
            self.pg.stop()
            self.pg = None
        shutil.rmtree(self.builddir, ignore_errors=True)


def run(names: list[str], source: Path, out: Path, pool_size: int, expectations: Expectations,
        serial: bool = False, progress=say, sql_prepare: str | None = None) -> list[Result]:
    """Run `names` on both sides and compare; writes outputs and diffs under `out`."""
    progress = progress or (lambda msg: None)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.diff"):
        old.unlink()
    direct, proxy = Side("direct", out, source, None), Side("proxy", out, source, pool_size, sql_prepare)
    outputs: dict[str, dict[str, tuple[str, float, int]]] = {"direct": {}, "proxy": {}}
    errors: list[BaseException] = []

    def drive(side: Side) -> None:
        try:
            for i, name in enumerate(names, 1):
                outputs[side.label][name] = side.run(name)
                if side.label == "proxy" and (i % 25 == 0 or i == len(names)):
                    progress(f"{i}/{len(names)} scripts through the proxy")
        except Exception as e:  # re-raised in the caller's thread
            errors.append(e)

    try:
        progress(f"two fresh clusters; proxy in smart mode, pool of {pool_size}"
                 + (f", sql_prepare = {sql_prepare}" if sql_prepare else ""))
        direct.start()
        proxy.start()
        if serial:
            drive(direct)
            drive(proxy)
        else:
            # Daemon: on Ctrl-C the clusters are stopped under it and it must not hold the exit.
            t = threading.Thread(target=drive, args=(direct,), name="compat-direct", daemon=True)
            t.start()
            drive(proxy)
            t.join()
        if errors:
            raise errors[0]
    finally:
        proxy.stop()
        direct.stop()

    results = []
    for name in names:
        (d_text, d_s, d_rc), (p_text, p_s, p_rc) = outputs["direct"][name], outputs["proxy"][name]
        status, note, diff = compare(name, d_text, p_text, expectations.scripts.get(name))
        r = Result(name, status, d_s, p_s, note, diff, d_rc, p_rc)
        if diff:
            (out / f"{name}.diff").write_text(diff)
        results.append(r)
    return results


def print_table(results: list[Result], skipped: dict[str, str], all_rows: bool = True) -> None:
    w = max([len(r.name) for r in results] + [6])
    print(f"\n{'script':<{w}}  {'direct':>7}  {'proxy':>7}  status")
    for r in results:
        if all_rows or r.status != IDENTICAL or r.note:
            note = f"  ({r.note})" if r.note else ""
            print(f"{r.name:<{w}}  {r.direct_s:6.2f}s  {r.proxy_s:6.2f}s  {r.status}{note}")
    for name, why in skipped.items():
        print(f"{name:<{w}}  {'-':>7}  {'-':>7}  skipped ({why})")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scripts", nargs="*", help="scripts to run, in this order [the whole schedule]; "
                                              "test_setup is added first unless --no-setup")
    p.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE, help=f"proxy pool size [{DEFAULT_POOL_SIZE}]")
    p.add_argument("--out", default=str(REPO / "compat-results"),
                   help="folder for each side's outputs and the per-script diffs [compat-results]")
    p.add_argument("--source", help=f"the pg_regress folder [${ENV_SOURCE} or ../shared/compat/pg_regress]")
    p.add_argument("--sql-prepare", choices=("carry", "pin"),
                   help="the proxy's [pins] sql_prepare: carry or pin SQL PREPARE [the proxy's default]")
    p.add_argument("--serial", action="store_true", help="run the direct side, then the proxy side (default: both at once)")
    p.add_argument("--no-setup", action="store_true", help="do not put test_setup first")
    p.add_argument("--include-regress-so", action="store_true",
                   help="also run the scripts that need regress.so (they fail the same way on both sides)")
    p.add_argument("--only-differences", action="store_true", help="leave identical scripts out of the table")
    p.add_argument("--expected", default=str(EXPECTED_FILE), help="the list of accepted differences "
                                                                    "[compat/expected_differences.toml]")
    a = p.parse_args(argv)
    if a.pool_size < 1:
        p.error("--pool-size must be at least 1")
    source = find_source(a.source)
    if source is None:
        p.error(f"no pg_regress folder: set ${ENV_SOURCE} or --source (looked in {REPO.parent / 'shared'})")
    expectations = load_expectations(Path(a.expected))
    known = schedule(source)
    names = a.scripts or known
    missing = [n for n in names if not (source / "sql" / f"{n}.sql").is_file()]
    if missing:
        p.error(f"no such script: {', '.join(missing)}")
    if not a.no_setup and "test_setup" not in names:
        names = ["test_setup", *names]
    skipped = {} if a.include_regress_so else {n: expectations.skip[n] for n in names if n in expectations.skip}
    names = [n for n in names if n not in skipped]

    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    try:
        results = run(names, source, Path(a.out), a.pool_size, expectations, serial=a.serial,
                      sql_prepare=a.sql_prepare)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    total = time.monotonic() - t0
    print_table(results, skipped, all_rows=not a.only_differences)
    counts = {s: sum(r.status == s for r in results) for s in (IDENTICAL, EXPECTED, BUG, UNEXPECTED)}
    print(f"\n{len(results)} scripts in {total:.0f} s (direct {sum(r.direct_s for r in results):.0f} s, "
          f"proxy {sum(r.proxy_s for r in results):.0f} s): "
          + ", ".join(f"{v} {k}" for k, v in counts.items()) + f", {len(skipped)} skipped")
    print(f"outputs and diffs in {a.out}")
    return 1 if counts[UNEXPECTED] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
