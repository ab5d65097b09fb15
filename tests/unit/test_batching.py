"""The dynamic batcher, driven with a fake runtime at the Runtime seam.

The fake runtime records every batch it runs and blocks each call until the test grants it a
permit, so tests sequence the batcher with events, never with timing: block the instance, queue
work, release, look at what ran. Queue timeouts and deadlines use a fake monotonic clock.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gateway import batching
from gateway.batching import Batcher, Instance
from gateway.errors import (
    DeadlineExceeded,
    ModelExecutionError,
    ResourceExhausted,
    Unavailable,
)
from gateway.modelconfig import BatchingConfig, QueuePolicy
from gateway.statistics import ModelStats
from gateway.tensors import TensorSpec
from runtimes.base import ExecutionError, ModelIO, Runtime

WAIT = 10.0  # seconds; only ever reached when something is broken


class FakeRuntime:
    """Runs ``y = x + 1`` and ``rowsum = x.sum(axis=1)``; blocks until granted a permit.

    ``plan`` holds per-call behaviours, consumed in order: an exception instance to raise, or
    a callable ``feeds -> outputs``. Without one a call computes the normal outputs.
    """

    device = "cpu"

    def __init__(self, blocked: bool = True):
        self.io = ModelIO([TensorSpec("x", "FP32", (-1, -1))],
                          [TensorSpec("y", "FP32", (-1, -1)), TensorSpec("rowsum", "FP32", (-1,))])
        self.calls: list[np.ndarray] = []  # the x of every call, in order
        self.plan: list = []
        self.closed = False
        self._permits = threading.Semaphore(0)
        self._open = not blocked
        self._lock = threading.Lock()

    # ---- test controls
    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def open(self) -> None:
        self._open = True
        self.allow(1000)

    @property
    def batch_rows(self) -> list[list[float]]:
        """The first value of each row of each batch: which requests ran together."""
        return [call[:, 0].tolist() for call in self.calls]

    # ---- Runtime
    def run(self, feeds, output_names):
        assert output_names == ["y", "rowsum"]
        x = feeds["x"]
        with self._lock:
            self.calls.append(np.array(x, copy=True))
            behaviour = self.plan.pop(0) if self.plan else None
        if not self._open:
            assert self._permits.acquire(timeout=WAIT), "test never released the fake runtime"
        if isinstance(behaviour, BaseException):
            raise behaviour
        if behaviour is not None:
            return behaviour(feeds)
        return [x + 1, x.sum(axis=1)]

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self):
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance_us(self, us: int) -> None:
        self.ns += us * 1000


def x_of(value: float, rows: int = 1, width: int = 3) -> np.ndarray:
    """A request input whose every element is ``value`` (so batches show who ran)."""
    return np.full((rows, width), value, dtype=np.float32)


class Harness:
    """A started Batcher over fake runtimes, with helpers to submit and wait."""

    def __init__(self, runtimes: list[FakeRuntime], max_batch_size, batching_cfg, **options):
        self.runtimes = runtimes
        seam: list[Runtime] = runtimes  # the fake stands in for runtimes.base.Runtime
        self.stats = ModelStats()
        instances = [Instance(f"fake{i}", rt, ThreadPoolExecutor(1, thread_name_prefix=f"fake{i}"))
                     for i, rt in enumerate(seam)]
        self.batcher = Batcher("m", "1", max_batch_size, batching_cfg, instances, ["x"],
                               ["y", "rowsum"], self.stats, **options)
        self.batcher.start()

    @property
    def runtime(self) -> FakeRuntime:
        return self.runtimes[0]

    def submit(self, value: float, rows: int = 1, width: int = 3, **kw) -> asyncio.Future:
        return self.batcher.submit([x_of(value, rows, width)], rows, ((width,),), **kw)

    async def calls(self, n: int, runtime: FakeRuntime | None = None) -> None:
        """Wait until ``n`` batches have entered the runtime (they may still be blocked)."""
        runtime = runtime or self.runtime
        for _ in range(int(WAIT / 0.002)):
            if len(runtime.calls) >= n:
                return
            await asyncio.sleep(0.002)
        raise AssertionError(f"expected {n} model calls, saw {len(runtime.calls)}")

    async def settle(self) -> None:
        """Let the event loop and the worker threads make whatever progress they can."""
        for _ in range(20):
            await asyncio.sleep(0.001)


DYNAMIC = BatchingConfig()  # dynamic_batching { } with Triton's defaults


@pytest.fixture
async def make():
    harnesses: list[Harness] = []

    def factory(max_batch_size: int = 8, batching_cfg: BatchingConfig | None = DYNAMIC,
                instances: int = 1, blocked: bool = True, **options) -> Harness:
        h = Harness([FakeRuntime(blocked) for _ in range(instances)], max_batch_size, batching_cfg,
                    **options)
        harnesses.append(h)
        return h

    yield factory
    for h in harnesses:
        for rt in h.runtimes:
            rt.open()
        await asyncio.wait_for(h.batcher.close(), WAIT)


async def result(future: asyncio.Future):
    return await asyncio.wait_for(future, WAIT)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(batching, "now_ns", fake)
    return fake


# ---------------------------------------------------------------- pull when free

async def test_an_idle_instance_runs_a_single_request_at_once_and_alone(make):
    h = make(max_batch_size=8)
    f = h.submit(1.0)
    await h.calls(1)  # entered the model with nothing else queued: no waiting for company
    h.runtime.allow()
    y, rowsum = await result(f)
    assert h.runtime.batch_rows == [[1.0]]
    np.testing.assert_array_equal(y, x_of(2.0))
    np.testing.assert_array_equal(rowsum, [3.0])


async def test_requests_queued_while_the_instance_is_busy_form_one_batch(make):
    h = make(max_batch_size=8)
    first = h.submit(0.0)
    await h.calls(1)
    queued = [h.submit(float(i)) for i in range(1, 6)]
    await h.settle()
    assert len(h.runtime.calls) == 1  # the busy instance took nothing more
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))
    assert h.runtime.batch_rows == [[0.0], [1.0, 2.0, 3.0, 4.0, 5.0]]


async def test_batches_are_capped_at_max_batch_size(make):
    h = make(max_batch_size=4)
    first = h.submit(0.0)
    await h.calls(1)
    queued = [h.submit(float(i)) for i in range(1, 7)]
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))
    assert h.runtime.batch_rows == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0]]


async def test_multi_row_requests_are_never_split_across_batches(make):
    h = make(max_batch_size=4)
    first = h.submit(0.0)
    await h.calls(1)
    sizes = {1.0: 2, 2.0: 3, 3.0: 1}
    queued = {v: h.submit(v, rows=n) for v, n in sizes.items()}
    h.runtime.open()
    await asyncio.gather(first, *queued.values())
    # 2 + 3 > 4: the second request waits for the next batch, which it shares with the third.
    assert h.runtime.batch_rows == [[0.0], [1.0, 1.0], [2.0, 2.0, 2.0, 3.0]]


async def test_each_instance_pulls_work_when_it_is_free(make):
    h = make(max_batch_size=8, instances=2)
    a, b = h.runtimes
    fa = h.submit(1.0)
    await h.calls(1, a)
    fb = h.submit(2.0)  # instance a is busy: b takes this one at once
    await h.calls(1, b)
    a.allow()
    b.allow()
    await asyncio.gather(result(fa), result(fb))
    assert (a.batch_rows, b.batch_rows) == ([[1.0]], [[2.0]])


async def test_results_are_split_back_to_exactly_the_right_callers(make):
    h = make(max_batch_size=16)
    first = h.submit(0.0)
    await h.calls(1)
    sizes = [3, 1, 4, 1, 5]
    futures = [h.submit(float(i + 1), rows=n) for i, n in enumerate(sizes)]
    h.runtime.open()
    await result(first)
    for i, (n, future) in enumerate(zip(sizes, futures)):
        y, rowsum = await result(future)
        np.testing.assert_array_equal(y, x_of(i + 2.0, rows=n))
        np.testing.assert_array_equal(rowsum, np.full(n, 3.0 * (i + 1)))
    assert len(h.runtime.calls) == 2 and len(h.runtime.calls[1]) == sum(sizes)


# ---------------------------------------------------------------- preferred sizes and delay

async def test_batches_are_trimmed_to_the_largest_preferred_size(make):
    h = make(max_batch_size=8, batching_cfg=BatchingConfig(preferred_batch_sizes=(2, 4)))
    first = h.submit(0.0)
    await h.calls(1)
    queued = [h.submit(float(i)) for i in range(1, 8)]
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))
    # 7 queued -> 4 (preferred), 3 left -> 2 (preferred), 1 left: nothing fits, so it runs.
    assert h.runtime.batch_rows == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0], [7.0]]


def run_guarded(scenario, timeout: float = WAIT):
    """Run an async scenario on its own loop in a thread, so a busy-looping batcher fails the
    test instead of hanging the whole run."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = asyncio.run(scenario())
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the batcher hung (its event loop never came back)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_request_larger_than_every_fitting_preferred_size_still_runs():
    async def scenario():
        h = Harness([FakeRuntime(blocked=False)], 8, BatchingConfig(preferred_batch_sizes=(2, 4)))
        y, _ = await result(h.submit(1.0, rows=3))
        await h.batcher.close()
        return y.shape, h.runtime.batch_rows

    assert run_guarded(scenario) == ((3, 3), [[1.0, 1.0, 1.0]])


def test_without_dynamic_batching_requests_run_alone_whatever_their_batch_size():
    async def scenario():
        h = Harness([FakeRuntime()], 8, None)
        first = h.submit(0.0)
        await h.calls(1)
        queued = [h.submit(1.0, rows=2), h.submit(2.0, rows=3), h.submit(3.0)]
        h.runtime.open()
        outs = await asyncio.gather(*map(result, [first, *queued]))
        await h.batcher.close()
        return [y.shape[0] for y, _ in outs], h.runtime.batch_rows

    sizes, rows = run_guarded(scenario)
    assert sizes == [1, 2, 3, 1]
    assert rows == [[0.0], [1.0, 1.0], [2.0, 2.0, 2.0], [3.0]]


async def test_max_queue_delay_waits_only_while_below_the_target(make):
    # A delay far longer than the test: reaching the target must end the wait, not the clock.
    h = make(max_batch_size=4, batching_cfg=BatchingConfig(max_queue_delay_us=600_000_000))
    futures = [h.submit(1.0)]
    await h.settle()
    assert h.runtime.calls == []  # below the target of 4: the idle instance waits for more
    futures += [h.submit(2.0, rows=2)]
    await h.settle()
    assert h.runtime.calls == []
    futures += [h.submit(3.0)]  # 1 + 2 + 1 = 4 = max_batch_size: run now
    await h.calls(1)
    h.runtime.open()
    await asyncio.gather(*map(result, futures))
    assert h.runtime.batch_rows == [[1.0, 2.0, 2.0, 3.0]]


async def test_max_queue_delay_targets_the_largest_preferred_size(make):
    cfg = BatchingConfig(preferred_batch_sizes=(2,), max_queue_delay_us=600_000_000)
    h = make(max_batch_size=8, batching_cfg=cfg)
    futures = [h.submit(1.0)]
    await h.settle()
    assert h.runtime.calls == []
    futures.append(h.submit(2.0))
    await h.calls(1)
    h.runtime.open()
    await asyncio.gather(*map(result, futures))
    assert h.runtime.batch_rows == [[1.0, 2.0]]


async def test_max_queue_delay_runs_what_it_has_when_the_delay_ends(make):
    h = make(max_batch_size=8, batching_cfg=BatchingConfig(max_queue_delay_us=20_000),
             blocked=False)
    y, _ = await result(h.submit(1.0))
    assert h.runtime.batch_rows == [[1.0]]
    np.testing.assert_array_equal(y, x_of(2.0))


# Triton's dynamic batcher, as L0_batcher checks it: preferred sizes [2, 6], max_batch_size 8,
# a delay far longer than the test, so only the arrival of requests can end a wait.
TRITON = BatchingConfig(preferred_batch_sizes=(2, 6), max_queue_delay_us=600_000_000)


async def test_with_a_delay_a_batch_goes_out_at_any_preferred_size(make):
    """Not the largest preferred size (6): the first one reached (2) sends the batch."""
    h = make(batching_cfg=TRITON)
    futures = [h.submit(1.0)]
    await h.settle()
    assert h.runtime.calls == []  # 1 is below every preferred size: wait for company
    futures.append(h.submit(2.0))
    await h.calls(1)
    h.runtime.open()
    await asyncio.gather(*map(result, futures))
    assert h.runtime.batch_rows == [[1.0, 2.0]]


async def test_with_a_delay_a_batch_that_cannot_reach_a_preferred_size_goes_now(make):
    """3 waits; 4 more would pass the largest preferred size (6): the 3 goes at once and the 4
    waits in turn, until 1 + 1 more make 6 (test_multi_batch_sum_gt_max_preferred)."""
    h = make(batching_cfg=TRITON, blocked=False)
    three = h.submit(1.0, rows=3)
    await h.settle()
    assert h.runtime.calls == []
    four = h.submit(2.0, rows=4)
    await result(three)
    await h.settle()
    assert h.runtime.batch_rows == [[1.0] * 3]  # the 4 waits below any preferred size
    assert not four.done()
    rest = [h.submit(3.0), h.submit(4.0)]
    await asyncio.gather(*map(result, [four, *rest]))
    assert h.runtime.batch_rows == [[1.0] * 3, [2.0] * 4 + [3.0, 4.0]]


async def test_with_a_delay_a_request_above_the_largest_preferred_size_runs_at_once(make):
    h = make(batching_cfg=TRITON, blocked=False)
    y, _ = await result(h.submit(1.0, rows=7))
    assert y.shape == (7, 3) and h.runtime.batch_rows == [[1.0] * 7]


async def test_with_a_delay_another_shape_sends_the_forming_batch(make):
    """The batch cannot grow past a request of another shape (FIFO): it goes now."""
    h = make(batching_cfg=TRITON, blocked=False)
    first = h.submit(1.0)
    await h.settle()
    assert h.runtime.calls == []
    other = h.submit(2.0, width=5)
    await result(first)
    await h.settle()
    assert h.runtime.batch_rows == [[1.0]] and not other.done()  # it waits in its turn
    late = h.submit(3.0, width=5)
    await asyncio.gather(result(other), result(late))
    assert h.runtime.batch_rows == [[1.0], [2.0, 3.0]]


async def test_with_a_delay_a_free_instance_takes_the_largest_preferred_size_queued(make):
    """Requests queued while the instance was busy: 7 waiting give a batch of 6 at once (the
    largest preferred size they reach), and the 7th waits for company."""
    h = make(batching_cfg=TRITON)
    first = [h.submit(0.0), h.submit(0.5)]  # 2: preferred, runs and blocks the instance
    await h.calls(1)
    queued = [h.submit(float(i)) for i in range(1, 8)]
    h.runtime.allow(2)
    await asyncio.gather(*map(result, [*first, *queued[:6]]))
    await h.settle()
    assert h.runtime.batch_rows == [[0.0, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
    assert not queued[6].done()
    h.runtime.open()
    last = h.submit(8.0)
    await asyncio.gather(result(queued[6]), result(last))
    assert h.runtime.batch_rows[-1] == [7.0, 8.0]


async def test_with_a_delay_one_instance_forms_a_batch_at_a_time(make):
    """Two idle instances: the second request joins the first one's batch, it does not start a
    batch of its own on the other instance."""
    h = make(batching_cfg=TRITON, instances=2, blocked=False)
    futures = [h.submit(1.0)]
    await h.settle()
    futures.append(h.submit(2.0))
    await asyncio.gather(*map(result, futures))
    rows = [r for rt in h.runtimes for r in rt.batch_rows]
    assert rows == [[1.0, 2.0]]


async def test_without_a_delay_a_batch_between_preferred_sizes_runs_whole(make):
    """Triton without a delay: 1 + 3 = 4 reaches no preferred size (2, 6) and is not past the
    largest, so the 4 run together rather than being cut to 2."""
    h = make(batching_cfg=BatchingConfig(preferred_batch_sizes=(2, 6)))
    first = h.submit(0.0)
    await h.calls(1)
    queued = [h.submit(1.0), h.submit(2.0, rows=3)]
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))
    assert h.runtime.batch_rows == [[0.0], [1.0, 2.0, 2.0, 2.0]]


async def test_different_shapes_never_share_a_batch(make):
    h = make(max_batch_size=8)
    first = h.submit(0.0)
    await h.calls(1)
    widths = [3, 5, 5, 3, 3, 5]
    queued = [h.submit(float(i + 1), width=w) for i, w in enumerate(widths)]
    h.runtime.open()
    outs = await asyncio.gather(*map(result, [first, *queued]))
    for call in h.runtime.calls:  # np.concatenate would have failed on mixed widths anyway
        assert call.shape[1] in (3, 5)
    served = sorted(v for call in h.runtime.calls[1:] for v in call[:, 0].tolist())
    assert served == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # everyone ran exactly once
    for (y, _), w in zip(outs[1:], widths):
        assert y.shape == (1, w)
    # Arrival order is kept: the same-shape neighbours 2,3 and 4,5 ran together.
    assert h.runtime.batch_rows[1:] == [[1.0], [2.0, 3.0], [4.0, 5.0], [6.0]]


# ---------------------------------------------------------------- priorities and queue policy

async def test_higher_priority_levels_run_first(make):
    cfg = BatchingConfig(priority_levels=3, default_priority_level=2)
    h = make(max_batch_size=2, batching_cfg=cfg)
    first = h.submit(0.0)
    await h.calls(1)
    queued = [h.submit(1.0, priority=3), h.submit(2.0),  # 0 = the default level (2)
              h.submit(3.0, priority=1), h.submit(4.0, priority=2),
              h.submit(5.0, priority=1), h.submit(6.0, priority=99)]  # past the last: lowest
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))
    assert h.runtime.batch_rows == [[0.0], [3.0, 5.0], [2.0, 4.0], [1.0, 6.0]]


async def test_a_full_queue_refuses_at_submit(make):
    cfg = BatchingConfig(default_queue_policy=QueuePolicy(max_queue_size=2))
    h = make(max_batch_size=8, batching_cfg=cfg)
    first = h.submit(0.0)
    await h.calls(1)  # running, so no longer queued
    queued = [h.submit(1.0), h.submit(2.0)]
    with pytest.raises(ResourceExhausted) as info:
        h.submit(3.0)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert info.value.message == "model 'm' version 1: queue is full (2 requests waiting)"
    assert h.batcher.queue_depth == 2
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))
    assert h.runtime.batch_rows == [[0.0], [1.0, 2.0]]
    await result(h.submit(4.0))  # room again


async def test_queue_size_limits_apply_per_priority_level(make):
    cfg = BatchingConfig(priority_levels=2, default_priority_level=2,
                         priority_queue_policy={1: QueuePolicy(max_queue_size=1)})
    h = make(max_batch_size=8, batching_cfg=cfg)
    first = h.submit(0.0)
    await h.calls(1)
    queued = [h.submit(1.0, priority=1)]
    with pytest.raises(ResourceExhausted):
        h.submit(2.0, priority=1)
    queued += [h.submit(float(v)) for v in (3, 4, 5)]  # level 2 is unbounded
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))


async def test_default_timeout_reject_fails_with_deadline_exceeded(make, clock):
    cfg = BatchingConfig(default_queue_policy=QueuePolicy("REJECT", default_timeout_us=100))
    h = make(max_batch_size=8, batching_cfg=cfg)
    first = h.submit(0.0)
    await h.calls(1)
    late = h.submit(1.0)
    clock.advance_us(101)
    fresh = h.submit(2.0)
    h.runtime.open()
    with pytest.raises(DeadlineExceeded) as info:
        await result(late)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert info.value.message == "model 'm' version 1: request timed out in the queue"
    await asyncio.gather(result(first), result(fresh))
    assert h.runtime.batch_rows == [[0.0], [2.0]]  # the timed-out request never ran


async def test_default_timeout_delay_still_serves_after_the_others(make, clock):
    cfg = BatchingConfig(default_queue_policy=QueuePolicy("DELAY", default_timeout_us=100))
    h = make(max_batch_size=1, batching_cfg=cfg)
    first = h.submit(0.0)
    await h.calls(1)
    delayed = [h.submit(1.0), h.submit(2.0)]
    clock.advance_us(101)
    fresh = [h.submit(3.0), h.submit(4.0)]
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *delayed, *fresh]))
    assert h.runtime.batch_rows == [[0.0], [3.0], [4.0], [1.0], [2.0]]


async def test_timeout_override_needs_allow_timeout_override(make, clock):
    cfg = BatchingConfig(priority_levels=2, default_priority_level=1,
                         priority_queue_policy={2: QueuePolicy(allow_timeout_override=True)})
    h = make(max_batch_size=8, batching_cfg=cfg)
    first = h.submit(0.0)
    await h.calls(1)
    ignored = h.submit(1.0, timeout_us=10)  # level 1 does not allow overrides: no timeout
    honoured = h.submit(2.0, priority=2, timeout_us=10)
    clock.advance_us(11)
    h.runtime.open()
    with pytest.raises(DeadlineExceeded):
        await result(honoured)
    await asyncio.gather(result(first), result(ignored))
    assert h.runtime.batch_rows == [[0.0], [1.0]]


async def test_timeout_override_can_lengthen_the_default(make, clock):
    policy = QueuePolicy("REJECT", default_timeout_us=10, allow_timeout_override=True)
    h = make(max_batch_size=8, batching_cfg=BatchingConfig(default_queue_policy=policy))
    first = h.submit(0.0)
    await h.calls(1)
    patient = h.submit(1.0, timeout_us=1_000_000)
    default = h.submit(2.0)
    clock.advance_us(11)
    h.runtime.open()
    with pytest.raises(DeadlineExceeded):
        await result(default)
    await asyncio.gather(result(first), result(patient))
    assert h.runtime.batch_rows == [[0.0], [1.0]]


async def test_a_passed_deadline_drops_the_request_before_it_runs(make, clock):
    h = make(max_batch_size=8)
    first = h.submit(0.0)
    await h.calls(1)
    gone = h.submit(1.0, deadline_ns=clock() + 50_000)
    waiting = h.submit(2.0, deadline_ns=clock() + 10_000_000)
    clock.advance_us(51)
    h.runtime.open()
    with pytest.raises(DeadlineExceeded):
        await result(gone)
    await asyncio.gather(result(first), result(waiting))
    assert h.runtime.batch_rows == [[0.0], [2.0]]  # 1.0 never reached the model
    assert h.batcher.queue_depth == 0


async def test_a_deadline_shorter_than_a_delay_timeout_still_rejects(make, clock):
    cfg = BatchingConfig(default_queue_policy=QueuePolicy("DELAY", default_timeout_us=1000))
    h = make(max_batch_size=8, batching_cfg=cfg)
    first = h.submit(0.0)
    await h.calls(1)
    gone = h.submit(1.0, deadline_ns=clock() + 10_000)
    clock.advance_us(11)
    h.runtime.open()
    with pytest.raises(DeadlineExceeded):
        await result(gone)
    await result(first)
    assert h.runtime.batch_rows == [[0.0]]


async def test_a_delayed_request_is_still_dropped_once_its_deadline_passes(make, clock):
    # DELAY moves a timed-out request behind the others; the caller's deadline still holds.
    cfg = BatchingConfig(default_queue_policy=QueuePolicy("DELAY", default_timeout_us=10))
    h = make(max_batch_size=1, batching_cfg=cfg)
    first = h.submit(0.0)
    await h.calls(1)
    delayed = h.submit(1.0, deadline_ns=clock() + 1_000_000)  # 1 ms
    clock.advance_us(20)  # its queue timeout passes: it is delayed, not dropped
    other = h.submit(2.0)
    h.runtime.allow()  # 0.0 ends; the instance takes 2.0 and leaves 1.0 delayed
    await h.calls(2)
    clock.advance_us(2000)  # now the caller's deadline has passed too
    h.runtime.open()
    await asyncio.gather(result(first), result(other))
    with pytest.raises(DeadlineExceeded):
        await result(delayed)
    assert h.runtime.batch_rows == [[0.0], [2.0]]


# ---------------------------------------------------------------- cancellation and errors

async def test_cancelled_requests_are_dropped_before_the_batch_runs(make):
    h = make(max_batch_size=8)
    first = h.submit(0.0)
    await h.calls(1)
    a, b, c = h.submit(1.0), h.submit(2.0), h.submit(3.0)
    b.cancel()
    h.runtime.open()
    await asyncio.gather(result(first), result(a), result(c))
    assert b.cancelled()
    assert h.runtime.batch_rows == [[0.0], [1.0, 3.0]]
    assert h.batcher.queue_depth == 0


async def test_a_batch_whose_requests_were_all_cancelled_never_runs(make):
    h = make(max_batch_size=8)
    first = h.submit(0.0)
    await h.calls(1)
    gone = [h.submit(1.0), h.submit(2.0)]
    for f in gone:
        f.cancel()
    h.runtime.open()
    await result(first)
    await result(h.submit(3.0))
    assert h.runtime.batch_rows == [[0.0], [3.0]]


async def test_cancelling_while_the_batch_runs_leaves_the_others_their_results(make):
    h = make(max_batch_size=8)
    first = h.submit(0.0)
    await h.calls(1)
    a, b = h.submit(1.0), h.submit(2.0)
    h.runtime.allow()
    await result(first)
    await h.calls(2)  # a and b are in the model now
    a.cancel()
    h.runtime.allow()
    y, _ = await result(b)
    np.testing.assert_array_equal(y, x_of(3.0))
    assert a.cancelled()


async def test_a_request_cancelled_during_the_queue_delay_never_runs(make, clock):
    h = make(max_batch_size=8, batching_cfg=BatchingConfig(max_queue_delay_us=1000),
             blocked=False)
    gone = h.submit(1.0)
    for _ in range(int(WAIT / 0.001)):  # until the idle instance holds it, waiting for company
        if h.batcher.queue_depth == 0:
            break
        await asyncio.sleep(0.001)
    gone.cancel()
    await h.settle()
    clock.advance_us(1001)  # the delay ends (on the batcher's clock) with nobody left to run
    await h.settle()
    assert h.runtime.calls == []
    other = h.submit(2.0)
    await h.settle()
    clock.advance_us(1001)
    y, _ = await result(other)
    assert h.runtime.batch_rows == [[2.0]]
    np.testing.assert_array_equal(y, x_of(3.0))


async def test_cancelling_a_lone_running_request_or_a_failing_one_is_harmless(make):
    h = make(max_batch_size=8)
    alone = h.submit(1.0)
    await h.calls(1)
    alone.cancel()
    h.runtime.allow()
    pair = [h.submit(2.0), h.submit(3.0)]
    h.runtime.plan = [RuntimeError("boom")]
    await h.calls(2)
    pair[0].cancel()
    h.runtime.allow()
    with pytest.raises(ModelExecutionError):
        await result(pair[1])
    h.runtime.open()
    await result(h.submit(4.0))
    assert alone.cancelled() and pair[0].cancelled()


async def test_a_model_error_fails_only_its_batch(make):
    h = make(max_batch_size=8)
    first = h.submit(0.0)
    await h.calls(1)
    failing = [h.submit(1.0), h.submit(2.0)]
    h.runtime.plan = [ExecutionError("bad dims in node Gemm_0")]
    h.runtime.allow()
    await result(first)
    await h.calls(2)
    h.runtime.allow()
    for f in failing:
        with pytest.raises(ModelExecutionError) as info:
            await result(f)
        assert info.value.code == "INTERNAL"
        assert info.value.message == (
            "model 'm' version 1 failed to execute: bad dims in node Gemm_0")
    after = h.submit(3.0)
    h.runtime.allow()
    y, _ = await result(after)
    np.testing.assert_array_equal(y, x_of(4.0))


async def test_an_error_without_a_message_is_named_by_its_type(make):
    h = make(max_batch_size=8, blocked=False)
    h.runtime.plan = [MemoryError()]
    with pytest.raises(ModelExecutionError) as info:
        await result(h.submit(1.0))
    assert info.value.message == "model 'm' version 1 failed to execute: MemoryError"


async def test_a_wrong_output_batch_size_fails_the_batch(make):
    h = make(max_batch_size=8)
    first = h.submit(0.0)
    await h.calls(1)
    pair = [h.submit(1.0), h.submit(2.0)]
    h.runtime.plan = [lambda feeds: [feeds["x"][:1] + 1, feeds["x"].sum(axis=1)]]
    h.runtime.open()
    await result(first)
    for f in pair:
        with pytest.raises(ModelExecutionError) as info:
            await result(f)
        assert info.value.message == "model 'm' version 1 returned [1, 2] rows for a batch of 2"
    await result(h.submit(3.0))  # the instance serves on


async def test_a_scalar_output_from_a_batching_model_fails_the_batch(make):
    h = make(max_batch_size=8, blocked=False)
    h.runtime.plan = [lambda feeds: [feeds["x"] + 1, np.float32(7.0) + np.zeros((), np.float32)]]
    with pytest.raises(ModelExecutionError) as info:
        await result(h.submit(1.0, rows=2))
    assert info.value.message == "model 'm' version 1 returned [2, 0] rows for a batch of 2"
    y, _ = await result(h.submit(2.0))  # the worker survived
    np.testing.assert_array_equal(y, x_of(3.0))


async def test_a_non_batching_model_may_return_any_shape(make):
    h = make(max_batch_size=0, batching_cfg=None, blocked=False)
    h.runtime.plan = [lambda feeds: [np.zeros((5, 5), np.float32), np.zeros((), np.float32)]]
    y, rowsum = await result(h.submit(1.0))
    assert y.shape == (5, 5) and rowsum.shape == ()


async def test_a_non_batching_model_runs_one_request_at_a_time(make):
    h = make(max_batch_size=0, batching_cfg=None)
    first = h.submit(0.0)
    await h.calls(1)
    queued = [h.submit(1.0), h.submit(2.0)]
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))
    assert h.runtime.batch_rows == [[0.0], [1.0], [2.0]]


async def test_lower_priority_levels_hold_at_most_their_share_of_the_in_flight_limit(make):
    """Requests starved by a higher priority pile up; bounded, they never fill the model's
    in-flight limit, so the first level always finds room."""
    cfg = BatchingConfig(priority_levels=2, default_priority_level=2,
                         priority_queue_policy={2: QueuePolicy(max_queue_size=100)})
    h = make(max_batch_size=1, batching_cfg=cfg, max_inflight=6)  # level 2's share: 3
    first = h.submit(0.0, priority=1)
    await h.calls(1)
    low = [h.submit(float(v), priority=2) for v in (1, 2, 3)]
    with pytest.raises(ResourceExhausted) as info:
        h.submit(4.0, priority=2)
    assert info.value.message == ("model 'm' version 1: priority level 2 has 3 requests waiting, "
                                  "its share of the model's in-flight limit; retry later")
    high = [h.submit(float(v), priority=1) for v in (5, 6, 7, 8)]  # the first level: no share
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *low, *high]))
    assert h.runtime.batch_rows == [[0.0], [5.0], [6.0], [7.0], [8.0], [1.0], [2.0], [3.0]]
    await result(h.submit(9.0, priority=2))  # room again


async def test_a_smaller_max_queue_size_wins_over_the_share(make):
    cfg = BatchingConfig(priority_levels=2, default_priority_level=2,
                         priority_queue_policy={2: QueuePolicy(max_queue_size=1)})
    h = make(max_batch_size=1, batching_cfg=cfg, max_inflight=6)
    first = h.submit(0.0, priority=1)
    await h.calls(1)
    queued = h.submit(1.0)
    with pytest.raises(ResourceExhausted) as info:
        h.submit(2.0)
    assert info.value.message == "model 'm' version 1: queue is full (1 requests waiting)"
    h.runtime.open()
    await asyncio.gather(result(first), result(queued))


# ---------------------------------------------------------------- close and statistics

async def test_close_drains_queued_work_then_closes_the_runtimes(make):
    h = make(max_batch_size=2, instances=2)
    a, b = h.runtimes
    futures = [h.submit(0.0)]
    await h.calls(1, a)
    futures.append(h.submit(1.0))
    await h.calls(1, b)
    futures += [h.submit(float(v)) for v in (2, 3, 4)]
    closing = asyncio.create_task(h.batcher.close())
    await h.settle()
    assert not closing.done()
    with pytest.raises(Unavailable) as info:
        h.submit(9.0)
    assert info.value.message == "model 'm' version 1 is unloading"
    assert not a.closed and not b.closed
    a.open()
    b.open()
    await asyncio.wait_for(closing, WAIT)
    for f in futures:
        assert f.done() and not f.cancelled() and f.exception() is None
    assert sorted(v for rt in (a, b) for row in rt.batch_rows for v in row) == [0, 1, 2, 3, 4]
    assert a.closed and b.closed


async def test_statistics_count_batches_requests_and_samples(make):
    h = make(max_batch_size=8)
    first = h.submit(0.0, rows=2)
    await h.calls(1)
    queued = [h.submit(1.0), h.submit(2.0, rows=3)]
    h.runtime.open()
    await asyncio.gather(*map(result, [first, *queued]))
    h.runtime.plan = [RuntimeError("boom")]
    with pytest.raises(ModelExecutionError):
        await result(h.submit(3.0))
    s = h.stats
    assert s.execution_count == 2  # the failed batch is not an execution
    assert s.inference_count == 6
    assert s.queue.count == 4  # every request that reached a batch, the failed one included
    assert (s.compute_input.count, s.compute_infer.count, s.compute_output.count) == (3, 3, 3)
    assert sorted(s.batches) == [2, 4]
    assert s.batches[4].compute_infer.count == 1 and s.batches[2].compute_infer.count == 1
    assert s.compute_infer.ns >= 0 and s.queue.ns >= 0
    assert s.last_inference_ms > 0


# ---------------------------------------------------------------- stuck instances

async def test_a_stuck_instance_fails_its_batch_and_the_others_take_over(make):
    h = make(max_batch_size=8, instances=2)
    h.batcher.execution_timeout_s = 0.05
    stuck, healthy = h.runtimes
    healthy.open()
    first = h.submit(1.0)  # lands on the first free instance, which never answers
    await h.calls(1, stuck)
    with pytest.raises(ModelExecutionError) as info:
        await result(first)
    assert info.value.message == ("model 'm' version 1 did not finish a batch within 0.05s; "
                                  "its instance is taken out of service")
    for value in (2.0, 3.0, 4.0):
        y, _ = await result(h.submit(value))
        np.testing.assert_array_equal(y, x_of(value + 1))
    assert len(stuck.calls) == 1  # the stuck instance took nothing more


async def test_when_every_instance_is_stuck_the_version_is_unavailable(make):
    h = make(max_batch_size=1)
    h.batcher.execution_timeout_s = 0.05
    first = h.submit(1.0)
    await h.calls(1)
    queued = h.submit(2.0)
    with pytest.raises(ModelExecutionError):
        await result(first)
    message = ("model 'm' version 1: every instance is stuck in a model call; reload the model")
    with pytest.raises(Unavailable) as info:
        await result(queued)
    assert info.value.message == message
    with pytest.raises(Unavailable) as info:
        h.submit(3.0)
    assert info.value.message == message
    h.runtime.open()  # the "model" finally returns; close() must not wait for it anyway


# ---------------------------------------------------------------- a drain out of time

async def test_abandon_answers_running_forming_and_queued_requests_at_once(make):
    h = make(max_batch_size=8, instances=2,
             batching_cfg=BatchingConfig(max_queue_delay_us=600_000_000))
    a, b = h.runtimes
    running = [h.submit(0.0, rows=8)]  # a full batch: runs at once on one instance
    await h.calls(1)
    forming = [h.submit(1.0)]  # the other instance holds it, waiting for company
    await h.settle()
    assert len(a.calls) + len(b.calls) == 1
    error = Unavailable("the server is shutting down")
    h.batcher.abandon(error)
    for f in running + forming:
        with pytest.raises(Unavailable) as info:
            await result(f)
        assert info.value is error
    assert h.batcher.queue_depth == 0
    # The model call still finishes on its thread; its result goes nowhere and harms nothing.
    a.open()
    b.open()
    y, _ = await result(h.submit(5.0, rows=8))
    np.testing.assert_array_equal(y, x_of(6.0, rows=8))


# ---------------------------------------------------------------- run_now keeps the order

async def test_run_now_never_overtakes_a_batch_being_formed(make):
    """With a queue delay, a worker holds the first request while the batch grows: a later
    request must join that batch, not run at once ahead of it (the batch would never form)."""
    h = make(max_batch_size=4, batching_cfg=BatchingConfig(max_queue_delay_us=600_000_000),
             blocked=False)
    h.batcher.inline = True
    first = h.submit(1.0)
    await h.settle()
    assert h.batcher.queue_depth == 0 and h.runtime.calls == []  # taken, waiting for company
    assert await h.batcher.run_now([x_of(2.0)], 1) is None
    later = [h.submit(float(v)) for v in (2, 3, 4)]
    await asyncio.gather(*map(result, [first, *later]))
    assert h.runtime.batch_rows == [[1.0, 2.0, 3.0, 4.0]]
    # Nothing queued or forming, but the delay asks requests to wait for company: never at once.
    assert await h.batcher.run_now([x_of(5.0)], 1) is None


async def test_an_inline_model_with_a_queue_delay_still_batches(make):
    """The inline fast path must not defeat the batching the config asks for: a small
    fixed-shape model with max_queue_delay batches concurrent requests (Triton shows {2: 1})."""
    cfg = BatchingConfig(preferred_batch_sizes=(2,), max_queue_delay_us=600_000_000)
    h = make(max_batch_size=8, batching_cfg=cfg, blocked=False, inline=True)
    assert await h.batcher.run_now([x_of(1.0)], 1) is None
    futures = [h.submit(1.0)]
    await h.settle()
    assert h.runtime.calls == []
    futures.append(h.submit(2.0))
    await asyncio.gather(*map(result, futures))
    assert h.runtime.batch_rows == [[1.0, 2.0]]
    assert sorted(h.stats.batches) == [2]



# ---------------------------------------------------------------- the inline time budget

async def test_inline_batches_that_keep_overrunning_move_the_version_to_its_threads(
        make, clock, caplog):
    """A model judged inline whose batches keep overrunning the budget (three within a
    minute) runs on its instance thread from then on; one overrun (the process was paused:
    wall time counts that too) is only logged."""
    caplog.set_level("INFO", logger="gateway.batching")
    h = make(max_batch_size=8, blocked=False)
    h.batcher.inline = True
    h.batcher.inline_budget_ns = 10_000_000
    loop_thread = threading.get_ident()
    ran_on = []

    def costly(feeds):  # this input takes 50 ms (on the fake clock)
        ran_on.append(threading.get_ident())
        clock.advance_us(50_000)
        return [feeds["x"] + 1, feeds["x"].sum(axis=1)]

    def cheap(feeds):
        ran_on.append(threading.get_ident())
        return [feeds["x"] + 1, feeds["x"].sum(axis=1)]

    h.runtime.plan = [cheap, costly, cheap, costly, costly, cheap]
    for value in (1.0, 2.0, 3.0, 4.0):
        y, _ = await h.batcher.run_now([x_of(value)], 1)  # inline: at once, on the loop
        np.testing.assert_array_equal(y, x_of(value + 1))
    assert h.batcher.inline  # one overrun, then one more: not yet
    assert "(1 of 3 in a minute before it moves to its threads)" in caplog.text
    y, _ = await h.batcher.run_now([x_of(5.0)], 1)
    assert not h.batcher.inline
    assert ("model 'm' version 1: a batch of 1 took 50.0 ms on the event loop, over its 10.0 ms "
            "budget (3 times within a minute)") in caplog.text
    assert await h.batcher.run_now([x_of(6.0)], 1) is None  # no longer at once
    y, _ = await result(h.submit(6.0))
    np.testing.assert_array_equal(y, x_of(7.0))
    assert ran_on[:5] == [loop_thread] * 5 and ran_on[5] != loop_thread


async def test_overruns_far_apart_keep_the_version_inline(make, clock):
    h = make(max_batch_size=8, blocked=False)
    h.batcher.inline = True
    h.batcher.inline_budget_ns = 10_000_000

    def costly(feeds):
        clock.advance_us(50_000)
        return [feeds["x"] + 1, feeds["x"].sum(axis=1)]

    h.runtime.plan = [costly] * 5
    for value in range(5):
        await h.batcher.run_now([x_of(float(value))], 1)
        clock.advance_us(40_000_000)  # 40 s between overruns
    assert h.batcher.inline


# ---------------------------------------------------------------- response cache

async def test_a_cached_response_answers_without_running_the_model(make):
    from gateway.cache import ResponseCache

    h = make(blocked=False, cache=ResponseCache(1 << 20))
    first, _ = await result(h.submit(1.0))
    again, _ = await result(h.submit(1.0))  # same input: from the cache
    other, _ = await result(h.submit(2.0))
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(other, x_of(3.0))
    assert h.runtime.batch_rows == [[1.0], [2.0]]
    assert (h.stats.cache_hit.count, h.stats.cache_miss.count) == (1, 2)
    assert h.stats.execution_count == 2  # hits are not executions
    assert await h.batcher.run_now([x_of(3.0)], 1) is None  # cached models use the queue


async def test_a_failed_request_is_not_cached(make):
    from gateway.cache import ResponseCache

    h = make(blocked=False, cache=ResponseCache(1 << 20))
    h.runtime.plan = [ExecutionError("boom")]
    with pytest.raises(ModelExecutionError):
        await result(h.submit(1.0))
    y, _ = await result(h.submit(1.0))
    np.testing.assert_array_equal(y, x_of(2.0))
    assert len(h.runtime.calls) == 2 and h.stats.cache_hit.count == 0
