"""The log readers of `unpinned audit`: statements, one at a time, out of PostgreSQL's logs
(stderr with any log_line_prefix, csvlog, jsonlog) or a pg_stat_statements CSV export, from
plain or gzip-compressed files or stdin. The aggregation and the report are in audit.py."""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

FORMATS = ("stderr", "csvlog", "jsonlog", "pgss")

# One logged statement may legitimately be megabytes (huge IN lists, bulk
# INSERTs); beyond this it is cut, so a wrong --log-line-prefix (every line then
# looks like a continuation) cannot pull the whole file into memory.
MAX_STATEMENT_CHARS = 64 * 1024 * 1024
_PROGRESS_EVERY = 4096      # lines between progress updates


class AuditError(Exception):
    """A usage problem (unreadable file, bad option): the CLI exits 2 with the message."""


@dataclass(slots=True)
class Statement:
    """One statement as the server logged it, with what the log says about who ran it."""
    text: str
    weight: int = 1                    # pg_stat_statements calls; 1 for log lines
    user: str | None = None
    database: str | None = None
    application: str | None = None
    timestamp: str | None = None
    parameters: str | None = None      # the DETAIL "Parameters: $1 = '...'" text, for display
    name: str | None = None            # prepared statement name of an `execute` line
    file: str = ""
    line: int = 0                      # first physical line of the entry in its file
    truncated: bool = False            # cut at MAX_STATEMENT_CHARS
    # stderr logs: the prefix match, read into the fields above by fill() only when
    # needed (a pinning statement); most statements never need it.
    pending: tuple[re.Match, bool] | None = None

    def fill(self) -> Statement:
        if self.pending is not None:
            m, guessed = self.pending
            self.pending = None
            for k, v in _fields(m, guessed).items():
                setattr(self, k, v)
        return self


def _clean(v: Any) -> str | None:
    """Log field value, with PostgreSQL's '[unknown]' and empty both meaning unknown."""
    if v is None:
        return None
    v = str(v).strip()
    return None if not v or v == "[unknown]" else v


# --------------------------------------------------------------------------- messages

# Severity words as the server writes them (untranslated, lc_messages=C/en).
_LEVELS = r"DEBUG[1-5]?|INFO|NOTICE|WARNING|ERROR|LOG|FATAL|PANIC|DETAIL|HINT|QUERY|CONTEXT|LOCATION|STATEMENT"

# The part of a message that names a statement. `execute fetch from` is a later
# Execute on an already counted portal; parse/bind (log_min_duration_statement,
# debug) are the same statement as its execute and are not matched.
_STMT = re.compile(r"(?:duration: \d+(?:\.\d+)? ms  )?(?:statement: |execute (?!fetch from )(?P<name>.+?): )")
_PARAMS = re.compile(r"parameters: ", re.I)


def _statement_start(msg: str) -> tuple[str | None, int] | None:
    """(prepared statement name or None, offset of the SQL) if msg logs a statement."""
    m = _STMT.match(msg)
    if m is None:
        return None
    return m.group("name"), m.end()


# --------------------------------------------------------------------------- log_line_prefix

_TS = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}"
_TZ = r"(?: [A-Za-z0-9+\-]+)?"
# Regex for each escape's value (PostgreSQL 17, log_line_prefix docs); text values
# are lazy so the literal text after them (and the severity) decides where they end.
_ESCAPES: dict[str, tuple[str, str | None]] = {
    "a": (r".*?", "application"),
    "u": (r".*?", "user"),
    "d": (r".*?", "database"),
    "r": (r".*?", None),
    "h": (r".*?", None),
    "b": (r".*?", None),
    "i": (r".*?", None),
    "p": (r"\d*", "pid"),
    "P": (r"\d*", None),
    "l": (r"\d*", None),
    "x": (r"\d*", None),
    "v": (r"[0-9/\-]*", None),
    "c": (r"[0-9a-f]*\.?[0-9a-f]*", None),
    "e": (r"[0-9A-Z]{5}", None),
    "Q": (r"-?\d*", None),
    "m": (_TS + r"\.\d+" + _TZ, "timestamp"),
    "t": (_TS + _TZ, "timestamp"),
    "s": (_TS + _TZ, None),
    "n": (r"\d+(?:\.\d+)?", "timestamp"),
}


def prefix_regex(prefix: str) -> str:
    """A regex (source) matching what the server writes for a log_line_prefix.

    Named groups: user, database, application, timestamp, pid (the first escape
    of each kind). `%q` makes the rest optional: the server stops there for
    processes without a session. Padding (`%-10u`, `%5p`) is allowed; unknown
    escapes print nothing, as in the server.
    """
    head: list[str] = []
    tail: list[str] | None = None
    out = head
    used: set[str] = set()
    i, n = 0, len(prefix)
    while i < n:
        ch = prefix[i]
        i += 1
        if ch != "%":
            out.append(re.escape(ch))
            continue
        j = i
        while j < n and (prefix[j] == "-" or prefix[j].isdigit()):
            j += 1
        padded = j > i
        if j >= n:
            break                               # a lone trailing % prints nothing
        esc, i = prefix[j], j + 1
        if esc == "%":
            out.append("%")
        elif esc == "q":
            if tail is None:
                tail = out = []
        elif esc in _ESCAPES:
            pat, group = _ESCAPES[esc]
            if group and group not in used:
                used.add(group)
                pat = f"(?P<{group}>{pat})"
            else:
                pat = f"(?:{pat})"
            out.append(rf" *{pat} *" if padded else pat)
    src = "".join(head)
    if tail is not None:
        src += "(?:" + "".join(tail) + ")?"
    return src


def _line_matcher(prefix: str | None) -> Callable[[str], re.Match | None]:
    if prefix is None:
        # No prefix given: the severity marker after whatever comes first.
        return re.compile(rf"(?P<prefix>.*?)(?<![A-Za-z0-9_])(?P<level>{_LEVELS}):  (?P<msg>.*)").match
    return re.compile(rf"{prefix_regex(prefix)}(?P<level>{_LEVELS}):  (?P<msg>.*)").match


# Best effort fields from an unknown prefix: `user@db` and a leading timestamp
# (what the common prefixes, RDS's '%t:%r:%u@%d:[%p]:' included, contain).
_GUESS_USER_DB = re.compile(r"(?:^|[\s:\[(])([^\s@:\[\]()/]+)@([^\s@:/\[\]()]+)")
_GUESS_TS = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?: ?[A-Z]{2,5}\b| ?[+-]\d{2}(?::?\d{2})?)?")


def _fields(m: re.Match, guessed: bool) -> dict[str, str | None]:
    if guessed:
        pre = m.group("prefix")
        out: dict[str, str | None] = {}
        um = _GUESS_USER_DB.search(pre)
        if um:
            out["user"], out["database"] = _clean(um.group(1)), _clean(um.group(2))
        tm = _GUESS_TS.search(pre)
        if tm:
            out["timestamp"] = tm.group(0)
        return out
    d = m.groupdict()
    return {k: _clean(d.get(k)) for k in ("user", "database", "application", "timestamp")}


# --------------------------------------------------------------------------- parsers

@dataclass
class ParseStats:
    """What a parser noticed besides statements, for warnings in the report."""
    messages: int = 0           # lines that started a log message
    truncated: int = 0          # statements cut at MAX_STATEMENT_CHARS
    bad_records: int = 0        # CSV/JSON records that could not be read


def _strip_eol(line: str) -> str:
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    return line


def stderr_statements(lines: Iterable[str], prefix: str | None = None, *, file: str = "",
                      stats: ParseStats | None = None, lazy_fields: bool = False) -> Iterator[Statement]:
    """Statements from a stderr-format log (any log_line_prefix).

    A message is a line that matches prefix + severity; the server writes a
    message's further lines with a leading tab (stripped here: it is not part of
    the SQL). With `prefix` given, any non-matching line continues the message,
    as the docs describe; without it the prefix is skipped up to the severity
    marker. A `DETAIL:  Parameters: ...` right after an `execute` is attached to it.
    With lazy_fields, user/database/application/timestamp wait for Statement.fill().
    """
    stats = stats if stats is not None else ParseStats()
    match = _line_matcher(prefix)
    guessed = prefix is None
    stmt: Statement | None = None       # statement seen; emitted at the next message (DETAIL may follow)
    parts: list[str] = []               # lines of the message being read, when kept
    size = 0
    target: str | None = None           # what continuation lines belong to: "stmt" | "detail" | None

    for lineno, line in enumerate(lines, 1):
        line = _strip_eol(line)
        if line.startswith("\t"):
            m = None
            line = line[1:]
        else:
            m = match(line)
        if m is None:
            if target is not None:
                if size + len(line) + 1 > MAX_STATEMENT_CHARS:
                    if target == "stmt" and stmt is not None and not stmt.truncated:
                        stmt.truncated = True
                        stats.truncated += 1
                    continue
                parts.append(line)
                size += len(line) + 1
            continue
        stats.messages += 1
        # A new message: the previous one is complete.
        if target == "stmt" and stmt is not None:
            stmt.text = "\n".join(parts)
        elif target == "detail" and stmt is not None:
            stmt.parameters = "\n".join(parts)
            yield stmt
            stmt = None
        target, parts, size = None, [], 0
        level, msg = m.group("level"), m.group("msg")
        if level == "DETAIL" and stmt is not None:
            pm = _PARAMS.match(msg)
            if pm:
                target, parts, size = "detail", [msg[pm.end():]], len(msg)
                continue
        if stmt is not None:
            yield stmt
            stmt = None
        if level == "LOG":
            start = _statement_start(msg)
            if start is not None:
                name, off = start
                stmt = Statement(text="", name=name, file=file, line=lineno, pending=(m, guessed))
                if not lazy_fields:
                    stmt.fill()
                target, parts, size = "stmt", [msg[off:]], len(msg)
    if target == "stmt" and stmt is not None:
        stmt.text = "\n".join(parts)
    elif target == "detail" and stmt is not None:
        stmt.parameters = "\n".join(parts)
    if stmt is not None:
        yield stmt


# csvlog columns (1-based in the PostgreSQL 17 docs): 1 log_time, 2 user_name,
# 3 database_name, 12 error_severity, 14 message, 15 detail, 23 application_name.
_CSV_TIME, _CSV_USER, _CSV_DB, _CSV_SEVERITY, _CSV_MESSAGE, _CSV_DETAIL, _CSV_APP = 0, 1, 2, 11, 13, 14, 22


def _set_csv_limit() -> None:
    # The default 128 KB field limit is below real statements; the cap also keeps
    # one unterminated quote from reading the rest of the file into a field.
    csv.field_size_limit(MAX_STATEMENT_CHARS)


class _LineCounter:
    """Wraps an iterable of lines for csv.reader and remembers the current line number."""
    __slots__ = ("it", "n")

    def __init__(self, lines: Iterable[str]):
        self.it, self.n = iter(lines), 0

    def __iter__(self) -> _LineCounter:
        return self

    def __next__(self) -> str:
        line = next(self.it)
        self.n += 1
        return line


def _csv_rows(lines: Iterable[str], stats: ParseStats) -> Iterator[tuple[int, list[str]]]:
    _set_csv_limit()
    counter = _LineCounter(lines)
    reader = csv.reader(counter)
    while True:
        start = counter.n + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            stats.bad_records += 1
            continue
        yield start, row


def csvlog_statements(lines: Iterable[str], *, file: str = "", stats: ParseStats | None = None) -> Iterator[Statement]:
    """Statements from a csvlog file (log_destination = 'csvlog')."""
    stats = stats if stats is not None else ParseStats()
    for lineno, row in _csv_rows(lines, stats):
        if len(row) <= _CSV_MESSAGE:
            stats.bad_records += 1
            continue
        stats.messages += 1
        if row[_CSV_SEVERITY] != "LOG":
            continue
        msg = row[_CSV_MESSAGE]
        start = _statement_start(msg)
        if start is None:
            continue
        name, off = start
        detail = row[_CSV_DETAIL] if len(row) > _CSV_DETAIL else ""
        pm = _PARAMS.match(detail)
        yield Statement(text=msg[off:], name=name, file=file, line=lineno,
                        user=_clean(row[_CSV_USER]), database=_clean(row[_CSV_DB]),
                        application=_clean(row[_CSV_APP]) if len(row) > _CSV_APP else None,
                        timestamp=_clean(row[_CSV_TIME]),
                        parameters=detail[pm.end():] if pm else None)


def jsonlog_statements(lines: Iterable[str], *, file: str = "", stats: ParseStats | None = None) -> Iterator[Statement]:
    """Statements from a jsonlog file (log_destination = 'jsonlog', PostgreSQL 15+): one object a line."""
    stats = stats if stats is not None else ParseStats()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            stats.bad_records += 1
            continue
        if not isinstance(rec, dict):
            stats.bad_records += 1
            continue
        stats.messages += 1
        msg = rec.get("message")
        if rec.get("error_severity", "LOG") != "LOG" or not isinstance(msg, str):
            continue
        start = _statement_start(msg)
        if start is None:
            continue
        name, off = start
        detail = rec.get("detail") or ""
        pm = _PARAMS.match(detail) if isinstance(detail, str) else None
        yield Statement(text=msg[off:], name=name, file=file, line=lineno,
                        user=_clean(rec.get("user")), database=_clean(rec.get("dbname")),
                        application=_clean(rec.get("application_name")),
                        timestamp=_clean(rec.get("timestamp")),
                        parameters=detail[pm.end():] if pm else None)


_PGSS_USER = ("rolname", "usename", "username", "user", "userid")
_PGSS_DB = ("datname", "dbname", "database", "dbid")


def pgss_statements(lines: Iterable[str], *, file: str = "", stats: ParseStats | None = None) -> Iterator[Statement]:
    """Statements from a pg_stat_statements CSV export with a header row; weight = calls.

    Other columns are allowed; a role/database name column (rolname, datname, ...)
    fills users/databases.
    """
    stats = stats if stats is not None else ParseStats()
    rows = _csv_rows(lines, stats)
    header: list[str] | None = None
    for lineno, row in rows:
        if header is None:
            header = [h.strip().lower() for h in row]
            if "query" not in header or "calls" not in header:
                raise AuditError(f"{file or 'input'}: not a pg_stat_statements export "
                                 "(the header needs 'query' and 'calls' columns)")
            qi, ci = header.index("query"), header.index("calls")
            ui = next((header.index(c) for c in _PGSS_USER if c in header), None)
            di = next((header.index(c) for c in _PGSS_DB if c in header), None)
            continue
        if len(row) <= max(qi, ci):
            stats.bad_records += 1
            continue
        stats.messages += 1
        try:
            calls = int(float(row[ci]))
        except ValueError:
            stats.bad_records += 1
            continue
        if calls <= 0 or not row[qi].strip():
            continue
        yield Statement(text=row[qi], weight=calls, file=file, line=lineno,
                        user=_clean(row[ui]) if ui is not None and ui < len(row) else None,
                        database=_clean(row[di]) if di is not None and di < len(row) else None)


# --------------------------------------------------------------------------- sources

_CSVLOG_START = re.compile(r'\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?(?: [^,"]*)?,')


def detect_format(first_line: str, path: str = "") -> str:
    """The input format, from the first line of a file (its extension breaks ties)."""
    s = first_line.strip()
    if s.startswith("{"):
        try:
            rec = json.loads(s)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and ("message" in rec or "error_severity" in rec):
            return "jsonlog"
    if s:
        try:
            row = next(csv.reader([s]))
        except (csv.Error, StopIteration):
            row = []
        names = {c.strip().lower() for c in row}
        if "query" in names and "calls" in names:
            return "pgss"
        if _CSVLOG_START.match(s) and len(row) >= 12:
            return "csvlog"
    if not s:
        base = path[:-3] if path.endswith(".gz") else path
        if base.endswith(".csv"):
            return "csvlog"
        if base.endswith(".json"):
            return "jsonlog"
    return "stderr"


class LogSource:
    """One input file (or '-' for stdin), decompressed if gzip, read as decoded lines.

    Lines are split on '\\n' only (a '\\r' inside a logged statement stays), decoded as
    UTF-8 with replacement. `position()` is how many bytes of the file (compressed,
    if it is) have been consumed, for the progress bar.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            if path == "-":
                self.raw: IO[bytes] = sys.stdin.buffer
                self.size: int | None = None
            else:
                if os.path.isdir(path):
                    raise AuditError(f"cannot read {path}: is a directory")
                self.raw = open(path, "rb")
                self.size = os.fstat(self.raw.fileno()).st_size
            head = self.raw.peek(2)[:2] if hasattr(self.raw, "peek") else b""
        except OSError as e:
            raise AuditError(f"cannot read {path}: {e.strerror or e}") from None
        self.compressed = head == b"\x1f\x8b"
        self._stream: IO[bytes] = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.compressed else self.raw
        self.lines = 0
        self.error: str | None = None

    def position(self) -> int:
        try:
            return self.raw.tell()
        except (OSError, ValueError):
            return 0

    def iter_lines(self, on_progress: Callable[[], None] | None = None) -> Iterator[str]:
        n = 0
        try:
            for b in self._stream:
                n += 1
                self.lines = n
                if on_progress is not None and n % _PROGRESS_EVERY == 0:
                    on_progress()
                yield b.decode("utf-8", "replace")
        except (EOFError, OSError, zlib.error) as e:
            # A log rotated or copied mid-write: keep what was read, say so.
            self.error = f"{self.path}: stopped after line {n}: {e}"
        if on_progress is not None:
            on_progress()

    def close(self) -> None:
        if self.raw is not sys.stdin.buffer:
            self.raw.close()
