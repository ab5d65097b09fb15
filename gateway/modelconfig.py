"""Model configuration: read ``config.pbtxt``, complete it from the model file, validate it.

The file format is Triton's (protobuf text format of ``inference.ModelConfig``), so an existing
Triton ONNX repository serves unchanged. Unknown fields are logged and skipped, never fatal.
What the serving core needs is turned into the frozen dataclasses below; the completed protobuf
message is kept only so the ModelConfig RPC can return it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import text_format

from gateway.errors import ModelLoadError
from gateway.modelconfig_pb import model_config_pb2 as mc
from gateway.tensors import DATATYPES, TensorSpec
from runtimes.base import ModelIO

if TYPE_CHECKING:
    from gateway.ensemble import EnsemblePlan

log = logging.getLogger(__name__)

# Triton's default (its ONNX Runtime backend's default-max-batch-size): the max_batch_size a
# model gets when its file has a dynamic batch dim and no config says; --default-max-batch-size.
DEFAULT_MAX_BATCH_SIZE = 4
SUPPORTED_PLATFORMS = {"", "onnxruntime_onnx"}
SUPPORTED_BACKENDS = {"", "onnxruntime"}


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    timeout_action: str = "REJECT"  # or "DELAY"
    default_timeout_us: int = 0  # 0 = no queue timeout
    allow_timeout_override: bool = False
    max_queue_size: int = 0  # 0 = unbounded (bounded by the server-wide limit)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    priority_levels: int = 0  # 0 = a single level
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: dict[int, QueuePolicy] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InstanceGroup:
    kind: str  # "KIND_CPU" or "KIND_GPU"
    count: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    kind: str = "latest"  # "latest", "all" or "specific"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions of ``available`` this policy serves, ascending."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions:] if self.num_versions > 0 else []


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    version_policy: VersionPolicy
    batching: BatchingConfig | None
    instance_groups: tuple[InstanceGroup, ...]
    parameters: dict[str, str]
    default_model_filename: str
    unsupported_outputs: dict[str, str]  # model outputs that are not tensors -> their type
    input_index: dict[str, int]  # input name -> position in ``inputs``
    output_index: dict[str, int]
    proto: mc.ModelConfig  # the completed config, for the ModelConfig RPC only
    response_cache: bool = False  # response_cache { enable: true }: repeats from the cache
    # output name -> class labels, one per line of the output's label_filename (classification)
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # platform "ensemble": the steps (gateway/ensemble.py); None for a model file
    ensemble: EnsemblePlan | None = None


def read_config_file(model_dir: Path, name: str) -> tuple[mc.ModelConfig, bool]:
    """Parse ``config.pbtxt`` if present; also say whether ``max_batch_size`` was given."""
    path = model_dir / "config.pbtxt"
    proto = mc.ModelConfig()
    if not path.is_file():
        proto.name = name
        return proto, False
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"config.pbtxt is unreadable: {exc.__class__.__name__}") from exc
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        if "has no field named" not in str(exc):
            raise ModelLoadError(f"config.pbtxt does not parse: {exc}") from exc
        log.warning("model '%s': config.pbtxt: %s; unknown fields are ignored", name, exc)
        proto = mc.ModelConfig()
        try:
            text_format.Parse(text, proto, allow_unknown_field=True)
        except text_format.ParseError as exc2:
            raise ModelLoadError(f"config.pbtxt does not parse: {exc2}") from exc2
    if proto.name and proto.name != name:
        raise ModelLoadError(
            f"config.pbtxt names the model '{proto.name}' but its directory is '{name}'")
    proto.name = name
    return proto, _names_max_batch_size(text)


def _names_max_batch_size(text: str) -> bool:
    """Whether the config sets max_batch_size at its top level, even to 0 (the proto default).

    Read from the tokens, not the lines: text format ignores line breaks, and comments or
    strings that mention the field do not set it.
    """
    tokens = text_format.Tokenizer(text.splitlines())
    depth, previous = 0, ""
    while not tokens.AtEnd():
        token = tokens.token
        if token in ("{", "<"):
            depth += 1
        elif token in ("}", ">"):
            depth -= 1
        elif token == ":" and depth == 0 and previous == "max_batch_size":
            return True
        previous = token
        tokens.NextToken()
    return False


def datatype_name(enum_value: int) -> str:
    return mc.DataType.Name(enum_value).removeprefix("TYPE_").replace("STRING", "BYTES")


def _datatype_enum(datatype: str) -> int:
    return mc.DataType.Value("TYPE_" + ("STRING" if datatype == "BYTES" else datatype))


def complete_config(proto: mc.ModelConfig, explicit_batch: bool, io: ModelIO,
                    default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> None:
    """Fill what the config leaves out, in place, as Triton's auto-complete and normalisation
    do, so the ModelConfig RPC answers what Triton would: from the model file the tensors and
    ``max_batch_size`` (``default_max_batch_size`` when every tensor has a dynamic first dim,
    with dynamic batching when that is above 1), then platform and backend,
    ``default_model_filename``, ``version_policy`` (latest 1), an ``instance_group`` named and
    counted as it runs, and ``preferred_batch_size`` (``max_batch_size``) in
    ``dynamic_batching``."""
    if not proto.platform and not proto.backend:
        proto.platform = "onnxruntime_onnx"
    if not proto.backend and proto.platform == "onnxruntime_onnx":
        proto.backend = "onnxruntime"
    if not proto.platform and proto.backend == "onnxruntime":
        proto.platform = "onnxruntime_onnx"
    tensors = io.inputs + io.outputs
    batch_dynamic = bool(tensors) and all(t.dims and t.dims[0] == -1 for t in tensors)
    if not explicit_batch and proto.max_batch_size == 0 and batch_dynamic:
        proto.max_batch_size = max(default_max_batch_size, 0)
        if (proto.max_batch_size > 1 and not proto.HasField("dynamic_batching")
                and not proto.HasField("sequence_batching")):
            proto.dynamic_batching.SetInParent()
    skip = 1 if proto.max_batch_size > 0 else 0
    _complete_tensors(proto.input, io.inputs, skip)
    _complete_tensors(proto.output, io.outputs, skip)
    if not proto.default_model_filename:
        proto.default_model_filename = "model.onnx"
    if not proto.HasField("version_policy"):
        proto.version_policy.latest.num_versions = 1
    if (proto.HasField("dynamic_batching") and not proto.dynamic_batching.preferred_batch_size
            and proto.max_batch_size > 0):
        proto.dynamic_batching.preferred_batch_size.append(proto.max_batch_size)
    _complete_instance_groups(proto)


def _complete_instance_groups(proto: mc.ModelConfig) -> None:
    """Name, kind and count of every instance group, as the loader runs them (Triton's names:
    the model's for the group it adds, ``<model>_<index>`` for unnamed ones)."""
    groups = proto.instance_group
    if not groups:
        groups.add(name=proto.name, kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    for index, group in enumerate(groups):
        if not group.name:
            group.name = f"{proto.name}_{index}"
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = (mc.ModelInstanceGroup.KIND_GPU if group.gpus
                          else mc.ModelInstanceGroup.KIND_CPU)
        group.count = max(group.count, 1)
        if group.kind == mc.ModelInstanceGroup.KIND_GPU and not group.gpus:
            group.gpus.append(0)


def _complete_tensors(configured, declared: list[TensorSpec], skip: int) -> None:
    if not configured:
        for spec in declared:
            t = configured.add()
            t.name = spec.name
    for t in configured:
        spec = next((s for s in declared if s.name == t.name), None)
        if spec is None:
            continue  # reported by validate()
        if t.data_type == mc.TYPE_INVALID:
            t.data_type = _datatype_enum(spec.datatype)
        if not t.dims and not t.HasField("reshape"):
            t.dims.extend(spec.dims[skip:])


def validate(proto: mc.ModelConfig, io: ModelIO) -> ModelConfig:
    """Check the completed config against the model file and freeze what the core needs."""
    if proto.platform not in SUPPORTED_PLATFORMS or proto.backend not in SUPPORTED_BACKENDS:
        raise ModelLoadError(
            f"platform '{proto.platform or proto.backend}' is not served; this gateway serves "
            "onnxruntime_onnx models")
    if proto.max_batch_size < 0:
        raise ModelLoadError("max_batch_size must not be negative")
    if proto.HasField("sequence_batching"):
        raise ModelLoadError("sequence_batching is not supported: this gateway serves stateless "
                             "models (use dynamic_batching)")
    ragged = [t.name for t in proto.input if t.allow_ragged_batch]
    if ragged or proto.batch_input or proto.batch_output:
        raise ModelLoadError(
            "ragged batching is not supported (allow_ragged_batch"
            + (f" on {', '.join(ragged)}" if ragged else "") + ", batch_input, batch_output): "
            "ONNX models take dense tensors; remove it to batch requests of one shape")
    skip = 1 if proto.max_batch_size > 0 else 0
    model_inputs = {s.name: s for s in io.inputs}
    model_outputs = {s.name: s for s in io.outputs}
    inputs = tuple(_check_tensor(t, model_inputs, "input", skip) for t in proto.input)
    outputs = []
    for t in proto.output:
        if t.name in io.unsupported_outputs:
            raise ModelLoadError(
                f"output '{t.name}' is a {io.unsupported_outputs[t.name]}, not a tensor; "
                "remove it from config.pbtxt")
        outputs.append(_check_tensor(t, model_outputs, "output", skip))
    required = {s.name for s in io.inputs} - {t.name for t in inputs}
    if required:
        raise ModelLoadError(f"config.pbtxt omits model inputs: {', '.join(sorted(required))}")
    return ModelConfig(
        name=proto.name,
        platform=proto.platform or "onnxruntime_onnx",
        max_batch_size=proto.max_batch_size,
        inputs=inputs,
        outputs=tuple(outputs),
        version_policy=version_policy(proto),
        batching=_batching(proto) if proto.HasField("dynamic_batching") else None,
        instance_groups=_instance_groups(proto),
        parameters={k: v.string_value for k, v in proto.parameters.items()},
        default_model_filename=proto.default_model_filename or "model.onnx",
        unsupported_outputs=dict(io.unsupported_outputs),
        input_index={t.name: i for i, t in enumerate(inputs)},
        output_index={t.name: i for i, t in enumerate(outputs)},
        proto=proto,
        response_cache=proto.response_cache.enable,
    )


def _check_tensor(t, declared: dict[str, TensorSpec], kind: str, skip: int) -> TensorSpec:
    spec = declared.get(t.name)
    if spec is None:
        raise ModelLoadError(f"config.pbtxt {kind} '{t.name}' is not an {kind} of the model file")
    datatype = datatype_name(t.data_type)
    if datatype not in DATATYPES:
        raise ModelLoadError(f"{kind} '{t.name}' has unsupported data_type {datatype}")
    if datatype != spec.datatype:
        raise ModelLoadError(
            f"{kind} '{t.name}' is {datatype} in config.pbtxt but {spec.datatype} in the model")
    dims = tuple(t.dims)
    if skip and (not spec.dims or spec.dims[0] != -1):
        raise ModelLoadError(
            f"max_batch_size > 0 needs a dynamic first dimension, but {kind} '{t.name}' has "
            f"shape {list(spec.dims)} in the model")
    model_dims = spec.dims[skip:]
    reshape = tuple(t.reshape.shape) if t.HasField("reshape") else None
    if (reshape is None and not skip and not model_dims and dims
            and all(d == 1 for d in dims)):
        # The model declares no dims: a scalar or a tensor of unknown rank (ONNX Runtime
        # reports both alike). Triton serves it with dims [1] (or [1, 1] ...): the tensor is
        # handed to the model as a scalar and answered with the config's dims.
        reshape = ()
    expected = dims if reshape is None else reshape
    if (len(expected) != len(model_dims)
        or any(m != -1 and c != -1 and m != c for c, m in zip(expected, model_dims))):
        raise ModelLoadError(
            f"{kind} '{t.name}' has {'dims' if reshape is None else 'reshape'} {list(expected)} "
            f"in config.pbtxt but {list(model_dims)} in the model"
            + (" (batch dim excluded)" if skip else ""))
    if reshape is not None and (dims.count(-1) != reshape.count(-1)
                                or _fixed(dims) != _fixed(reshape)):
        # Variable dims are carried over in order, as Triton does: dims [2, 4, -1, 6] with
        # reshape [8, -1, 1, 6] hands the model [8, n, 1, 6] for a tensor of [2, 4, n, 6].
        raise ModelLoadError(
            f"{kind} '{t.name}': dims {list(dims)} and reshape {list(reshape)} hold different "
            "numbers of elements" + (" (variable dims carry over in order: both need as many "
                                     "-1 dims, and equal products of the others)"
                                     if -1 in dims or -1 in reshape else ""))
    return TensorSpec(t.name, datatype, dims, optional=bool(getattr(t, "optional", False)),
                      reshape=reshape)


def _fixed(dims: tuple[int, ...]) -> int:
    """The product of a shape's fixed dims."""
    return prod(d for d in dims if d != -1)


def carry_variable_dims(shape: tuple[int, ...], source: tuple[int, ...],
                        target: tuple[int, ...]) -> tuple[int, ...]:
    """``target`` with its -1 dims taken, in order, from the sizes ``shape`` has where
    ``source`` has -1 (a reshape with variable dims, in either direction)."""
    values = iter([n for n, d in zip(shape, source) if d == -1])
    return tuple(next(values) if d == -1 else d for d in target)


def version_policy(proto: mc.ModelConfig) -> VersionPolicy:
    which = proto.version_policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy("all")
    if which == "specific":
        return VersionPolicy("specific", versions=tuple(proto.version_policy.specific.versions))
    if which == "latest":
        return VersionPolicy("latest", num_versions=proto.version_policy.latest.num_versions or 1)
    return VersionPolicy()


def _queue_policy(p) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=mc.ModelQueuePolicy.TimeoutAction.Name(p.timeout_action),
        default_timeout_us=p.default_timeout_microseconds,
        allow_timeout_override=p.allow_timeout_override,
        max_queue_size=p.max_queue_size,
    )


def _batching(proto: mc.ModelConfig) -> BatchingConfig:
    db = proto.dynamic_batching
    for size in db.preferred_batch_size:
        if size <= 0 or size > proto.max_batch_size:
            raise ModelLoadError(
                f"preferred_batch_size {size} must be between 1 and max_batch_size "
                f"({proto.max_batch_size})")
    if db.priority_levels and not 1 <= db.default_priority_level <= db.priority_levels:
        raise ModelLoadError("default_priority_level must be between 1 and priority_levels")
    return BatchingConfig(
        preferred_batch_sizes=tuple(sorted(db.preferred_batch_size)),
        max_queue_delay_us=db.max_queue_delay_microseconds,
        priority_levels=db.priority_levels,
        default_priority_level=db.default_priority_level,
        default_queue_policy=_queue_policy(db.default_queue_policy),
        priority_queue_policy={k: _queue_policy(v) for k, v in db.priority_queue_policy.items()},
    )


def _instance_groups(proto: mc.ModelConfig) -> tuple[InstanceGroup, ...]:
    groups = []
    for g in proto.instance_group:
        kind = mc.ModelInstanceGroup.Kind.Name(g.kind)
        if kind == "KIND_AUTO":
            kind = "KIND_GPU" if g.gpus else "KIND_CPU"
        if kind not in ("KIND_CPU", "KIND_GPU"):
            raise ModelLoadError(f"instance_group kind {kind} is not supported")
        groups.append(InstanceGroup(kind, g.count or 1, tuple(g.gpus)))
    return tuple(groups) or (InstanceGroup("KIND_CPU", 1),)
