"""Per model-version counters in the shape of Triton's statistics extension.

Durations are cumulative nanoseconds, as ModelStatistics reports them. The batcher updates these
once per batch (and once per request for success/fail), so the request path pays a few integer
additions and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    """Counters of one model version since it was loaded."""

    last_inference_ms: int = 0
    inference_count: int = 0  # samples (batch elements) inferred
    execution_count: int = 0  # model executions (batches)
    success: Duration = field(default_factory=Duration)  # end to end, per request
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)  # batch size -> durations
    cache_hit: Duration = field(default_factory=Duration)  # response cache: lookup time
    cache_miss: Duration = field(default_factory=Duration)  # lookup and insert time

    def record_batch(self, size: int, requests: int, input_ns: int, infer_ns: int,
                     output_ns: int) -> None:
        """Account one executed batch of ``size`` samples from ``requests`` requests."""
        self.execution_count += 1
        self.inference_count += size
        self.compute_input.add(input_ns, requests)
        self.compute_infer.add(infer_ns, requests)
        self.compute_output.add(output_ns, requests)
        stats = self.batches.get(size)
        if stats is None:
            stats = self.batches[size] = BatchStats()
        stats.compute_input.add(input_ns)
        stats.compute_infer.add(infer_ns)
        stats.compute_output.add(output_ns)
