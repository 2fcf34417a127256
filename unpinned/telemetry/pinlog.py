"""Telling why: pin events as JSON lines, RDS Proxy's own WARN line, and the
aggregates behind SHOW PINS / SHOW PIN_REASONS / the live page.

One `PinEvent` per pin, unpin, would-pin-on-RDS, carried (smart mode kept LISTEN or
SQL PREPARE going without a pin) and currval-guard hit. The full SQL
text is kept (also beyond 16 KB) unless truncation or literal redaction is configured.
"""
from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import IO, NamedTuple

from unpinned.sql.classifier import digest, fingerprint
from unpinned.sql.effects import REASON_SENTENCES, RDS_REASON_SQL, RDS_REASON_TOO_LONG, Classification, Reason

PIN, UNPIN, WOULD_PIN, CURRVAL_GUARD = "pin", "unpin", "would_pin_rds", "currval_guard"
# Smart mode carried state that used to pin (LISTEN, SQL PREPARE): no pin, said so.
CARRIED = "carried"


class ClientInfo(NamedTuple):
    """Who a pin belongs to. A tuple: made at every login, with `tuple.__new__(ClientInfo, ...)`
    there, without the Python call a dataclass's __init__ is."""
    id: int
    address: str
    user: str
    database: str
    application_name: str = ""


@dataclass(slots=True)
class PinEvent:
    event: str
    reason: str
    client: ClientInfo
    server_id: int | None
    sql: str
    fingerprint: str
    digest: str
    protocol: str                      # "simple" | "extended" | "startup"
    mode: str
    time: float = field(default_factory=time.time)

    def as_dict(self, max_sql: int = 0, redact: bool = False) -> dict:
        sql = self.digest if redact else self.sql
        truncated = bool(max_sql) and len(sql) > max_sql
        try:
            sentence = REASON_SENTENCES[Reason(self.reason)]
        except ValueError:
            sentence = self.reason
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time)) + f".{int(self.time % 1 * 1000):03d}Z",
            "event": self.event,
            "mode": self.mode,
            "reason": self.reason,
            "reason_text": sentence,
            "client_id": self.client.id,
            "client_addr": self.client.address,
            "user": self.client.user,
            "database": self.client.database,
            "application_name": self.client.application_name,
            "server_connection_id": self.server_id,
            "protocol": self.protocol,
            "fingerprint": self.fingerprint,
            "sql_length": len(self.sql.encode()),
            "sql": sql[:max_sql] if truncated else sql,
            "sql_truncated": truncated,
        }


def rds_warn_line(event: PinEvent, digest: str) -> str:
    """RDS Proxy's pin message, as it appears in CloudWatch."""
    reason = RDS_REASON_TOO_LONG if event.reason == Reason.STATEMENT_TOO_LONG else \
        f'{RDS_REASON_SQL} Digest: "{digest}".'
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.time))
    return (f"{stamp} [WARN] [proxyEndpoint=default] [clientConnection={event.client.id}] The client session "
            f"was pinned to the database connection [dbConnection={event.server_id}] for the remainder of the "
            f"session. The proxy can't reuse this connection until the session ends. Reason: {reason}")


@dataclass(slots=True)
class ReasonStats:
    reason: str
    fingerprint: str
    count: int = 0
    sample: str = ""
    digest: str = ""
    last_seen: float = 0.0
    events: dict = field(default_factory=dict)   # event kind -> count


class PinLog:
    """Where pin events go: a JSON-lines stream, RDS lines, and in-memory aggregates."""

    def __init__(self, stream: IO[str] | None = None, *, mode: str = "smart", max_sql: int = 0,
                 redact: bool = False, rds_lines: bool = True, recent: int = 1000, max_reasons: int = 10000):
        self.stream = stream
        self.mode = mode
        self.max_sql = max_sql
        self.redact = redact
        self.rds_lines = rds_lines and mode == "rds"
        self.recent: deque[PinEvent] = deque(maxlen=recent)
        self.reasons: OrderedDict[tuple[str, str, str], ReasonStats] = OrderedDict()
        self.max_reasons = max_reasons
        self.counts: dict[tuple[str, str], int] = {}   # (event, reason) -> count, for metrics

    def record(self, event: str, reason: str, client: ClientInfo, server_id: int | None,
               classification: Classification | None, protocol: str, sql: str | None = None) -> PinEvent:
        if classification is not None:
            text, fp, dg = classification.text, fingerprint(classification), digest(classification)
        else:
            text, fp, dg = sql or "", "", sql or ""
        ev = PinEvent(event, str(reason), client, server_id, text, fp, dg, protocol, self.mode)
        self.recent.append(ev)
        key = (event, ev.reason, fp)
        self.counts[(event, ev.reason)] = self.counts.get((event, ev.reason), 0) + 1
        stats = self.reasons.get(key)
        if stats is None:
            if len(self.reasons) >= self.max_reasons:
                self.reasons.popitem(last=False)
            stats = self.reasons[key] = ReasonStats(ev.reason, fp, sample=text, digest=dg)
        stats.count += 1
        stats.last_seen = ev.time
        stats.events[event] = stats.events.get(event, 0) + 1
        if self.stream is not None:
            line = json.dumps(ev.as_dict(self.max_sql, self.redact), ensure_ascii=False)
            if self.rds_lines and event == PIN:
                line += "\n" + rds_warn_line(ev, dg)
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass   # a closed log must not take the proxy down
        return ev

    def reason_rows(self, event: str | None = None) -> list[ReasonStats]:
        rows = [s for (ev, _, _), s in self.reasons.items() if event is None or ev == event]
        return sorted(rows, key=lambda s: -s.count)


def open_stream(target: str) -> IO[str] | None:
    """'' → no JSON log; '-' → stderr; otherwise a file opened for appending."""
    if not target:
        return None
    if target == "-":
        return sys.stderr
    return open(target, "a", buffering=1, encoding="utf-8")
