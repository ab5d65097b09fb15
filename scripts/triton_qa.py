"""Run Triton's own QA suites (qa/L0_*) against `gateway serve`, ONNX models only.

Nothing of Triton's is kept in this repository: the suites, their helpers (qa/common) and the
model generators are extracted at run time from a git mirror of triton-inference-server/server
into a work directory, the ONNX models are generated there, and each suite's model repository
is built the way its test.sh builds it (ONNX only). Then, for each run, a fresh gateway serves
the repository on Triton's ports (gRPC 8001, HTTP 8000) and pytest runs the named tests.

    python scripts/triton_qa.py --triton DIR_OF_GIT_MIRROR --work /tmp/tqa \\
        [--suites L0_batcher,L0_infer] [--gateway-root CHECKOUT] [--json results.json]

``--gateway-root`` runs another checkout's gateway (a baseline) with this script. A conftest
placed in the work directory (ours) turns off the TensorRT, LibTorch and OpenVINO branches of
the suites (test_util.validate_for_*_model) and, unless --ensembles, the ensemble ones, so a
suite exercises its ONNX models only. Tests that need a feature the gateway declares unsupported
are listed in NOT_APPLICABLE with the reason and reported apart.
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


def extract(mirror: Path, work: Path) -> Path:
    """qa/common and the suites, from the mirror's HEAD, into work/qa."""
    qa = work / "qa"
    if qa.is_dir():
        return qa
    paths = ["qa/common", *(f"qa/{s}" for s in SUITES)]
    data = subprocess.run(["git", "-C", str(mirror), "archive", "HEAD", *paths],
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
    elif name == "infer":
        for m in sorted(qa.glob("onnx_*")):
            if "bf16" in m.name:
                continue  # test.sh drops bf16 models on CPU
            _edit(_copy(m, dest / m.name) / "config.pbtxt",
                  append="\ninstance_group [ { kind: KIND_CPU }]\n")
    elif name == "infer_variable":
        for m in sorted(var.glob("onnx_*")):
            _copy(m, dest / m.name)
    elif name == "infer_reshape":
        for m in sorted((data / "qa_reshape_model_repository").glob("onnx_*")):
            _copy(m, dest / m.name)
    elif name == "infer_zero":
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
    if not ports_free():
        sys.exit("ports 8000/8001 are taken: the suites talk to localhost:8000 and :8001")
    results = []
    for index, run in enumerate(r for r in runs() if not wanted or r.suite in wanted):
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
    print("\nsuite                     applicable passed   (not applicable: passed/total)")
    for suite in sorted({r["suite"] for r in results}):
        rows = [r for r in results if r["suite"] == suite and r["outcome"] != "skipped"]
        app = [r for r in rows if not r["not_applicable"]]
        na = [r for r in rows if r["not_applicable"]]
        ok = sum(r["outcome"] == "passed" for r in app)
        na_ok = sum(r["outcome"] == "passed" for r in na)
        print(f"{suite:25s} {ok:4d} / {len(app):<4d}"
              + (f"        ({na_ok}/{len(na)})" if na else ""))
    app = [r for r in results if r["outcome"] != "skipped" and not r["not_applicable"]]
    print(f"{'total':25s} {sum(r['outcome'] == 'passed' for r in app):4d} / {len(app)}")


if __name__ == "__main__":
    sys.exit(main())
