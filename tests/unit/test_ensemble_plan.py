"""The ensemble's plan, its checks against composing configs, and its scheduler (with a fake
step runner at the data plane seam)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc

import numpy as np
import pytest
from google.protobuf import text_format

from gateway.ensemble import (
    EnsembleScheduler,
    StepShapes,
    check_composing,
    ensemble_config,
    fit,
)
from gateway.errors import InvalidArgument, ModelLoadError, NotFound, Unavailable
from gateway.modelconfig import ModelConfig, VersionPolicy
from gateway.modelconfig_pb import model_config_pb2 as mc
from gateway.statistics import ModelStats
from gateway.tensors import InferResponse, Tensor, TensorSpec


def config(text: str, name: str = "ens") -> ModelConfig:
    proto = text_format.Parse(text, mc.ModelConfig())
    proto.name = name
    return ensemble_config(proto)


def step(model, inputs, outputs, version=-1):
    ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'step {{ model_name: "{model}" model_version: {version} {ins} {outs} }}'


def ens(*steps, inputs=("IN",), outputs=("OUT",), dims="[ 4 ]", dtype="TYPE_FP32", mbs=8):
    io = lambda names: " ".join(
        f'{{ name: "{n}" data_type: {dtype} dims: {dims} }}' for n in names)
    return (f'platform: "ensemble" max_batch_size: {mbs} input [ {", ".join(io([n]) for n in inputs)} ] '
            f'output [ {", ".join(io([n]) for n in outputs)} ] '
            f'ensemble_scheduling {{ {" ".join(steps)} }}')


def model(name, inputs, outputs, mbs=8, dims=(4,), datatype="FP32") -> ModelConfig:
    ins = tuple(TensorSpec(n, datatype, dims) for n in inputs)
    outs = tuple(TensorSpec(n, datatype, dims) for n in outputs)
    return ModelConfig(name, "onnxruntime_onnx", mbs, ins, outs, VersionPolicy(), None, (), {},
                       "model.onnx", {}, {s.name: i for i, s in enumerate(ins)},
                       {s.name: i for i, s in enumerate(outs)}, mc.ModelConfig())


# ---- the plan ------------------------------------------------------------------------------


def test_steps_are_ordered_by_what_they_read_and_independent_ones_share_a_wave():
    c = config(ens(step("join", {"A": "a", "B": "b"}, {"S": "OUT"}),
                   step("left", {"X": "IN"}, {"Y": "a"}),
                   step("right", {"X": "IN"}, {"Y": "b"})))
    waves = [[s.model for s in wave] for wave in c.ensemble.waves]
    assert waves == [["left", "right"], ["join"]]
    assert c.ensemble.models == {"join", "left", "right"}
    assert c.platform == "ensemble" and c.proto.version_policy.latest.num_versions == 1
    assert [s.version for s in c.ensemble.steps] == ["", "", ""]


def test_a_pinned_version_is_kept_and_minus_one_is_routed():
    c = config(ens(step("m", {"X": "IN"}, {"Y": "OUT"}, version=3)))
    assert c.ensemble.steps[0].version == "3"
    assert c.ensemble.steps[0].label == "step 1 (model 'm' version 3)"


@pytest.mark.parametrize("text, words", [
    (ens(step("m", {"X": "nowhere"}, {"Y": "OUT"})),
     "step 1 (model 'm') reads ensemble tensor nowhere (for its input X), which is neither"),
    (ens(step("a", {"X": "IN"}, {"Y": "OUT"}), step("b", {"X": "IN"}, {"Y": "OUT"})),
     "ensemble tensor OUT is produced by step 1 (model 'a') and by step 2 (model 'b')"),
    (ens(step("a", {"X": "IN"}, {"Y": "IN"})),
     "ensemble tensor IN is produced by the request (an ensemble input) and by step 1"),
    (ens(step("a", {"X": "IN"}, {"Y": "other"})), "output OUT is not produced by any step"),
    (ens(step("a", {"X": "IN", "Z": "q"}, {"Y": "p"}), step("b", {"X": "p"}, {"Y": "q"}),
         step("c", {"X": "p"}, {"Y": "OUT"})),
     "steps 1, 2 read each other's outputs in a cycle"),
    (ens(step("ens", {"X": "IN"}, {"Y": "OUT"})), "circular dependency between ensembles"),
    (ens(step("a", {"X": "IN"}, {})), "has no output_map"),
    (ens(step("a", {"X": "IN"}, {"Y": "OUT"}), mbs=-1), "must not be negative"),
    (('platform: "ensemble" input [ { name: "IN" data_type: TYPE_FP32 dims: [1] } ] '
     'output [ { name: "OUT" data_type: TYPE_FP32 dims: [1] } ]'), "no ensemble_scheduling steps"),
    (ens(step("a", {"X": "IN"}, {"Y": "OUT"}), dims="[ -1 ]").replace(
        "dims: [ -1 ] }", "dims: [ -1 ] reshape { shape: [ -1 ] } }", 1),
     "reshape with variable (-1) dims is not supported"),
])
def test_what_the_file_alone_shows_is_refused_with_why(text, words):
    with pytest.raises(ModelLoadError, match=None) as info:
        config(text)
    assert words in str(info.value)


# ---- against composing models ---------------------------------------------------------------


CHAIN = ens(step("pre", {"X": "IN"}, {"Y": "mid"}), step("post", {"X": "mid"}, {"Y": "OUT"}))


def fits(c, **configs):
    composing = {s.index: configs.get(s.model, []) for s in c.ensemble.steps}
    check_composing(c, composing)


def test_a_chain_of_matching_models_fits():
    fits(config(CHAIN), pre=[model("pre", ["X"], ["Y"])], post=[model("post", ["X"], ["Y"])])


@pytest.mark.parametrize("pre, post, words", [
    ([], [model("post", ["X"], ["Y"])], "ensemble ens contains models that are not available: pre"),
    ([model("pre", ["X", "W"], ["Y"])], [model("post", ["X"], ["Y"])],
     "in ensemble ens, input W in model pre is not mapped to any ensemble tensors"),
    ([model("pre", ["Q"], ["Y"])], [model("post", ["X"], ["Y"])],
     "in ensemble ens, ensemble tensor IN is mapping to non-existing input X in model pre"),
    ([model("pre", ["X"], ["Q"])], [model("post", ["X"], ["Y"])],
     "in ensemble ens, ensemble tensor mid is mapped from non-existing output Y in model pre"),
    ([model("pre", ["X"], ["Y"], datatype="INT64")], [model("post", ["X"], ["Y"])],
     ("in ensemble ens, ensemble tensor IN: inconsistent data type: FP32 is inferred from model "
     "ens while INT64 is inferred from model pre")),
    ([model("pre", ["X"], ["Y"], dims=(5,))], [model("post", ["X"], ["Y"])],
     ("in ensemble ens, ensemble tensor IN: inconsistent shape: [-1, 4] is inferred from model "
     "ens while [-1, 5] is inferred from model pre")),
    ([model("pre", ["X"], ["Y"], mbs=4)], [model("post", ["X"], ["Y"])],
     ("ensemble ens allows maximum batch size 8, but it contains model pre which only allows "
     "maximum batch size to be 4")),
])
def test_what_does_not_fit_is_refused_in_tritons_words(pre, post, words):
    with pytest.raises(ModelLoadError) as info:
        fits(config(CHAIN), pre=pre, post=post)
    assert words in str(info.value)


def test_every_version_a_routed_step_may_reach_must_fit():
    with pytest.raises(ModelLoadError, match="inconsistent shape"):
        fits(config(CHAIN), pre=[model("pre", ["X"], ["Y"]),
                                 model("pre", ["X"], ["Y"], dims=(3,))],
             post=[model("post", ["X"], ["Y"])])


def test_a_batching_model_meets_a_non_batching_one_in_full_dims():
    # A non-batching model of [-1, 4] fits a batching ensemble's [4] (Triton's full dims rule);
    # its variable dim also fits a fixed one.
    fits(config(CHAIN), pre=[model("pre", ["X"], ["Y"], mbs=0, dims=(-1, 4))],
         post=[model("post", ["X"], ["Y"], dims=(-1,))])


# ---- the scheduler ---------------------------------------------------------------------------


def scheduler(c, batching=True):
    shapes = {s.index: StepShapes(batching, {name: (4,) for name, _ in s.inputs})
              for s in c.ensemble.steps}
    return EnsembleScheduler("ens", "1", c, ModelStats(), shapes)


def run(coro):
    return asyncio.run(coro)


def test_values_flow_through_the_steps_and_stats_count_the_pipeline():
    c = config(CHAIN)
    seen = []

    async def run_step(step, tensors, request):
        seen.append((step.model, [t.name for t in tensors]))
        return InferResponse(step.model, "1", "", [Tensor("Y", "FP32", tensors[0].data + 1)])

    s = scheduler(c)
    x = np.zeros((2, 4), np.float32)
    out = run(s.run([x], 2, run_step, None))
    np.testing.assert_array_equal(out[0], x + 2)
    assert seen == [("pre", ["X"]), ("post", ["X"])]
    assert (s.stats.inference_count, s.stats.execution_count) == (2, 1)
    assert s.queue_depth == 0


def test_a_failing_step_names_the_ensemble_and_the_step_and_keeps_its_code():
    async def run_step(step, tensors, request):
        raise InvalidArgument("input 'X' has shape [9]")

    with pytest.raises(InvalidArgument) as info:
        run(scheduler(config(CHAIN)).run([np.zeros((1, 4))], 1,
                                         run_step, None))
    assert info.value.message == "in ensemble 'ens', step 1 (model 'pre'): input 'X' has shape [9]"


def test_a_composing_model_that_is_gone_makes_the_ensemble_unavailable_not_unknown():
    async def run_step(step, tensors, request):
        raise NotFound("Request for unknown model: 'pre' is not found")

    with pytest.raises(Unavailable, match="in ensemble 'ens', step 1"):
        run(scheduler(config(CHAIN)).run([np.zeros((1, 4))], 1,
                                         run_step, None))


def test_a_broken_ensemble_refuses_before_any_step():
    s = scheduler(config(CHAIN))
    s.broken = "ensemble ens contains models that are not available: pre"

    async def run_step(step, tensors, request):
        raise AssertionError("no step may run")

    with pytest.raises(Unavailable, match="not available: pre"):
        run(s.run([np.zeros((1, 4))], 1, run_step, None))


def test_steps_of_a_wave_run_together_and_the_first_failure_cancels_the_rest():
    c = config(ens(step("slow", {"X": "IN"}, {"Y": "a"}), step("bad", {"X": "IN"}, {"Y": "b"}),
                   step("join", {"A": "a", "B": "b"}, {"S": "OUT"})))
    cancelled = []

    async def run_step(step, tensors, request):
        if step.model == "slow":
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(step.model)
                raise
        raise InvalidArgument("refused")

    async def scenario():
        s = scheduler(c)
        with pytest.raises(InvalidArgument, match="step 2 \\(model 'bad'\\)"):
            await asyncio.wait_for(
                s.run([np.zeros((1, 4))], 1, run_step, None), 5)
        assert s.queue_depth == 0
        await asyncio.wait_for(s.close(), 1)  # nothing left running

    run(scenario())
    assert cancelled == ["slow"]


def test_close_waits_for_pipelines_in_flight():
    c = config(CHAIN)
    release = None

    async def run_step(step, tensors, request):
        await release.wait()
        return InferResponse(step.model, "1", "", [Tensor("Y", "FP32", tensors[0].data)])

    async def scenario():
        nonlocal release
        release = asyncio.Event()
        s = scheduler(c)
        task = asyncio.ensure_future(s.run([np.zeros((1, 4))], 1,
                                           run_step, None))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0.01)
        assert not closing.done() and s.queue_depth == 1
        release.set()
        await asyncio.wait_for(closing, 1)
        assert (await task)[0].shape == (1, 4)

    run(scenario())


# ---- a batching side meets a non-batching one (Triton's rule) --------------------------------


def test_fit_adds_a_batch_of_one_for_a_batching_model_and_takes_it_off_again():
    x = np.zeros((16,), np.float32)
    assert fit(x, False, True, (16,)).shape == (1, 16)  # matches the model's dims: batch of 1
    assert fit(x, False, True, (-1,)).shape == (1, 16)
    assert fit(np.zeros((2, 16)), False, True, (16,)).shape == (2, 16)  # already batched
    assert fit(np.zeros((1, 16)), True, False, (16,)).shape == (16,)  # batch of 1 stripped
    assert fit(np.zeros((1, 16)), True, False, (-1, 16)).shape == (1, 16)  # fits as it is
    assert fit(np.zeros((3, 16)), True, False, (16,)).shape == (3, 16)  # only a batch of 1
    assert fit(x, True, True, (16,)) is x and fit(x, False, False, (16,)) is x


def test_a_non_batching_ensemble_feeds_a_batching_step_and_answers_without_the_batch():
    c = config(ens(step("pre", {"X": "IN"}, {"Y": "OUT"}), dims="[ 4 ]", mbs=0))
    seen = []

    async def run_step(step, tensors, request):
        seen.append(tensors[0].data.shape)
        return InferResponse(step.model, "1", "", [Tensor("Y", "FP32", tensors[0].data * 2)])

    out = run(scheduler(c, batching=True).run([np.ones(4, np.float32)], 1,
                                               run_step, None))
    assert seen == [(1, 4)] and out[0].shape == (4,)
    np.testing.assert_array_equal(out[0], np.full(4, 2.0))


def test_the_composition_says_how_each_step_batches_and_which_labels_outputs_inherit():
    c = config(CHAIN)
    post = dataclasses.replace(model("post", ["X"], ["Y"], mbs=0, dims=(-1, 4)),
                               labels={"Y": ("a", "b", "c", "d")})
    composition = check_composing(c, {1: [model("pre", ["X"], ["Y"])], 2: [post]})
    assert composition.steps[1].batching and not composition.steps[2].batching
    assert composition.steps[1].dims == {"X": (4,)}
    assert composition.labels == {"OUT": ("a", "b", "c", "d")}


def test_versions_of_a_routed_step_that_differ_in_batching_are_refused():
    with pytest.raises(ModelLoadError, match="differ in batching"):
        fits(config(CHAIN), pre=[model("pre", ["X"], ["Y"]),
                                 model("pre", ["X"], ["Y"], mbs=0, dims=(-1, 4))],
             post=[model("post", ["X"], ["Y"])])


def test_every_failure_of_a_wave_is_collected(caplog):
    c = config(ens(step("a", {"X": "IN"}, {"Y": "p"}), step("b", {"X": "IN"}, {"Y": "q"}),
                   step("join", {"A": "p", "B": "q"}, {"S": "OUT"})))

    async def run_step(step, tensors, request):
        raise InvalidArgument(f"{step.model} refused")

    async def scenario():
        with pytest.raises(InvalidArgument, match="step 1 \\(model 'a'\\): a refused"):
            await scheduler(c).run([np.zeros((1, 4))], 1, run_step, None)

    run(scenario())
    gc.collect()
    assert "never retrieved" not in caplog.text
