"""config.pbtxt: parse (Triton's text format), auto-complete from the model file, validate."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
from google.protobuf import text_format

from gateway.errors import ModelLoadError
from gateway.modelconfig import (
    BatchingConfig,
    InstanceGroup,
    QueuePolicy,
    VersionPolicy,
    complete_config,
    read_config_file,
    validate,
)
from gateway.modelconfig_pb import model_config_pb2 as mc
from gateway.tensors import TensorSpec
from runtimes.base import ModelIO

# A model file with a dynamic batch dim on every tensor, as ORT reports it.
BATCHED = ModelIO(
    inputs=[TensorSpec("input", "FP32", (-1, 4)), TensorSpec("mask", "BOOL", (-1, 4))],
    outputs=[TensorSpec("probs", "FP32", (-1, 3)), TensorSpec("label", "INT64", (-1,))],
)
IMAGE = ModelIO(inputs=[TensorSpec("image", "FP32", (-1, 3, 224, 224))],
                outputs=[TensorSpec("logits", "FP32", (-1, 1000))])
FIXED = ModelIO(inputs=[TensorSpec("x", "FP32", (2, 4))], outputs=[TensorSpec("y", "FP32", (2,))])


def write(tmp_path: Path, text: str | bytes | None, name: str = "m") -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.pbtxt").unlink(missing_ok=True)
    if isinstance(text, bytes):
        (model_dir / "config.pbtxt").write_bytes(text)
    elif text is not None:
        (model_dir / "config.pbtxt").write_text(textwrap.dedent(text))
    return model_dir


def load(tmp_path: Path, text: str | None, io: ModelIO, name: str = "m"):
    """What the loader does: read, complete from the model file, validate."""
    proto, explicit = read_config_file(write(tmp_path, text, name), name)
    complete_config(proto, explicit, io)
    return validate(proto, io)


def load_error(tmp_path: Path, text: str | None, io: ModelIO) -> str:
    with pytest.raises(ModelLoadError) as info:
        load(tmp_path, text, io)
    return str(info.value)


# ---------------------------------------------------------------- parsing

FULL = """
    name: "resnet"
    platform: "onnxruntime_onnx"
    max_batch_size: 16
    version_policy: { specific: { versions: [1, 3] } }
    input [
      { name: "image" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 224, 224 ] }
    ]
    output [
      { name: "logits" data_type: TYPE_FP32 dims: [ 1000 ] label_filename: "labels.txt" }
    ]
    dynamic_batching {
      preferred_batch_size: [ 8, 4 ]
      max_queue_delay_microseconds: 100
      preserve_ordering: true
      priority_levels: 3
      default_priority_level: 2
      default_queue_policy {
        timeout_action: DELAY
        default_timeout_microseconds: 5000
        allow_timeout_override: true
        max_queue_size: 32
      }
      priority_queue_policy [
        { key: 1 value: { timeout_action: REJECT default_timeout_microseconds: 100 max_queue_size: 4 } },
        { key: 3 value: { max_queue_size: 1 } }
      ]
    }
    instance_group [
      { kind: KIND_GPU count: 2 gpus: [ 0, 1 ] },
      { kind: KIND_CPU count: 1 },
      { kind: KIND_AUTO }
    ]
    parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
    parameters [ { key: "cudnn_conv_algo_search" value: { string_value: "HEURISTIC" } } ]
    default_model_filename: "resnet50.onnx"
    model_warmup [ { name: "zeros" batch_size: 1
                     inputs { key: "image" value { data_type: TYPE_FP32 dims: [3, 224, 224]
                                                   zero_data: true } } } ]
    optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
"""


def test_full_triton_config_is_read_as_written(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        config = load(tmp_path, FULL, IMAGE, name="resnet")
    assert not caplog.records  # every field above is a Triton field: nothing to warn about
    assert config.name == "resnet"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert config.inputs == (TensorSpec("image", "FP32", (3, 224, 224)),)
    assert config.outputs == (TensorSpec("logits", "FP32", (1000,)),)
    assert config.input_index == {"image": 0} and config.output_index == {"logits": 0}
    assert config.version_policy == VersionPolicy("specific", versions=(1, 3))
    assert config.batching == BatchingConfig(
        preferred_batch_sizes=(4, 8),
        max_queue_delay_us=100,
        priority_levels=3,
        default_priority_level=2,
        default_queue_policy=QueuePolicy("DELAY", 5000, True, 32),
        priority_queue_policy={1: QueuePolicy("REJECT", 100, False, 4),
                               3: QueuePolicy("REJECT", 0, False, 1)},
    )
    assert config.instance_groups == (InstanceGroup("KIND_GPU", 2, (0, 1)),
                                      InstanceGroup("KIND_CPU", 1), InstanceGroup("KIND_CPU", 1))
    assert config.parameters == {"intra_op_thread_count": "2",
                                 "cudnn_conv_algo_search": "HEURISTIC"}
    assert config.default_model_filename == "resnet50.onnx"
    # The completed proto (for the ModelConfig RPC) keeps what was written, Triton fields included.
    assert config.proto.model_warmup[0].name == "zeros"
    assert config.proto.dynamic_batching.preserve_ordering


def test_defaults_of_a_minimal_config(tmp_path):
    config = load(tmp_path, 'name: "m"\nmax_batch_size: 8\n', BATCHED)
    assert config.version_policy == VersionPolicy("latest", num_versions=1)
    assert config.batching is None  # no dynamic_batching block: requests run one by one
    assert config.instance_groups == (InstanceGroup("KIND_CPU", 1),)
    assert config.parameters == {}
    assert config.default_model_filename == "model.onnx"


def test_backend_onnxruntime_is_served(tmp_path):
    config = load(tmp_path, 'backend: "onnxruntime"\nmax_batch_size: 4', BATCHED)
    assert config.max_batch_size == 4


@pytest.mark.parametrize("line, shown", [('platform: "tensorrt_plan"', "tensorrt_plan"),
                                         ('backend: "python"', "python")])
def test_other_platforms_are_refused(tmp_path, line, shown):
    assert load_error(tmp_path, line, BATCHED) == (
        f"platform '{shown}' is not served; this gateway serves onnxruntime_onnx models")


def test_unknown_fields_are_logged_and_ignored(tmp_path, caplog):
    text = """
        name: "m"
        max_batch_size: 8
        future_knob: 3
        dynamic_batching { max_queue_delay_microseconds: 250 not_yet_invented { a: 1 } }
        input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "mask" } ]
    """
    with caplog.at_level(logging.WARNING, logger="gateway.modelconfig"):
        config = load(tmp_path, text, BATCHED)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "model 'm': config.pbtxt" in messages[0]
    assert 'no field named "future_knob"' in messages[0]
    assert messages[0].endswith("unknown fields are ignored")
    # Everything known is still honoured, before and after the unknown fields.
    assert config.max_batch_size == 8
    assert config.batching.max_queue_delay_us == 250
    assert config.inputs[0] == TensorSpec("input", "FP32", (4,))


def test_unknown_field_in_a_nested_message_is_ignored(tmp_path, caplog):
    text = 'input [ { name: "input" dimz: [ 9 ] }, { name: "mask" } ]\nmax_batch_size: 2'
    with caplog.at_level(logging.WARNING, logger="gateway.modelconfig"):
        config = load(tmp_path, text, BATCHED)
    assert 'no field named "dimz"' in caplog.text
    assert config.inputs[0] == TensorSpec("input", "FP32", (4,))  # dims completed from the model


@pytest.mark.parametrize("text, where", [
    ('name: "m"\nmax_batch_size: 8\ninput [ { name: "x" ', "3:"),
    ('name: "m"\nmax_batch_size: eight', "2:"),
    ('max_batch_size: 4\n}', "2:1"),
    ('input [ { name: "x" data_type: TYPE_FLOAT128 } ]', "1:"),
    ('future_knob: 1\nmax_batch_size: 4 4', "2:"),  # a syntax error after an unknown field
])
def test_syntax_errors_fail_the_load_with_the_position(tmp_path, text, where):
    with pytest.raises(ModelLoadError) as info:
        read_config_file(write(tmp_path, text), "m")
    message = str(info.value)
    assert message.startswith(f"config.pbtxt does not parse: {where}")


def test_unreadable_config_fails_the_load(tmp_path):
    with pytest.raises(ModelLoadError, match="^config.pbtxt is unreadable: UnicodeDecodeError$"):
        read_config_file(write(tmp_path, b"name: \"m\xff\xfe\""), "m")


def test_name_must_match_the_directory(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        read_config_file(write(tmp_path, 'name: "other"'), "m")
    assert str(info.value) == "config.pbtxt names the model 'other' but its directory is 'm'"


def test_missing_name_is_taken_from_the_directory(tmp_path):
    proto, explicit = read_config_file(write(tmp_path, "max_batch_size: 3"), "m")
    assert proto.name == "m" and proto.max_batch_size == 3 and explicit


def test_no_config_file_gives_an_empty_config_named_after_the_directory(tmp_path):
    proto, explicit = read_config_file(write(tmp_path, None), "m")
    assert proto == mc.ModelConfig(name="m") and not explicit


@pytest.mark.parametrize("text, explicit", [
    ("max_batch_size: 0", True),
    ('name: "m" max_batch_size: 0', True),  # text format does not care about line breaks
    ("  max_batch_size : 0 # no batching", True),
    ('name: "m" # max_batch_size: 0', False),  # a comment is not a field
    ('parameters { key: "max_batch_size" value: { string_value: "0" } }', False),
    ('name: "m"', False),
])
def test_explicit_max_batch_size_is_detected(tmp_path, text, explicit):
    assert read_config_file(write(tmp_path, text), "m")[1] is explicit


# ---------------------------------------------------------------- auto-complete

def test_no_config_is_completed_from_the_model_with_batching(tmp_path):
    config = load(tmp_path, None, BATCHED)
    assert config.platform == "onnxruntime_onnx" and config.proto.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4  # Triton's default
    # dynamic batching on, preferred_batch_size filled with max_batch_size as Triton does
    assert config.batching == BatchingConfig(preferred_batch_sizes=(4,))
    assert config.inputs == (TensorSpec("input", "FP32", (4,)), TensorSpec("mask", "BOOL", (4,)))
    assert config.outputs == (TensorSpec("probs", "FP32", (3,)), TensorSpec("label", "INT64", ()))
    # The completed proto is what the ModelConfig RPC shows: Triton's types and dims.
    assert [(t.name, t.data_type, list(t.dims)) for t in config.proto.input] == [
        ("input", mc.TYPE_FP32, [4]), ("mask", mc.TYPE_BOOL, [4])]
    assert config.proto.HasField("dynamic_batching")


def test_completed_config_fills_what_triton_fills(tmp_path):
    """L0_model_config compare_status: backend, default_model_filename, version_policy,
    instance_group (name, count, kind) and preferred_batch_size, as Triton's normalisation."""
    proto = load(tmp_path, None, BATCHED).proto
    expected = mc.ModelConfig()
    text_format.Parse("""
        name: "m" platform: "onnxruntime_onnx" backend: "onnxruntime"
        version_policy { latest { num_versions: 1 } }
        max_batch_size: 4
        input { name: "input" data_type: TYPE_FP32 dims: 4 }
        input { name: "mask" data_type: TYPE_BOOL dims: 4 }
        output { name: "probs" data_type: TYPE_FP32 dims: 3 }
        output { name: "label" data_type: TYPE_INT64 }
        instance_group { name: "m" count: 1 kind: KIND_CPU }
        dynamic_batching { preferred_batch_size: 4 }
        default_model_filename: "model.onnx"
    """, expected)
    assert proto == expected


def test_instance_groups_are_named_counted_and_resolved(tmp_path):
    text = """
        instance_group [ { kind: KIND_CPU count: 2 }, { name: "g" kind: KIND_AUTO },
                         { kind: KIND_GPU } ]
    """
    groups = load(tmp_path, text, BATCHED).proto.instance_group
    assert [(g.name, g.count, mc.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus))
            for g in groups] == [("m_0", 2, "KIND_CPU", []), ("g", 1, "KIND_CPU", []),
                                 ("m_2", 1, "KIND_GPU", [0])]


@pytest.mark.parametrize("default, size, batching", [(8, 8, True), (1, 1, False), (0, 0, False)])
def test_default_max_batch_size_is_a_setting(tmp_path, default, size, batching):
    """--default-max-batch-size: dynamic batching only above 1, no batching at 0 (Triton's
    default-max-batch-size backend setting)."""
    proto, explicit = read_config_file(write(tmp_path, None), "m")
    complete_config(proto, explicit, BATCHED, default_max_batch_size=default)
    config = validate(proto, BATCHED)
    assert config.max_batch_size == size
    assert (config.batching is not None) is batching


def test_bytes_tensors_complete_as_type_string(tmp_path):
    io = ModelIO([TensorSpec("text", "BYTES", (-1,))], [TensorSpec("n", "INT32", (-1, 1))])
    config = load(tmp_path, None, io)
    assert config.proto.input[0].data_type == mc.TYPE_STRING
    assert config.inputs == (TensorSpec("text", "BYTES", ()),)


def test_fixed_first_dim_completes_without_batching(tmp_path):
    config = load(tmp_path, None, FIXED)
    assert config.max_batch_size == 0
    assert config.batching is None
    assert config.inputs == (TensorSpec("x", "FP32", (2, 4)),)
    assert config.outputs == (TensorSpec("y", "FP32", (2,)),)


def test_one_tensor_without_a_dynamic_first_dim_disables_auto_batching(tmp_path):
    io = ModelIO([TensorSpec("x", "FP32", (-1, 4))], [TensorSpec("y", "FP32", (4,))])
    config = load(tmp_path, None, io)
    assert config.max_batch_size == 0 and config.batching is None
    assert config.inputs == (TensorSpec("x", "FP32", (-1, 4)),)


def test_explicit_max_batch_size_zero_is_honoured(tmp_path):
    config = load(tmp_path, "max_batch_size: 0", BATCHED)
    assert config.max_batch_size == 0
    assert config.batching is None
    assert config.inputs[0] == TensorSpec("input", "FP32", (-1, 4))  # the batch dim is a dim


def test_explicit_max_batch_size_zero_written_inline_is_honoured(tmp_path):
    text = 'name: "m" max_batch_size: 0 input [ { name: "input" dims: [ -1, 4 ] }, { name: "mask" } ]'
    config = load(tmp_path, text, BATCHED)
    assert config.max_batch_size == 0
    assert config.inputs == (TensorSpec("input", "FP32", (-1, 4)),
                             TensorSpec("mask", "BOOL", (-1, 4)))


def test_existing_dynamic_batching_is_kept_when_completing(tmp_path):
    config = load(tmp_path, "dynamic_batching { max_queue_delay_microseconds: 7 }", BATCHED)
    assert config.max_batch_size == 4
    assert config.batching.max_queue_delay_us == 7


def test_partial_config_with_names_only_gets_datatypes_and_dims(tmp_path):
    text = """
        max_batch_size: 8
        input [ { name: "mask" }, { name: "input" } ]
        output [ { name: "label" } ]
    """
    config = load(tmp_path, text, BATCHED)
    assert config.max_batch_size == 8
    assert config.batching is None  # an explicit config gets no batching it did not ask for
    # The config's order is kept; only listed outputs are served.
    assert config.inputs == (TensorSpec("mask", "BOOL", (4,)), TensorSpec("input", "FP32", (4,)))
    assert config.input_index == {"mask": 0, "input": 1}
    assert config.outputs == (TensorSpec("label", "INT64", ()),)


def test_partial_config_without_max_batch_size_is_completed_with_batching(tmp_path):
    config = load(tmp_path, 'input [ { name: "input" }, { name: "mask" } ]', BATCHED)
    assert config.max_batch_size == 4
    assert config.inputs[0] == TensorSpec("input", "FP32", (4,))
    assert len(config.outputs) == 2  # no outputs listed: all of them


# ---------------------------------------------------------------- validation

def test_datatype_mismatch_is_refused(tmp_path):
    text = 'max_batch_size: 8\ninput [ { name: "input" data_type: TYPE_INT32 }, { name: "mask" } ]'
    assert load_error(tmp_path, text, BATCHED) == (
        "input 'input' is INT32 in config.pbtxt but FP32 in the model")


def test_output_datatype_mismatch_is_refused(tmp_path):
    text = 'max_batch_size: 8\noutput [ { name: "label" data_type: TYPE_INT32 } ]'
    assert load_error(tmp_path, text, BATCHED) == (
        "output 'label' is INT32 in config.pbtxt but INT64 in the model")


def test_unsupported_datatype_is_refused(tmp_path):
    text = 'max_batch_size: 8\ninput [ { name: "input" data_type: TYPE_BF16 }, { name: "mask" } ]'
    assert load_error(tmp_path, text, BATCHED) == "input 'input' has unsupported data_type BF16"


@pytest.mark.parametrize("dims, shown", [("[ 5 ]", "[5]"), ("[ 4, 1 ]", "[4, 1]"), ("[ ]", None)])
def test_dims_mismatch_is_refused(tmp_path, dims, shown):
    text = f'max_batch_size: 8\ninput [ {{ name: "input" dims: {dims} }}, {{ name: "mask" }} ]'
    if shown is None:  # empty dims are completed from the model, so they cannot mismatch
        assert load(tmp_path, text, BATCHED).inputs[0].dims == (4,)
        return
    assert load_error(tmp_path, text, BATCHED) == (
        f"input 'input' has dims {shown} in config.pbtxt but [4] in the model (batch dim excluded)")


def test_dims_mismatch_without_batching_names_the_full_shape(tmp_path):
    text = 'max_batch_size: 0\ninput [ { name: "x" dims: [ 3, 4 ] } ]'
    assert load_error(tmp_path, text, FIXED) == (
        "input 'x' has dims [3, 4] in config.pbtxt but [2, 4] in the model")


def test_variable_dims_match_fixed_ones_either_way(tmp_path):
    io = ModelIO([TensorSpec("x", "FP32", (-1, -1, 4))], [TensorSpec("y", "FP32", (-1, 2))])
    text = 'max_batch_size: 8\ninput [ { name: "x" dims: [ 16, -1 ] } ]\noutput [ { name: "y" dims: [ -1 ] } ]'
    config = load(tmp_path, text, io)
    assert config.inputs[0].dims == (16, -1) and config.outputs[0].dims == (-1,)


def test_batching_needs_a_dynamic_first_dimension(tmp_path):
    assert load_error(tmp_path, "max_batch_size: 4", FIXED) == (
        "max_batch_size > 0 needs a dynamic first dimension, but input 'x' has shape [2, 4] "
        "in the model")


def test_negative_max_batch_size_is_refused(tmp_path):
    assert load_error(tmp_path, "max_batch_size: -1", BATCHED) == "max_batch_size must not be negative"


def test_config_tensor_not_in_the_model_is_refused(tmp_path):
    text = 'max_batch_size: 8\ninput [ { name: "input" }, { name: "mask" }, { name: "extra" } ]'
    assert load_error(tmp_path, text, BATCHED) == (
        "config.pbtxt input 'extra' is not an input of the model file")
    text = 'max_batch_size: 8\noutput [ { name: "logits" } ]'
    assert load_error(tmp_path, text, BATCHED) == (
        "config.pbtxt output 'logits' is not an output of the model file")


def test_omitted_model_inputs_are_refused(tmp_path):
    text = 'max_batch_size: 8\ninput [ { name: "input" } ]'
    assert load_error(tmp_path, text, BATCHED) == "config.pbtxt omits model inputs: mask"


def test_non_tensor_outputs_cannot_be_configured(tmp_path):
    io = ModelIO([TensorSpec("x", "FP32", (-1, 4))], [TensorSpec("label", "INT64", (-1,))],
                 unsupported_outputs={"probabilities": "seq(map(int64,tensor(float)))"})
    assert load(tmp_path, None, io).unsupported_outputs == {
        "probabilities": "seq(map(int64,tensor(float)))"}
    text = 'max_batch_size: 8\noutput [ { name: "probabilities" } ]'
    assert load_error(tmp_path, text, io) == (
        "output 'probabilities' is a seq(map(int64,tensor(float))), not a tensor; "
        "remove it from config.pbtxt")


@pytest.mark.parametrize("size", [0, 9])
def test_preferred_batch_size_must_fit_max_batch_size(tmp_path, size):
    text = f"max_batch_size: 8\ndynamic_batching {{ preferred_batch_size: [ 2, {size} ] }}"
    assert load_error(tmp_path, text, BATCHED) == (
        f"preferred_batch_size {size} must be between 1 and max_batch_size (8)")


@pytest.mark.parametrize("level", [0, 4])
def test_default_priority_level_must_be_a_level(tmp_path, level):
    text = f"max_batch_size: 8\ndynamic_batching {{ priority_levels: 3 default_priority_level: {level} }}"
    assert load_error(tmp_path, text, BATCHED) == (
        "default_priority_level must be between 1 and priority_levels")


def test_instance_group_kind_model_is_refused(tmp_path):
    text = "max_batch_size: 8\ninstance_group [ { kind: KIND_MODEL } ]"
    assert load_error(tmp_path, text, BATCHED) == "instance_group kind KIND_MODEL is not supported"


def test_instance_group_kind_auto_picks_gpu_when_gpus_are_named(tmp_path):
    text = "max_batch_size: 8\ninstance_group [ { count: 3 gpus: [ 1 ] }, { count: 0 } ]"
    assert load(tmp_path, text, BATCHED).instance_groups == (
        InstanceGroup("KIND_GPU", 3, (1,)), InstanceGroup("KIND_CPU", 1))


# ---------------------------------------------------------------- reshape

def test_reshape_to_a_scalar_per_sample(tmp_path):
    """The iris demo's label: Triton wants dims [1]; the model's output is [-1]."""
    text = """
        max_batch_size: 8
        output [ { name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } } ]
    """
    config = load(tmp_path, text, BATCHED)
    assert config.outputs == (TensorSpec("label", "INT64", (1,), reshape=()),)


def test_reshape_of_an_input(tmp_path):
    text = """
        max_batch_size: 8
        input [ { name: "input" dims: [ 2, 2 ] reshape: { shape: [ 4 ] } }, { name: "mask" } ]
    """
    config = load(tmp_path, text, BATCHED)
    assert config.inputs[0] == TensorSpec("input", "FP32", (2, 2), reshape=(4,))
    assert config.proto.input[0].data_type == mc.TYPE_FP32  # datatype still completed


def test_reshape_must_match_the_model(tmp_path):
    text = """
        max_batch_size: 8
        input [ { name: "input" dims: [ 5 ] reshape: { shape: [ 5 ] } }, { name: "mask" } ]
    """
    assert load_error(tmp_path, text, BATCHED) == (
        "input 'input' has reshape [5] in config.pbtxt but [4] in the model (batch dim excluded)")


def test_reshape_must_keep_the_element_count(tmp_path):
    text = """
        max_batch_size: 8
        input [ { name: "input" dims: [ 3 ] reshape: { shape: [ 4 ] } }, { name: "mask" } ]
    """
    assert load_error(tmp_path, text, BATCHED) == (
        "input 'input': dims [3] and reshape [4] hold different numbers of elements")


def test_reshape_needs_dims(tmp_path):
    text = """
        max_batch_size: 8
        input [ { name: "input" reshape: { shape: [ 4 ] } }, { name: "mask" } ]
    """
    assert load_error(tmp_path, text, BATCHED) == (
        "input 'input': dims [] and reshape [4] hold different numbers of elements")


def test_reshape_with_variable_dims_must_carry_them_over(tmp_path):
    io = ModelIO([TensorSpec("x", "FP32", (-1, -1))], [TensorSpec("y", "FP32", (-1,))])
    text = 'max_batch_size: 8\ninput [ { name: "x" dims: [ -1, 2 ] reshape: { shape: [ -1 ] } } ]'
    assert load_error(tmp_path, text, io) == (
        "input 'x': dims [-1, 2] and reshape [-1] hold different numbers of elements (variable "
        "dims carry over in order: both need as many -1 dims, and equal products of the others)")


def test_reshape_with_variable_dims_loads(tmp_path):
    """Triton's L0_infer_reshape models: dims [2, 4, -1, 6] reshape [8, -1, 1, 6]."""
    io = ModelIO([TensorSpec("x", "INT32", (8, -1, 1, 6))],
                 [TensorSpec("y", "INT32", (8, -1, 1, 6))])
    text = """
        input [ { name: "x" data_type: TYPE_INT32 dims: [ 2, 4, -1, 6 ]
                  reshape: { shape: [ 8, -1, 1, 6 ] } } ]
        output [ { name: "y" data_type: TYPE_INT32 dims: [ 2, 4, -1, 6 ]
                   reshape: { shape: [ 8, -1, 1, 6 ] } } ]
    """
    config = load(tmp_path, text, io)
    assert config.inputs[0].dims == (2, 4, -1, 6)
    assert config.inputs[0].reshape == (8, -1, 1, 6)


def test_a_model_tensor_without_dims_takes_config_dims_of_ones(tmp_path):
    """ONNX Runtime reports a scalar and a tensor of unknown rank alike (no dims): Triton serves
    it with dims [1] (L0_scalar_io); the model gets a scalar."""
    io = ModelIO([TensorSpec("x", "FP32", ())], [TensorSpec("y", "FP32", ())])
    text = """
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 1, 1 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
    """
    config = load(tmp_path, text, io)
    assert (config.inputs[0].dims, config.inputs[0].reshape) == ((1, 1), ())
    assert (config.outputs[0].dims, config.outputs[0].reshape) == ((1,), ())
    assert load_error(tmp_path, text.replace("dims: [ 1 ]", "dims: [ 2 ]"), io) == (
        "output 'y' has dims [2] in config.pbtxt but [] in the model")


# ---------------------------------------------------------------- version policy

@pytest.mark.parametrize("text, policy", [
    ("", VersionPolicy("latest", 1)),
    ("version_policy: { latest: { } }", VersionPolicy("latest", 1)),
    ("version_policy: { latest: { num_versions: 2 } }", VersionPolicy("latest", 2)),
    ("version_policy: { all: { } }", VersionPolicy("all")),
    ("version_policy: { specific: { versions: [ 3, 1 ] } }", VersionPolicy("specific", versions=(3, 1))),
])
def test_version_policy_is_read(tmp_path, text, policy):
    assert load(tmp_path, "max_batch_size: 8\n" + text, BATCHED).version_policy == policy


@pytest.mark.parametrize("policy, available, selected", [
    (VersionPolicy(), [3, 1, 2], [3]),
    (VersionPolicy("latest", 2), [3, 1, 10, 2], [3, 10]),
    (VersionPolicy("latest", 5), [2, 1], [1, 2]),
    (VersionPolicy("latest", 0), [2, 1], []),
    (VersionPolicy("latest", 1), [], []),
    (VersionPolicy("all"), [5, 2, 9], [2, 5, 9]),
    (VersionPolicy("specific", versions=(3, 1)), [1, 2, 3, 4], [1, 3]),
    (VersionPolicy("specific", versions=(7,)), [1, 2], []),
])
def test_version_policy_select(policy, available, selected):
    assert policy.select(available) == selected


def test_default_max_batch_size_setting_and_its_environment_mirror(tmp_path):
    from dataclasses import replace

    from gateway.config import Settings, from_environment

    assert Settings().default_max_batch_size == 4
    assert from_environment({"GATEWAY_DEFAULT_MAX_BATCH_SIZE": "16"}).default_max_batch_size == 16
    with pytest.raises(ValueError, match="default max batch size and cache size must not be negative"):
        replace(Settings(model_repository=tmp_path), default_max_batch_size=-1).validated()


RAGGED_INPUT = ('max_batch_size: 8\n'
                'input [ { name: "input" allow_ragged_batch: true }, { name: "mask" } ]')
BATCH_OUTPUT = ('max_batch_size: 8\nbatch_output [ { target_name: "probs" '
                'kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "input" } ]')


@pytest.mark.parametrize("text, reason", [
    ("max_batch_size: 8\nsequence_batching { }", "sequence_batching is not supported"),
    (RAGGED_INPUT, ("ragged batching is not supported (allow_ragged_batch on input, "
                    "batch_input, batch_output)")),
    (BATCH_OUTPUT, "ragged batching is not supported"),
])
def test_stateful_and_ragged_batching_are_refused_with_the_reason(tmp_path, text, reason):
    assert reason in load_error(tmp_path, text, BATCHED)
