"""Turn one version directory into running model instances (blocking; run off the event loop).

Order matters: the first instance's runtime tells what the model file declares, which completes
and checks the config; then the remaining instances open, and every instance runs each batch
size it may see once (warm-up), so the first real requests do not pay for allocations.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.batching import Instance
from gateway.classification import read_labels
from gateway.errors import ModelLoadError
from gateway.modelconfig import DEFAULT_MAX_BATCH_SIZE, ModelConfig, complete_config, validate
from gateway.modelconfig_pb import model_config_pb2 as mc
from gateway.tensors import DATATYPE_TO_DTYPE
from runtimes import RuntimeOptions, load_runtime

log = logging.getLogger(__name__)


# A model whose largest batch runs faster than this executes on the event loop: handing a
# batch to a worker thread and back costs ~100-150 us of CPU (two thread wake-ups and GIL
# hand-offs), more than such a model computes. Heavier models run on their instance threads.
INLINE_MAX_SECONDS = 0.0005
# A batch judged inline that takes longer than this (wall clock, so with room for the process
# being descheduled) moves its version to its instance threads for good: the judgment was wrong
# (inputs that cost more than the warm-up's zeros), and the event loop serves everyone else.
INLINE_BUDGET_SECONDS = 0.01
EXECUTION_MODES = ("auto", "inline", "thread")


@dataclass(slots=True)
class LoadedVersion:
    config: ModelConfig
    instances: list[Instance]
    inline: bool = False  # run batches on the event loop (see INLINE_MAX_SECONDS)
    inline_budget_s: float = 0.0  # enforced on inline batches (0: never, execution=inline)


def load_version(model_file: Path, model: str, version: int, proto: mc.ModelConfig,
                 explicit_batch: bool, cpu_threads: int = 1,
                 default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> LoadedVersion:
    """Open every instance of one model version, complete its config and warm it up."""
    proto = copy.deepcopy(proto)
    groups = _device_plan(proto)
    instances: list[Instance] = []
    try:
        for index, (device, device_id) in enumerate(groups):
            runtime = load_runtime(model_file, RuntimeOptions(
                device=device, device_id=device_id, intra_op_threads=cpu_threads,
                parameters=tuple((k, v.string_value) for k, v in proto.parameters.items())))
            if index == 0:
                complete_config(proto, explicit_batch, runtime.io, default_max_batch_size)
                config = validate(proto, runtime.io)
                labels = {t.name: read_labels(model_file.parent.parent, t.label_filename)
                          for t in proto.output if t.label_filename}
                if labels:  # for the classification extension
                    config = dataclasses.replace(config, labels=labels)
                for name, kind in config.unsupported_outputs.items():
                    log.warning("model '%s' version %s: output '%s' is a %s, not a tensor; it is "
                                "left out of metadata and refused if requested", model, version,
                                name, kind)
            name = f"{model}_{version}_{index}"
            executor = ThreadPoolExecutor(1, thread_name_prefix=name)
            instances.append(Instance(name, runtime, executor))
        slowest = max(_warm_up(inst, config) for inst in instances)
        inline = _runs_inline(config, groups, slowest, _has_control_flow(model_file))
    except BaseException:
        for inst in instances:
            inst.executor.shutdown(wait=False)
            inst.runtime.close()
        raise
    auto = config.parameters.get("execution", "auto").lower() == "auto"
    return LoadedVersion(config, instances, inline,
                         INLINE_BUDGET_SECONDS if inline and auto else 0.0)


def _runs_inline(config: ModelConfig, devices: list[tuple[str, int]], slowest: float,
                 control_flow: bool) -> bool:
    """Where batches execute: the ``execution`` parameter (auto, inline, thread) decides.

    Auto runs a model on the event loop only if its cost cannot depend on the data, since the
    warm-up that measured it (``slowest``: the largest batch's run time, infinity when the
    warm-up failed) fed zeros and empty strings: CPU only, every input and output of fixed
    shape, no strings (their length is the caller's), no control flow (Loop, Scan, If), and
    fast enough. The batcher still moves it to its threads if a batch overruns the budget."""
    mode = config.parameters.get("execution", "auto").lower()
    if mode not in EXECUTION_MODES:
        raise ModelLoadError(f"parameter execution must be one of {', '.join(EXECUTION_MODES)}, "
                             f"not {mode!r}")
    if mode != "auto":
        return mode == "inline"
    specs = (*config.inputs, *config.outputs)
    fixed = all(d >= 0 for spec in specs for d in spec.dims)
    strings = any(spec.datatype == "BYTES" for spec in specs)
    return (fixed and not strings and not control_flow and all(d == "cpu" for d, _ in devices)
            and slowest <= INLINE_MAX_SECONDS)


# A NodeProto's op_type is field 4, a string: tag 0x22, the length, then the name.
_CONTROL_FLOW_OPS = (b"\x22\x04Loop", b"\x22\x04Scan", b"\x22\x02If")


def _has_control_flow(model_file: Path) -> bool:
    """Whether the ONNX file holds a Loop, Scan or If node (a byte search of the protobuf:
    a false positive only costs the inline fast path)."""
    data = model_file.read_bytes()
    return any(op in data for op in _CONTROL_FLOW_OPS)


def _device_plan(proto: mc.ModelConfig) -> list[tuple[str, int]]:
    """(device, device id) for every instance the config's instance_group asks for."""
    plan: list[tuple[str, int]] = []
    groups = (list(proto.instance_group)
              or [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU)])
    for g in groups:
        count = g.count or 1
        kind = mc.ModelInstanceGroup.Kind.Name(g.kind)
        if kind == "KIND_GPU" or (kind == "KIND_AUTO" and g.gpus):
            for gpu in (g.gpus or [0]):
                plan += [("gpu", gpu)] * count
        elif kind in ("KIND_CPU", "KIND_AUTO"):
            plan += [("cpu", 0)] * count
        else:
            raise ModelLoadError(f"instance_group kind {kind} is not supported")
    return plan


def warmup_sizes(config: ModelConfig) -> list[int]:
    if config.max_batch_size <= 0:
        return [0]
    if config.batching is None:
        return [1]
    return list(range(1, config.max_batch_size + 1))


def _warm_up(inst: Instance, config: ModelConfig) -> float:
    """Run every batch size once; return the best of three runs at the largest batch a request
    can bring (``max_batch_size``, also without dynamic batching: a request may carry that many
    rows), or infinity if the model refused the zeros it was warmed up with."""
    names = [o.name for o in config.outputs]
    largest = max(config.max_batch_size, 0)
    sizes = warmup_sizes(config)
    try:
        for size in sizes:
            inst.runtime.run(_zeros(config, size), names)
        if largest not in sizes:
            inst.runtime.run(_zeros(config, largest), names)
    except Exception as exc:  # some models reject zeros; that is not a load failure
        log.warning("%s: warm-up failed (%s); continuing", inst.name, exc)
        return float("inf")
    feeds = _zeros(config, largest)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        inst.runtime.run(dict(feeds), names)
        timings.append(time.perf_counter() - start)
    return min(timings)


def _zeros(config: ModelConfig, size: int) -> dict:
    """Warm-up feeds: zeros (empty strings) of batch ``size`` (0: a model without batching)."""
    feeds = {}
    for spec in config.inputs:
        model_dims = spec.dims if spec.reshape is None else spec.reshape  # what the model sees
        dims = tuple(1 if d < 0 else d for d in model_dims)
        shape = (size, *dims) if size else dims
        feeds[spec.name] = (np.full(shape, b"", dtype=object) if spec.datatype == "BYTES"
                            else np.zeros(shape, dtype=DATATYPE_TO_DTYPE[spec.datatype]))
    return feeds
