"""Hosts, roles, the writer and reader choice (SPEC 3.4), without PostgreSQL: the decisions
the proxy takes from health checks, one rule a user relies on per test."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unpinned.backend.topology import (ALL_LAGGING, BEHIND_CLIENT, NO_REPLICAS, NONE_HEALTHY, Host,
                                       ProbeResult, Role, Topology, format_lsn, parse_host,
                                       parse_host_list, parse_lsn, split_hosts_url)
from unpinned.config import Upstream

W, R1, R2 = Host("w", 5432), Host("r1", 5433), Host("r2", 5434)


def ok(host: Host, t: float, recovery: bool, lsn: int | None = 100, lag: float = 0.0,
       timeline: int | None = 1) -> ProbeResult:
    return ProbeResult(host, ok=True, checked_at=t, elapsed=0.001, in_recovery=recovery, lsn=lsn,
                       lag_seconds=0.0 if not recovery else lag, timeline=None if recovery else timeline)


def fail(host: Host, t: float, error: str = "connection refused") -> ProbeResult:
    return ProbeResult(host, ok=False, checked_at=t, error=error)


def cluster(**kw) -> Topology:
    """A writer at LSN 1000 and two caught-up readers."""
    topo = Topology([W, R1, R2], **kw)
    topo.observe(ok(W, 1, False, lsn=1000))
    topo.observe(ok(R1, 1, True, lsn=1000))
    topo.observe(ok(R2, 1, True, lsn=1000))
    return topo


def kinds(events) -> list[str]:
    return [e.kind for e in events]


# -- LSNs -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("16/B374D848", 0x16_B374D848), ("0/0", 0), ("0/1", 1), ("1/0", 1 << 32),
    ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1), ("16/b374d848", 0x16_B374D848), (" 0/3000060\n", 0x3000060),
])
def test_parse_lsn(text: str, value: int) -> None:
    assert parse_lsn(text) == value


@pytest.mark.parametrize("text", ["", "16", "16/", "/B374D848", "16/B374D848/1", "123456789/0",
                                  "0/123456789", "G/0", "-1/0", "0x16/0", "16 / 0"])
def test_parse_lsn_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not an LSN"):
        parse_lsn(text)


def test_format_lsn_is_postgres_text() -> None:
    # PostgreSQL prints upper-case hex without leading zeros on either side.
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    assert format_lsn(0x3000060) == "0/3000060"
    with pytest.raises(ValueError):
        format_lsn(-1)
    with pytest.raises(ValueError):
        format_lsn(1 << 64)


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFFFFFFFF))
def test_lsn_order_is_postgres_order(hi1: int, lo1: int, hi2: int, lo2: int) -> None:
    a, b = parse_lsn(f"{hi1:x}/{lo1:X}"), parse_lsn(f"{hi2:X}/{lo2:x}")
    # pg_lsn compares as (high word, low word).
    assert (a < b) == ((hi1, lo1) < (hi2, lo2)) and (a == b) == ((hi1, lo1) == (hi2, lo2))
    assert parse_lsn(format_lsn(a)) == a


# -- hosts from the upstream URL and list ------------------------------------------------------


@pytest.mark.parametrize("url, hosts", [
    ("postgresql://u:p@db/app", [Host("db", 5432)]),
    ("postgresql://u:p@db:6000/app", [Host("db", 6000)]),
    ("postgresql://u:p@h1:5432,h2:5433,h3/db", [Host("h1", 5432), Host("h2", 5433), Host("h3", 5432)]),
    ("postgresql://u@[::1]:5433,[fe80::1%25eth0],10.0.0.2/db",
     [Host("::1", 5433), Host("fe80::1%eth0", 5432), Host("10.0.0.2", 5432)]),
    ("postgresql://[2001:DB8::1]/db", [Host("2001:db8::1", 5432)]),
    ("postgres://H1.Example.COM,h2/db", [Host("h1.example.com", 5432), Host("h2", 5432)]),
    ("postgresql:///db", [Host("127.0.0.1", 5432)]),
    ("postgresql://u:p@/db?host=h1,h2&port=5440,5441", [Host("h1", 5440), Host("h2", 5441)]),
    ("postgresql://u:p@/db?host=h1,h2&port=5440", [Host("h1", 5440), Host("h2", 5440)]),
    ("postgresql://h1,h2:7/db?port=6000", [Host("h1", 6000), Host("h2", 7)]),
    ("postgresql://u@:5499/db", [Host("127.0.0.1", 5499)]),
    ("postgresql://u@%2Ftmp%2Fpg:5439/db", [Host("/tmp/pg", 5439)]),
    ("postgresql://u@/db?host=/var/run/postgresql", [Host("/var/run/postgresql", 5432)]),
])
def test_multi_host_url(url: str, hosts: list[Host]) -> None:
    assert split_hosts_url(url)[0] == hosts


def test_reduced_url_keeps_everything_but_the_other_hosts() -> None:
    url = "postgresql://app:p%40ss%2Fw@h1:5432,[::1]:5433,h3/my%20db?sslmode=require&port=5432&connect_timeout=3"
    hosts, one = split_hosts_url(url)
    assert hosts == [Host("h1", 5432), Host("::1", 5433), Host("h3", 5432)]
    # The existing one-host parser reads the same credentials, database and TLS settings.
    up = Upstream.from_url(one)
    assert (up.host, up.port, up.user, up.password, up.database, up.sslmode) == \
        ("h1", 5432, "app", "p@ss/w", "my db", "require")
    assert "h3" not in one and "connect_timeout=3" in one
    # The first host in brackets or as a socket directory survives the round trip.
    assert Upstream.from_url(split_hosts_url("postgresql://u@[::1]:7,h2/db")[1]).host == "::1"
    up = Upstream.from_url(split_hosts_url("postgresql://u@/db?host=/tmp/s,/tmp/t&port=5,6")[1])
    assert (up.host, up.port) == ("/tmp/s", 5)


@pytest.mark.parametrize("url, message", [
    ("postgresql://u:secret@h1,,h2/db", "empty host"),
    ("postgresql://u:secret@h1,/db", "empty host"),
    ("postgresql://u:secret@h1:0/db", "bad port '0'"),
    ("postgresql://u:secret@h1:65536/db", "bad port"),
    ("postgresql://u:secret@h1:x/db", "bad port 'x'"),
    ("postgresql://u:secret@h1:5432,h1/db", "listed twice"),
    ("postgresql://u:secret@[::1/db", "unclosed"),
    ("postgresql://u:secret@[nothex]:5/db", "bad IPv6"),
    ("postgresql://u:secret@[::1]x/db", "unexpected"),
    ("postgresql://u:secret@/db?host=a,b,c&port=1,2", "2 ports for 3 hosts"),
    ("postgresql://u:secret@a,b/db?port=1,2", "not a list in both"),
    ("db.example.com", "not a postgresql"),
])
def test_bad_urls_say_what_is_wrong_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        split_hosts_url(url)
    assert "secret" not in str(e.value)


def test_host_list() -> None:
    hosts = parse_host_list(["h1:6000", "H2", "[::1]:5433", "::2", "/tmp/sock", {"host": "h4", "port": 7},
                             {"host": "h5"}])
    assert hosts == [Host("h1", 6000), Host("h2", 5432), Host("::1", 5433), Host("::2", 5432),
                     Host("/tmp/sock", 5432), Host("h4", 7), Host("h5", 5432)]
    assert [str(h) for h in hosts[:3]] == ["h1:6000", "h2:5432", "[::1]:5433"]


@pytest.mark.parametrize("entries, message", [
    ([], "no hosts"), ("h1,h2", "must be a list"), ([5432], "each entry"), (["h1", "h1:5432"], "listed twice"),
    ([{"host": "h", "port": "5432"}], "bad port"), ([{"host": "h", "port": True}], "bad port"),
    ([{"host": "h", "user": "x"}], "each entry"), (["h:99999"], "bad port"), (["a b"], "bad host"),
])
def test_host_list_rejects(entries, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_host_list(entries)


_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_ports = st.one_of(st.none(), st.integers(1, 65535))


@given(st.lists(st.tuples(st.one_of(_names, _ipv4, _ipv6), _ports), min_size=1, max_size=6,
                unique_by=lambda t: t[0]))
def test_any_host_list_round_trips_through_a_url(entries) -> None:
    netloc = ",".join((f"[{h}]" if ":" in h else h) + (f":{p}" if p else "") for h, p in entries)
    hosts, one = split_hosts_url(f"postgresql://user:pw@{netloc}/db")
    assert hosts == [Host(h, p or 5432) for h, p in entries]
    assert parse_host_list([str(h) for h in hosts]) == hosts
    up = Upstream.from_url(one)
    assert (up.host, up.port, up.user, up.password, up.database) == (hosts[0].host, hosts[0].port, "user", "pw", "db")


def test_parse_host_bare_ipv6_takes_no_port() -> None:
    # "::1:5432" is itself a valid IPv6 address: brackets are the only way to give a port.
    assert parse_host("::1:5432") == Host("::1:5432", 5432)
    assert parse_host("[::1]:5432") == Host("::1", 5432)


# -- roles and the writer ------------------------------------------------------------------


def test_nothing_is_used_before_the_first_check() -> None:
    topo = Topology([W, R1])
    assert topo.writer() is None and topo.pick_reader() is None
    # Unknown roles might be replicas: a reader waits rather than failing at once.
    assert topo.reader_unavailable() == NONE_HEALTHY
    assert all(s["role"] == "unknown" and not s["healthy"] for s in topo.snapshot())


def test_roles_come_from_pg_is_in_recovery() -> None:
    topo = Topology([W, R1])
    ev = topo.observe(ok(W, 1, False, lsn=500))
    assert topo.writer() == W and kinds(ev) == ["healthy", "role", "writer"]
    assert ev[-1].detail == "none -> w:5432"
    ev = topo.observe(ok(R1, 1, True, lsn=400))
    assert kinds(ev) == ["healthy", "role"] and ev[1].detail == "unknown -> reader"
    assert topo.states[R1].role is Role.READER and topo.states[R1].lag_bytes == 100
    assert topo.pick_reader() == R1 and topo.writer() == W
    # Nothing changed: no events.
    assert topo.observe(ok(W, 2, False, lsn=600)) == []


def test_single_host_has_no_replica_even_while_down() -> None:
    topo = Topology([W])
    topo.observe(ok(W, 1, False))
    assert topo.reader_unavailable() == NO_REPLICAS
    ev = topo.observe(fail(W, 2))
    assert kinds(ev) == ["unhealthy", "writer"] and ev[0].detail == "connection refused"
    assert topo.writer() is None
    # The last role is kept: a reader client still gets the immediate "no replica" answer.
    assert topo.states[W].role is Role.WRITER and topo.reader_unavailable() == NO_REPLICAS
    ev = topo.observe(ok(W, 3, False))
    assert kinds(ev) == ["healthy", "writer"] and topo.writer() == W


def test_unhealthy_only_after_consecutive_failures() -> None:
    topo = cluster(unhealthy_after=3)
    assert topo.observe(fail(R1, 2)) == [] and topo.observe(fail(R1, 3)) == []
    assert topo.states[R1].healthy and topo.states[R1].consecutive_failures == 2
    topo.observe(ok(R1, 4, True))      # a success resets the count
    assert topo.states[R1].consecutive_failures == 0 and topo.states[R1].last_error is None
    for t in (5, 6):
        topo.observe(fail(R1, t, "timeout"))
    assert topo.states[R1].healthy
    ev = topo.observe(fail(R1, 7, "timeout"))
    assert kinds(ev) == ["unhealthy"] and not topo.states[R1].healthy
    assert topo.states[R1].checked_at == 7 and topo.states[R1].ok_at == 4
    assert topo.readers() == [R2]


def test_report_failure_counts_like_a_failed_check() -> None:
    topo = cluster()
    ev = topo.report_failure(W, "server closed the connection", 5)
    assert kinds(ev) == ["unhealthy", "writer"] and topo.writer() is None
    assert topo.states[W].last_error == "server closed the connection"


def test_failover_to_a_promoted_replica() -> None:
    topo = cluster()
    topo.lend(R1)
    topo.observe(fail(W, 2))
    assert topo.writer() is None
    ev = topo.observe(ok(R1, 3, False, lsn=1200, timeline=2))
    assert kinds(ev) == ["role", "writer"]
    assert ev[0].detail == "reader -> writer" and ev[1].detail == "none -> r1:5433"
    assert topo.writer() == R1 and topo.states[R1].role_since == 3
    # The new writer is no longer a reader; R2 now trails R1.
    assert topo.readers() == [R2]
    topo.observe(ok(R2, 3, True, lsn=1100))
    assert topo.states[R2].lag_bytes == 100


def test_restarted_old_primary_does_not_take_the_writer_back() -> None:
    topo = cluster()
    topo.observe(fail(W, 2))
    topo.observe(ok(R1, 3, False, timeline=2))
    # The old primary comes back writable on its old timeline: split brain.
    ev = topo.observe(ok(W, 4, False, timeline=1))
    assert kinds(ev) == ["healthy", "writer_conflict"] and topo.writer() == R1
    assert "w:5432 (timeline 1)" in ev[1].detail and "following r1:5433" in ev[1].detail
    # Reported once, not on every check while it lasts.
    assert topo.observe(ok(W, 5, False, timeline=1)) == []
    assert topo.observe(ok(R1, 5, False, timeline=2)) == []


def test_newer_timeline_wins_even_over_the_current_writer() -> None:
    topo = cluster()
    ev = topo.observe(ok(R1, 2, False, timeline=2))   # promoted while W still answers
    assert kinds(ev) == ["role", "writer_conflict", "writer"] and topo.writer() == R1


def test_writer_tie_keeps_the_current_one_or_picks_none() -> None:
    topo = cluster()
    topo.observe(ok(R1, 2, False, timeline=1))
    assert topo.writer() == W                          # same timeline: the current writer stays
    topo.observe(fail(W, 3))
    assert topo.writer() == R1                         # the only claim left
    # Three writable hosts: R2 on the newest timeline leads; when it goes, W and R1 tie
    # on the older one and neither is the current writer: no guess, no writer.
    topo = Topology([W, R1, R2])
    topo.observe(ok(W, 1, False, timeline=2))
    topo.observe(ok(R1, 1, False, timeline=2))
    assert topo.writer() == W
    topo.observe(ok(R2, 1, False, timeline=3))
    assert topo.writer() == R2
    ev = topo.observe(fail(R2, 2))
    assert topo.writer() is None and kinds(ev) == ["unhealthy", "writer_conflict", "writer"]
    assert "following none" in ev[1].detail and ev[2].detail == "r2:5434 -> none"
    topo.observe(fail(R1, 3))
    assert topo.writer() == W                          # one claim again
    # Unknown timelines rank below any known one.
    topo = Topology([W, R1])
    topo.observe(ok(W, 1, False, timeline=None))
    topo.observe(ok(R1, 1, False, timeline=1))
    assert topo.writer() == R1


def test_demoted_writer_becomes_a_reader() -> None:
    topo = cluster()
    topo.observe(ok(R1, 2, False, timeline=2))
    ev = topo.observe(ok(W, 3, True, lsn=1000))     # old primary rejoined as a replica
    assert kinds(ev) == ["role"] and ev[0].detail == "writer -> reader"
    assert set(topo.readers()) == {W, R2}


# -- readers: load, health, lag, monotonic reads ------------------------------------------


def test_readers_round_robin_when_equally_loaded() -> None:
    topo = cluster()
    assert [topo.pick_reader() for _ in range(6)] == [R1, R2, R1, R2, R1, R2]


def test_readers_fewest_borrowed_first() -> None:
    topo = cluster()
    topo.lend(R1)
    topo.lend(R1)
    topo.lend(R2)
    assert [topo.pick_reader() for _ in range(3)] == [R2, R2, R2]
    topo.lend(R2)
    assert {topo.pick_reader() for _ in range(4)} == {R1, R2}   # equal again: both used
    topo.give_back(R2)
    topo.give_back(R2)
    assert topo.pick_reader() == R2 and topo.states[R2].borrowed == 0
    with pytest.raises(ValueError, match="no borrowed"):
        topo.give_back(R2)


def test_lending_as_picked_balances() -> None:
    topo = Topology([W, R1, R2, Host("r3", 1)])
    for h, rec in ((W, False), (R1, True), (R2, True), (Host("r3", 1), True)):
        topo.observe(ok(h, 1, rec))
    for _ in range(30):
        topo.lend(topo.pick_reader())
    assert [topo.states[h].borrowed for h in topo.hosts] == [0, 10, 10, 10]


def test_unhealthy_reader_is_skipped_and_comes_back() -> None:
    topo = cluster()
    topo.observe(fail(R1, 2))
    assert [topo.pick_reader() for _ in range(3)] == [R2, R2, R2]
    topo.observe(fail(R2, 2))
    assert topo.pick_reader() is None and topo.reader_unavailable() == NONE_HEALTHY
    topo.observe(ok(R2, 3, True))
    assert topo.pick_reader() == R2 and topo.reader_unavailable() is None


def test_lag_ejects_and_readmits_with_hysteresis() -> None:
    topo = cluster(max_replica_lag=10)
    assert topo.observe(ok(R1, 2, True, lag=10.0)) == []       # at the limit: still in
    ev = topo.observe(ok(R1, 3, True, lag=10.5))
    assert kinds(ev) == ["ejected"] and "lag 10.5 s" in ev[0].detail
    assert topo.readers() == [R2] and topo.states[R1].ejected_for_lag
    assert topo.observe(ok(R1, 4, True, lag=7.0)) == []        # better, not yet good: stays out
    assert topo.readers() == [R2]
    ev = topo.observe(ok(R1, 5, True, lag=5.0))
    assert kinds(ev) == ["readmitted"] and topo.readers() == [R1, R2]
    topo.observe(ok(R1, 6, True, lag=11))
    topo.observe(ok(R2, 6, True, lag=11))
    assert topo.pick_reader() is None and topo.reader_unavailable() == ALL_LAGGING


def test_no_lag_limit_by_default() -> None:
    topo = cluster()
    topo.observe(ok(R1, 2, True, lag=1e6, lsn=0))
    assert R1 in topo.readers()


def test_custom_readmit_lag() -> None:
    topo = cluster(max_replica_lag=10, readmit_lag=9)
    topo.observe(ok(R1, 2, True, lag=11))
    assert kinds(topo.observe(ok(R1, 3, True, lag=9))) == ["readmitted"]
    with pytest.raises(ValueError, match="readmit_lag"):
        Topology([W], max_replica_lag=10, readmit_lag=11)


def test_lag_in_bytes_behind_the_writer() -> None:
    topo = cluster(max_replica_lag_bytes=500)
    ev = topo.observe(ok(R1, 2, True, lsn=400))                 # 600 behind W's 1000
    assert kinds(ev) == ["ejected"] and topo.states[R1].lag_bytes == 600
    assert topo.observe(ok(R1, 3, True, lsn=600)) == []         # 400 behind: over half, stays out
    assert kinds(topo.observe(ok(R1, 4, True, lsn=800))) == ["readmitted"]
    # The writer moving on makes the readers' byte lag grow without a reader check.
    ev = topo.observe(ok(W, 5, False, lsn=2000))
    assert sorted(e.host.host for e in ev if e.kind == "ejected") == ["r1", "r2"]


def test_reader_ahead_of_the_writers_last_check_has_no_negative_lag() -> None:
    topo = cluster()
    topo.observe(ok(R1, 2, True, lsn=5000))
    assert topo.states[R1].lag_bytes == 0


def test_monotonic_reads() -> None:
    topo = cluster()
    topo.observe(ok(R1, 2, True, lsn=900))
    topo.observe(ok(R2, 2, True, lsn=950))
    assert [topo.pick_reader(min_lsn=920) for _ in range(3)] == [R2, R2, R2]
    assert topo.pick_reader(min_lsn=950) == R2
    assert topo.pick_reader(min_lsn=951) is None and topo.reader_unavailable(951) == BEHIND_CLIENT
    # A position seen on R1's connection after a transaction lets R1 serve that client.
    topo.note_lsn(R1, 960)
    assert topo.pick_reader(min_lsn=951) == R1
    topo.note_lsn(R1, 10)                                  # never moves back
    assert topo.states[R1].lsn == 960
    # Even the least loaded replica is passed over when it is older than the client's view.
    topo.lend(R1)
    topo.lend(R1)
    topo.observe(ok(R2, 3, True, lsn=955))
    assert topo.pick_reader(min_lsn=958) == R1


def test_reader_with_unknown_position_serves_only_clients_without_one() -> None:
    topo = cluster()
    topo.observe(ok(R1, 2, True, lsn=None))
    topo.observe(ok(R2, 2, True, lsn=None))
    assert topo.pick_reader() in (R1, R2)
    assert topo.pick_reader(min_lsn=1) is None and topo.reader_unavailable(1) == BEHIND_CLIENT


def test_promoted_replica_loses_its_ejection() -> None:
    topo = cluster(max_replica_lag=1)
    topo.observe(ok(R1, 2, True, lag=5))
    assert topo.states[R1].ejected_for_lag
    topo.observe(ok(R1, 3, False, timeline=2))
    s = topo.states[R1]
    assert not s.ejected_for_lag and s.lag_seconds == 0 and s.lag_bytes == 0


def test_bad_topologies() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Topology([W, W])
    with pytest.raises(ValueError, match="no hosts"):
        Topology([])
    with pytest.raises(ValueError, match="negative"):
        Topology([W], max_replica_lag=-1)
    with pytest.raises(ValueError, match="unhealthy_after"):
        Topology([W], unhealthy_after=0)


def test_snapshot_for_admin_and_metrics() -> None:
    topo = cluster()
    topo.lend(R2)
    snap = {s["host"]: s for s in topo.snapshot()}
    assert snap["w:5432"]["is_writer"] and snap["w:5432"]["role"] == "writer"
    assert snap["r2:5434"] == {"host": "r2:5434", "role": "reader", "healthy": True, "checked_at": 1,
                               "lsn": "0/3E8", "lag_seconds": 0.0, "lag_bytes": 0, "timeline": None,
                               "consecutive_failures": 0, "ejected_for_lag": False, "last_error": None,
                               "borrowed": 1, "is_writer": False}


# -- properties over any sequence of checks ---------------------------------------------------

HOSTS = [W, R1, R2]
_results = st.builds(
    lambda i, okay, rec, lsn, lag, tl: (ProbeResult(HOSTS[i], ok=okay, checked_at=0,
                                                    in_recovery=rec if okay else None,
                                                    lsn=lsn if okay else None, lag_seconds=lag if okay and rec else 0.0,
                                                    timeline=tl if okay and not rec else None,
                                                    error=None if okay else "down")),
    st.integers(0, 2), st.booleans(), st.booleans(), st.one_of(st.none(), st.integers(0, 3000)),
    st.floats(0, 30), st.one_of(st.none(), st.integers(1, 3)))
_ops = st.one_of(_results, st.tuples(st.sampled_from(["lend", "give_back"]), st.integers(0, 2)))


@settings(max_examples=300, deadline=None)
@given(st.lists(_ops, max_size=40), st.integers(0, 3000), st.integers(1, 3))
def test_invariants_hold_after_any_sequence(ops, min_lsn: int, unhealthy_after: int) -> None:
    topo = Topology(HOSTS, max_replica_lag=10, max_replica_lag_bytes=1000, unhealthy_after=unhealthy_after)
    for t, op in enumerate(ops):
        if isinstance(op, ProbeResult):
            topo.observe(ProbeResult(**{**op.__dict__, "checked_at": float(t)}))
        elif op[0] == "lend":
            topo.lend(HOSTS[op[1]])
        elif topo.states[HOSTS[op[1]]].borrowed:
            topo.give_back(HOSTS[op[1]])
        states = topo.states.values()
        w = topo.writer()
        claims = [s for s in states if s.healthy and s.role is Role.WRITER]
        if w is not None:
            ws = topo.states[w]
            # The writer is a healthy writable host on the newest timeline among the claims.
            assert ws in claims
            assert all((s.timeline or -1) <= (ws.timeline or -1) for s in claims)
        elif len(claims) == 1:
            raise AssertionError("a lone healthy writer must be the writer")
        for s in states:
            assert s.lag_bytes is None or s.lag_bytes >= 0
            assert s.borrowed >= 0
            if s.ejected_for_lag:
                assert s.role is Role.READER
        pick = topo.pick_reader(min_lsn)
        reason = topo.reader_unavailable(min_lsn)
        assert (pick is None) == (reason is not None)
        if pick is not None:
            p = topo.states[pick]
            assert p.healthy and p.role is Role.READER and not p.ejected_for_lag
            # A client that has seen nothing (min_lsn 0) may read anywhere; else never older.
            assert min_lsn == 0 or (p.lsn is not None and p.lsn >= min_lsn)
            assert pick != w
            eligible = topo.readers(min_lsn)
            assert p.borrowed == min(topo.states[h].borrowed for h in eligible)
        elif reason == NO_REPLICAS:
            assert all(s.role is Role.WRITER for s in states)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=3, max_size=3), st.integers(1, 5))
def test_round_robin_is_fair(readers, rounds: int) -> None:
    topo = Topology(HOSTS)
    for h, rec in zip(HOSTS, readers):
        topo.observe(ok(h, 1, rec))
    eligible = [h for h, rec in zip(HOSTS, readers) if rec]
    picks = Counter(topo.pick_reader() for _ in range(rounds * max(1, len(eligible))))
    if eligible:
        assert picks == Counter({h: rounds for h in eligible})
    else:
        assert picks == Counter({None: rounds})
