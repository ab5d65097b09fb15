"""Canary analysis, pure: what a rollout's parameters may be, what counts as a failure, how the
fleet's figures add up, and whether a finished step advances, waits or rolls back.

Nothing here does I/O or reads a clock, so every rule is unit-tested directly.

What counts: every finished request to the canary or the baseline except the caller's own
mistakes (bad input, unknown names, credentials). Timeouts, cancellations, overload and model
errors are failures, and every counted request's latency enters the p99, a timed-out one at the
time it gave up. Latencies are kept as counts in fixed buckets, so the judge can add up the
histograms of every replica and take the fleet's p99 from the sum.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

from gateway.errors import InvalidArgument

# Status codes that say the caller was wrong, not the version: not evidence either way.
CALLER_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED",
                          "PERMISSION_DENIED", "FAILED_PRECONDITION", "UNIMPLEMENTED"})
LATENCY_SLACK_S = 0.002  # p99 differences below this are noise, whatever the ratio
# Histogram bounds: 50 us to ~170 s, each 1.1x the last (p99 within 5%), then overflow.
BOUNDS_NS = tuple(round(50_000 * 1.1 ** i) for i in range(158))
MAX_INTERVAL_S = 7 * 24 * 3600.0
MAX_MIN_REQUESTS = 10**9


def bucket_of(elapsed_ns: int) -> int:
    return bisect_left(BOUNDS_NS, elapsed_ns)


def percentile_s(buckets: list[int], q: float) -> float:
    """The q-quantile (0..1) of a bucketed latency distribution, in seconds: the upper bound of
    the bucket holding it (the overflow bucket reads as twice the last bound)."""
    total = sum(buckets)
    if not total:
        return 0.0
    rank = math.ceil(q * total)
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            bound = BOUNDS_NS[index] if index < len(BOUNDS_NS) else BOUNDS_NS[-1] * 2
            return bound / 1e9
    return BOUNDS_NS[-1] * 2 / 1e9


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    model: str
    to_version: str
    from_version: str
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    interval_s: float = 60.0
    max_error_rate: float = 0.01
    max_latency_ratio: float = 1.5
    min_requests: int = 100
    # Ground-truth feedback (gateway/feedback.py), off at 0: the canary's accuracy must be at
    # least this times the baseline's (regression: its mean absolute error at most the
    # baseline's divided by it), once both versions have ``min_labels`` labelled predictions.
    min_accuracy_ratio: float = 0.0
    min_labels: int = 50

    def validate(self) -> None:
        self.validate_limits()
        if self.to_version == self.from_version:
            raise InvalidArgument("the canary and the baseline are the same version")

    def validate_limits(self) -> None:
        """Everything but the versions (a publish checks its canary before it has one)."""
        finite = all(math.isfinite(v) for v in (*self.steps, self.interval_s,
                                                self.max_error_rate, self.max_latency_ratio,
                                                self.min_accuracy_ratio))
        if not finite:
            raise InvalidArgument("rollout parameters must be finite numbers (no NaN or "
                                  "infinity)")
        if not self.steps or any(not 0 < s <= 100 for s in self.steps) \
                or any(a >= b for a, b in zip(self.steps, self.steps[1:])):
            raise InvalidArgument("steps must be increasing percentages in (0, 100]")
        if self.steps[-1] != 100:
            raise InvalidArgument("the last step must be 100 (promotion)")
        if not 0 < self.interval_s <= MAX_INTERVAL_S:
            raise InvalidArgument(f"interval must be above 0 and at most {MAX_INTERVAL_S:g} "
                                  "seconds (7 days)")
        if not 0 <= self.min_requests <= MAX_MIN_REQUESTS:
            raise InvalidArgument("min_requests must be 0 (no minimum) or more")
        if not 0 <= self.max_error_rate <= 1:
            raise InvalidArgument("max_error_rate must be within [0, 1]")
        if not self.max_latency_ratio > 0:
            raise InvalidArgument("max_latency_ratio must be above 0")
        if self.min_accuracy_ratio < 0 or not 0 <= self.min_labels <= MAX_MIN_REQUESTS:
            raise InvalidArgument("min_accuracy_ratio and min_labels must not be negative")


def rollout_spec(model: str, to_version: str, from_version: str = "", *,
                 steps=None, interval_s=None, max_error_rate=None, max_latency_ratio=None,
                 min_requests=None, min_accuracy_ratio=None, min_labels=None) -> RolloutSpec:
    """A spec from an operator's request: None keeps the default; nothing is validated yet."""
    given = {"steps": tuple(float(s) for s in steps) if steps else None,
             "interval_s": interval_s, "max_error_rate": max_error_rate,
             "max_latency_ratio": max_latency_ratio, "min_requests": min_requests,
             "min_accuracy_ratio": min_accuracy_ratio, "min_labels": min_labels}
    return RolloutSpec(model, to_version, from_version,
                       **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True, slots=True)
class Window:
    """What one version did during the current step, across the fleet."""

    requests: int
    errors: int
    p99_s: float
    replicas: int = 0  # how many replicas' figures are in it

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def merge(figures: list[dict], window: str, version: str) -> Window:
    """One version's window from every replica's published figures for window ``window``."""
    requests = errors = replicas = 0
    buckets = [0] * (len(BOUNDS_NS) + 1)
    for record in figures:
        if record.get("window") != window:
            continue  # an earlier step's figures, or a replica that has not caught up
        data = (record.get("versions") or {}).get(version)
        if not data:
            continue
        replicas += 1
        requests += int(data.get("requests", 0))
        errors += int(data.get("errors", 0))
        for index, count in (data.get("buckets") or {}).items():
            index = int(index)
            if 0 <= index < len(buckets):
                buckets[index] += int(count)
    return Window(requests, errors, percentile_s(buckets, 0.99), replicas)


Quality = tuple  # (kind, labelled, accuracy or mean absolute error) of one version


def decide(spec: RolloutSpec, canary: Window, baseline: Window,
           canary_quality: Quality | None = None,
           baseline_quality: Quality | None = None) -> tuple[str, str]:
    """("advance" | "rollback" | "wait", why) for one finished step."""
    if canary.requests < spec.min_requests:  # 0: judged on time alone
        return "wait", (f"{canary.requests} canary requests so far; {spec.min_requests} "
                        "needed before judging")
    if canary.error_rate > spec.max_error_rate:
        return "rollback", (f"canary error rate {canary.error_rate:.2%} is above "
                            f"{spec.max_error_rate:.2%} ({canary.errors} of {canary.requests}"
                            " failed, timed out or were shed)")
    if baseline.requests and baseline.p99_s > 0:
        ratio = canary.p99_s / baseline.p99_s
        # Sub-millisecond p99s jitter by more than any ratio on a busy host: a canary is slow
        # only when it is also slower by a noticeable absolute margin.
        if ratio > spec.max_latency_ratio and canary.p99_s - baseline.p99_s > LATENCY_SLACK_S:
            return "rollback", (f"canary p99 latency {canary.p99_s * 1000:.2f} ms is "
                                f"{ratio:.2f}x the baseline's {baseline.p99_s * 1000:.2f} ms "
                                f"(limit {spec.max_latency_ratio:g}x)")
    if spec.min_accuracy_ratio > 0:
        verdict = _judge_quality(spec, canary_quality, baseline_quality)
        if verdict is not None:
            return verdict
    return "advance", (f"canary healthy: {canary.requests} requests, error rate "
                       f"{canary.error_rate:.2%}, p99 {canary.p99_s * 1000:.2f} ms vs baseline "
                       f"{baseline.p99_s * 1000:.2f} ms")


def _judge_quality(spec: RolloutSpec, canary: Quality | None,
                   baseline: Quality | None) -> tuple[str, str] | None:
    """The feedback check: None when the canary is good enough."""
    labelled = [q[1] if q else 0 for q in (canary, baseline)]
    if min(labelled) < max(spec.min_labels, 1):
        return "wait", (f"{labelled[0]} canary and {labelled[1]} baseline predictions "
                        f"labelled; {spec.min_labels} each needed to compare accuracy")
    kind, _, score = canary
    base = baseline[2]
    if kind == "regression":
        if score * spec.min_accuracy_ratio > base:
            return "rollback", (f"canary mean absolute error {score:.4g} is above the "
                                f"baseline's {base:.4g} / {spec.min_accuracy_ratio:g}")
    elif score < spec.min_accuracy_ratio * base:
        return "rollback", (f"canary accuracy {score:.2%} is below {spec.min_accuracy_ratio:g}x "
                            f"the baseline's {base:.2%} ({canary[1]} labelled)")
    return None
