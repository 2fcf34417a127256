"""Latency histograms as /metrics shows them: Prometheus buckets, each bound inclusive (`le`)."""
from __future__ import annotations

from unpinned.telemetry.buckets import BUCKETS, bucket
from unpinned.telemetry.counters import Histogram


def test_a_sample_counts_in_the_first_bucket_whose_bound_is_not_below_it():
    for i, bound in enumerate(BUCKETS):
        h = Histogram()
        h.observe(bound)                 # on the bound: that bucket (le is inclusive)
        h.observe(bound * 1.000001)      # just above: the next one (+Inf after the last)
        cumulative = dict(h.buckets())
        assert cumulative[repr(bound)] == 1
        if i:
            assert cumulative[repr(BUCKETS[i - 1])] == 0
        following = repr(BUCKETS[i + 1]) if i + 1 < len(BUCKETS) else "+Inf"
        assert cumulative[following] == 2
        assert h.count == 2 and h.sum == bound + bound * 1.000001


def test_zero_negative_and_huge_samples():
    assert bucket(0.0) == 0 and bucket(-1.0) == 0          # (a clock step: still counted)
    assert bucket(1e9) == len(BUCKETS)
    h = Histogram()
    for s in (0.0, 0.003, 1e9):
        h.observe(s)
    assert h.buckets()[-1] == ("+Inf", 3)
    assert h.quantile(0.5) == 0.005 and h.quantile(1.0) == float("inf")
