"""Score one chunk: its rows as requests of at most ``batch_size``, at most ``concurrency`` in
flight (shared by every chunk of the job), answers put back in row order.

A request that fails is retried with backoff while the status says the server could not take
it (UNAVAILABLE, RESOURCE_EXHAUSTED); once the retries are spent the job stops, keeping what it
finished, since every later row would fail the same way. A request the server refuses for its
rows (INVALID_ARGUMENT, or INTERNAL: the model failed on them) is split in halves and sent
again until the rows at fault are found, so one bad row costs only itself. Any other refusal
(NOT_FOUND, UNAUTHENTICATED ...) stops the job: it would refuse every row.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from gateway.batch.engines.base import Engine, ModelInfo, RetryPolicy, call_with_retries
from gateway.batch.errors import ISOLATE, InferenceFailure, JobAborted, UsageError
from gateway.batch.mapping import Binding, to_tensors
from gateway.batch.results import ROW_ID, empty_output, is_fixed, result_table
from gateway.batch.sources import Chunk


@dataclass(slots=True)
class ChunkStats:
    rows: int = 0
    ok: int = 0
    failed: int = 0
    versions: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # (row id, error) of the first failed rows

    def as_dict(self) -> dict:
        return {"rows": self.rows, "ok": self.ok, "failed": self.failed,
                "versions": dict(self.versions), "examples": self.examples}


class ChunkScorer:
    def __init__(self, engine: Engine, info: ModelInfo, bindings: list[Binding],
                 outputs: list[str] | None = None, *, batch_size: int | None = None,
                 concurrency: int = 8, retry: RetryPolicy | None = None,
                 id_column: str | None = None, fail_fast: bool = False):
        self.engine = engine
        self.info = info
        self.bindings = bindings
        self.outputs = [resolve_output(info, n) for n in outputs] if outputs else \
            list(info.outputs)
        self.output_names = [s.name for s in self.outputs]
        limit = info.max_batch_size if info.batching else 1
        if batch_size is not None and not 1 <= batch_size <= limit:
            raise UsageError(f"--batch-size must be 1 to {limit} for model '{info.name}' "
                             f"(its max_batch_size is {info.max_batch_size})")
        self.batch_size = batch_size or limit
        self.slots = asyncio.Semaphore(concurrency)
        self.retry = retry or RetryPolicy()
        self.id_column = id_column
        self.id_name = id_column or ROW_ID
        self.fail_fast = fail_fast
        self.retries = 0  # requests sent again after a retryable failure
        names = [self.id_name, *self.output_names]
        clash = {"model_version", "error"} & set(names) or (
            {n for n in names if names.count(n) > 1})
        if clash:
            raise UsageError(f"column name {min(clash)!r} would appear twice in the "
                             "output: rename the id column or ask for other outputs")

    def _retried(self, failure: InferenceFailure) -> None:
        self.retries += 1

    async def score(self, chunk: Chunk) -> tuple[pa.Table, ChunkStats]:
        rows = chunk.rows
        tensors = await asyncio.to_thread(to_tensors, chunk.table, rows, self.bindings,
                                          chunk.errors)
        ids = self._ids(chunk)
        errors = np.full(rows, None, dtype=object)
        for row, reason in tensors.errors.items():
            errors[row] = reason
        if self.fail_fast and tensors.errors:
            row = min(tensors.errors)
            raise JobAborted(f"row {ids[row].as_py()}: {tensors.errors[row]} (--fail-fast)")
        values = {s.name: empty_output(s, rows) for s in self.outputs}
        versions = np.full(rows, None, dtype=object)
        tasks: list[asyncio.Task] = []
        try:
            for members, arrays in tensors.groups:
                for a in range(0, len(members), self.batch_size):
                    b = a + self.batch_size
                    await self.slots.acquire()
                    task = asyncio.create_task(self._request(
                        members[a:b], {k: v[a:b] for k, v in arrays.items()}, values, versions,
                        errors, ids))
                    task.add_done_callback(lambda _: self.slots.release())
                    tasks.append(task)
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        ok = np.equal(errors, None)
        table = result_table(ids, self.id_name, self.outputs, values, ok, versions, errors)
        served = versions[ok]
        counts = Counter()
        if len(served):
            names, sizes = np.unique(served.astype(str), return_counts=True)
            counts.update(dict(zip(names.tolist(), sizes.tolist(), strict=True)))
        stats = ChunkStats(rows, int(ok.sum()), int(rows - ok.sum()), counts)
        for row in np.flatnonzero(~ok)[:5]:
            stats.examples.append((ids[int(row)].as_py(), errors[row]))
        return table, stats

    def _ids(self, chunk: Chunk) -> pa.Array:
        if self.id_column is None:
            return pa.array(np.arange(chunk.start, chunk.start + chunk.rows, dtype=np.int64))
        if self.id_column not in chunk.table.column_names:
            return pa.nulls(chunk.rows)
        return chunk.table.column(self.id_column).combine_chunks()

    async def _request(self, members: np.ndarray, arrays: dict, values: dict,
                       versions: np.ndarray, errors: np.ndarray, ids: pa.Array) -> None:
        batching = self.info.batching
        feeds = arrays if batching else {k: v[0] for k, v in arrays.items()}
        try:
            version, outputs = await call_with_retries(
                lambda: self.engine.infer(feeds, self.output_names), self.retry, self._retried)
        except InferenceFailure as exc:
            if exc.retryable:
                raise JobAborted(
                    f"{self.engine.description} answered {exc.code} "
                    f"{self.retry.attempts} times: {exc.message}") from None
            if not exc.rows_at_fault:
                raise JobAborted(f"{self.engine.description} refused the request: "
                                 f"{exc.code}: {exc.message}") from None
            if exc.code in ISOLATE and len(members) > 1:
                half = len(members) // 2
                for part in (slice(0, half), slice(half, None)):
                    await self._request(members[part], {k: v[part] for k, v in arrays.items()},
                                        values, versions, errors, ids)
                return
            self._fail(members, f"{exc.code}: {exc.message}", errors, ids)
            return
        if not batching:
            outputs = [o[np.newaxis] for o in outputs]
        for spec, data in zip(self.outputs, outputs):
            if data.shape[:1] != (len(members),) or (
                    is_fixed(spec) and data.shape[1:] != tuple(spec.dims)):
                self._fail(members, f"INTERNAL: output '{spec.name}' has shape "
                                    f"{list(data.shape)} for {len(members)} rows", errors, ids)
                return
        for spec, data in zip(self.outputs, outputs):
            target = values[spec.name]
            if is_fixed(spec):
                target[members] = data
            else:
                for i, row in enumerate(members):
                    target[row] = data[i]
        versions[members] = version

    def _fail(self, members: np.ndarray, message: str, errors: np.ndarray, ids) -> None:
        errors[members] = message
        if self.fail_fast:
            raise JobAborted(f"row {ids[int(members[0])].as_py()}: {message} (--fail-fast)")


def resolve_output(info: ModelInfo, name: str):
    spec = info.output(name)
    if spec is None:
        raise UsageError(f"model '{info.name}' has no output '{name}'; its outputs are "
                         f"{', '.join(s.name for s in info.outputs)}")
    return spec
