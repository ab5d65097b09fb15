"""Loading a version: where its batches will run (event loop or instance thread)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest

from bench import models
from gateway.batching import Instance
from gateway.errors import ModelLoadError
from gateway.loading import (
    INLINE_BUDGET_SECONDS,
    INLINE_MAX_SECONDS,
    _has_control_flow,
    _runs_inline,
    _warm_up,
    load_version,
)
from gateway.modelconfig import read_config_file
from gateway.tensors import TensorSpec


def load(tmp_path, builder, *args, config="max_batch_size: 8\ndynamic_batching { }", **kw):
    path = models.make_version(tmp_path, "m", 1, builder, *args, **kw)
    models.write_config(tmp_path / "m", config)
    proto, explicit = read_config_file(tmp_path / "m", "m")
    return load_version(path, "m", 1, proto, explicit)


def test_a_tiny_fixed_shape_model_runs_inline(tmp_path):
    loaded = load(tmp_path, models.build_mlp)
    assert loaded.inline
    assert loaded.inline_budget_s == INLINE_BUDGET_SECONDS  # judged: the budget is enforced


def test_only_models_whose_cost_cannot_depend_on_the_data_run_inline(tmp_path):
    """Fixed shapes in and out, no strings: a warm-up with zeros tells what any batch costs."""
    config = load(tmp_path, models.build_mlp).config
    assert _runs_inline(config, [("cpu", 0)], 0.0, False)
    text = dataclasses.replace(config, inputs=(TensorSpec("input", "BYTES", (32,)),))
    assert not _runs_inline(text, [("cpu", 0)], 0.0, False)  # a string's length is the caller's
    text_out = dataclasses.replace(config, outputs=(TensorSpec("output", "BYTES", (4,)),))
    assert not _runs_inline(text_out, [("cpu", 0)], 0.0, False)
    ragged = dataclasses.replace(config, outputs=(TensorSpec("output", "FP32", (-1,)),))
    assert not _runs_inline(ragged, [("cpu", 0)], 0.0, False)  # output size set by the data


def test_the_warm_up_is_timed_at_the_largest_batch_a_request_can_bring(tmp_path):
    """Without dynamic batching a request still carries up to max_batch_size rows."""
    config = load(tmp_path, models.build_mlp, config="max_batch_size: 8").config
    assert config.batching is None

    class Recording:
        def __init__(self):
            self.batches = []

        def run(self, feeds, names):
            self.batches.append(feeds["input"].shape[0])
            return [np.zeros((feeds["input"].shape[0], 4), np.float32)]

    runtime = Recording()
    _warm_up(Instance("r", runtime, None), config)
    assert runtime.batches == [1, 8, 8, 8, 8]  # warm-up 1 and 8, then three timed runs at 8


def test_control_flow_variable_shapes_and_gpu_keep_the_thread(tmp_path):
    busy = load(tmp_path / "a", models.build_busy_model)  # a Loop: cost depends on the data
    assert not busy.inline
    assert _has_control_flow(tmp_path / "a" / "m" / "1" / "model.onnx")
    variable = load(tmp_path / "b", models.build_identity, "FP32")  # [batch, -1]
    assert not variable.inline
    config = load(tmp_path / "c", models.build_mlp).config
    assert not _runs_inline(config, [("gpu", 0)], 0.0, False)
    assert not _runs_inline(config, [("cpu", 0)], INLINE_MAX_SECONDS * 2, False)


def test_the_execution_parameter_overrides_auto(tmp_path):
    param = 'parameters {{ key: "execution" value {{ string_value: "{}" }} }}'
    forced = load(tmp_path / "a", models.build_mlp,
                  config="max_batch_size: 8\n" + param.format("thread"))
    assert not forced.inline
    inline = load(tmp_path / "b", models.build_busy_model,
                  config="max_batch_size: 8\n" + param.format("inline"))
    assert inline.inline
    assert inline.inline_budget_s == 0  # asked for: no budget moves it off the loop
    with pytest.raises(ModelLoadError) as info:
        load(tmp_path / "c", models.build_mlp, config="max_batch_size: 8\n" + param.format("gpu"))
    assert str(info.value) == "parameter execution must be one of auto, inline, thread, not 'gpu'"


async def test_an_inline_batcher_runs_on_the_event_loop_thread(tmp_path):
    from gateway.batching import Batcher
    from gateway.statistics import ModelStats

    loaded = load(tmp_path, models.build_mlp)
    ran_on = []
    runtime = loaded.instances[0].runtime
    real_run = runtime.run

    def run(feeds, names):
        ran_on.append(threading.get_ident())
        return real_run(feeds, names)

    runtime.run = run
    batcher = Batcher("m", "1", 8, loaded.config.batching, loaded.instances, ["input"],
                      ["output"], ModelStats(), inline=True)
    batcher.start()
    x = np.ones((2, 32), np.float32)
    (y,) = await asyncio.wait_for(batcher.submit([x], 2, ((32,),)), 10)
    assert y.shape == (2, 4)
    assert ran_on == [threading.get_ident()]
    await batcher.close()


async def test_run_now_skips_the_queue_only_when_nothing_waits(tmp_path):
    from gateway.batching import Batcher
    from gateway.statistics import ModelStats

    loaded = load(tmp_path, models.build_mlp)
    stats = ModelStats()
    batcher = Batcher("m", "1", 8, loaded.config.batching, loaded.instances, ["input"],
                      ["output"], stats, inline=True)
    batcher.start()
    x = np.ones((1, 32), np.float32)
    (y,) = await batcher.run_now([x], 1)
    assert y.shape == (1, 4) and stats.execution_count == 1
    queued = batcher.submit([x], 1, ((32,),))
    assert await batcher.run_now([x], 1) is None  # someone is waiting: keep the order
    await asyncio.wait_for(queued, 10)
    threaded = Batcher("m", "1", 8, loaded.config.batching, loaded.instances, ["input"],
                       ["output"], ModelStats(), inline=False)
    assert await threaded.run_now([x], 1) is None
    await batcher.close()
