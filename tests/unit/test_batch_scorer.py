"""Unit tests of gateway.batch.scorer with a scripted engine at the engine seam: retries with
backoff, the halving that finds the rows at fault, and the refusals that stop a job."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from gateway.batch.engines.base import ModelInfo, RetryPolicy
from gateway.batch.errors import InferenceFailure, JobAborted
from gateway.batch.mapping import bind_inputs
from gateway.batch.scorer import ChunkScorer
from gateway.batch.sources import Chunk
from gateway.tensors import TensorSpec

INFO = ModelInfo("m", "", 8, (TensorSpec("x", "FP32", (1,)),),
                 (TensorSpec("y", "FP32", (1,)), TensorSpec("v", "FP32", (2,))))
FAST = RetryPolicy(attempts=3, base_seconds=0.001, max_seconds=0.002)


class Scripted:
    """Doubles x; fails a request per ``fail(rows)`` -> status code or None."""

    description = "scripted engine"

    def __init__(self, fail=lambda x: None):
        self.fail = fail
        self.calls = []

    async def infer(self, inputs, outputs):
        x = inputs["x"]
        self.calls.append(len(x))
        code = self.fail(x)
        if code:
            raise InferenceFailure(code, f"refused {len(x)} rows")
        return "7", [x * 2, np.concatenate([x, -x], axis=1)][:len(outputs)]


def _chunk(values, start=100):
    return Chunk(0, start, pa.table({"x": pa.array(values, pa.float32())}), len(values))


async def _score(engine, values, **kw):
    bindings = bind_inputs(INFO, pa.schema([("x", pa.float32())]))
    scorer = ChunkScorer(engine, INFO, bindings, kw.pop("outputs", None), retry=FAST, **kw)
    table, stats = await scorer.score(_chunk(values))
    return scorer, table, stats


async def test_rows_are_answered_in_order_with_version_and_ids():
    engine = Scripted()
    _, table, stats = await _score(engine, [float(i) for i in range(20)], batch_size=8)
    assert engine.calls == [8, 8, 4]
    assert table.column_names == ["row_id", "y", "v", "model_version", "error"]
    assert table.column("row_id").to_pylist() == list(range(100, 120))
    assert table.column("y").to_pylist() == [2.0 * i for i in range(20)]
    assert table.column("v").to_pylist()[3] == [3.0, -3.0]
    assert set(table.column("model_version").to_pylist()) == {"7"}
    assert (stats.ok, stats.failed, dict(stats.versions)) == (20, 0, {"7": 20})


async def test_unavailable_is_retried_then_succeeds():
    state = {"n": 0}

    def fail(x):
        state["n"] += 1
        return "UNAVAILABLE" if state["n"] <= 2 else None
    scorer, _table, stats = await _score(Scripted(fail), [1.0, 2.0])
    assert (scorer.retries, stats.ok) == (2, 2)


async def test_resource_exhausted_past_the_retries_stops_the_job():
    with pytest.raises(JobAborted) as caught:
        await _score(Scripted(lambda x: "RESOURCE_EXHAUSTED"), [1.0])
    assert caught.value.message == ("scripted engine answered RESOURCE_EXHAUSTED 3 times: "
                                    "refused 1 rows")


async def test_caller_errors_are_not_retried_and_halving_finds_the_bad_row():
    engine = Scripted(lambda x: "INVALID_ARGUMENT" if (x == 5.0).any() else None)
    scorer, table, stats = await _score(engine, [float(i) for i in range(8)])
    assert scorer.retries == 0
    assert engine.calls == [8, 4, 4, 2, 1, 1, 2]
    errors = table.column("error").to_pylist()
    assert errors[5] == "INVALID_ARGUMENT: refused 1 rows"
    assert [e is None for e in errors].count(True) == 7
    assert table.column("y").to_pylist()[5] is None and table.column("y").to_pylist()[6] == 12.0
    assert stats.examples == [(105, "INVALID_ARGUMENT: refused 1 rows")]


async def test_deadline_fails_the_rows_without_halving():
    engine = Scripted(lambda x: "DEADLINE_EXCEEDED")
    _, _table, stats = await _score(engine, [1.0, 2.0, 3.0])
    assert engine.calls == [3] and stats.failed == 3


@pytest.mark.parametrize("code", ["NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED"])
async def test_refusals_that_would_fail_every_row_stop_the_job(code):
    with pytest.raises(JobAborted) as caught:
        await _score(Scripted(lambda x: code), [1.0])
    assert caught.value.message == f"scripted engine refused the request: {code}: refused 1 rows"


async def test_fail_fast_stops_at_the_first_bad_row():
    engine = Scripted(lambda x: "INTERNAL" if (x == 2.0).any() else None)
    with pytest.raises(JobAborted) as caught:
        await _score(engine, [1.0, 2.0, 3.0], fail_fast=True)
    assert caught.value.message == "row 101: INTERNAL: refused 1 rows (--fail-fast)"


async def test_requested_outputs_only_and_batch_size_limit():
    _, table, _ = await _score(Scripted(), [1.0], outputs=["y"])
    assert table.column_names == ["row_id", "y", "model_version", "error"]
    with pytest.raises(Exception, match="--batch-size must be 1 to 8"):
        await _score(Scripted(), [1.0], batch_size=9)
