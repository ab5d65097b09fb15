"""Turn one version directory into running model instances (blocking; run off the event loop).

Order matters: the first instance's runtime tells what the model file declares, which completes
and checks the config; then the remaining instances open, and every instance runs each batch
size it may see once (warm-up), so the first real requests do not pay for allocations.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.batching import Instance
from gateway.errors import ModelLoadError
from gateway.modelconfig import ModelConfig, complete_config, validate
from gateway.protocol.pb import model_config_pb2 as mc
from gateway.tensors import DATATYPE_TO_DTYPE
from runtimes import RuntimeOptions, load_runtime

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedVersion:
    config: ModelConfig
    instances: list[Instance]


def load_version(model_file: Path, model: str, version: int, proto: mc.ModelConfig,
                 explicit_batch: bool, cpu_threads: int = 1) -> LoadedVersion:
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
                complete_config(proto, explicit_batch, runtime.io)
                config = validate(proto, runtime.io)
            name = f"{model}_{version}_{index}"
            instances.append(Instance(name, runtime, ThreadPoolExecutor(1, thread_name_prefix=name)))
        for inst in instances:
            _warm_up(inst, config)
    except BaseException:
        for inst in instances:
            inst.executor.shutdown(wait=False)
            inst.runtime.close()
        raise
    return LoadedVersion(config, instances)


def _device_plan(proto: mc.ModelConfig) -> list[tuple[str, int]]:
    """(device, device id) for every instance the config's instance_group asks for."""
    plan: list[tuple[str, int]] = []
    groups = list(proto.instance_group) or [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU)]
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


def _warm_up(inst: Instance, config: ModelConfig) -> None:
    names = [o.name for o in config.outputs]
    for size in warmup_sizes(config):
        feeds = {}
        for spec in config.inputs:
            dims = tuple(1 if d < 0 else d for d in spec.dims)
            shape = (size, *dims) if size else dims
            dtype = DATATYPE_TO_DTYPE[spec.datatype]
            feeds[spec.name] = (np.full(shape, b"", dtype=object) if spec.datatype == "BYTES"
                                else np.zeros(shape, dtype=dtype))
        try:
            inst.runtime.run(feeds, names)
        except Exception as exc:  # some models reject zeros; that is not a load failure
            log.warning("%s: warm-up at batch %d failed (%s); continuing", inst.name, size, exc)
            return
