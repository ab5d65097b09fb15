"""Scale-out on Dask: a picklable scorer for ``map_partitions``.

Why Dask (and not Ray Data): it installs from PyPI in a few pure-Python packages beside pandas
and pyarrow, which batch users already have; its local cluster is ordinary processes that start
in seconds; it reads and writes the same Parquet/CSV files, partitioned, on a laptop or a
cluster. Ray brings its own object store and raylet processes and a much larger install for
what is here one ``map_partitions`` call.

``Scorer(model, url=... | model_repository=...)`` holds settings only, so it pickles to every
worker; in each worker process it opens its engine once (a gRPC channel to the gateway fleet,
or the model loaded as ``gateway serve`` loads it) on a background event loop and keeps it for
every partition and every thread of that process. Called with a pandas DataFrame it returns
one with the same index and a column per output, ``model_version`` and ``error``: so the scores
line up with the input, partition by partition::

    import dask.dataframe as dd
    from gateway.batch import Scorer, score_dataframe

    frame = dd.read_parquet("s3://bucket/rows/")            # any Dask DataFrame
    scorer = Scorer("tiny_mlp", url="gateway.internal:8001")
    scores = score_dataframe(frame, scorer)          # frame.map_partitions(scorer, meta=...)
    score_dataframe(frame, scorer, keep_columns=True).to_parquet("s3://bucket/scored/")

Retries, row errors and ``fail_fast`` behave as in ``gateway score``; checkpointing is Dask's
business here (its task retries rerun a failed partition).
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from gateway.batch.engines import make_engine
from gateway.batch.engines.base import Engine, ModelInfo, RetryPolicy, call_with_retries
from gateway.batch.mapping import bind_inputs
from gateway.batch.results import ROW_ID, empty_output, result_table
from gateway.batch.scorer import ChunkScorer
from gateway.batch.sources import Chunk

_LOCK = threading.Lock()
_PROCESS: dict[tuple, _Runtime] = {}  # settings -> this process's engine and its loop


@dataclass
class _Runtime:
    loop: asyncio.AbstractEventLoop
    engine: Engine
    info: ModelInfo
    scorers: dict  # (column names, types) -> ChunkScorer

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


class Scorer:
    """Scores pandas DataFrames with a model, in any process it is shipped to."""

    def __init__(self, model: str, *, url: str | None = None, model_repository=None,
                 model_version: str = "", inputs: list[str] | None = None,
                 outputs: list[str] | None = None, batch_size: int | None = None,
                 concurrency: int | None = None, retry: RetryPolicy | None = None,
                 timeout: float = 60.0, token: str | None = None, cpu_threads: int = 1,
                 fail_fast: bool = False):
        self.model = model
        self.settings = {
            "url": url, "model_repository": str(model_repository) if model_repository else None,
            "model_version": model_version, "timeout": timeout, "token": token,
            "cpu_threads": cpu_threads}
        self.inputs = list(inputs or [])
        self.outputs = list(outputs or [])
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.fail_fast = fail_fast
        make_engine(model, **{k: v for k, v in self.settings.items()})  # checks url/repository

    def _key(self) -> tuple:
        return (self.model, tuple(sorted(self.settings.items())))

    def _runtime(self) -> _Runtime:
        key = self._key()
        with _LOCK:
            runtime = _PROCESS.get(key)
            if runtime is None:
                if not _PROCESS:
                    atexit.register(close_all)
                runtime = _PROCESS[key] = self._start()
        return runtime

    def _start(self) -> _Runtime:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name=f"gateway-batch-{self.model}",
                         daemon=True).start()
        engine = make_engine(self.model, **self.settings)
        try:
            info = asyncio.run_coroutine_threadsafe(
                call_with_retries(engine.start, self.retry), loop).result()
        except BaseException:
            asyncio.run_coroutine_threadsafe(engine.close(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            raise
        return _Runtime(loop, engine, info, {})

    def _scorer(self, runtime: _Runtime, schema: pa.Schema) -> ChunkScorer:
        key = tuple((f.name, str(f.type)) for f in schema)
        scorer = runtime.scorers.get(key)
        if scorer is None:
            bindings = bind_inputs(runtime.info, schema, self.inputs)

            async def create():  # the semaphore belongs to the runtime's loop
                return ChunkScorer(runtime.engine, runtime.info, bindings, self.outputs or None,
                                   batch_size=self.batch_size,
                                   concurrency=self.concurrency or getattr(
                                       runtime.engine, "concurrency", 8),
                                   retry=self.retry, fail_fast=self.fail_fast)
            scorer = runtime.scorers[key] = runtime.run(create())
        return scorer

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        runtime = self._runtime()
        table = pa.Table.from_pandas(frame, preserve_index=False)
        scorer = self._scorer(runtime, table.schema)
        if len(frame) == 0:
            return self.meta()
        scored, _ = runtime.run(scorer.score(Chunk(0, 0, table, len(frame))))
        result = _to_pandas(scored.drop_columns([ROW_ID]))
        result.index = frame.index
        return result

    def meta(self) -> pd.DataFrame:
        """An empty frame with the result's columns and dtypes (Dask's ``meta``)."""
        info = self._runtime().info
        specs = [info.output(n) for n in self.outputs] if self.outputs else list(info.outputs)
        empty = result_table(pa.array([], pa.int64()), ROW_ID, specs,
                             {s.name: empty_output(s, 0) for s in specs},
                             np.zeros(0, bool), np.zeros(0, object), np.zeros(0, object))
        return _to_pandas(empty.drop_columns([ROW_ID]))


def _dtype(t: pa.DataType):
    """Vectors stay Arrow lists in pandas (one buffer, cheap to ship between workers, unlike an
    object column of small arrays); text is pandas' Arrow-backed string."""
    if pa.types.is_string(t):
        return pd.StringDtype("pyarrow")
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        return pd.ArrowDtype(t)
    return None


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=_dtype)


def score_dataframe(frame, scorer: Scorer, *, keep_columns: bool = False):
    """``frame.map_partitions(scorer)`` with the result's ``meta``: a Dask DataFrame with the
    same partitions and index as ``frame`` and the scores as columns (after ``frame``'s own
    columns with ``keep_columns``, joined partition by partition, without a shuffle)."""
    if keep_columns:
        return frame.map_partitions(_with_scores, scorer,
                                    meta=frame._meta.join(scorer.meta()))
    return frame.map_partitions(scorer, meta=scorer.meta())


def _with_scores(part: pd.DataFrame, scorer: Scorer) -> pd.DataFrame:
    return part.join(scorer(part))


def close_all() -> None:
    """Close this process's engines (tests; a worker process simply exits)."""
    with _LOCK:
        runtimes = list(_PROCESS.values())
        _PROCESS.clear()
    for runtime in runtimes:
        try:
            runtime.run(runtime.engine.close())
        finally:
            runtime.loop.call_soon_threadsafe(runtime.loop.stop)
