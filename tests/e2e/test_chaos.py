"""The fault suite, short: transfers between accounts through the proxy while backends are
terminated, PostgreSQL is restarted and crashed, and clients vanish mid-transaction and
mid-message. The money is all there, no acknowledged transfer is lost, no failed one is
applied, nothing hangs. (Longer: `make chaos`; an hour with memory sampled: `make soak`.)"""
from __future__ import annotations

import os

import pytest

from support.chaos import run

pytestmark = pytest.mark.timeout(150)


def test_transfers_survive_faults():
    seconds = float(os.environ.get("CHAOS_TEST_SECONDS", "24"))
    out = run(seconds, clients=6, fault_every=1.5, seed=int(os.environ.get("CHAOS_SEED", "7")))
    print(out.summary())
    assert not out.problems(), out.summary()
    # Every kind of fault happened, and clients kept going through them.
    assert all(n > 0 for n in out.faults.values()), out.faults
    assert len(out.ledger.acked) > 50, out.summary()
