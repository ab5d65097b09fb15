"""Ensembles (Triton's ``platform: "ensemble"``): a pipeline of models served as one model.

An ensemble's config.pbtxt names its inputs and outputs and, in ``ensemble_scheduling``, the
steps: each step sends ensemble tensors (``input_map``: model input -> ensemble tensor) to a
composing model and names its outputs as ensemble tensors (``output_map``: model output ->
ensemble tensor). The ensemble has no model file and no batcher of its own: every step is an
ordinary request to its model through the data plane, so it is routed (``model_version: -1``
follows the model's traffic split, sticky keys included), batched with that model's other
callers, counted in that model's statistics and metrics, and it fails as that model's requests
fail. The ensemble's own statistics count the whole pipeline.

Three parts, in order of use: ``ensemble_config`` checks what the ensemble's file alone can
tell (a step reading a tensor nothing produces, a tensor produced twice, a cycle) and plans the
order; ``check_composing`` checks the plan against the composing models' configs once they have
loaded (Triton's rules and words: every model input mapped exactly once, data types and shapes
consistent, batch sizes); ``EnsembleScheduler`` runs requests through the plan, steps whose
inputs are ready together, and reports a failing step's error with the ensemble and the step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from gateway.errors import GatewayError, ModelLoadError, NotFound, Unavailable
from gateway.modelconfig import ModelConfig, datatype_name, version_policy
from gateway.modelconfig_pb import model_config_pb2 as mc
from gateway.statistics import ModelStats
from gateway.tensors import DATATYPES, InferResponse, Tensor, TensorSpec

log = logging.getLogger(__name__)
ENSEMBLE_PLATFORM = "ensemble"


@dataclass(frozen=True, slots=True)
class Step:
    index: int  # 1-based, in config.pbtxt order: how an operator finds it
    model: str
    version: str  # "" = routed by the model's traffic policy (model_version -1)
    inputs: tuple[tuple[str, str], ...]  # (model input, ensemble tensor), by input name
    outputs: tuple[tuple[str, str], ...]  # (model output, ensemble tensor), by output name

    @property
    def label(self) -> str:
        return f"step {self.index} (model '{self.model}'" + (
            f" version {self.version})" if self.version else ")")


@dataclass(frozen=True, slots=True)
class EnsemblePlan:
    steps: tuple[Step, ...]
    # The steps in dependency order: every step of a wave reads only ensemble inputs and
    # outputs of earlier waves, so the steps of one wave run at the same time.
    waves: tuple[tuple[Step, ...], ...]
    models: frozenset[str]  # the composing models


def is_ensemble(proto: mc.ModelConfig) -> bool:
    return proto.platform == ENSEMBLE_PLATFORM or proto.HasField("ensemble_scheduling")


def ensemble_config(proto: mc.ModelConfig) -> ModelConfig:
    """The ensemble's config, checked as far as its own file allows, with its plan."""
    name = proto.name
    if proto.platform != ENSEMBLE_PLATFORM:
        raise ModelLoadError(f"ensemble_scheduling is set but platform is "
                             f"'{proto.platform or proto.backend}'; an ensemble has platform "
                             "\"ensemble\"")
    if not proto.HasField("ensemble_scheduling") or not proto.ensemble_scheduling.step:
        raise ModelLoadError(f"ensemble {name} has no ensemble_scheduling steps")
    if proto.max_batch_size < 0:
        raise ModelLoadError("max_batch_size must not be negative")
    if proto.response_cache.enable:
        log.warning("model '%s': response_cache is not honoured on an ensemble (its steps are "
                    "routed per request, so a cached answer could come from another composing "
                    "version); enable it on the composing models", name)
    if proto.ensemble_scheduling.max_inflight_requests:
        log.warning("model '%s': ensemble_scheduling.max_inflight_requests is not honoured: "
                    "the server's and each composing model's in-flight limits apply", name)
    if not proto.input or not proto.output:
        raise ModelLoadError(f"ensemble {name} must declare its inputs and outputs")
    inputs = tuple(_tensor_spec(t, "input") for t in proto.input)
    outputs = tuple(_tensor_spec(t, "output") for t in proto.output)
    for kind, specs in (("input", inputs), ("output", outputs)):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ModelLoadError(f"ensemble {name} declares an {kind} twice")
    if not proto.HasField("version_policy"):
        proto.version_policy.latest.num_versions = 1
    plan = _plan(name, proto, [s.name for s in inputs], [s.name for s in outputs])
    return ModelConfig(
        name=name,
        platform=ENSEMBLE_PLATFORM,
        max_batch_size=proto.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        version_policy=version_policy(proto),
        batching=None,
        instance_groups=(),
        parameters={k: v.string_value for k, v in proto.parameters.items()},
        default_model_filename="",
        unsupported_outputs={},
        input_index={s.name: i for i, s in enumerate(inputs)},
        output_index={s.name: i for i, s in enumerate(outputs)},
        proto=proto,
        ensemble=plan,
    )


def _tensor_spec(t, kind: str) -> TensorSpec:
    datatype = datatype_name(t.data_type)
    if datatype not in DATATYPES:
        raise ModelLoadError(f"ensemble {kind} '{t.name}' has unsupported data_type {datatype}")
    reshape = tuple(t.reshape.shape) if t.HasField("reshape") else None
    if reshape is not None and (-1 in reshape or -1 in t.dims):
        raise ModelLoadError(f"ensemble {kind} '{t.name}': a reshape with variable (-1) dims "
                             "is not supported on an ensemble's own tensors")
    if reshape is not None and int(np.prod(reshape)) != int(np.prod(t.dims)):
        raise ModelLoadError(f"ensemble {kind} '{t.name}': dims {list(t.dims)} and reshape "
                             f"{list(reshape)} hold different numbers of elements")
    return TensorSpec(t.name, datatype, tuple(t.dims), reshape=reshape)


def _plan(name: str, proto: mc.ModelConfig, inputs: list[str],
          outputs: list[str]) -> EnsemblePlan:
    """The steps in dependency order; refuses what no composing model can fix."""
    steps = []
    producer: dict[str, Step | None] = {t: None for t in inputs}  # None: the request
    for index, s in enumerate(proto.ensemble_scheduling.step, start=1):
        if not s.model_name:
            raise ModelLoadError(f"in ensemble {name}, step {index} names no model_name")
        if s.model_name == name:
            raise ModelLoadError(f"circular dependency between ensembles: {name} -> {name}")
        if s.model_version < -1:
            raise ModelLoadError(f"in ensemble {name}, step {index}: model_version "
                                 f"{s.model_version} (use -1 to follow the model's routing)")
        if not s.output_map:
            raise ModelLoadError(f"in ensemble {name}, step {index} (model '{s.model_name}') "
                                 "has no output_map: its results would go nowhere")
        step = Step(index, s.model_name, str(s.model_version) if s.model_version > 0 else "",
                    tuple(sorted(s.input_map.items())), tuple(sorted(s.output_map.items())))
        for _, tensor in step.outputs:
            if tensor in producer:
                first = producer[tensor]
                raise ModelLoadError(
                    f"in ensemble {name}, ensemble tensor {tensor} is produced by "
                    + (f"{first.label} and by " if first else "the request (an ensemble input) "
                       "and by ") + step.label)
            producer[tensor] = step
        steps.append(step)
    for step in steps:
        for model_input, tensor in step.inputs:
            if tensor not in producer:
                raise ModelLoadError(
                    f"in ensemble {name}, {step.label} reads ensemble tensor {tensor} (for its "
                    f"input {model_input}), which is neither an ensemble input nor a step's "
                    "output")
    for tensor in outputs:
        if producer.get(tensor, None) is None:
            raise ModelLoadError(f"in ensemble {name}, output {tensor} is not produced by any "
                                 "step")
    # Waves: a step runs once every step it reads from has run.
    wave_of: dict[int, int] = {}
    remaining = list(steps)
    while remaining:
        placed = []
        for step in remaining:
            sources = [producer[t] for _, t in step.inputs]
            if all(src is None or src.index in wave_of for src in sources):
                placed.append((step, 1 + max((wave_of[src.index] for src in sources
                                              if src is not None), default=-1)))
        if not placed:
            # Name the cycle, not what waits behind it: drop steps no remaining step reads.
            while True:
                read = {producer[t].index for s in remaining for _, t in s.inputs
                        if producer[t] is not None}
                behind = [s for s in remaining if s.index not in read]
                if not behind:
                    break
                remaining = [s for s in remaining if s.index in read]
            raise ModelLoadError(
                f"in ensemble {name}, steps {', '.join(str(s.index) for s in remaining)} read "
                "each other's outputs in a cycle")
        for step, wave in placed:
            wave_of[step.index] = wave
        remaining = [s for s in remaining if s.index not in wave_of]
    waves = [[] for _ in range(max(wave_of.values()) + 1)]
    for step in steps:
        waves[wave_of[step.index]].append(step)
    return EnsemblePlan(tuple(steps), tuple(tuple(w) for w in waves),
                        frozenset(s.model for s in steps))


# ---- against the composing models (once they have loaded) ----------------------------------


@dataclass(slots=True)
class _Node:
    """What one side says an ensemble tensor is (Triton's consistency rule compares these)."""

    owner: str
    datatype: str
    dims: tuple[int, ...]
    full: tuple[int, ...]  # with the batch dim, -1, when the owner batches


def _node(owner: str, batching: bool, datatype: str, dims: tuple[int, ...]) -> _Node:
    dims = tuple(dims)
    return _Node(owner, datatype, dims, ((-1,) if batching else ()) + dims)


def _same_dims(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _consistent(name: str, tensor: str, seen: _Node, new: _Node) -> None:
    prefix = f"in ensemble {name}, ensemble tensor {tensor}: "
    if seen.datatype != new.datatype:
        raise ModelLoadError(f"{prefix}inconsistent data type: {seen.datatype} is inferred from "
                             f"model {seen.owner} while {new.datatype} is inferred from model "
                             f"{new.owner}")
    # A batching model's [d...] meets a non-batching model's [-1, d...]: equal in full.
    if not _same_dims(seen.dims, new.dims) and not _same_dims(seen.full, new.full):
        raise ModelLoadError(f"{prefix}inconsistent shape: {list(seen.full)} is inferred from "
                             f"model {seen.owner} while {list(new.full)} is inferred from "
                             f"model {new.owner}")


@dataclass(frozen=True, slots=True)
class StepShapes:
    """What the scheduler needs of a step's model to hand it tensors: whether it batches, and
    its inputs' dims (batch dim excluded), for Triton's rule where a batching side meets a
    non-batching one (see ``fit``)."""

    batching: bool
    dims: dict[str, tuple[int, ...]]  # model input -> config dims


@dataclass(frozen=True, slots=True)
class Composition:
    """What ``check_composing`` found: each step's shapes, and the class labels each ensemble
    output inherits from the model output that produces it (classification extension)."""

    steps: dict[int, StepShapes]
    labels: dict[str, tuple[str, ...]]


def check_composing(config: ModelConfig, composing: dict[int, list[ModelConfig]]) -> Composition:
    """Check the plan against the configs each step may be served by (for a routed step, every
    serving version of its model); ModelLoadError in Triton's words when they do not fit."""
    name = config.name
    plan: EnsemblePlan = config.ensemble
    missing = sorted({s.model + (f" version {s.version}" if s.version else "")
                      for s in plan.steps if not composing.get(s.index)})
    if missing:
        raise ModelLoadError(f"ensemble {name} contains models that are not available: "
                             f"{', '.join(missing)}")
    batching = config.max_batch_size > 0
    nodes: dict[str, _Node] = {}
    for spec in (*config.inputs, *config.outputs):
        nodes[spec.name] = _node(name, batching, spec.datatype,
                                 spec.reshape if spec.reshape is not None else spec.dims)
    steps, labels = {}, {}
    outputs = {spec.name for spec in config.outputs}
    for step in plan.steps:
        models = composing[step.index]
        for model in models:
            _check_step(name, config.max_batch_size, step, model, nodes)
        batching = {m.max_batch_size > 0 for m in models}
        if len(batching) > 1:
            raise ModelLoadError(
                f"in ensemble {name}, {step.label}: the serving versions of model {step.model} "
                "differ in batching (max_batch_size 0 and above 0); pin model_version in the "
                "step")
        first = models[0]
        steps[step.index] = StepShapes(batching.pop(), {s.name: s.dims for s in first.inputs})
        for model_output, tensor in step.outputs:
            if tensor in outputs and first.labels.get(model_output):
                labels[tensor] = first.labels[model_output]
    return Composition(steps, labels)


def _check_step(name: str, max_batch_size: int, step: Step, model: ModelConfig,
                nodes: dict[str, _Node]) -> None:
    if 0 < model.max_batch_size < max_batch_size:
        raise ModelLoadError(f"ensemble {name} allows maximum batch size {max_batch_size}, but "
                             f"it contains model {step.model} which only allows maximum batch "
                             f"size to be {model.max_batch_size}")
    batching = model.max_batch_size > 0
    mapped = dict(step.inputs)
    for model_input, tensor in step.inputs:
        if model_input not in model.input_index:
            raise ModelLoadError(f"in ensemble {name}, ensemble tensor {tensor} is mapping to "
                                 f"non-existing input {model_input} in model {step.model}")
    for spec in model.inputs:
        tensor = mapped.get(spec.name)
        if tensor is None:
            if spec.optional:
                continue
            raise ModelLoadError(f"in ensemble {name}, input {spec.name} in model {step.model} "
                                 "is not mapped to any ensemble tensors")
        _merge(name, tensor, _node(step.model, batching, spec.datatype, spec.dims), nodes)
    for model_output, tensor in step.outputs:
        index = model.output_index.get(model_output)
        if index is None:
            raise ModelLoadError(f"in ensemble {name}, ensemble tensor {tensor} is mapped from "
                                 f"non-existing output {model_output} in model {step.model}")
        spec = model.outputs[index]
        _merge(name, tensor, _node(step.model, batching, spec.datatype, spec.dims), nodes)


def _merge(name: str, tensor: str, node: _Node, nodes: dict[str, _Node]) -> None:
    seen = nodes.get(tensor)
    if seen is None:
        nodes[tensor] = node
    else:
        _consistent(name, tensor, seen, node)


# ---- serving ---------------------------------------------------------------------------------


def fit(data: np.ndarray, batched: bool, to_batching: bool, dims: tuple[int, ...]) -> np.ndarray:
    """A tensor from one side handed to the other, where one batches and the other does not
    (Triton's rule): to a batching model, a tensor that already has the model's dims gets a
    batch of 1; to a non-batching one, a batch of 1 whose shape is not the model's loses its
    batch dim. Otherwise the tensor goes as it is."""
    if batched == to_batching:
        return data
    shape = data.shape
    if to_batching:
        return data.reshape((1, *shape)) if _same_dims(dims, shape) else data
    if shape and shape[0] == 1 and not _same_dims(dims, shape):
        return data.reshape(shape[1:])
    return data


# The data plane's way to run one step: (step, its input tensors named by the model's inputs,
# the caller's request) -> the model's response with the step's outputs, in step.outputs order.
RunStep = Callable[[Step, list[Tensor], object], Awaitable[InferResponse]]


class EnsembleScheduler:
    """Runs the requests of one ensemble version through its plan.

    It stands where a model version's Batcher stands (the repository, metrics and drain treat
    both alike), but holds no queue and no instances: the steps queue in their models'
    batchers. ``broken`` holds why the ensemble cannot serve now (a composing model went away or
    changed so it no longer fits); the repository sets and clears it."""

    def __init__(self, model: str, version: str, config: ModelConfig, stats: ModelStats,
                 shapes: dict[int, StepShapes]):
        self.model = model
        self.version = version
        self.config = config
        self.plan: EnsemblePlan = config.ensemble
        self.stats = stats
        self.instances: list = []
        self.inline = False
        self.cache = None
        self.observer = None
        self.broken = ""
        self.shapes = shapes  # step index -> its model's shapes (replaced when it reloads)
        self._batching = config.max_batch_size > 0
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queue_depth(self) -> int:
        return self._running

    def start(self) -> None:
        pass

    def abandon(self, error: GatewayError) -> None:
        """Nothing to do: the steps in flight are queued in their models' batchers, which are
        abandoned with them."""

    async def close(self) -> None:
        """Retire: the pipelines in flight finish (their steps are in other models' batchers)."""
        await self._idle.wait()

    async def run(self, inputs: list[np.ndarray], size: int, run_step: RunStep,
                  request) -> list[np.ndarray]:
        """The ensemble's outputs, in config order, for the request's checked ``inputs`` (in
        config order too, as ``prepare_inputs`` gives them)."""
        if self.broken:
            raise Unavailable(f"in ensemble '{self.model}', {self.broken}")
        start = time.monotonic_ns()
        self._running += 1
        self._idle.clear()
        try:
            # ensemble tensor -> (its value, whether it carries a batch dim)
            values = {spec.name: (Tensor(spec.name, spec.datatype, array), self._batching)
                      for spec, array in zip(self.config.inputs, inputs)}
            shapes = self.shapes
            for wave in self.plan.waves:
                if len(wave) == 1:
                    await self._step(wave[0], shapes[wave[0].index], values, run_step, request)
                else:
                    await self._together(wave, shapes, values, run_step, request)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()
        stats = self.stats
        stats.inference_count += size
        stats.execution_count += 1
        stats.compute_infer.add(time.monotonic_ns() - start)
        stats.last_inference_ms = time.time_ns() // 1_000_000
        outputs = []
        for spec in self.config.outputs:
            value, batched = values[spec.name]
            dims = spec.reshape if spec.reshape is not None else spec.dims
            outputs.append(fit(value.data, batched, self._batching, dims))
        return outputs

    async def _step(self, step: Step, shapes: StepShapes, values: dict, run_step: RunStep,
                    request) -> None:
        tensors = []
        for model_input, tensor in step.inputs:
            value, batched = values[tensor]
            data = fit(value.data, batched, shapes.batching, shapes.dims[model_input])
            tensors.append(Tensor(model_input, value.datatype, data))
        try:
            response = await run_step(step, tensors, request)
        except GatewayError as exc:
            # The caller's model exists; a composing model that does not is the server's state.
            kind = Unavailable if isinstance(exc, NotFound) else type(exc)
            raise kind(f"in ensemble '{self.model}', {step.label}: {exc.message}") from None
        for (_, tensor), out in zip(step.outputs, response.outputs):
            values[tensor] = (Tensor(tensor, out.datatype, out.data), shapes.batching)

    async def _together(self, wave: tuple[Step, ...], shapes: dict[int, StepShapes],
                        values: dict, run_step: RunStep, request) -> None:
        """The steps of one wave at once; the first failure cancels the others."""
        tasks = [asyncio.ensure_future(self._step(s, shapes[s.index], values, run_step,
                                                  request)) for s in wave]
        try:
            _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        # Every failure is collected (asyncio logs one never looked at); the first in config
        # order is the one reported.
        failures = [task.exception() for task in tasks if not task.cancelled()]
        for failure in failures:
            if failure is not None:
                raise failure
