"""Dynamic batching for one model version: a queue, a pool of instances, pull-when-free.

Each model instance runs a worker task. Without ``max_queue_delay_microseconds`` an idle worker
takes whatever is queued at once, so at low load a request runs alone with no added wait; while
every instance is busy the queue grows, and the next free instance takes it as one batch.

With a delay configured the batch is formed as Triton's dynamic batcher forms it (one free
instance forms at a time, like Triton's single scheduler thread): it goes out as soon as it
reaches *any* preferred batch size (the largest one the queue allows), when the next request
would take it past the largest preferred size or ``max_batch_size`` or has another shape, or
when its oldest request has waited the delay; below that it waits for more. Preferred sizes
default to ``max_batch_size``. Without a delay a batch is trimmed to the largest preferred size
it covers, the rest waiting for the next free instance.

Requests are grouped by a shape key: requests whose non-batch dims differ never share a batch.
Cancelled and expired requests are dropped before a batch runs. Model calls run on one thread
per instance (ONNX Runtime releases the GIL), or on the event loop for models too small to be
worth the hand-off (``inline``), but never so as to skip a configured queue delay.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gateway.cache import ResponseCache
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    ModelExecutionError,
    ResourceExhausted,
    Unavailable,
)
from gateway.modelconfig import BatchingConfig, QueuePolicy
from gateway.statistics import ModelStats
from runtimes.base import ExecutionError, Runtime

log = logging.getLogger(__name__)
_LOADS = itertools.count(1)  # one number per batcher: the response cache's scope
# An inline model moves to its threads after this many budget overruns within the window.
OVERRUNS_TO_LEAVE = 3
OVERRUN_WINDOW_NS = 60_000_000_000
now_ns = time.monotonic_ns


@dataclass(slots=True)
class Instance:
    """One runtime and the single thread that drives it."""

    name: str
    runtime: Runtime
    executor: ThreadPoolExecutor
    batch: list | None = None  # the requests it is forming into a batch or running


class QueuedRequest:
    """A request waiting in the batcher; ``inputs`` are in the model's input order."""

    __slots__ = (
        "deadline_ns",
        "enqueued_ns",
        "expires_ns",
        "future",
        "inputs",
        "key",
        "level",
        "reject_on_expiry",
        "size",
    )

    def __init__(self, inputs, size, key, future, enqueued_ns, expires_ns, reject_on_expiry, level,
                 deadline_ns=0):
        self.inputs = inputs
        self.size = size
        self.key = key
        self.future = future
        self.enqueued_ns = enqueued_ns
        self.expires_ns = expires_ns
        self.reject_on_expiry = reject_on_expiry
        self.level = level
        self.deadline_ns = deadline_ns  # the caller's own deadline, kept once DELAY applies


class _Level:
    """One priority level: requests in arrival order, then those delayed by their timeout.

    ``limit``: requests it may hold waiting (0: no limit), the smaller of its policy's
    max_queue_size and ``share``; ``share`` bounds a level below the first to its part of the
    model's in-flight limit, so requests starved by higher priorities never fill that limit
    and lock every priority out."""

    __slots__ = ("delayed", "limit", "policy", "ready", "share")

    def __init__(self, policy: QueuePolicy, share: int = 0):
        self.ready: deque[QueuedRequest] = deque()
        self.delayed: deque[QueuedRequest] = deque()
        self.policy = policy
        self.share = share
        limits = [n for n in (policy.max_queue_size, share) if n]
        self.limit = min(limits) if limits else 0

    def __len__(self) -> int:
        return len(self.ready) + len(self.delayed)


class Batcher:
    """Queue and scheduler of one model version."""

    def __init__(self, model: str, version: str, max_batch_size: int,
                 batching: BatchingConfig | None, instances: list[Instance],
                 input_names: list[str], output_names: list[str], stats: ModelStats,
                 execution_timeout_s: float = 0.0, inline: bool = False,
                 inline_budget_s: float = 0.0, max_inflight: int = 0,
                 cache: ResponseCache | None = None):
        self.model = model
        self.version = version
        self.batching = max_batch_size > 0
        self.max_batch_size = max(max_batch_size, 1)
        cfg = batching or BatchingConfig()
        # Without dynamic_batching in the config, requests still run alone on a free instance.
        self.max_batch = self.max_batch_size if batching is not None else 1
        # Triton's defaults: no preferred size configured means max_batch_size.
        self.preferred = frozenset(cfg.preferred_batch_sizes or (self.max_batch,))
        self.max_preferred = max(self.preferred)
        # Without a delay a batch is cut to a preferred size only if one is below the largest
        # batch (Triton fills preferred_batch_size with max_batch_size: nothing to cut).
        self.trim = any(p < self.max_batch for p in cfg.preferred_batch_sizes)
        self.delay_ns = cfg.max_queue_delay_us * 1000
        self._former = asyncio.Lock()  # with a delay, one free instance forms a batch at a time
        self.default_level = cfg.default_priority_level if cfg.priority_levels else 0
        levels = max(cfg.priority_levels, 1)
        # Strict priority never ages a request: below the first level, each holds at most its
        # share of the model's in-flight limit (``max_inflight``; 0 = no shares).
        share = max(max_inflight // levels, 1) if max_inflight and levels > 1 else 0
        self._levels = [_Level(cfg.priority_queue_policy.get(i + 1, cfg.default_queue_policy),
                               share if i else 0)
                        for i in range(levels)]
        self.instances = instances
        self.input_names = input_names
        self.output_names = output_names
        self.stats = stats
        self._pending = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._workers: list[asyncio.Task] = []
        # A batch running longer than this takes its instance out of service (0 = never).
        self.execution_timeout_s = execution_timeout_s
        # Small models run on the event loop: the thread hand-off costs more than they compute.
        self.inline = inline
        # An inline batch over this (ns) moves the version to its instance threads for good
        # (gateway.loading.INLINE_BUDGET_SECONDS); no limit when inline was asked for explicitly.
        self.inline_budget_ns = int(inline_budget_s * 1e9) if inline_budget_s else 1 << 62
        self._overruns, self._overrun_since = 0, 0  # inline budget overruns in this window
        self._stuck: set[str] = set()  # names of instances whose thread never came back
        # The server's response cache, when this model's config enables it (gateway/cache.py).
        # Its entries are this load's: a version reloaded with a new file (same number) gets
        # a new batcher, whose lookups never find what the old file computed.
        self.cache = cache
        self._cache_scope = f"{version}#{next(_LOADS)}"
        self._label = f"model '{model}' version {version}"
        # Called after each batch: (batcher, requests, feeds, size, start_ns, infer_ns, done_ns).
        # Monitoring hangs here; it must be cheap or hand off to another thread.
        self.observer = None

    @property
    def queue_depth(self) -> int:
        return self._pending

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(inst), name=f"batcher:{inst.name}")
                         for inst in self.instances]

    def submit(self, inputs: list[np.ndarray], size: int, key: tuple, priority: int = 0,
               timeout_us: int = 0, deadline_ns: int = 0) -> asyncio.Future:
        """Queue one request; the returned future resolves to its list of output arrays."""
        if self._closed:
            raise Unavailable(f"{self._label} is unloading")
        if len(self._stuck) == len(self.instances):
            raise Unavailable(f"{self._label}: every instance is stuck in a model call; "
                              "reload the model")
        if self.cache is not None:
            return self._submit_cached(inputs, size, key, priority, timeout_us, deadline_ns)
        return self._enqueue(inputs, size, key, priority, timeout_us, deadline_ns)

    def _submit_cached(self, inputs, size, key, priority, timeout_us, deadline_ns):
        """A hit answers at once (no queue, no execution); a miss runs and, if it succeeds, is
        kept. Statistics as Triton's: cache_hit (lookup time), cache_miss (lookup and insert)."""
        start = now_ns()
        cache_key = self.cache.key(self.model, self._cache_scope, inputs)
        outputs = self.cache.get(cache_key)
        if outputs is not None:
            self.stats.cache_hit.add(now_ns() - start)
            future = asyncio.get_running_loop().create_future()
            future.set_result(outputs)
            return future
        lookup_ns = now_ns() - start
        future = self._enqueue(inputs, size, key, priority, timeout_us, deadline_ns)

        def keep(done: asyncio.Future) -> None:
            insert_start = now_ns()
            if not done.cancelled() and done.exception() is None:
                self.cache.put(cache_key, done.result())
            self.stats.cache_miss.add(lookup_ns + now_ns() - insert_start)

        future.add_done_callback(keep)
        return future

    def _enqueue(self, inputs, size, key, priority, timeout_us, deadline_ns) -> asyncio.Future:
        level_index = (priority or self.default_level or 1) - 1
        if not 0 <= level_index < len(self._levels):
            level_index = len(self._levels) - 1
        level = self._levels[level_index]
        policy = level.policy
        if level.limit and len(level) >= level.limit:
            if len(level) >= policy.max_queue_size > 0:
                raise ResourceExhausted(
                    f"{self._label}: queue is full ({policy.max_queue_size} requests waiting)")
            raise ResourceExhausted(
                f"{self._label}: priority level {level_index + 1} has {level.share} requests "
                "waiting, its share of the model's in-flight limit; retry later")
        enqueued = now_ns()
        timeout_ns = (timeout_us if timeout_us and policy.allow_timeout_override
                      else policy.default_timeout_us) * 1000
        expires = enqueued + timeout_ns if timeout_ns else 0
        reject = policy.timeout_action != "DELAY"
        if deadline_ns and (not expires or deadline_ns < expires):
            expires, reject = deadline_ns, True  # past the caller's deadline nobody waits
        future = asyncio.get_running_loop().create_future()
        level.ready.append(QueuedRequest(inputs, size, key, future, enqueued, expires, reject,
                                         level_index, deadline_ns))
        self._pending += 1
        self._wakeup.set()
        return future

    async def run_now(self, inputs: list[np.ndarray], size: int) -> list[np.ndarray] | None:
        """Run a request at once, without the queue, when that is what the queue would do: a
        model that runs on the event loop with nothing waiting and no queue delay configured
        (a delay asks requests to wait for company). None: submit it instead.

        It saves the hand-over to the worker task and back (two task switches per request)."""
        if (not self.inline or self._pending or self.delay_ns or self._closed
                or self._stuck or self.cache is not None):
            return None
        loop = asyncio.get_running_loop()
        item = QueuedRequest(inputs, size, (), loop.create_future(), now_ns(), 0, True, 0)
        await self._execute(loop, self.instances[0], [item])  # inline: never suspends
        return item.future.result()

    async def _work(self, instance: Instance) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(instance)
            if batch is None:
                return
            try:
                await self._execute(loop, instance, batch)
                instance.batch = None
                if self.inline:
                    await asyncio.sleep(0)  # let the callers and new requests run in between
            except _InstanceStuck:
                self._retire_stuck(instance)
                return
            except Exception as exc:  # our bug: fail the batch, keep the worker alive
                instance.batch = None
                log.exception("%s: unexpected error running a batch", self._label)
                self._fail(batch, ModelExecutionError(
                    f"{self._label}: internal error running the batch ({type(exc).__name__})"))

    async def _next_batch(self, instance: Instance) -> list[QueuedRequest] | None:
        if self.delay_ns:
            async with self._former:
                return await self._form_batch(instance)
        while True:  # pull-when-free: whatever is queued, now
            if not self._pending:
                if self._closed:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, size, _ = self._take(self.max_batch, None)
            if not batch:
                continue
            if self.trim and size not in self.preferred:
                cut = self._preferred_cut(batch)
                if cut:
                    self._cut(batch, cut)
            instance.batch = batch
            return batch

    async def _form_batch(self, instance: Instance) -> list[QueuedRequest] | None:
        """Triton's dynamic batch (its ``GetDynamicBatch``) for a model with a queue delay: the
        batch grows until it reaches a preferred size, cannot grow, or its oldest request has
        waited ``max_queue_delay``. Holds ``_former``: the other free instances wait their turn."""
        while True:
            if not self._pending:
                if self._closed:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, size, blocked = self._take(self.max_batch, None)
            if batch:
                break
        instance.batch = batch  # abandon() answers a forming batch too
        key = batch[0].key
        until = min(item.enqueued_ns for item in batch) + self.delay_ns  # the oldest's wait
        while True:
            exceeded = self._closed or now_ns() >= until  # unloading: run what is here, now
            cut = self._preferred_cut(batch)
            if cut and not exceeded:
                self._cut(batch, cut)
                return batch
            if blocked or exceeded or size >= self.max_preferred:
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), (until - now_ns()) / 1e9)
            except TimeoutError:
                pass
            more, added, blocked = self._take(self.max_batch - size, key)
            if more:
                batch += more
                size += added
                until = min(until, min(item.enqueued_ns for item in more) + self.delay_ns)

    def _preferred_cut(self, batch: list[QueuedRequest]) -> int:
        """How many requests of ``batch`` (in order) to run now for a preferred batch size, as
        Triton decides: the largest prefix that sums to a preferred size or, once the next
        request would take it past the largest preferred size, the prefix before it
        (0: neither)."""
        pending = best = 0
        for index, item in enumerate(batch):
            if pending and not best and pending + item.size > self.max_preferred:
                return index
            pending += item.size
            if pending in self.preferred:
                best = index + 1
        return best

    def _take(self, limit: int, key) -> tuple[list[QueuedRequest], int, bool]:
        """Pop up to ``limit`` samples of one shape key, highest priority first, FIFO within;
        also say whether a request is left at the head that could not join (another shape, or
        too large): the batch cannot grow any more.

        A new batch (``key`` None) always takes its first request, even one larger than
        ``limit`` (a multi-row request to a model without dynamic batching runs alone).
        """
        batch: list[QueuedRequest] = []
        size = 0
        now = now_ns()
        starting = key is None
        for level in self._levels:
            for queue in (level.ready, level.delayed):
                while queue:
                    item = queue[0]
                    if item.future.done():  # cancelled by the caller
                        queue.popleft()
                        self._pending -= 1
                        continue
                    if item.expires_ns and now > item.expires_ns:
                        queue.popleft()
                        if item.reject_on_expiry:
                            self._pending -= 1
                            item.future.set_exception(DeadlineExceeded(
                                f"{self._label}: request timed out in the queue"))
                        else:  # DELAY: behind the others, but not past the caller's deadline
                            item.expires_ns, item.reject_on_expiry = item.deadline_ns, True
                            level.delayed.append(item)
                        continue
                    if key is None:
                        key = item.key
                    first = starting and not batch  # a new batch always takes its first
                    if item.key != key or (size + item.size > limit and not first):
                        return batch, size, True
                    queue.popleft()
                    self._pending -= 1
                    batch.append(item)
                    size += item.size
        return batch, size, False

    def _cut(self, batch: list[QueuedRequest], keep: int) -> None:
        """Run the first ``keep`` requests of a batch (at least one); the rest go back to the
        front of their queues, in order."""
        keep = max(keep, 1)
        for item in reversed(batch[keep:]):
            self._levels[item.level].ready.appendleft(item)
            self._pending += 1
        del batch[keep:]

    async def _execute(self, loop, instance: Instance, batch: list[QueuedRequest]) -> None:
        batch = [item for item in batch if not item.future.done()]
        if not batch:
            return
        start = now_ns()
        stats = self.stats
        for item in batch:
            stats.queue.add(start - item.enqueued_ns)
        size = sum(item.size for item in batch)
        if len(batch) == 1:
            feeds = dict(zip(self.input_names, batch[0].inputs))
        else:
            feeds = {name: np.concatenate(parts) for name, parts
                     in zip(self.input_names, zip(*(item.inputs for item in batch)))}
        input_done = now_ns()
        try:
            if self.inline:
                outputs = instance.runtime.run(feeds, self.output_names)
            else:
                call = loop.run_in_executor(instance.executor, instance.runtime.run, feeds,
                                            self.output_names)
                if self.execution_timeout_s:
                    outputs = await asyncio.wait_for(call, self.execution_timeout_s)
                else:
                    outputs = await call
        except TimeoutError:
            self._fail(batch, ModelExecutionError(
                f"{self._label} did not finish a batch within {self.execution_timeout_s:g}s; "
                "its instance is taken out of service"))
            raise _InstanceStuck from None
        except Exception as exc:  # the model failed: fail this batch only
            log.warning("%s failed on a batch of %d: %s", self._label, size, exc)
            detail = str(exc) if isinstance(exc, ExecutionError) else type(exc).__name__
            self._fail(batch, ModelExecutionError(f"{self._label} failed to execute: {detail}"))
            return
        infer_done = now_ns()
        if self.inline and infer_done - input_done > self.inline_budget_ns:
            self._overran(size, infer_done - input_done, infer_done)
        if self.batching and any(np.ndim(out) == 0 or len(out) != size for out in outputs):
            rows = [len(o) if np.ndim(o) else 0 for o in outputs]  # a scalar has no batch rows
            self._fail(batch, ModelExecutionError(
                f"{self._label} returned {rows} rows for a batch of {size}"))
            return
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
        else:
            offset = 0
            for item in batch:
                end = offset + item.size
                if not item.future.done():
                    item.future.set_result([out[offset:end] for out in outputs])
                offset = end
        done = now_ns()
        stats.record_batch(size, len(batch), input_done - start, infer_done - input_done,
                           done - infer_done)
        stats.last_inference_ms = time.time_ns() // 1_000_000
        if self.observer is not None:
            self.observer(self, batch, feeds, size, start, infer_done - input_done, done)

    def _overran(self, size: int, took_ns: int, now: int) -> None:
        """An inline batch overran its budget. Wall time also counts the process being
        paused (a busy host, a VM steal), so one overrun is not evidence: OVERRUNS_TO_LEAVE
        within OVERRUN_WINDOW_NS are."""
        if now - self._overrun_since > OVERRUN_WINDOW_NS:
            self._overrun_since, self._overruns = now, 0
        self._overruns += 1
        if self._overruns >= OVERRUNS_TO_LEAVE:
            self._leave_the_loop(size, took_ns)
        else:
            log.info("%s: a batch of %d took %.1f ms on the event loop, over its %.1f ms "
                     "budget (%d of %d in a minute before it moves to its threads)",
                     self._label, size, took_ns / 1e6, self.inline_budget_ns / 1e6,
                     self._overruns, OVERRUNS_TO_LEAVE)

    def _leave_the_loop(self, size: int, took_ns: int) -> None:
        """Inline batches kept overrunning their budget: run on the instance threads from now
        on."""
        self.inline = False
        log.warning("%s: a batch of %d took %.1f ms on the event loop, over its %.1f ms budget "
                    "(%d times within a minute); it runs on its instance threads from now on",
                    self._label, size, took_ns / 1e6, self.inline_budget_ns / 1e6,
                    self._overruns)

    def _fail(self, batch: list[QueuedRequest], error: GatewayError) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    def _retire_stuck(self, instance: Instance) -> None:
        """An instance's thread is stuck in the model: stop using it; fail over to the rest."""
        self._stuck.add(instance.name)
        log.error("%s: instance %s is stuck in a model call and is out of service (%d of %d "
                  "left)", self._label, instance.name, len(self.instances) - len(self._stuck),
                  len(self.instances))
        if len(self._stuck) < len(self.instances):
            return
        error = Unavailable(f"{self._label}: every instance is stuck in a model call; "
                            "reload the model")
        for level in self._levels:
            for queue in (level.ready, level.delayed):
                while queue:
                    item = queue.popleft()
                    if not item.future.done():
                        item.future.set_exception(error)
        self._pending = 0

    def abandon(self, error: GatewayError) -> None:
        """Answer every queued, forming and running request with ``error`` now (a drain out of
        time). Running model calls finish on their threads; their results go unused."""
        for level in self._levels:
            for queue in (level.ready, level.delayed):
                while queue:
                    item = queue.popleft()
                    if not item.future.done():
                        item.future.set_exception(error)
        self._pending = 0
        for instance in self.instances:
            if instance.batch:
                self._fail(instance.batch, error)

    async def close(self) -> None:
        """Stop taking requests, finish everything queued and running, release the instances."""
        self._closed = True
        self._wakeup.set()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        for inst in self.instances:
            stuck = inst.name in self._stuck
            inst.executor.shutdown(wait=not stuck)  # a stuck thread would never be joined
            if not stuck:
                inst.runtime.close()


class _InstanceStuck(Exception):
    """Raised inside a worker whose model call outlived the execution timeout."""
