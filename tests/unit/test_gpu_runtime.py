"""The CPU side of the GPU path, on any machine: which providers an instance asks ONNX Runtime
for, the reasons a KIND_GPU version fails to load (no CUDA provider, a CUDA provider that did not
start, GPU memory exhausted), how outputs are bound with IOBinding, and GPU metrics without NVML.

ONNX Runtime is replaced at its seam (``ort.InferenceSession``, ``ort.get_available_providers``)
by fakes that record what the runtime asks of it; the real CUDA path is covered by
tests/integration/test_gpu.py on a machine with a GPU.
"""

from __future__ import annotations

import logging
import sys
from typing import ClassVar

import numpy as np
import pytest

from bench import models
from gateway.errors import ModelLoadError
from gateway.loading import load_version
from gateway.modelconfig import read_config_file
from gateway.monitoring.gpu import GpuSampler
from runtimes import RuntimeOptions, load_runtime
from runtimes import ort as ort_runtime
from runtimes.ort import OrtRuntime, select_providers

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
NO_CUDA = ("instance_group asks for KIND_GPU but this onnxruntime has no CUDA provider "
           "(install onnxruntime-gpu on a machine with a GPU)")


@pytest.fixture
def with_cuda(monkeypatch):
    """An onnxruntime that lists the CUDA provider (as onnxruntime-gpu does, GPU or not)."""
    monkeypatch.setattr(ort_runtime.ort, "get_available_providers", lambda: [CUDA, CPU])


@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(ort_runtime.ort, "get_available_providers", lambda: [CPU])


class FakeBinding:
    def __init__(self, session):
        self.session = session
        self.inputs: dict = {}
        self.outputs: list = []
        self.cleared = 0

    def clear_binding_inputs(self):
        self.inputs = {}
        self.cleared += 1

    def clear_binding_outputs(self):
        self.outputs = []

    def bind_cpu_input(self, name, value):
        self.inputs[name] = value

    def bind_output(self, name, device_type="cpu", device_id=0):
        self.outputs.append((name, device_type, device_id))

    def copy_outputs_to_cpu(self):
        return [self.session.results[name].copy() for name, _, _ in self.outputs]


class FakeArg:
    def __init__(self, name, type_, shape):
        self.name, self.type, self.shape = name, type_, shape


class FakeSession:
    """Records the providers it was created with; runs as a given set of providers."""

    created: ClassVar[list] = []
    runs_on: ClassVar[list | None] = None  # the providers it reports; None: the ones asked for
    raises: ClassVar[Exception | None] = None

    def __init__(self, path, sess_options=None, providers=None):
        if FakeSession.raises is not None:
            raise FakeSession.raises
        FakeSession.created.append(providers)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        self._providers = FakeSession.runs_on if FakeSession.runs_on is not None else names
        self.results = {"scores": np.arange(6, dtype=np.float32).reshape(2, 3),
                        "labels": np.array([b"a", b"b"], dtype=object)}
        self.iobinding_runs = 0

    def get_providers(self):
        return self._providers

    def get_inputs(self):
        return [FakeArg("input", "tensor(float)", ["batch", 4])]

    def get_outputs(self):
        return [FakeArg("scores", "tensor(float)", ["batch", 3]),
                FakeArg("labels", "tensor(string)", ["batch"])]

    def io_binding(self):
        self.binding = FakeBinding(self)
        return self.binding

    def run_with_iobinding(self, binding):
        self.iobinding_runs += 1

    def run(self, names, feeds):
        return [self.results[n] for n in names]


@pytest.fixture
def fake_session(monkeypatch):
    FakeSession.created, FakeSession.runs_on, FakeSession.raises = [], None, None
    monkeypatch.setattr(ort_runtime.ort, "InferenceSession", FakeSession)
    yield FakeSession
    FakeSession.created, FakeSession.runs_on, FakeSession.raises = [], None, None


def gpu(device_id=0):
    return RuntimeOptions(device="gpu", device_id=device_id)


# ---- provider selection ---------------------------------------------------------------------

def test_a_cpu_instance_asks_for_the_cpu_provider_only(with_cuda):
    assert select_providers("cpu") == [CPU]


def test_a_gpu_instance_asks_for_cuda_on_its_gpu_then_the_cpu(with_cuda):
    assert select_providers("gpu", 1) == [(CUDA, {"device_id": 1}), CPU]


def test_an_unknown_device_is_refused():
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        select_providers("tpu")


def test_the_session_gets_the_selected_providers(with_cuda, fake_session):
    OrtRuntime("model.onnx", gpu(2))
    OrtRuntime("model.onnx", RuntimeOptions())
    assert fake_session.created == [[(CUDA, {"device_id": 2}), CPU], [CPU]]


# ---- load failures --------------------------------------------------------------------------

def test_kind_gpu_without_a_cuda_provider_says_what_to_install(without_cuda, fake_session):
    with pytest.raises(ModelLoadError) as info:
        OrtRuntime("model.onnx", gpu())
    assert str(info.value) == NO_CUDA
    assert fake_session.created == []  # refused before any session is made


def test_kind_gpu_on_a_cpu_only_onnxruntime_fails_the_version_not_the_process(
        tmp_path, without_cuda):
    """The real loader over a real model file: the version fails with the reason."""
    path = models.make_version(tmp_path, "m", 1, models.build_mlp)
    models.write_config(tmp_path / "m", "max_batch_size: 8\n"
                        "instance_group [ { kind: KIND_GPU count: 2 } ]")
    proto, explicit = read_config_file(tmp_path / "m", "m")
    with pytest.raises(ModelLoadError) as info:
        load_version(path, "m", 1, proto, explicit)
    assert str(info.value) == NO_CUDA


def test_a_cuda_provider_that_did_not_start_is_a_load_failure_not_a_cpu_fallback(
        with_cuda, fake_session):
    """onnxruntime-gpu without CUDA 13 / cuDNN 9 libraries (or without a GPU) creates the
    session on the CPU provider alone and only logs it: KIND_GPU must not run on the CPU."""
    fake_session.runs_on = [CPU]
    with pytest.raises(ModelLoadError) as info:
        OrtRuntime("model.onnx", gpu(1))
    message = str(info.value)
    assert message.startswith("instance_group asks for KIND_GPU but onnxruntime's CUDA provider "
                              "did not start on GPU 1")
    assert "cuDNN" in message


ARENA_OOM = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
             "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:359 void* "
             "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, "
             "bool, onnxruntime::WaitNotificationFn) Failed to allocate memory for requested "
             "buffer of size 1610612736\n")


@pytest.mark.parametrize("text", [
    ARENA_OOM,
    ("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory ; GPU=0 ; hostname=h ; "
     "file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_allocator.cc ; line=50"),
    "[ONNXRuntimeError] : 1 : FAIL : CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED ; GPU=0",
])
def test_gpu_memory_exhausted_at_load_is_named_as_such(with_cuda, fake_session, text):
    fake_session.raises = RuntimeError(text)
    with pytest.raises(ModelLoadError) as info:
        OrtRuntime("model.onnx", gpu(0))
    message = str(info.value)
    assert message.startswith("not enough free memory on GPU 0 to load the model (onnxruntime: ")
    assert "/onnxruntime_src" not in message and "\n" not in message


def test_memory_words_on_a_cpu_instance_keep_the_plain_reason(fake_session):
    fake_session.raises = RuntimeError(ARENA_OOM)
    with pytest.raises(ModelLoadError) as info:
        OrtRuntime("model.onnx", RuntimeOptions())
    assert str(info.value).startswith("onnxruntime could not load the model: ")


def test_other_gpu_load_failures_keep_the_plain_reason(with_cuda, fake_session):
    fake_session.raises = RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : bad graph")
    with pytest.raises(ModelLoadError) as info:
        OrtRuntime("model.onnx", gpu())
    assert str(info.value) == "onnxruntime could not load the model: bad graph"


# ---- IOBinding --------------------------------------------------------------------------------

def test_gpu_runs_bind_inputs_from_host_and_outputs_on_their_gpu(with_cuda, fake_session):
    runtime = OrtRuntime("model.onnx", gpu(3))
    x = np.ones((2, 4), np.float32)
    scores, labels = runtime.run({"input": x}, ["scores", "labels"])
    binding = runtime._session.binding
    assert binding.inputs["input"] is x
    # string tensors exist only in host memory: bound to the CPU, the rest to the instance's GPU
    assert binding.outputs == [("scores", "cuda", 3), ("labels", "cpu", 0)]
    np.testing.assert_array_equal(scores, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert list(labels) == [b"a", b"b"]


def test_each_gpu_run_rebinds_only_what_it_asks_for(with_cuda, fake_session):
    runtime = OrtRuntime("model.onnx", gpu())
    runtime.run({"input": np.ones((2, 4), np.float32)}, ["scores", "labels"])
    (only,) = runtime.run({"input": np.zeros((5, 4), np.float32)}, ["scores"])
    binding = runtime._session.binding
    assert binding.outputs == [("scores", "cuda", 0)]  # cleared between runs
    assert binding.inputs["input"].shape == (5, 4)
    assert runtime._session.iobinding_runs == 2 and binding.cleared == 2
    assert only.shape == (2, 3)


def test_cpu_runs_do_not_use_iobinding(fake_session):
    runtime = OrtRuntime("model.onnx", RuntimeOptions())
    assert runtime._binding is None
    (scores,) = runtime.run({"input": np.ones((2, 4), np.float32)}, ["scores"])
    assert scores.shape == (2, 3)


def test_load_runtime_on_cpu_still_serves_a_real_model(tmp_path):
    """The provider refactor left the CPU path as it was: a real session, real outputs."""
    path = models.build_mlp(tmp_path / "m.onnx", (4, 8, 2))
    runtime = load_runtime(path, RuntimeOptions())
    (out,) = runtime.run({"input": np.ones((3, 4), np.float32)}, ["output"])
    assert out.shape == (3, 2) and runtime.device == "cpu"


# ---- NVML absent ---------------------------------------------------------------------------

def test_no_pynvml_module_means_gpu_metrics_off_with_one_line(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    sampler = GpuSampler(1.0)
    with caplog.at_level(logging.INFO, logger="gateway.monitoring.gpu"):
        assert not sampler.start()
        sampler.stop()
    assert sampler.samples == [] and not sampler.available
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("GPU metrics off: NVML unavailable (") and "pynvml" in line
