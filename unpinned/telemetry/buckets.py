"""The latency histograms' bucket bounds, and the bucket a sample falls in: a function on a
float compiled with mypyc (unpinned/compiled.txt), called for most transactions, where bisect
on the tuple compares Python floats one call at a time. The histograms are in counters.py."""
from __future__ import annotations

from typing import Final

# Seconds; from 50 µs to 10 s. (bucket() writes them out again: tests/unit/test_counters.py.)
BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)


def bucket(seconds: float) -> int:
    """bisect_left(BUCKETS, seconds): the index of the first bound not below `seconds`
    (len(BUCKETS) past the last one). The bounds written out as constants: compiled, these are
    comparisons of doubles; a loop over the tuple makes a float object of each bound."""
    if not seconds > 0.00005:
        return 0
    if not seconds > 0.0001:
        return 1
    if not seconds > 0.00025:
        return 2
    if not seconds > 0.0005:
        return 3
    if not seconds > 0.001:
        return 4
    if not seconds > 0.0025:
        return 5
    if not seconds > 0.005:
        return 6
    if not seconds > 0.01:
        return 7
    if not seconds > 0.025:
        return 8
    if not seconds > 0.05:
        return 9
    if not seconds > 0.1:
        return 10
    if not seconds > 0.25:
        return 11
    if not seconds > 0.5:
        return 12
    if not seconds > 1.0:
        return 13
    if not seconds > 2.5:
        return 14
    if not seconds > 5.0:
        return 15
    if not seconds > 10.0:
        return 16
    return 17
