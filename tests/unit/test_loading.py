"""Loading a version: where its batches will run (event loop or instance thread)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from bench import models
from gateway.errors import ModelLoadError
from gateway.loading import INLINE_MAX_SECONDS, _has_control_flow, _runs_inline, load_version
from gateway.modelconfig import read_config_file


def load(tmp_path, builder, *args, config="max_batch_size: 8\ndynamic_batching { }", **kw):
    path = models.make_version(tmp_path, "m", 1, builder, *args, **kw)
    models.write_config(tmp_path / "m", config)
    proto, explicit = read_config_file(tmp_path / "m", "m")
    return load_version(path, "m", 1, proto, explicit)


def test_a_tiny_fixed_shape_model_runs_inline(tmp_path):
    loaded = load(tmp_path, models.build_mlp)
    assert loaded.inline


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
