"""The pure canary analysis: bucketed latencies, the fleet merge, and what counts."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.control.analysis import BOUNDS_NS, CALLER_CODES, bucket_of, merge, percentile_s


def test_the_bucketed_p99_is_within_ten_percent_of_the_exact_one():
    rng = np.random.default_rng(0)
    for scale in (0.0002, 0.003, 0.08, 2.0):
        latencies = rng.lognormal(np.log(scale), 0.6, 5000)
        buckets = [0] * (len(BOUNDS_NS) + 1)
        for value in latencies:
            buckets[bucket_of(int(value * 1e9))] += 1
        exact = float(np.percentile(latencies, 99))
        assert percentile_s(buckets, 0.99) == pytest.approx(exact, rel=0.1)
    assert percentile_s([0] * 5, 0.99) == 0.0


def test_the_merge_adds_up_replicas_of_the_same_window_only():
    def record(window, requests, errors, bucket):
        return {"window": window, "versions": {"2": {"requests": requests, "errors": errors,
                                                      "buckets": {str(bucket): requests}}}}

    figures = [record("w", 10, 1, 40), record("w", 30, 0, 60), record("old", 99, 99, 1),
               {"window": "w", "versions": {"1": {"requests": 5}}}]
    window = merge(figures, "w", "2")
    assert (window.requests, window.errors, window.replicas) == (40, 1, 2)
    assert window.p99_s == pytest.approx(BOUNDS_NS[60] / 1e9)
    assert merge(figures, "w", "3").requests == 0


def test_callers_mistakes_are_the_only_codes_left_out():
    assert {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED"} <= \
        CALLER_CODES
    for code in ("DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                 "INTERNAL"):
        assert code not in CALLER_CODES
