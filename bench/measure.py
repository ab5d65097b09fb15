"""Measurement windows: merge the client processes' windows, apply the stability rule, summarise.

The rule is perf_analyzer's: a step is stable when each of the last three windows is within
``stability`` of their mean, for throughput and for p99 latency. Figures then come from those
windows only, so the warm-up and the settling period never reach a report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class Window:
    """One measurement window, merged over the client processes that reported it."""

    index: int
    start: float = float("inf")
    end: float = 0.0
    latencies: list = field(default_factory=list)  # float64 arrays, seconds
    lags: list = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    sent: int = 0
    cpu_s: dict = field(default_factory=dict)  # client process -> CPU seconds in this window
    reporters: int = 0

    def add(self, msg: tuple, process: int) -> None:
        _, _, start, end, latencies, lags, errors, versions, sent, cpu = msg
        self.start, self.end = min(self.start, start), max(self.end, end)
        self.latencies.append(np.frombuffer(latencies, dtype=np.float64))
        self.lags.append(np.frombuffer(lags, dtype=np.float64))
        self.errors.update(errors)
        self.versions.update({v.decode(errors="replace"): n for v, n in versions.items()})
        self.sent += sent
        self.cpu_s[process] = cpu
        self.reporters += 1

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 1e-9)

    @property
    def ok(self) -> int:
        return sum(len(a) for a in self.latencies)

    @property
    def completed_rate(self) -> float:
        """Completions per second, errors included: what the stability rule watches."""
        return (self.ok + sum(self.errors.values())) / self.seconds

    @property
    def p99(self) -> float | None:
        lat = np.concatenate(self.latencies) if self.latencies else np.empty(0)
        return float(np.percentile(lat, 99)) if lat.size else None

    def brief(self) -> dict:
        p99 = self.p99
        return {"index": self.index, "seconds": round(self.seconds, 4),
                "throughput_rps": round(self.ok / self.seconds, 2),
                "sent_rps": round(self.sent / self.seconds, 2),
                "errors": sum(self.errors.values()),
                "p99_ms": None if p99 is None else round(p99 * 1e3, 4)}


def within(values: list[float], tolerance: float) -> bool:
    mean = sum(values) / len(values)
    if mean == 0:
        return all(v == 0 for v in values)
    return all(abs(v / mean - 1) <= tolerance for v in values)


def stable(windows: list[Window], count: int = 3, tolerance: float = 0.10) -> bool:
    """True when the last ``count`` windows agree on throughput and on p99 latency."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    if not within([w.completed_rate for w in last], tolerance):
        return False
    p99s = [w.p99 for w in last]
    if all(p is None for p in p99s):  # nothing succeeded: throughput alone decides
        return True
    return None not in p99s and within(p99s, tolerance)


def latency_figures(samples: np.ndarray) -> dict | None:
    """Milliseconds: p50/p90/p95/p99, max, mean, min of a sample in seconds."""
    if samples.size == 0:
        return None
    values = np.percentile(samples, PERCENTILES) * 1e3
    figures = {f"p{p}": round(float(v), 4) for p, v in zip(PERCENTILES, values)}
    figures.update(max=round(float(samples.max()) * 1e3, 4),
                   mean=round(float(samples.mean()) * 1e3, 4),
                   min=round(float(samples.min()) * 1e3, 4))
    return figures


def summarise(windows: list[Window], batch_size: int) -> dict:
    """The client-side figures of a step over the given windows."""
    seconds = sum(w.seconds for w in windows)
    latencies = np.concatenate([a for w in windows for a in w.latencies] or [np.empty(0)])
    lags = np.concatenate([a for w in windows for a in w.lags] or [np.empty(0)])
    errors, versions = Counter(), Counter()
    for w in windows:
        errors.update(w.errors)
        versions.update(w.versions)
    ok = int(latencies.size)
    cpu = Counter()
    for w in windows:
        cpu.update(w.cpu_s)
    return {
        "measured_s": round(seconds, 4),
        "requests": ok,
        "throughput_rps": round(ok / seconds, 2) if seconds else 0.0,
        "inferences_per_s": round(ok * batch_size / seconds, 2) if seconds else 0.0,
        "completed_rps": round((ok + sum(errors.values())) / seconds, 2) if seconds else 0.0,
        "sent_rps": round(sum(w.sent for w in windows) / seconds, 2) if seconds else 0.0,
        "errors": dict(sorted(errors.items())),
        "error_count": sum(errors.values()),
        "latency_ms": latency_figures(latencies),
        "send_lag_ms": latency_figures(lags),
        "versions": dict(sorted(versions.items())),
        "client": {
            "processes": len(cpu),
            "cpu_s": round(sum(cpu.values()), 4),
            "cores": round(sum(cpu.values()) / seconds, 3) if seconds else 0.0,
            # near 1.0: that process was saturated, and the client may be the bottleneck
            "busiest_process": round(max(cpu.values()) / seconds, 3) if cpu else 0.0,
        },
    }
