"""Batch scoring: a model over a file of any size, through a gateway or in this process.

``score(model, source, sink, ...)`` is ``gateway score`` as a function: it reads ``source``
(Parquet, CSV, JSON Lines, .npy, .npz) in chunks, scores every row through a running gateway
(``url="host:port"``) or in this process (``model_repository=DIR``, loaded as ``gateway serve``
loads it), writes ``sink`` (Parquet, CSV or JSON Lines) with the row id, the outputs, the
version that served each row and an error column, and returns a ``ScoreReport``. With
``resume=True`` it continues a job that was interrupted.

For a cluster, ``Scorer`` is a picklable callable from a pandas DataFrame to its scores, for
Dask's ``map_partitions``; ``score_dataframe(ddf, scorer)`` wires it up (see
``gateway.batch.cluster``).
"""

from __future__ import annotations

# Names are imported on first use: `gateway serve` imports gateway.batch.cli to build its
# parser, and must neither need pyarrow nor pay for importing it.
_EXPORTS = {
    "DEFAULT_CHUNK_ROWS": "gateway.batch.job", "ScoreReport": "gateway.batch.job",
    "score_file": "gateway.batch.job", "ModelInfo": "gateway.batch.engines.base",
    "RetryPolicy": "gateway.batch.engines.base", "BatchError": "gateway.batch.errors",
    "JobAborted": "gateway.batch.errors", "UsageError": "gateway.batch.errors",
    "Scorer": "gateway.batch.cluster", "score_dataframe": "gateway.batch.cluster",
}
__all__ = ["DEFAULT_CHUNK_ROWS", "BatchError", "JobAborted", "ModelInfo", "RetryPolicy",
           "ScoreReport", "Scorer", "UsageError", "score", "score_dataframe", "score_file"]


def score(model: str, source, sink, **options):
    """Score the file ``source`` into the file ``sink`` with ``model``; blocking.

    Options (all keywords): ``url`` or ``model_repository`` (one of them), ``model_version``,
    ``inputs`` (["NAME=COL,COL"]), ``outputs`` (names; default all), ``id_column``,
    ``input_format``, ``format`` (parquet, csv, jsonl), ``chunk_rows``, ``batch_size``,
    ``concurrency``, ``retry`` (a ``RetryPolicy``), ``timeout``, ``token``, ``cpu_threads``,
    ``resume``, ``fail_fast``, ``progress``, ``work_dir``. Raises ``UsageError`` when the job
    cannot start, ``JobAborted`` when it had to stop (finished chunks are kept for ``resume``).
    From a running event loop, ``await score_file(...)`` instead."""
    from gateway.batch.job import score_file

    return run(score_file(model, source, sink, **options))


def run(coroutine):
    """Run a coroutine to completion on a new event loop (uvloop where installed)."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway.batch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
