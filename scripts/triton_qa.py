"""Run Triton's own QA suites (qa/L0_*) against `gateway serve`, ONNX models only.

Nothing of Triton's is kept in this repository: the suites, their helpers (qa/common) and the
model generators are extracted at run time from a git mirror of triton-inference-server/server
into a work directory, the ONNX models are generated there, and each suite's model repository
is built the way its test.sh builds it (ONNX only). Then, for each run, a fresh gateway serves
the repository on Triton's ports (gRPC 8001, HTTP 8000) and pytest runs the named tests.

    python scripts/triton_qa.py --triton DIR_OF_GIT_MIRROR --work /tmp/tqa \\
        [--suites L0_batcher,L0_infer] [--ensembles include|skip|only] \\
        [--gateway-root CHECKOUT] [--json results.json]

``--gateway-root`` runs another checkout's gateway (a baseline) with this script. A conftest
placed in the work directory (ours) turns off the TensorRT, LibTorch and OpenVINO branches of
the suites (test_util.validate_for_*_model), and the ensemble ones in a run whose ENSEMBLES is
0, so a suite exercises its ONNX models (and, with ENSEMBLES=1, their ensembles) only. Tests
that need a feature the gateway declares unsupported are listed in NOT_APPLICABLE with the
reason and reported apart.

Ensembles. L0_infer, L0_infer_variable, L0_infer_reshape and L0_infer_zero run twice: as
before, ONNX models only (label "onnx", ENSEMBLES=0), and with Triton's ensembles (label
"onnx+ensembles", ENSEMBLES=1), the repository built as the suite's test.sh builds it with
ENSEMBLES=1: the ensembles of qa_ensemble_model_repository (generated here with
gen_qa_models.py --ensemble [--variable], gen_qa_reshape_models.py --ensemble and
gen_qa_identity_models.py --ensemble), L0_infer's hand-written qa/ensemble_models of an
ONNX-only run (wrong_label, label_override, mix_type, batch_to_nobatch[_nobatch],
nobatch_to_batch[_nobatch], mix_nobatch_batch) and their custom_[nobatch_]zero_1_float32. The
composing "nop_*" and "custom_*" models are Triton identity-backend models (a config and no
model file); the gateway serves ONNX only, so each becomes an ONNX stand-in: 1/model.onnx of
ONNX Identity nodes, INPUTn -> OUTPUTn with the config's data types and model shapes (the
reshape shape where a tensor has one, batch dim first where max_batch_size > 0), and
``backend: "onnxruntime"`` in place of ``backend: "identity"``; the rest of the config is
Triton's. Ensembles whose steps name a model the ONNX-only repository lacks (the plan_ and
libtorch_ ones, mix_platform and mix_ensemble: the suites run them only with those backends)
are left out, and so are the sequence ensembles (gen_qa_sequence_models.py --ensemble: no suite
here uses them) and the custom_* identity copies L0_infer_reshape's test.sh makes of twelve ONNX
models (no test or ensemble names them). L0_infer_variable's test runs its ensembles for TensorRT
only ("No basic ensemble models are created against custom models"), so its ensemble run checks
no more than the ONNX-only one while loading the ensembles beside the models. ``--ensembles``
chooses: include (default: both kinds of run), skip (the ONNX-only runs alone, as before) or only
(the ensemble runs alone).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORTS = (8000, 8001)

CONFTEST = '''
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "common"))
import test_util as tu

# TestResultCollector records results for test.sh from unittest's runner; under pytest it
# fails for want of them: plain unittest behaviour instead.
import unittest
tu.TestResultCollector.run = unittest.TestCase.run
tu.TestResultCollector.tearDownClass = classmethod(lambda cls: None)

_backends = os.environ.get("BACKENDS", "onnx").split()
if "plan" not in _backends:
    tu.validate_for_trt_model = lambda *a, **k: False
if "libtorch" not in _backends:
    tu.validate_for_libtorch_model = lambda *a, **k: False
if "openvino" not in _backends:
    tu.validate_for_openvino_model = lambda *a, **k: False
if os.environ.get("ENSEMBLES", "0") == "0":
    tu.validate_for_ensemble_model = lambda *a, **k: False
'''

# ---- what each suite runs ------------------------------------------------------------------

BATCHER_NO_DELAY = [
    "test_static_batch_preferred", "test_static_batch_lt_any_preferred",
    "test_static_batch_not_preferred", "test_static_batch_gt_max_preferred",
    "test_multi_batch_not_preferred", "test_multi_batch_gt_max_preferred",
    "test_multi_batch_sum_gt_max_preferred", "test_multi_same_output0",
    "test_multi_same_output1", "test_multi_different_outputs",
    "test_multi_different_output_order"]
BATCHER_DELAY = {  # test -> TRITONSERVER_DELAY_SCHEDULER
    "test_multi_batch_delayed_sum_gt_max_preferred": 2,
    "test_multi_batch_use_biggest_preferred": 6,
    "test_multi_batch_use_best_preferred": 3,
    "test_multi_batch_delayed_use_max_batch": 3}
BATCHER_SHAPES = ["test_multi_batch_not_preferred_different_shape",
                  "test_multi_batch_preferred_different_shape",
                  "test_multi_batch_different_shape_allow_ragged",
                  "test_multi_batch_different_shape"]
BATCHER_PREFERRED_ONLY = {"test_preferred_batch_only_aligned": 4,
                          "test_preferred_batch_only_unaligned": 5,
                          "test_preferred_batch_only_use_biggest_preferred": 7,
                          "test_preferred_batch_only_use_no_preferred_size": 3}

DELAY_HOOK = ("needs TRITONSERVER_DELAY_SCHEDULER, a Triton test hook that holds its scheduler "
              "until N requests are queued")
NOT_APPLICABLE = {
    **{f"L0_batcher::{kind}::{t}": DELAY_HOOK for kind in ("FIXED", "VARIABLE")
       for t in BATCHER_DELAY},
    "L0_batcher::VARIABLE::test_multi_batch_delayed_preferred_different_shape": DELAY_HOOK,
    **{f"L0_batcher::PREFERRED::{t}": DELAY_HOOK for t in BATCHER_PREFERRED_ONLY},
    "L0_batcher::VARIABLE::test_multi_batch_different_shape_allow_ragged":
        "ragged batching (allow_ragged_batch, batch_output) is not supported",
    "L0_string_io::onnx::test_unicode_bytes":
        "non-UTF-8 BYTES: ONNX Runtime's Python API cannot carry them (refused, with why)",
    "L0_grpc::GrpcTest::test_bytes_contents_many_elements_serialization":
        "a declared limit: at most 1,048,576 BYTES elements per request (the test sends 10 M)",
}


ENSEMBLE_LABEL = "onnx+ensembles"


@dataclass
class Run:
    suite: str
    label: str  # distinguishes runs of one suite (model set, settings)
    repo: str  # name of the repository builder
    test_file: str
    tests: list[str] = field(default_factory=list)  # Class::test ids; empty: the whole file
    env: dict = field(default_factory=dict)
    server_args: list[str] = field(default_factory=list)
    per_test_server: bool = False  # a fresh server for each test (absolute statistics)

    @property
    def ensembles(self) -> bool:
        return self.env.get("ENSEMBLES") == "1"


def runs() -> list[Run]:
    out: list[Run] = []
    b_env = {"BACKENDS": "onnx", "USE_HTTP": "0", "USE_GRPC": "1"}
    for kind, repo in (("FIXED", "batcher_fixed"), ("VARIABLE", "batcher_variable")):
        out.append(Run("L0_batcher", kind, repo, "batcher_test.py",
                       [f"BatcherTest::{t}" for t in BATCHER_NO_DELAY], b_env,
                       per_test_server=True))
        for test, n in BATCHER_DELAY.items():
            out.append(Run("L0_batcher", kind, repo, "batcher_test.py", [f"BatcherTest::{test}"],
                           {**b_env, "TRITONSERVER_DELAY_SCHEDULER": str(n)}, per_test_server=True))
    out.append(Run("L0_batcher", "VARIABLE", "batcher_variable", "batcher_test.py",
                   [f"BatcherTest::{t}" for t in BATCHER_SHAPES], b_env, per_test_server=True))
    out.append(Run("L0_batcher", "VARIABLE", "batcher_variable", "batcher_test.py",
                   ["BatcherTest::test_multi_batch_delayed_preferred_different_shape"],
                   {**b_env, "TRITONSERVER_DELAY_SCHEDULER": "4"}, per_test_server=True))
    for test, n in BATCHER_PREFERRED_ONLY.items():
        out.append(Run("L0_batcher", "PREFERRED", "batcher_preferred_only", "batcher_test.py",
                       [f"BatcherTest::{test}"],
                       {**b_env, "TRITONSERVER_DELAY_SCHEDULER": str(n)}, per_test_server=True))
    infer_env = {"BACKENDS": "onnx", "ENSEMBLES": "0", "USE_HTTP": "0", "USE_GRPC": "1",
                 "TRITON_SERVER_CPU_ONLY": "1"}
    out.append(Run("L0_infer", "onnx", "infer", "infer_test.py", [], infer_env))
    out.append(Run("L0_infer_variable", "onnx", "infer_variable", "infer_variable_test.py", [],
                   {"BACKENDS": "onnx", "ENSEMBLES": "0"}))
    out.append(Run("L0_infer_reshape", "onnx", "infer_reshape", "infer_reshape_test.py", [],
                   {"BACKENDS": "onnx", "ENSEMBLES": "0"}))
    out.append(Run("L0_infer_zero", "onnx", "infer_zero", "infer_zero_test.py", [],
                   {"BACKENDS": "onnx", "ENSEMBLES": "0"}))
    # The same suites with Triton's ensembles of those models (see the module docstring).
    out.append(Run("L0_infer", ENSEMBLE_LABEL, "infer_ensembles", "infer_test.py", [],
                   {**infer_env, "ENSEMBLES": "1"}))
    out.append(Run("L0_infer_variable", ENSEMBLE_LABEL, "infer_variable_ensembles",
                   "infer_variable_test.py", [], {"BACKENDS": "onnx", "ENSEMBLES": "1"}))
    out.append(Run("L0_infer_reshape", ENSEMBLE_LABEL, "infer_reshape_ensembles",
                   "infer_reshape_test.py", [], {"BACKENDS": "onnx", "ENSEMBLES": "1"}))
    out.append(Run("L0_infer_zero", ENSEMBLE_LABEL, "infer_zero_ensembles", "infer_zero_test.py",
                   [], {"BACKENDS": "onnx", "ENSEMBLES": "1"}))
    out.append(Run("L0_scalar_io", "onnx", "scalar_io", "scalar_test.py", [],
                   {"BACKENDS": "onnx"}))
    out.append(Run("L0_string_io", "onnx", "string_io", "string_client_test.py", [], {}))
    out.append(Run("L0_output_name", "onnx", "output_name", "output_name_test.py", [],
                   {"BACKENDS": "onnx"}))
    out.append(Run("L0_grpc", "GrpcTest", "grpc_unit", "python_unit_test.py", ["GrpcTest"], {}))
    out.append(Run("L0_input_validation", "InputShapeTest", "input_shape",
                   "input_validation_test.py",
                   ["InputShapeTest::test_input_string_shape_validation"], {}))
    out.append(Run("L0_input_validation", "ModelNameValidationTest", "empty",
                   "input_validation_test.py", ["ModelNameValidationTest"], {},
                   ["--control-mode", "explicit"]))
    return out


# ---- extraction and models -----------------------------------------------------------------

SUITES = sorted({r.suite for r in runs()})


# L0_infer's test.sh copies these into its repository when ENSEMBLES=1 and BACKENDS has onnx
# (mix_platform and mix_ensemble only with libtorch too: not here).
INFER_ENSEMBLE_MODELS = [
    "wrong_label_int32_float32_float32", "label_override_int32_float32_float32",
    "mix_type_int32_float32_float32", "batch_to_nobatch_float32_float32_float32",
    "batch_to_nobatch_nobatch_float32_float32_float32", "nobatch_to_batch_float32_float32_float32",
    "nobatch_to_batch_nobatch_float32_float32_float32", "mix_nobatch_batch_float32_float32_float32"]


def extract(mirror: Path, work: Path) -> Path:
    """qa/common, the suites and the hand-written models they use, from the mirror's HEAD, into
    work/qa (what an earlier run extracted is kept)."""
    qa = work / "qa"
    paths = ["qa/common", *(f"qa/{s}" for s in SUITES), "qa/ensemble_models",
             "qa/custom_models/custom_zero_1_float32"]
    missing = [p for p in paths if not (work / p).exists()]
    if missing:
        data = subprocess.run(["git", "-C", str(mirror), "archive", "HEAD", *missing],
                              check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(data)) as tar:
            tar.extractall(work, filter="data")
    (qa / "conftest.py").write_text(CONFTEST)
    return qa


def generate(qa: Path, work: Path) -> Path:
    data = work / "data"
    if (data / ".done").exists():
        return data
    common = qa / "common"
    jobs = [
        (["gen_qa_models.py", "--onnx"], "qa_model_repository"),
        (["gen_qa_models.py", "--onnx", "--variable"], "qa_variable_model_repository"),
        (["gen_qa_identity_models.py", "--onnx"], "qa_identity_model_repository"),
        (["gen_qa_reshape_models.py", "--onnx", "--variable"], "qa_reshape_model_repository"),
        (["gen_qa_ort_scalar_models.py"], "qa_scalar_models"),
    ]
    for args, out in jobs:
        (data / out).mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, args[0], *args[1:], "--models_dir", str(data / out)],
                       cwd=common, check=True, capture_output=True)
    _simple_models(data / "extra")
    (data / ".done").write_text("")
    return data


ENSEMBLE_REPOS = ["qa_model_repository", "qa_variable_model_repository",
                  "qa_reshape_model_repository", "qa_identity_model_repository"]


def generate_ensembles(qa: Path, data: Path) -> Path:
    """data/qa_ensemble_model_repository as Triton's gen_qa_model_repository makes it (less the
    sequence ones), every identity-backend model in it made an ONNX stand-in; and L0_infer's
    custom_[nobatch_]zero_1_float32, edited as its test.sh edits them, made stand-ins too."""
    ens = data / "qa_ensemble_model_repository"
    if (ens / ".done").exists():
        return ens
    if ens.exists():
        shutil.rmtree(ens)
    jobs = [(["gen_qa_models.py", "--ensemble"], "qa_model_repository"),
            (["gen_qa_models.py", "--ensemble", "--variable"], "qa_variable_model_repository"),
            (["gen_qa_reshape_models.py", "--ensemble"], "qa_reshape_model_repository"),
            (["gen_qa_identity_models.py", "--ensemble"], "qa_identity_model_repository")]
    for args, out in jobs:
        (ens / out).mkdir(parents=True)
        subprocess.run([sys.executable, args[0], *args[1:], "--models_dir", str(ens / out)],
                       cwd=qa / "common", check=True, capture_output=True)
    # test.sh: cp custom_zero_1_float32, append a CPU instance group, then a batching copy
    # (max_batch_size 8, dims [-1]) and a non-batching one (max_batch_size 0, dims [-1, -1]).
    custom = ens / "custom"
    src = qa / "custom_models" / "custom_zero_1_float32"
    batching = (("max_batch_size: 1", "max_batch_size: 8"), (r"dims: \[ 1 \]", "dims: [ -1 ]"))
    nobatch = (("custom_zero_1_float32", "custom_nobatch_zero_1_float32"),
               ("max_batch_size: 1", "max_batch_size: 0"),
               (r"dims: \[ 1 \]", "dims: [ -1, -1 ]"))
    for name, subs in (("custom_zero_1_float32", batching),
                       ("custom_nobatch_zero_1_float32", nobatch)):
        m = _copy(src, custom / name)
        _edit(m / "config.pbtxt", append="\ninstance_group [ { kind: KIND_CPU }]\n")
        _edit(m / "config.pbtxt", *subs)
    for config in sorted(ens.glob("*/*/config.pbtxt")):
        if re.search(r'^\s*backend:\s*"identity"', config.read_text(), re.MULTILINE):
            identity_standin(config.parent)
    (ens / ".done").write_text("")
    return ens


ONNX_TYPES = {  # config data_type -> ONNX TensorProto type name
    "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32", "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP16": "FLOAT16",
    "TYPE_FP32": "FLOAT", "TYPE_FP64": "DOUBLE", "TYPE_STRING": "STRING",
    "TYPE_BF16": "BFLOAT16"}


def _model_config_pb2():
    sys.path.insert(0, str(ROOT))
    try:
        from gateway.modelconfig_pb import model_config_pb2
    finally:
        sys.path.remove(str(ROOT))
    return model_config_pb2


def identity_standin(model: Path) -> None:
    """An ONNX stand-in for a Triton identity-backend model (its config and no model file):
    1/model.onnx copies INPUTn to OUTPUTn (ONNX Identity), with the config's data types and
    model shapes (a tensor's reshape shape where it has one, else its dims; the batch dim first
    where max_batch_size > 0; -1 a symbolic dim), and the config says backend "onnxruntime"."""
    import onnx
    from google.protobuf import text_format
    from onnx import TensorProto, helper

    config = model / "config.pbtxt"
    text = config.read_text()
    mc = _model_config_pb2()
    proto = text_format.Parse(text, mc.ModelConfig())
    if proto.backend != "identity":
        raise SystemExit(f"{model}: not an identity-backend model")

    def model_shape(tensor) -> list[int]:
        return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)

    def value_info(tensor, dims: list[str | int]):
        dtype = getattr(TensorProto, ONNX_TYPES[mc.DataType.Name(tensor.data_type)])
        return helper.make_tensor_value_info(tensor.name, dtype, dims)

    def onnx_dims(shape: list[int], key: str) -> list[str | int]:
        dims: list[str | int] = ["batch"] if proto.max_batch_size > 0 else []
        return dims + [d if d >= 0 else f"{key}_{i}" for i, d in enumerate(shape)]

    inputs = {t.name: t for t in proto.input}
    in_vi, out_vi, nodes = [], [], []
    for pos, out in enumerate(proto.output):
        # The identity backend answers OUTPUTn with INPUTn.
        src = inputs.get("INPUT" + out.name.removeprefix("OUTPUT")) or proto.input[pos]
        key = f"d{pos}"
        same = model_shape(src) == model_shape(out)
        out_vi.append(value_info(out, onnx_dims(model_shape(out), key if same else f"o{pos}")))
        nodes.append(helper.make_node("Identity", [src.name], [out.name]))
    for pos, tensor in enumerate(proto.input):
        paired = [i for i, o in enumerate(proto.output)
                  if nodes[i].input[0] == tensor.name]
        key = f"d{paired[0]}" if paired else f"i{pos}"
        in_vi.append(value_info(tensor, onnx_dims(model_shape(tensor), key)))
    graph = helper.make_graph(nodes, proto.name, in_vi, out_vi)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model)
    (model / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, model / "1" / "model.onnx")
    config.write_text(re.sub(r'^(\s*)backend:\s*"identity"', r'\1backend: "onnxruntime"', text,
                             flags=re.MULTILINE))


def _ensembles(proto_dirs: list[Path]) -> dict[str, set[str]]:
    """name -> composing model names, for the ensembles among these model directories."""
    from google.protobuf import text_format
    mc = _model_config_pb2()
    out = {}
    for d in proto_dirs:
        proto = text_format.Parse((d / "config.pbtxt").read_text(), mc.ModelConfig())
        if proto.platform == "ensemble":
            out[d.name] = {s.model_name for s in proto.ensemble_scheduling.step}
    return out


def prune_ensembles(repo: Path) -> list[str]:
    """Drop the ensembles that name a model the repository lacks (those of other backends),
    repeatedly (an ensemble may compose an ensemble); returns their names."""
    dropped = []
    while True:
        models = {d.name for d in repo.iterdir() if (d / "config.pbtxt").exists()}
        ensembles = _ensembles([repo / m for m in sorted(models)])
        gone = [e for e, steps in ensembles.items() if not steps <= models]
        if not gone:
            return dropped
        for e in gone:
            shutil.rmtree(repo / e)
        dropped += gone


def _simple_models(out: Path) -> None:
    """ONNX stand-ins (our own graphs) for Triton's example models of other backends: `simple`
    (INT32 sum and difference, as docs/examples/model_repository/simple) and `string_identity`
    (BYTES identity, as qa/python_models/string_identity)."""
    import onnx
    from onnx import TensorProto, helper

    def save(name, graph, config):
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, out / name / "1" / "model.onnx")
        (out / name / "config.pbtxt").write_text(config)

    vi = helper.make_tensor_value_info
    save("simple", helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
         helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])], "simple",
        [vi("INPUT0", TensorProto.INT32, [None, 16]), vi("INPUT1", TensorProto.INT32, [None, 16])],
        [vi("OUTPUT0", TensorProto.INT32, [None, 16]),
         vi("OUTPUT1", TensorProto.INT32, [None, 16])]),
        'name: "simple"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },'
        ' { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },'
        ' { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]\n')
    save("string_identity", helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], "string_identity",
        [vi("INPUT0", TensorProto.STRING, [None])], [vi("OUTPUT0", TensorProto.STRING, [None])]),
        'name: "string_identity"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
        'instance_group [{ kind: KIND_CPU }]\n')


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _edit(config: Path, *subs: tuple[str, str], append: str = "") -> None:
    text = config.read_text()
    for pattern, repl in subs:
        text = re.sub(pattern, repl, text, flags=re.MULTILINE)
    config.write_text(text + append)


BATCHER_SUBS = (("^max_batch_size:.*", "max_batch_size: 8"),
                ("^version_policy:.*", "version_policy: { specific { versions: [1] }}"))


def build_repo(name: str, data: Path, dest: Path) -> Path:
    """A suite's model repository, as its test.sh builds it (ONNX models only)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    qa = data / "qa_model_repository"
    var = data / "qa_variable_model_repository"
    ident = data / "qa_identity_model_repository"
    if name in ("batcher_fixed", "batcher_variable", "batcher_preferred_only"):
        src = var if name == "batcher_variable" else qa
        m = _copy(src / "onnx_float32_float32_float32", dest / "onnx_float32_float32_float32")
        batching = ("dynamic_batching { preferred_batch_size: [ 4, 6 ] }"
                    if name == "batcher_preferred_only" else
                    "dynamic_batching { preferred_batch_size: [ 2, 6 ], "
                    "max_queue_delay_microseconds: 10000000 }")
        _edit(m / "config.pbtxt", *BATCHER_SUBS, append="\n" + batching + "\n")
        if name == "batcher_variable":
            _edit(m / "config.pbtxt", ("16", "-1"))
            z = _copy(ident / "onnx_nobatch_zero_1_float32", dest / "onnx_zero_1_float32")
            _edit(z / "config.pbtxt", ("nobatch_", ""), ("^max_batch_size:.*", "max_batch_size: 8"),
                  ('name: "INPUT0"', 'name: "INPUT0"\nallow_ragged_batch: true'),
                  append='\nbatch_output [{target_name: "OUTPUT0" '
                         'kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "INPUT0" }] '
                         "dynamic_batching { preferred_batch_size: [ 2, 6 ], "
                         "max_queue_delay_microseconds: 10000000 }\n")
    elif name in ("infer", "infer_ensembles"):
        for m in sorted(qa.glob("onnx_*")):
            if "bf16" in m.name:
                continue  # test.sh drops bf16 models on CPU
            _edit(_copy(m, dest / m.name) / "config.pbtxt",
                  append="\ninstance_group [ { kind: KIND_CPU }]\n")
        if name == "infer_ensembles":
            # test.sh: cp qa_ensemble_model_repository/qa_model_repository/*onnx* and nop_*,
            # then ../ensemble_models/$EM, then custom_[nobatch_]zero_1_float32.
            ens = data / "qa_ensemble_model_repository"
            for m in sorted((ens / "qa_model_repository").iterdir()):
                if "onnx" in m.name or m.name.startswith("nop_"):
                    _copy(m, dest / m.name)
            for em in INFER_ENSEMBLE_MODELS:
                _copy(data.parent / "qa" / "ensemble_models" / em, dest / em)
                (dest / em / "1").mkdir(exist_ok=True)
            for m in sorted((ens / "custom").iterdir()):
                _copy(m, dest / m.name)
    elif name in ("infer_variable", "infer_variable_ensembles"):
        for m in sorted(var.glob("onnx_*")):
            _copy(m, dest / m.name)
    elif name in ("infer_reshape", "infer_reshape_ensembles"):
        for m in sorted((data / "qa_reshape_model_repository").glob("onnx_*")):
            _copy(m, dest / m.name)
    elif name in ("infer_zero", "infer_zero_ensembles"):
        for m in sorted(ident.glob("onnx_*")):
            _copy(m, dest / m.name)
    elif name == "scalar_io":
        for m in sorted((data / "qa_scalar_models").iterdir()):
            _copy(m, dest / m.name)
    elif name == "string_io":
        _copy(ident / "onnx_zero_1_object", dest / "onnx_zero_1_object")
        _copy(data / "extra" / "string_identity", dest / "string_identity")
    elif name == "output_name":
        # The test names libtorch_ and plan_ models too: ONNX copies under those names (it
        # checks the refusal of an unknown output, not the backend).
        for prefix in ("onnx", "libtorch", "plan"):
            m = _copy(ident / "onnx_nobatch_zero_1_float32",
                      dest / f"{prefix}_nobatch_zero_1_float32")
            _edit(m / "config.pbtxt", ("onnx_nobatch", f"{prefix}_nobatch"))
    elif name == "grpc_unit":
        _copy(data / "extra" / "simple", dest / "simple")
        _copy(data / "extra" / "string_identity", dest / "string_identity")
    elif name == "input_shape":
        _copy(qa / "onnx_object_int32_int32", dest / "onnx_object_int32_int32")
    elif name != "empty":
        raise SystemExit(f"unknown repository {name}")
    if name in ("infer_variable_ensembles", "infer_reshape_ensembles", "infer_zero_ensembles"):
        # test.sh: cp qa_ensemble_model_repository/<the suite's repository>/* (ensembles and
        # their nop_ models, made ONNX stand-ins here).
        src = {"infer_variable_ensembles": "qa_variable_model_repository",
               "infer_reshape_ensembles": "qa_reshape_model_repository",
               "infer_zero_ensembles": "qa_identity_model_repository"}[name]
        for m in sorted((data / "qa_ensemble_model_repository" / src).iterdir()):
            _copy(m, dest / m.name)
    if name.endswith("_ensembles"):
        prune_ensembles(dest)  # the plan_ and libtorch_ ensembles: no such models here
    return dest


# ---- serving and running -------------------------------------------------------------------

class Gateway:
    def __init__(self, root: Path, repo: Path, args: list[str], log: Path, env: dict):
        cmd = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(repo),
               "--grpc-port", "8001", "--http-port", "8000", "--metrics-port", "0", *args]
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **env})
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.ready.wait(180) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"gateway did not start; see {log}")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if "gateway ready" in line:
                self.ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def ports_free() -> bool:
    for port in PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return False
    return True


def pytest(qa: Path, run: Run, tests: list[str], report: Path, timeout: int) -> list[dict]:
    suite_dir = qa / run.suite
    ids = [f"{run.test_file}::{t}" for t in tests] or [run.test_file]
    env = {k: v for k, v in os.environ.items() if k != "TRITONSERVER_DELAY_SCHEDULER"}
    env.update(run.env)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={qa}",
           f"--junitxml={report}", "-o", "junit_family=xunit1", *ids]
    try:
        subprocess.run(cmd, cwd=suite_dir, env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [{"test": t, "outcome": "failed", "message": f"timed out after {timeout}s"}
                for t in tests or [run.test_file]]
    if not report.exists():
        return [{"test": t, "outcome": "failed", "message": "pytest wrote no report"}
                for t in tests or [run.test_file]]
    results = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:300] \
                    if (node.get("message") or node.text) else ""
                break
        results.append({"test": name, "outcome": outcome, "message": message})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", type=Path,
                        help="git directory of a triton-inference-server/server mirror")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory")
    parser.add_argument("--suites", default="", help="comma-separated; default: all")
    parser.add_argument("--ensembles", choices=("include", "skip", "only"), default="include",
                        help="the ensemble runs (label onnx+ensembles) of L0_infer, "
                             "L0_infer_variable, L0_infer_reshape and L0_infer_zero: with the "
                             "other runs (default), not at all, or alone")
    parser.add_argument("--gateway-root", type=Path, default=ROOT,
                        help="the checkout whose gateway serves (default: this one)")
    parser.add_argument("--json", type=Path, help="write every test's outcome here")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    parser.add_argument("--summarise", type=Path, metavar="JSON",
                        help="only summarise the results of an earlier --json (with this "
                             "script's NOT_APPLICABLE table)")
    args = parser.parse_args()
    if args.summarise:
        results = json.loads(args.summarise.read_text())
        for r in results:
            r["not_applicable"] = NOT_APPLICABLE.get(f"{r['suite']}::{r['label']}::{r['test']}",
                                                     "")
        summarise(results)
        return 0
    if args.triton is None:
        parser.error("--triton is required (unless --summarise)")
    wanted = set(filter(None, args.suites.split(",")))
    args.work.mkdir(parents=True, exist_ok=True)
    qa = extract(args.triton, args.work)
    data = generate(qa, args.work)
    selected = [(index, r) for index, r in enumerate(runs())
                if (not wanted or r.suite in wanted)
                and {"include": True, "skip": not r.ensembles, "only": r.ensembles}[args.ensembles]]
    if any(r.ensembles for _, r in selected):
        generate_ensembles(qa, data)
    if not ports_free():
        sys.exit("ports 8000/8001 are taken: the suites talk to localhost:8000 and :8001")
    results = []
    for index, run in selected:
        repo = build_repo(run.repo, data, args.work / "repos" / f"{run.suite}-{index}")
        batches = [[t] for t in run.tests] if run.per_test_server else [run.tests]
        for n, tests in enumerate(batches):
            log = args.work / "logs" / f"{run.suite}-{index}-{n}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            if run.per_test_server:  # statistics are absolute: a fresh repository too
                repo = build_repo(run.repo, data, repo)
            started = time.time()
            try:
                gateway = Gateway(args.gateway_root, repo, run.server_args, log, run.env)
            except RuntimeError as exc:
                outcomes = [{"test": t, "outcome": "failed", "message": str(exc)}
                            for t in tests or [run.test_file]]
            else:
                try:
                    outcomes = pytest(qa, run, tests, log.with_suffix(".xml"), args.timeout)
                finally:
                    gateway.stop()
            for o in outcomes:
                o["test"] = o["test"].split("::")[-1]
                o.update(suite=run.suite, label=run.label)
                key = f"{run.suite}::{run.label}::{o['test']}"
                o["not_applicable"] = NOT_APPLICABLE.get(key, "")
                results.append(o)
                print(f"{o['outcome']:7s} {key}"
                      + (f"  ({o['message'][:120]})" if o["outcome"] != "passed" else ""),
                      flush=True)
            print(f"        [{time.time() - started:.0f}s]", flush=True)
    summarise(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def summarise(results: list[dict]) -> None:
    """Per suite (an ensemble run on a row of its own), then totals."""
    def row(r: dict) -> str:
        return r["suite"] + (" +ensembles" if r["label"] == ENSEMBLE_LABEL else "")

    def counts(rows: list[dict]) -> tuple[int, int, int, int]:
        rows = [r for r in rows if r["outcome"] != "skipped"]
        app = [r for r in rows if not r["not_applicable"]]
        na = [r for r in rows if r["not_applicable"]]
        return (sum(r["outcome"] == "passed" for r in app), len(app),
                sum(r["outcome"] == "passed" for r in na), len(na))

    print(f"\n{'suite':29s} applicable passed   (not applicable: passed/total)")
    for name in sorted({row(r) for r in results}):
        ok, n, na_ok, na = counts([r for r in results if row(r) == name])
        print(f"{name:29s} {ok:4d} / {n:<4d}" + (f"        ({na_ok}/{na})" if na else ""))
    ensembles = [r for r in results if r["label"] == ENSEMBLE_LABEL]
    if ensembles and len(ensembles) < len(results):
        ok, n, _, _ = counts([r for r in results if r["label"] != ENSEMBLE_LABEL])
        print(f"{'total without ensembles':29s} {ok:4d} / {n}")
        ok, n, _, _ = counts(ensembles)
        print(f"{'total of ensemble runs':29s} {ok:4d} / {n}")
    ok, n, _, _ = counts(results)
    print(f"{'total':29s} {ok:4d} / {n}")


if __name__ == "__main__":
    sys.exit(main())
