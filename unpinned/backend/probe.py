"""The health and role check of one upstream host, and the loop that keeps checking them all.

A check is one fresh connection: connect, log in (the proxy's own SCRAM/md5 code), one
query, Terminate. A fresh login is the thing clients need to work, so it is what gets
tested; it costs PostgreSQL one backend start per host per interval. The whole check
is bounded by `timeout`, and a check never raises for anything the host does: a host
that is down, slow, refusing logins or mid-promotion is a `ProbeResult(ok=False,
error=...)` with a sentence a person can act on.

The query asks, in one round trip:
- pg_is_in_recovery(): reader (true) or writer (false), as libpq's target_session_attrs;
- the position: pg_current_wal_lsn() on a writer, pg_last_wal_replay_lsn() on a reader;
- the reader's lag in seconds: 0 when it has replayed all it received, else the age of
  the last transaction it replayed (the usual measure; it over-states the lag of a
  replica whose primary was idle before a burst, which errs on the safe side). A replica
  cut off from its primary also shows 0 here; the topology compares its position with
  the writer's (lag_bytes) for that;
- the writer's timeline (the first 8 hex digits of its current WAL file name), which
  tells the newest promotion apart when two hosts both claim to be the writer.
Every function used is executable by any role: no superuser needed.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from unpinned.backend.server import open_stream
from unpinned.backend.topology import Event, Host, ProbeResult, Topology, parse_lsn
from unpinned.wire import messages as m
from unpinned.wire.auth import AuthFailed, ServerAuth

log = logging.getLogger("unpinned.probe")

PROBE_SQL = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, "
    "CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0) END, "
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"
)
APPLICATION_NAME = "unpinned-probe"


class _Refused(Exception):
    """The host answered but would not serve the check (login refused, query error)."""


class _NotPostgres(Exception):
    """What answered is not a PostgreSQL server (another service on that port)."""


async def probe(host: Host, user: str, password: str | None, database: str = "postgres", *,
                timeout: float = 5.0, sslmode: str = "disable", tls_context: ssl.SSLContext | None = None,
                clock: Callable[[], float] = time.monotonic) -> ProbeResult:
    """Check one host: role, position, lag. Never raises for the host's failures."""
    t0 = clock()
    writer: asyncio.StreamWriter | None = None

    def failed(error: str) -> ProbeResult:
        now = clock()
        return ProbeResult(host, ok=False, checked_at=now, elapsed=now - t0, error=error)

    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_stream(host.host, host.port)
            if sslmode != "disable" and not host.is_unix:
                await _start_tls(reader, writer, host, sslmode, tls_context)
            row = await _login_and_query(reader, writer, user, password, database)
    except TimeoutError:
        return failed(f"{host} did not answer the check within {timeout:g} s")
    except _Refused as e:
        return failed(f"{host} refused the check: {e}")
    except _NotPostgres as e:
        return failed(f"{host} does not answer as PostgreSQL does ({e})")
    except AuthFailed as e:
        return failed(f"{host} refused the check's login: {e}")
    except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
        if isinstance(e, asyncio.IncompleteReadError):
            what = "it closed the connection"
        elif isinstance(e, ConnectionRefusedError):
            what = "connection refused"
        else:
            what = e.strerror or str(e) or type(e).__name__
        return failed(f"could not check {host}: {what}")
    finally:
        if writer is not None:
            try:
                if not writer.is_closing():
                    writer.write(m.TERMINATE_MSG)
                writer.close()
            except (OSError, RuntimeError):
                pass
    now = clock()
    in_recovery, lsn, lag, timeline = row
    try:
        return ProbeResult(host, ok=True, checked_at=now, elapsed=now - t0,
                           in_recovery=in_recovery == "t",
                           lsn=parse_lsn(lsn) if lsn is not None else None,
                           lag_seconds=float(lag) if lag is not None else None,
                           timeline=int(timeline) if timeline is not None else None)
    except ValueError as e:
        return failed(f"{host} answered the check with something unexpected: {e}")


async def _start_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: Host,
                     sslmode: str, ctx: ssl.SSLContext | None) -> None:
    writer.write(m.pack_i32(8) + m.pack_i32(m.SSL_REQUEST))
    answer = await reader.readexactly(1)
    if answer == b"N":
        if sslmode in ("require", "verify-ca", "verify-full"):
            raise _Refused(f"it does not support TLS, and upstream sslmode is {sslmode}")
        return
    if answer != b"S":
        raise _Refused(f"unexpected answer {answer!r} to an SSL request")
    if ctx is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        await writer.start_tls(ctx, server_hostname=host.host if sslmode == "verify-full" else None)
    except ssl.SSLError as e:
        raise _Refused(f"TLS failed: {e}") from None


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    length = m.unpack_i32(head, 1)[0]
    if not 4 <= length <= 1 << 20:
        raise _NotPostgres(f"a message of {length} bytes")
    return head[:1], await reader.readexactly(length - 4)


def _data_row(body: bytes) -> list[str | None]:
    count = int.from_bytes(body[:2], "big")
    pos, out = 2, []
    for _ in range(count):
        n = int.from_bytes(body[pos:pos + 4], "big", signed=True)
        pos += 4
        if n < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + n].decode())
            pos += n
    return out


async def _login_and_query(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           user: str, password: str | None, database: str) -> list[str | None]:
    writer.write(m.startup_message({"user": user, "database": database, "application_name": APPLICATION_NAME}))
    auth = ServerAuth(user, password)
    while True:
        t, body = await _read_message(reader)
        if t == b"R":
            reply = auth.step(body)
            if reply:
                writer.write(reply)
        elif t == b"E":
            # 57P03 "the database system is starting up / shutting down / in recovery mode"
            # lands here too: a host not accepting connections yet.
            f = m.parse_error_fields(body)
            raise _Refused(f"{f.get('M', 'error')} (SQLSTATE {f.get('C', '?')})")
        elif t == b"Z":
            break
    writer.write(m.query(PROBE_SQL))
    row: list[str | None] | None = None
    error = None
    while True:
        t, body = await _read_message(reader)
        if t == b"D":
            row = _data_row(body)
        elif t == b"E":
            f = m.parse_error_fields(body)
            error = f"{f.get('M', 'error')} (SQLSTATE {f.get('C', '?')})"
        elif t == b"Z":
            break
    if error or row is None or len(row) != 4:
        raise _Refused(error or "the check query returned no row")
    return row


ProbeFn = Callable[[Host], Awaitable[ProbeResult]]


class HealthChecker:
    """Checks every host of a Topology every `interval` seconds, all hosts at once, and hands
    each batch of changes to `on_events` (log them, count them, wake waiting clients).

    `check_now()` runs a round at once (the proxy calls it when a server connection fails,
    so a failover does not wait for the next tick) and returns its events.
    """

    def __init__(self, topology: Topology, probe_fn: ProbeFn, interval: float = 1.0,
                 on_events: Callable[[list[Event]], None] | None = None) -> None:
        if interval <= 0:
            raise ValueError("health_check_interval must be more than 0")
        self.topology = topology
        self.probe_fn = probe_fn
        self.interval = interval
        self.on_events = on_events
        self.rounds = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._round_lock = asyncio.Lock()

    async def check_now(self) -> list[Event]:
        async with self._round_lock:   # one round at a time: results must land in order
            results = await asyncio.gather(*(self.probe_fn(h) for h in self.topology.hosts))
            events: list[Event] = []
            for r in results:
                events += self.topology.observe(r)
            self.rounds += 1
        if events and self.on_events is not None:
            self.on_events(events)
        return events

    def wake(self) -> None:
        """Start the next round now instead of at the next tick."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="unpinned-health-checks")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await self.check_now()
            except Exception:   # a bug here must not end health checking for good
                log.exception("health check round failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass


def probe_for(user: str, password: str | None, database: str = "postgres", **kwargs) -> ProbeFn:
    """A probe_fn for HealthChecker with the credentials and options (timeout, sslmode, ...) bound."""

    async def fn(host: Host) -> ProbeResult:
        return await probe(host, user, password, database, **kwargs)
    return fn
