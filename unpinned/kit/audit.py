"""`unpinned audit`: find pin causes in PostgreSQL logs or a pg_stat_statements export.

The seed's team found asyncpg's JIT toggle only after turning on
`log_statement = 'all'` and reading the log by hand. This module does that
reading: it streams the log, pulls every statement the server logged, classifies
it with the proxy's own classifier (`classifier.classify`) and aggregates the pin
reasons RDS Proxy would give (`policy.rds_reasons`) and the ones smart mode would
still have (`policy.static_smart_reasons`), by (mode, reason, fingerprint).

Inputs, one format per file (detected from the first line unless forced):

- ``stderr``: the plain server log, with any ``log_line_prefix``. Statements come
  from ``LOG:  statement: ...``, ``LOG:  execute <name>: ...`` and the
  ``duration: ... ms  statement|execute`` forms of log_min_duration_statement;
  ``parse``/``bind`` lines are skipped so nothing is counted twice.
- ``csvlog`` and ``jsonlog`` (``log_destination``).
- ``pgss``: a CSV export of pg_stat_statements with ``query`` and ``calls``
  columns; each query counts ``calls`` times.

Files may be gzip-compressed. Everything is streamed line by line; memory holds
the aggregates (capped, see MAX_GROUPS) and one statement at a time.

The readers are in audit_logs.py; this module aggregates, runs and renders.
"""
from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table
from rich.text import Text

from unpinned.kit.audit_logs import (
    FORMATS,
    MAX_STATEMENT_CHARS,
    AuditError,
    LogSource,
    ParseStats,
    Statement,
    csvlog_statements,
    detect_format,
    jsonlog_statements,
    pgss_statements,
    prefix_regex,
    stderr_statements,
)
from unpinned.sql.classifier import classify, digest, fingerprint
from unpinned.state.policy import PolicyOptions, describe, rds_reasons, static_smart_reasons

__all__ = [
    "FORMATS", "MODES", "AuditError", "Statement", "Audit", "LogSource",
    "prefix_regex", "stderr_statements", "csvlog_statements", "jsonlog_statements",
    "pgss_statements", "detect_format", "run_audit",
    "render_json", "render_markdown", "render_table",
]

MODES = ("rds", "smart")

# Distinct (mode, reason, fingerprint) groups kept; later new fingerprints go to
# one "other" group per reason, so a log of endless distinct statements stays bounded.
MAX_GROUPS = 5000
# Users / databases / application names remembered per group.
SEEN_CAP = 5
OTHER_FINGERPRINT = "*"


# --------------------------------------------------------------------------- aggregation

@dataclass(slots=True)
class Group:
    """Statements of one fingerprint that pin for one reason in one mode."""
    mode: str
    reason: str
    fingerprint: str
    digest: str
    sample: Statement
    count: int = 0
    users: list[str] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)
    applications: list[str] = field(default_factory=list)
    capped: set[str] = field(default_factory=set)
    first_seen: str | None = None
    last_seen: str | None = None

    def add(self, st: Statement) -> None:
        self.count += st.weight
        for attr, value in (("users", st.user), ("databases", st.database), ("applications", st.application)):
            if value is None:
                continue
            seen = getattr(self, attr)
            if value not in seen:
                if len(seen) < SEEN_CAP:
                    seen.append(value)
                else:
                    self.capped.add(attr)
        ts = st.timestamp
        if ts is not None:
            # Same-format timestamps from one server compare correctly as strings.
            if self.first_seen is None or ts < self.first_seen:
                self.first_seen = ts
            if self.last_seen is None or ts > self.last_seen:
                self.last_seen = ts


@dataclass
class FileSummary:
    path: str
    format: str
    lines: int = 0
    statements: int = 0
    entries: int = 0
    compressed: bool = False
    warnings: list[str] = field(default_factory=list)


class Audit:
    """Classifies statements and aggregates pin reasons per (mode, reason, fingerprint)."""

    def __init__(self, opts: PolicyOptions | None = None, *, max_groups: int = MAX_GROUPS):
        self.opts = opts or PolicyOptions()
        self.max_groups = max_groups
        self.files: list[FileSummary] = []
        self.lines = 0
        self.statements = 0             # weighted (pg_stat_statements calls)
        self.entries = 0                # log entries / export rows
        self.pinning = {m: 0 for m in MODES}
        self.groups: dict[tuple[str, str, str], Group] = {}
        self.warnings: list[str] = []
        self._policies = (("rds", rds_reasons), ("smart", static_smart_reasons))

    def add(self, st: Statement) -> None:
        self.statements += st.weight
        self.entries += 1
        c = classify(st.text)
        fp: str | None = None
        for mode, policy in self._policies:
            reasons = policy(c, self.opts)
            if not reasons:
                continue
            self.pinning[mode] += st.weight
            if fp is None:
                fp = fingerprint(c)
                st.fill()
            for r in reasons:
                key = (mode, str(r), fp)
                g = self.groups.get(key)
                if g is None:
                    if len(self.groups) >= self.max_groups:
                        key = (mode, str(r), OTHER_FINGERPRINT)
                        g = self.groups.get(key)
                    if g is None:
                        other = key[2] == OTHER_FINGERPRINT
                        g = Group(mode=mode, reason=str(r), fingerprint=key[2],
                                  digest="(further fingerprints, group limit reached)" if other else digest(c),
                                  sample=st)
                        self.groups[key] = g
                g.add(st)

    def add_file(self, source: LogSource, fmt: str | None = None, *, prefix: str | None = None,
                 on_progress: Callable[[], None] | None = None) -> FileSummary:
        """Read one source to the end. fmt None: detect from the first line."""
        lines = source.iter_lines(on_progress)
        first = next(lines, None)
        if fmt is None:
            fmt = detect_format(first or "", source.path)
        if first is not None:
            lines = _chain_first(first, lines)
        summary = FileSummary(path=source.path, format=fmt, compressed=source.compressed)
        stats = ParseStats()
        name = source.path
        if fmt == "stderr":
            gen = stderr_statements(lines, prefix, file=name, stats=stats, lazy_fields=True)
        elif fmt == "csvlog":
            gen = csvlog_statements(lines, file=name, stats=stats)
        elif fmt == "jsonlog":
            gen = jsonlog_statements(lines, file=name, stats=stats)
        elif fmt == "pgss":
            gen = pgss_statements(lines, file=name, stats=stats)
        else:
            raise AuditError(f"unknown input format {fmt!r} (one of {', '.join(FORMATS)})")
        before_s, before_e = self.statements, self.entries
        for st in gen:
            self.add(st)
        summary.lines = source.lines
        summary.statements = self.statements - before_s
        summary.entries = self.entries - before_e
        if source.error:
            summary.warnings.append(source.error)
        if stats.truncated:
            summary.warnings.append(f"{stats.truncated} statement(s) longer than {MAX_STATEMENT_CHARS} "
                                    "characters were cut (classified on the cut text)")
        if stats.bad_records:
            summary.warnings.append(f"{stats.bad_records} record(s) could not be read as {fmt}")
        if fmt == "stderr" and prefix is not None and summary.lines and not stats.messages:
            summary.warnings.append("no line matched --log-line-prefix; check it against the server's setting")
        self.lines += summary.lines
        self.files.append(summary)
        self.warnings.extend(summary.warnings)
        return summary

    # -- report --------------------------------------------------------------

    def report(self, modes: Iterable[str] = MODES, top: int | None = None) -> dict[str, Any]:
        """Everything as plain data (what --format json prints)."""
        total = self.statements
        out: dict[str, Any] = {
            "files": [{"path": f.path, "format": f.format, "compressed": f.compressed, "lines": f.lines,
                       "entries": f.entries, "statements": f.statements, "warnings": f.warnings}
                      for f in self.files],
            "lines": self.lines,
            "entries": self.entries,
            "statements": total,
            "pinning": dict(self.pinning),
            "options": {"set_local_pins": self.opts.set_local_pins, "sequences": self.opts.sequences},
            "warnings": list(self.warnings),
            "modes": {},
        }
        if not self.entries:
            out["warnings"].append("no statements found: the server logs them with log_statement = 'all' "
                                   "(or log_min_duration_statement = 0)")
        for mode in modes:
            groups = sorted((g for g in self.groups.values() if g.mode == mode),
                            key=lambda g: (-g.count, g.reason, g.digest))
            by_reason: dict[str, dict[str, Any]] = {}
            for g in groups:
                r = by_reason.setdefault(g.reason, {"reason": g.reason, "description": describe(g.reason),
                                                    "count": 0, "fingerprints": 0})
                r["count"] += g.count
                r["fingerprints"] += 1
            shown = groups if top is None else groups[:top]
            out["modes"][mode] = {
                "pinning_statements": self.pinning[mode],
                "share": _share(self.pinning[mode], total),
                "reasons": sorted(by_reason.values(), key=lambda r: (-r["count"], r["reason"])),
                "groups": [_group_dict(g, total) for g in shown],
                "groups_total": len(groups),
            }
        return out


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _share(n: int, total: int) -> float:
    return round(n / total, 6) if total else 0.0


def _group_dict(g: Group, total: int) -> dict[str, Any]:
    s = g.sample
    return {
        "reason": g.reason,
        "description": describe(g.reason),
        "count": g.count,
        "share": _share(g.count, total),
        "fingerprint": g.fingerprint,
        "digest": g.digest,
        "sample": {"text": s.text, "parameters": s.parameters, "prepared_name": s.name,
                   "user": s.user, "database": s.database, "application": s.application,
                   "timestamp": s.timestamp, "file": s.file, "line": s.line, "truncated": s.truncated},
        "users": list(g.users),
        "databases": list(g.databases),
        "applications": list(g.applications),
        "capped": sorted(g.capped),
        "first_seen": g.first_seen,
        "last_seen": g.last_seen,
    }


# --------------------------------------------------------------------------- running

def run_audit(paths: list[str], *, input_format: str | None = None, prefix: str | None = None,
              opts: PolicyOptions | None = None, progress: bool = False) -> Audit:
    """Read every file into one Audit. Raises AuditError for an unreadable file, before reading any."""
    if input_format is not None and input_format not in FORMATS:
        raise AuditError(f"unknown input format {input_format!r} (one of {', '.join(FORMATS)})")
    if paths.count("-") > 1:
        raise AuditError("'-' (stdin) can be given once")
    sources: list[LogSource] = []
    try:
        for p in paths:
            sources.append(LogSource(p))
    except AuditError:
        for s in sources:
            s.close()
        raise
    audit = Audit(opts)
    try:
        if progress:
            _run_with_progress(audit, sources, input_format, prefix)
        else:
            for s in sources:
                audit.add_file(s, input_format, prefix=prefix)
    finally:
        for s in sources:
            s.close()
    return audit


def _run_with_progress(audit: Audit, sources: list[LogSource], fmt: str | None, prefix: str | None) -> None:

    sizes = [s.size for s in sources]
    total = None if any(x is None for x in sizes) else sum(sizes)  # type: ignore[arg-type]
    columns = (TextColumn("[bold]audit[/bold] {task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=total)
        done = 0
        for s in sources:
            base = done

            def update(s: LogSource = s, base: int = base) -> None:
                bar.update(task, completed=base + s.position(), description=os.path.basename(s.path))
            audit.add_file(s, fmt, prefix=prefix, on_progress=update)
            done = base + (s.size if s.size is not None else s.position())


# --------------------------------------------------------------------------- rendering

def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)


def _one_line(s: str, limit: int) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x >= 0.001 or x == 0 else "<0.1%"


def _header_line(report: dict[str, Any]) -> str:
    files = ", ".join(f"{f['path']} ({f['format']}{', gzip' if f['compressed'] else ''})" for f in report["files"])
    total = report["statements"]
    p = report["pinning"]
    return (f"files: {files}; lines read: {report['lines']}; statements classified: {total}; "
            f"pin under rds: {p['rds']} ({_pct(_share(p['rds'], total))}); "
            f"pin under smart: {p['smart']} ({_pct(_share(p['smart'], total))})")


def _seen(g: dict[str, Any]) -> str:
    users, dbs, apps = g["users"], g["databases"], g["applications"]
    parts = []
    if users or dbs:
        parts.append(", ".join(users) + ("…" if "users" in g["capped"] else "") + "@" +
                     ", ".join(dbs) + ("…" if "databases" in g["capped"] else ""))
    if apps:
        parts.append(", ".join(apps) + ("…" if "applications" in g["capped"] else ""))
    return " ".join(parts)


def render_table(report: dict[str, Any], console: Any = None, top: int = 20) -> None:
    """Rich tables on the console (stdout by default), one per mode."""

    console = console or Console()
    console.print(Text(_header_line(report)))
    for w in report["warnings"]:
        console.print(Text("warning: " + w, style="yellow"))
    for mode, data in report["modes"].items():
        n = data["pinning_statements"]
        if not n:
            console.print(Text(f"{mode}: no statement pins", style="bold green"))
            continue
        console.print(Text(f"{mode}: {n} statement(s) pin ({_pct(data['share'])}): " +
                           ", ".join(f"{r['reason']} {r['count']}" for r in data["reasons"]), style="bold red"))
        t = Table(show_lines=False, expand=False)
        t.add_column("reason", no_wrap=True)
        t.add_column("count", justify="right")
        t.add_column("share", justify="right")
        t.add_column("digest", overflow="fold", ratio=2)
        t.add_column("sample", overflow="fold", ratio=3)
        # Who ran it only fits a wide terminal; JSON and Markdown always have it.
        wide = console.width >= 120
        if wide:
            t.add_column("seen as", overflow="fold", ratio=1)
        for g in data["groups"][:top]:
            sample = g["sample"]["text"]
            if g["sample"]["parameters"]:
                sample += "  -- " + g["sample"]["parameters"]
            row = [Text(g["reason"]), str(g["count"]), _pct(g["share"]), Text(_one_line(g["digest"], 80)),
                   Text(_one_line(sample, 100))]
            t.add_row(*row, *([Text(_seen(g))] if wide else []))
        console.print(t)
        hidden = data["groups_total"] - min(top, len(data["groups"]))
        if hidden > 0:
            console.print(Text(f"  … {hidden} more group(s); --top N or --format json shows them"))
        for r in data["reasons"]:
            console.print(Text(f"  {r['reason']}: {r['description']}", style="dim"))


def _md_cell(s: str) -> str:
    # GFM: a pipe ends the cell even inside code, unless escaped; backslashes in code stay literal.
    s = s.replace("|", "\\|")
    if not s:
        return ""
    fence = "``" if "`" in s else "`"
    return f"{fence} {s} {fence}" if fence == "``" else f"`{s}`"


def render_markdown(report: dict[str, Any], top: int = 20, sample_chars: int = 4000) -> str:
    """A Markdown report (for an issue or a pull request); samples longer than sample_chars are cut."""
    out = ["# unpinned audit", "", _header_line(report), ""]
    for w in report["warnings"]:
        out.append(f"> warning: {w}")
    if report["warnings"]:
        out.append("")
    for mode, data in report["modes"].items():
        n = data["pinning_statements"]
        out.append(f"## {mode}: " + (f"{n} statement(s) pin ({_pct(data['share'])})" if n else "no statement pins"))
        out.append("")
        if not n:
            continue
        out += ["| reason | statements | fingerprints | why |", "|---|---:|---:|---|"]
        for r in data["reasons"]:
            out.append(f"| {r['reason']} | {r['count']} | {r['fingerprints']} | {r['description']} |")
        out += ["", "| # | reason | count | share | digest | seen as |", "|---:|---|---:|---:|---|---|"]
        groups = data["groups"][:top]
        for i, g in enumerate(groups, 1):
            out.append(f"| {i} | {g['reason']} | {g['count']} | {_pct(g['share'])} | "
                       f"{_md_cell(_one_line(g['digest'], 120))} | {_md_cell(_seen(g))} |")
        hidden = data["groups_total"] - len(groups)
        if hidden > 0:
            out.append(f"\n_{hidden} more group(s) not shown; `--top N` or `--format json` lists them._")
        out.append("")
        for i, g in enumerate(groups, 1):
            s = g["sample"]
            # Display only: drivers indent their SQL inside source code.
            text = textwrap.dedent(s["text"]).strip("\n").rstrip()
            cut = len(text) > sample_chars
            if cut:
                text = text[:sample_chars]
            ticks = max((len(m) for m in re.findall(r"`+", text)), default=0)
            fence = "`" * max(3, ticks + 1)
            where = f"{s['file']}:{s['line']}" if s["file"] else ""
            out.append(f"### {mode} #{i}: {g['reason']} ({g['count']}x, fingerprint {g['fingerprint']})")
            out.append("")
            if where:
                out.append(f"First seen at `{where}`" + (f", {s['timestamp']}" if s["timestamp"] else "") + ".")
                out.append("")
            out += [fence + "sql", text, fence]
            if cut:
                out.append(f"_(sample cut at {sample_chars} of {len(s['text'])} characters; "
                           "`--format json` has it in full)_")
            if s["parameters"]:
                out.append(f"\nParameters: {_md_cell(s['parameters'])}")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def exit_status(report: dict[str, Any]) -> int:
    """0 when nothing pins in the reported mode(s), 1 when something does."""
    return 1 if any(d["pinning_statements"] for d in report["modes"].values()) else 0

