"""Which upstream host is the writer and which replicas may serve a reader (SPEC 3.4).

Pure decisions, no sockets and no clock: the health probe (`backend.probe`) feeds
`Topology.observe()` one `ProbeResult` per check, and the proxy asks `writer()` and
`pick_reader(min_lsn)`. Everything that changes (a role, health, a lag ejection, the
writer) comes back from `observe()` as an `Event`, for the log and the metrics.

Rules, in the words a user would check them by:
- A host's role is what its last successful check said: `pg_is_in_recovery()` false is
  a writer, true a reader; never checked successfully, unknown. A failed check keeps
  the last role (so a one-host upstream that is down is still known to have no replica)
  and marks the host unhealthy after `unhealthy_after` failures in a row.
- The writer is the healthy host claiming to be one. If several claim it (an old primary
  restarted after a failover without being rejoined: split brain), the highest timeline
  wins: a promotion always starts a new timeline above the one it left, so the newest
  promotion is the one to follow. On a tie the current writer stays; with no current
  writer among them there is no writer (`writer_conflict` event) rather than a guess that
  could lose writes: the proxy then waits as it does during a failover.
- A reader is served by a healthy replica that is not ejected for lag and has replayed
  at least `min_lsn` (the newest position that client has seen: monotonic reads), among
  those the one with the fewest borrowed connections, then round-robin. The writer never
  serves the reader endpoint (RDS Proxy's READ_ONLY endpoints do not either).
- A replica whose lag exceeds `max_replica_lag` seconds (or `max_replica_lag_bytes`
  behind the writer's last known position) is ejected, and put back only when it is
  within half of that (`readmit_lag`): a replica hovering at the limit does not flap.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from unpinned.hosts import DEFAULT_PORT, Host, unique_hosts, parse_host, parse_host_list, split_hosts_url  # noqa: F401 (public here too)

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    """PostgreSQL's pg_lsn text ("16/B374D848": high and low 32 bits in hex) as a number."""
    m = _LSN.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not an LSN: {text!r}")
    return int(m.group(1), 16) << 32 | int(m.group(2), 16)


def format_lsn(value: int) -> str:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# -- hosts from a URL or a list -------------------------------------------------


class Role(enum.Enum):
    WRITER = "writer"
    READER = "reader"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ProbeResult:
    """One health and role check of one host (made by backend.probe)."""
    host: Host
    ok: bool
    checked_at: float                  # monotonic seconds when the check ended
    elapsed: float = 0.0               # how long it took
    in_recovery: bool | None = None
    lsn: int | None = None             # writer: pg_current_wal_lsn(); reader: pg_last_wal_replay_lsn()
    lag_seconds: float | None = None   # reader: how far replay trails (0 when caught up)
    timeline: int | None = None        # writer: the timeline it writes on
    error: str | None = None           # why the check failed, for a person

    @property
    def role(self) -> Role:
        if not self.ok or self.in_recovery is None:
            return Role.UNKNOWN
        return Role.READER if self.in_recovery else Role.WRITER


@dataclass
class HostState:
    host: Host
    role: Role = Role.UNKNOWN
    healthy: bool = False              # no check yet counts as unhealthy: nothing is sent there blind
    checked_at: float | None = None    # last check, successful or not
    ok_at: float | None = None         # last successful check
    role_since: float | None = None    # when the current role was first seen
    lsn: int | None = None
    lag_seconds: float | None = None
    lag_bytes: int | None = None       # reader: writer's last known LSN minus this one's (>= 0)
    timeline: int | None = None
    consecutive_failures: int = 0
    ejected_for_lag: bool = False
    last_error: str | None = None
    borrowed: int = 0                  # server connections to this host lent to clients now

    def as_dict(self) -> dict[str, object]:
        return {
            "host": str(self.host), "role": self.role.value, "healthy": self.healthy,
            "checked_at": self.checked_at, "lsn": format_lsn(self.lsn) if self.lsn is not None else None,
            "lag_seconds": self.lag_seconds, "lag_bytes": self.lag_bytes, "timeline": self.timeline,
            "consecutive_failures": self.consecutive_failures, "ejected_for_lag": self.ejected_for_lag,
            "last_error": self.last_error, "borrowed": self.borrowed,
        }


@dataclass(frozen=True)
class Event:
    """Something that changed, for the log and the metrics. Kinds: role, unhealthy, healthy,
    ejected, readmitted, writer (detail names the old and new writer), writer_conflict."""
    kind: str
    host: Host | None
    at: float
    detail: str = ""


# Why no reader can be picked now, as pick_reader's caller must act on it:
NO_REPLICAS = "no_replicas"        # every host is known to be a writer: fail the client at once
NONE_HEALTHY = "none_healthy"      # replicas exist (or roles are unknown) but none answers: wait
ALL_LAGGING = "all_lagging"        # healthy replicas all ejected for lag: wait
BEHIND_CLIENT = "behind_client"    # healthy replicas all older than what the client has seen: wait


@dataclass
class Topology:
    hosts: list[Host]
    max_replica_lag: float = 0.0       # seconds; 0 = no limit
    max_replica_lag_bytes: int = 0     # bytes behind the writer; 0 = no limit
    readmit_lag: float | None = None   # seconds; None = half of max_replica_lag
    unhealthy_after: int = 1           # failed checks in a row before a host is unhealthy
    states: dict[Host, HostState] = field(init=False)
    _writer: Host | None = field(init=False, default=None)
    _rr: int = field(init=False, default=0)
    _claims: tuple[Host, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        unique_hosts(list(self.hosts), "the topology")
        if self.max_replica_lag < 0 or self.max_replica_lag_bytes < 0:
            raise ValueError("max_replica_lag must not be negative")
        if self.unhealthy_after < 1:
            raise ValueError("unhealthy_after must be at least 1")
        if self.readmit_lag is None:
            self.readmit_lag = self.max_replica_lag / 2
        elif self.max_replica_lag and not 0 <= self.readmit_lag <= self.max_replica_lag:
            raise ValueError("readmit_lag must be between 0 and max_replica_lag")
        self.states = {h: HostState(h) for h in self.hosts}

    # -- input -----------------------------------------------------------------

    def observe(self, result: ProbeResult) -> list[Event]:
        """Apply one check's result; returns what changed."""
        s = self.states[result.host]
        now = result.checked_at
        events: list[Event] = []
        s.checked_at = now
        if not result.ok:
            s.consecutive_failures += 1
            s.last_error = result.error or "check failed"
            if s.healthy and s.consecutive_failures >= self.unhealthy_after:
                s.healthy = False
                events.append(Event("unhealthy", s.host, now, s.last_error))
        else:
            s.consecutive_failures = 0
            s.last_error = None
            s.ok_at = now
            if not s.healthy:
                s.healthy = True
                events.append(Event("healthy", s.host, now, f"answered in {result.elapsed * 1000:.0f} ms"))
            role = result.role
            if role is not s.role:
                events.append(Event("role", s.host, now, f"{s.role.value} -> {role.value}"))
                s.role, s.role_since = role, now
                if role is Role.WRITER:
                    s.lag_seconds, s.lag_bytes, s.ejected_for_lag = 0.0, 0, False
            s.lsn = result.lsn
            s.timeline = result.timeline
            if role is Role.READER:
                s.lag_seconds = result.lag_seconds
        events += self._elect(now)
        events += self._judge_lags(now)
        return events

    def report_failure(self, host: Host, error: str, now: float) -> list[Event]:
        """The proxy itself failed to reach `host` (a connect or login error): counts as a failed check."""
        return self.observe(ProbeResult(host, ok=False, checked_at=now, error=error))

    def note_lsn(self, host: Host, lsn: int) -> None:
        """A position this host is known to have reached (read on a connection after a
        transaction): only ever moves the known LSN forward, between checks."""
        s = self.states[host]
        if s.lsn is None or lsn > s.lsn:
            s.lsn = lsn

    def lend(self, host: Host) -> None:
        self.states[host].borrowed += 1

    def give_back(self, host: Host) -> None:
        s = self.states[host]
        if s.borrowed <= 0:
            raise ValueError(f"{host} has no borrowed connection to give back")
        s.borrowed -= 1

    # -- decisions -------------------------------------------------------------

    def writer(self) -> Host | None:
        return self._writer

    def readers(self, min_lsn: int = 0) -> list[Host]:
        """Replicas a reader may use now, in host order."""
        return [s.host for s in self.states.values() if self._serves(s, min_lsn)]

    def pick_reader(self, min_lsn: int = 0) -> Host | None:
        """The replica for the next reader transaction, or None (see `reader_unavailable`)."""
        order = list(self.states.values())
        candidates = [(i, s) for i, s in enumerate(order) if self._serves(s, min_lsn)]
        if not candidates:
            return None
        least = min(s.borrowed for _, s in candidates)
        tied = [(i, s) for i, s in candidates if s.borrowed == least]
        # Round-robin among equally loaded replicas: the first at or after the one past the last pick.
        i, s = min(tied, key=lambda t: (t[0] - self._rr) % len(order))
        self._rr = (i + 1) % len(order)
        return s.host

    def reader_unavailable(self, min_lsn: int = 0) -> str | None:
        """Why pick_reader(min_lsn) has nothing, or None when it has something."""
        states = list(self.states.values())
        if any(self._serves(s, min_lsn) for s in states):
            return None
        if all(s.role is Role.WRITER for s in states):
            return NO_REPLICAS
        healthy = [s for s in states if s.healthy and s.role is Role.READER]
        if not healthy:
            return NONE_HEALTHY
        if all(s.ejected_for_lag for s in healthy):
            return ALL_LAGGING
        return BEHIND_CLIENT

    def snapshot(self) -> list[dict[str, object]]:
        writer = self._writer
        return [{**s.as_dict(), "is_writer": s.host == writer} for s in self.states.values()]

    # -- internals ---------------------------------------------------------------

    @staticmethod
    def _serves(s: HostState, min_lsn: int) -> bool:
        return (s.healthy and s.role is Role.READER and not s.ejected_for_lag
                and (min_lsn <= 0 or (s.lsn is not None and s.lsn >= min_lsn)))

    def _judge_lags(self, now: float) -> list[Event]:
        events = []
        w = self.states.get(self._writer) if self._writer else None
        for s in self.states.values():
            if s.role is not Role.READER:
                continue
            if w is not None and w.lsn is not None and s.lsn is not None:
                # The writer's position is as old as its last check: a reader checked since may be ahead.
                s.lag_bytes = max(0, w.lsn - s.lsn)
            over = ((self.max_replica_lag > 0 and s.lag_seconds is not None and s.lag_seconds > self.max_replica_lag)
                    or (self.max_replica_lag_bytes > 0 and s.lag_bytes is not None
                        and s.lag_bytes > self.max_replica_lag_bytes))
            back = ((self.max_replica_lag <= 0 or (s.lag_seconds is not None and s.lag_seconds <= self.readmit_lag))
                    and (self.max_replica_lag_bytes <= 0
                         or (s.lag_bytes is not None and s.lag_bytes <= self.max_replica_lag_bytes // 2)))
            if not s.ejected_for_lag and over:
                s.ejected_for_lag = True
                events.append(Event("ejected", s.host, now, self._lag_text(s)))
            elif s.ejected_for_lag and back:
                s.ejected_for_lag = False
                events.append(Event("readmitted", s.host, now, self._lag_text(s)))
        return events

    @staticmethod
    def _lag_text(s: HostState) -> str:
        secs = f"{s.lag_seconds:.1f} s" if s.lag_seconds is not None else "? s"
        return f"lag {secs}, {s.lag_bytes if s.lag_bytes is not None else '?'} bytes"

    def _elect(self, now: float) -> list[Event]:
        claims = [s for s in self.states.values() if s.healthy and s.role is Role.WRITER]
        old = self._writer
        events = []
        if not claims:
            new = None
        else:
            top = max(s.timeline if s.timeline is not None else -1 for s in claims)
            best = [s for s in claims if (s.timeline if s.timeline is not None else -1) == top]
            if len(best) == 1:
                new = best[0].host
            elif old is not None and any(s.host == old for s in best):
                new = old
            else:
                new = None
            claimed = tuple(s.host for s in claims)
            if len(claims) > 1 and claimed != self._claims:   # once per new conflict, not per check
                names = ", ".join(f"{s.host} (timeline {s.timeline})" for s in claims)
                chosen = f"following {new}" if new else "following none until one remains"
                events.append(Event("writer_conflict", new, now, f"several hosts are writable: {names}; {chosen}"))
        self._claims = tuple(s.host for s in claims)
        if new != old:
            self._writer = new
            events.append(Event("writer", new, now, f"{old or 'none'} -> {new or 'none'}"))
        return events


def probe_failed(host: Host, error: str, now: float, elapsed: float = 0.0) -> ProbeResult:
    return ProbeResult(host, ok=False, checked_at=now, elapsed=elapsed, error=error)


__all__ = ["Host", "Role", "ProbeResult", "HostState", "Event", "Topology", "parse_lsn", "format_lsn",
           "parse_host", "parse_host_list", "split_hosts_url", "probe_failed",
           "NO_REPLICAS", "NONE_HEALTHY", "ALL_LAGGING", "BEHIND_CLIENT", "DEFAULT_PORT"]
