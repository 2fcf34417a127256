"""How the cluster pools read the topology's events (issue 11), without PostgreSQL."""
from __future__ import annotations

import asyncio

from unpinned.backend.cluster_pools import Cluster
from unpinned.backend.topology import ProbeResult
from unpinned.config import load
from unpinned.hosts import Host

H1, H2 = Host("h1", 5432), Host("h2", 5432)


def cluster() -> Cluster:
    cfg = load(None, auth="trust", upstream="postgresql://app:pw@h1:5432,h2:5432/appdb")
    return Cluster(cfg, probe_fn=lambda host: None)


def check(c: Cluster, host: Host, at: float, **result) -> None:
    c._on_events(c.topology.observe(ProbeResult(host, checked_at=at, **result)))


def test_writer_lost_then_promoted_is_one_failover_timed_from_the_loss() -> None:
    asyncio.run(lost_then_promoted())


async def lost_then_promoted() -> None:
    c = cluster()     # with no writer it looks for one in a task: hence the event loop
    check(c, H1, 1.0, ok=True, in_recovery=False, timeline=1)
    check(c, H2, 1.0, ok=True, in_recovery=True, lag_seconds=0.0)
    assert c.topology.writer() == H1 and c.counts["failover"] == 0 and c.last_failover is None
    check(c, H1, 2.0, ok=False, error="connection refused")
    assert c.topology.writer() is None and c.writer_lost_at == 2.0
    check(c, H2, 3.5, ok=True, in_recovery=False, timeline=2)
    assert c.topology.writer() == H2
    assert c.counts["failover"] == 1 and c.last_failover["to"] == str(H2) and c.last_failover["seconds"] == 1.5
    await asyncio.sleep(0)      # the search task sees a writer and ends


def test_promotion_seen_before_the_old_writers_failure_is_still_a_failover() -> None:
    # The promoted replica answers on a newer timeline while the old writer has not yet failed
    # a check: the writer moves in one step, and that is the failover (it was missed once).
    c = cluster()
    check(c, H1, 1.0, ok=True, in_recovery=False, timeline=1)
    check(c, H2, 1.0, ok=True, in_recovery=True, lag_seconds=0.0)
    check(c, H2, 2.0, ok=True, in_recovery=False, timeline=2)
    assert c.topology.writer() == H2
    assert c.counts["failover"] == 1 and c.last_failover["to"] == str(H2) and c.last_failover["seconds"] == 0.0
    check(c, H1, 2.5, ok=False, error="connection refused")     # then the old one's failure: no second one
    assert c.counts["failover"] == 1 and c.topology.writer() == H2
