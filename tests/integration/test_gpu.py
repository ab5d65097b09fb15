"""The GPU path on a real NVIDIA GPU: KIND_GPU instances, IOBinding outputs, every batch shape
the batcher forms, NVML metrics, and a model too large for the GPU's free memory.

The tests marked ``gpu`` need onnxruntime-gpu (CUDAExecutionProvider) and a GPU that NVML sees;
elsewhere they are skipped with the reason. scripts/gpu_check.sh runs them on a device machine
(docs/gpu.md). One test runs only where there is no CUDA provider: a KIND_GPU model fails to
load with the reason while the CPU models serve.

References are computed in-process: by onnxruntime on the GPU (the same kernels, so close
agreement) and on the CPU (TF32 and other GPU kernels: agreement within a relative tolerance).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import itertools
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from support import ROOT, TIMEOUT, index_rows, start_gateway, wait_for
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from bench import models
from runtimes import RuntimeOptions
from runtimes.ort import OrtRuntime

CUDA = "CUDAExecutionProvider"
HAS_CUDA_PROVIDER = CUDA in ort.get_available_providers()


def _gpu_problem() -> str | None:
    """Why the GPU tests cannot run here, or None."""
    if not HAS_CUDA_PROVIDER:
        return ("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed; "
                f"providers: {', '.join(ort.get_available_providers())})")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() == 0:
                return "NVML sees no NVIDIA GPU"
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        return f"no NVIDIA GPU visible (NVML: {type(exc).__name__}: {exc})"
    return None


GPU_PROBLEM = _gpu_problem()
needs_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=str(GPU_PROBLEM))

SMALL_MLP = (64, 1024, 1024, 16)
LOAD_MLP = (64, 8192, 8192, 8192, 16)  # 512 MiB of weights, ~17 GFLOP per batch of 64
RESNET_IMAGE, RESNET_WIDTHS = 32, (16, 32)
GIB = 1 << 30


def _gpu_bench():
    """scripts/gpu_bench.py (the conv net builder lives there, with the bench that uses it)."""
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_resnet(path: Path) -> Path:
    return _gpu_bench().build_resnet(path, image=RESNET_IMAGE, widths=RESNET_WIDTHS, blocks=1)


def gpu_config(max_batch: int, count: int = 1, kind: str = "KIND_GPU", extra: str = "") -> str:
    return f"""
        max_batch_size: {max_batch}
        instance_group [ {{ kind: {kind} count: {count} }} ]
        dynamic_batching {{ }}
        {extra}
    """


def cuda_session(path: Path):
    s = ort.InferenceSession(str(path), providers=[CUDA, "CPUExecutionProvider"])
    assert s.get_providers()[0] == CUDA, s.get_providers()
    return s


def cpu_session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def infer(client, model: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None):
    tensors = []
    for name, value in inputs.items():
        datatype = "BYTES" if value.dtype == object else {
            np.float32: "FP32", np.float16: "FP16", np.int64: "INT64"}[value.dtype.type]
        t = grpcclient.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value)
        tensors.append(t)
    requested = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, tensors, outputs=requested, client_timeout=TIMEOUT)


def close_to_cpu(actual: np.ndarray, expected: np.ndarray, rel: float = 2e-2) -> None:
    """Within ``rel`` of the output's scale: GPU kernels (TF32 matmuls and convolutions among
    them) do not reproduce the CPU's rounding."""
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


def rows(seed: int, n: int, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


# ---- NVML and raw CUDA (test side) ----------------------------------------------------------

def nvml_device():
    import pynvml

    pynvml.nvmlInit()
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)


def gpu_pids() -> set[int]:
    nvml, handle = nvml_device()
    try:
        return {p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    except Exception:
        return set()


class Cudart:
    """cudaMemGetInfo / cudaMalloc / cudaFree through ctypes: holds GPU memory in this process
    so that a model no longer fits (no PyTorch or CuPy needed)."""

    def __init__(self):
        names = ["libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart")]
        self.lib = None
        for name in filter(None, names):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.lib is None:
            pytest.skip("libcudart not found on the loader's path (LD_LIBRARY_PATH)")
        self.held: list[ctypes.c_void_p] = []

    def mem_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        rc = self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
        assert rc == 0, f"cudaMemGetInfo failed ({rc})"
        return free.value, total.value

    def hold(self, nbytes: int) -> None:
        """Allocate about ``nbytes``, in pieces of at most 4 GiB, halving a piece that does not
        fit (down to 64 MiB)."""
        piece = 4 * GIB
        while nbytes > 0 and piece >= 64 << 20:
            size = min(nbytes, piece)
            ptr = ctypes.c_void_p()
            if self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(size)) == 0:
                self.held.append(ptr)
                nbytes -= size
            else:
                self.lib.cudaGetLastError()  # clear the (non-sticky) allocation error
                piece //= 2

    def release(self) -> None:
        for ptr in self.held:
            self.lib.cudaFree(ptr)
        self.held.clear()


# ---- the repository and gateway shared by the GPU tests ----------------------------------------

@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("gpu_repo")
    mv = models.make_version
    mv(repo, "mlp_gpu", 1, models.build_mlp, SMALL_MLP)
    models.write_config(repo / "mlp_gpu", gpu_config(64, count=2))
    mv(repo, "mlp_cpu", 1, models.build_mlp, SMALL_MLP)
    models.write_config(repo / "mlp_cpu", gpu_config(64, kind="KIND_CPU"))
    mv(repo, "load_gpu", 1, models.build_mlp, LOAD_MLP)
    models.write_config(repo / "load_gpu", gpu_config(64))
    mv(repo, "resnet_gpu", 1, build_resnet)
    models.write_config(repo / "resnet_gpu", gpu_config(8))
    mv(repo, "add_sub_gpu", 1, models.build_add_sub)
    models.write_config(repo / "add_sub_gpu", gpu_config(8))
    mv(repo, "text_gpu", 1, models.build_identity, "BYTES")
    models.write_config(repo / "text_gpu", gpu_config(8))
    mv(repo, "fp16_gpu", 1, models.build_identity, "FP16")
    models.write_config(repo / "fp16_gpu", gpu_config(8))
    return repo


@pytest.fixture(scope="module")
def gpu_gateway(gpu_repo):
    with start_gateway(gpu_repo, "--gpu-sample-interval", "0.2", timeout=300) as gw:
        yield gw
    assert gw.process.returncode == 0, gw.log()


@pytest.fixture
def client(gpu_gateway):
    c = grpcclient.InferenceServerClient(gpu_gateway.url)
    yield c
    c.close()


def model_path(repo: Path, name: str) -> Path:
    return repo / name / "1" / "model.onnx"


# ---- KIND_GPU instances --------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_kind_gpu_instances_load_and_report_as_configured(client, gpu_gateway):
    rows_ = index_rows(client)
    for name in ("mlp_gpu", "load_gpu", "resnet_gpu", "add_sub_gpu", "text_gpu", "fp16_gpu"):
        assert rows_[(name, "1")] == ("READY", ""), (name, rows_.get((name, "1")))
    groups = client.get_model_config("mlp_gpu").config.instance_group
    assert [(mc.ModelInstanceGroup.Kind.Name(g.kind), g.count, list(g.gpus)) for g in groups] \
        == [("KIND_GPU", 2, [0])]
    pids = gpu_pids()
    if pids:  # NVML lists compute processes on this host: the gateway is one of them
        assert gpu_gateway.process.pid in pids, (gpu_gateway.process.pid, pids)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [1, 7, 64])
def test_kind_gpu_serves_what_onnxruntime_cuda_computes_in_process(client, gpu_repo, n):
    x = rows(n, n)
    served = infer(client, "mlp_gpu", {"input": x}).as_numpy("output")
    path = model_path(gpu_repo, "mlp_gpu")
    (on_gpu,) = cuda_session(path).run(["output"], {"input": x})
    (on_cpu,) = cpu_session(path).run(["output"], {"input": x})
    assert served.shape == (n, SMALL_MLP[-1]) and served.dtype == np.float32
    # one request alone is one batch of the same shape: the same kernels as in-process
    np.testing.assert_allclose(served, on_gpu, rtol=1e-4, atol=1e-4)
    close_to_cpu(served, on_cpu)
    cpu_served = infer(client, "mlp_cpu", {"input": x}).as_numpy("output")
    close_to_cpu(served, cpu_served)


@pytest.mark.gpu
@needs_gpu
def test_a_conv_net_runs_on_cudnn_like_on_the_cpu(client, gpu_repo):
    x = np.random.default_rng(3).random((5, 3, RESNET_IMAGE, RESNET_IMAGE), dtype=np.float32)
    served = infer(client, "resnet_gpu", {"input": x}).as_numpy("logits")
    path = model_path(gpu_repo, "resnet_gpu")
    (on_gpu,) = cuda_session(path).run(["logits"], {"input": x})
    (on_cpu,) = cpu_session(path).run(["logits"], {"input": x})
    np.testing.assert_allclose(served, on_gpu, rtol=1e-3, atol=1e-3 * np.abs(on_gpu).max())
    close_to_cpu(served, on_cpu)


# ---- IOBinding -------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_iobinding_returns_fresh_host_arrays_in_the_order_asked(gpu_repo):
    """OrtRuntime on the GPU directly: outputs bound on the device are copied out as new host
    arrays (a later run does not overwrite an earlier result), in the order requested, for a
    subset of outputs, for changing batch sizes and for a non-contiguous input."""
    runtime = OrtRuntime(model_path(gpu_repo, "add_sub_gpu"), RuntimeOptions(device="gpu"))
    assert runtime._session.get_providers()[0] == CUDA
    a, b = rows(1, 3, 16), rows(2, 3, 16)
    diff, total = runtime.run({"INPUT0": a, "INPUT1": b}, ["OUTPUT1", "OUTPUT0"])
    for out in (diff, total):
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 16)
        assert out.flags.c_contiguous
    np.testing.assert_allclose(diff, a - b, rtol=1e-6)
    np.testing.assert_allclose(total, a + b, rtol=1e-6)
    kept = diff.copy()
    wide = rows(3, 16, 8).T  # (8, 16), not C-contiguous
    c = rows(4, 8, 16)
    (only,) = runtime.run({"INPUT0": wide, "INPUT1": c}, ["OUTPUT0"])
    np.testing.assert_allclose(only, wide + c, rtol=1e-6)
    np.testing.assert_array_equal(diff, kept)  # the first result was not reused
    (one,) = runtime.run({"INPUT0": a[:1], "INPUT1": b[:1]}, ["OUTPUT1"])
    np.testing.assert_allclose(one, a[:1] - b[:1], rtol=1e-6)
    runtime.close()


@pytest.mark.gpu
@needs_gpu
def test_strings_and_fp16_on_a_gpu_instance(client):
    """String tensors exist only in host memory: a KIND_GPU model with BYTES outputs binds them
    to the CPU (ORT runs string nodes on its CPU provider); FP16 round-trips on the device."""
    text = np.array([[b"gpu", "naïve".encode()], [b"", b"x" * 300]], dtype=object)
    served = infer(client, "text_gpu", {"INPUT0": text}).as_numpy("OUTPUT0")
    assert served.tolist() == text.tolist()
    half = np.arange(12, dtype=np.float16).reshape(3, 4) / np.float16(7)
    np.testing.assert_array_equal(infer(client, "fp16_gpu", {"INPUT0": half})
                                  .as_numpy("OUTPUT0"), half)


@pytest.mark.gpu
@needs_gpu
def test_a_subset_of_outputs_over_grpc(client):
    a, b = rows(5, 2, 16), rows(6, 2, 16)
    result = infer(client, "add_sub_gpu", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT1"])
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert result.as_numpy("OUTPUT0") is None


# ---- batch shapes ----------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_every_batch_shape_the_batcher_forms_serves_correct_rows(gpu_gateway, gpu_repo):
    """runtimes/ort.py pads to no bucket: each batch size up to max_batch_size is its own shape,
    run once at load (the warm-up) so none pays for its first kernels under load. Concurrent
    requests of 1..8 rows form batches of many sizes; every row must equal the CPU's answer
    for that row, whichever batch it rode in."""
    before = _batch_sizes(gpu_gateway, "mlp_gpu")
    sizes = [1 + (i * 5) % 8 for i in range(96)]
    path = model_path(gpu_repo, "mlp_gpu")
    reference = cpu_session(path)
    local = threading.local()

    def one(i: int):
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(gpu_gateway.url)
        x = rows(100 + i, sizes[i])
        return x, infer(local.client, "mlp_gpu", {"input": x}).as_numpy("output")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(len(sizes))))
    for x, served in results:
        (expected,) = reference.run(["output"], {"input": x})
        close_to_cpu(served, expected)
    after = _batch_sizes(gpu_gateway, "mlp_gpu")
    ran = {size for size, count in after.items() if count > before.get(size, 0)}
    assert len(ran) >= 3, f"batch sizes executed: {sorted(ran)}"
    assert max(ran) <= 64


def _batch_sizes(gateway, model: str) -> dict[int, int]:
    c = grpcclient.InferenceServerClient(gateway.url)
    try:
        stats = c.get_inference_statistics(model).model_stats[0]
        return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    finally:
        c.close()


# ---- NVML metrics ----------------------------------------------------------------------------

def scrape(gateway) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics",
                                  timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("gateway_gpu_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def gpu_value(samples, name: str, **labels) -> float | None:
    for (n, lbls), v in samples.items():
        if n == name and all(dict(lbls).get(k) == val for k, val in labels.items()):
            return v
    return None


@pytest.mark.gpu
@needs_gpu
def test_nvml_metrics_are_present_and_plausible_and_utilisation_rises_under_load(gpu_gateway):
    nvml, handle = nvml_device()
    total = nvml.nvmlDeviceGetMemoryInfo(handle).total
    samples = wait_for(lambda: scrape(gpu_gateway) or None, what="GPU series in /metrics")
    info = [dict(lbls) for (n, lbls) in samples if n == "gateway_gpu_info"]
    assert any(i["gpu"] == "0" and i["name"] and i["uuid"].startswith("GPU-") for i in info), info
    assert gpu_value(samples, "gateway_gpu_memory_total_bytes", gpu="0") == total
    used = gpu_value(samples, "gateway_gpu_memory_used_bytes", gpu="0")
    weights = 4 * sum(a * b for a, b in itertools.pairwise(LOAD_MLP))
    assert weights <= used <= total, (used, weights, total)
    temperature = gpu_value(samples, "gateway_gpu_temperature_celsius", gpu="0")
    assert temperature is None or 5 < temperature < 110
    power = gpu_value(samples, "gateway_gpu_power_watts", gpu="0")
    assert power is None or 0 < power < 2000

    def utilisation(seconds: float) -> list[float]:
        seen, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            seen.append(gpu_value(scrape(gpu_gateway), "gateway_gpu_utilization_ratio", gpu="0"))
            time.sleep(0.2)
        assert all(u is not None and 0.0 <= u <= 1.0 for u in seen), seen
        return seen

    idle = utilisation(1.5)
    stop = threading.Event()
    x = rows(7, 64)

    def load():
        c = grpcclient.InferenceServerClient(gpu_gateway.url)
        try:
            while not stop.is_set():
                infer(c, "load_gpu", {"input": x})
        finally:
            c.close()

    threads = [threading.Thread(target=load, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # NVML's utilisation covers its last sample period
        busy = utilisation(4.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert max(busy) >= 0.05 and max(busy) > max(idle), f"idle {idle}, under load {busy}"


# ---- a model too large for the GPU -----------------------------------------------------------

def build_large(path: Path, nbytes: int, width: int = 1024) -> Path:
    """MatMul by one FP32 weight of ``nbytes`` held as external data in a sparse file (no disk
    written, zeros when read): input [batch, width] -> output [batch, nbytes / 4 / width]."""
    cols = nbytes // 4 // width
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[width, cols])
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"),
                       ("length", str(width * cols * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["input", "w"], ["output"], name="matmul")], "large",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", width])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", cols])],
        initializer=[weight])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "weights.bin", "wb") as f:
        f.truncate(width * cols * 4)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.gpu
@needs_gpu
def test_a_model_too_large_for_the_free_gpu_memory_fails_with_why_while_others_serve(tmp_path):
    repo = tmp_path / "repo"
    models.make_version(repo, "small_gpu", 1, models.build_mlp, SMALL_MLP)
    models.write_config(repo / "small_gpu", gpu_config(8))
    models.make_version(repo, "small_cpu", 1, models.build_mlp, SMALL_MLP)
    models.write_config(repo / "small_cpu", gpu_config(8, kind="KIND_CPU"))
    large = 3 * GIB // 2
    build_large(repo / "large_gpu" / "1" / "model.onnx", large)
    models.write_config(repo / "large_gpu", gpu_config(2))
    cuda = Cudart()
    with start_gateway(repo, "--control-mode", "explicit", "--load-model", "small_gpu",
                       "--load-model", "small_cpu", timeout=300) as gw:
        c = grpcclient.InferenceServerClient(gw.url)
        try:
            free, _ = cuda.mem_info()
            cuda.hold(free - GIB)  # this process takes all but 1 GiB: 1.5 GiB cannot fit
            left, _ = cuda.mem_info()
            assert left < large, f"could not take the GPU's memory: {left} bytes still free"
            with pytest.raises(InferenceServerException) as info:
                c.load_model("large_gpu", client_timeout=120)
            message = info.value.message()
            assert "not enough free memory on GPU 0 to load the model" in message, message
            state, reason = index_rows(c)[("large_gpu", "1")]
            assert state == "UNAVAILABLE" and "not enough free memory on GPU 0" in reason, reason
            x = rows(9, 4)
            expected = infer(c, "small_cpu", {"input": x}).as_numpy("output")
            close_to_cpu(infer(c, "small_gpu", {"input": x}).as_numpy("output"), expected)
            cuda.release()
            # the same file loads once the memory is free: memory was the only reason
            c.load_model("large_gpu", client_timeout=120)
            out = infer(c, "large_gpu", {"input": rows(10, 1, 1024)}).as_numpy("output")
            assert out.shape == (1, large // 4 // 1024) and not out.any()
        finally:
            cuda.release()
            c.close()


# ---- without a CUDA provider (runs on CPU-only machines) ----------------------------------------

@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="onnxruntime has the CUDA provider: the gpu-marked "
                                              "tests cover KIND_GPU")
def test_kind_gpu_without_a_cuda_provider_fails_that_model_only(tmp_path):
    repo = tmp_path / "repo"
    models.make_version(repo, "wants_gpu", 1, models.build_mlp, (8, 4))
    models.write_config(repo / "wants_gpu", gpu_config(4, count=2))
    models.make_version(repo, "on_cpu", 1, models.build_mlp, (8, 4))
    models.write_config(repo / "on_cpu", gpu_config(4, kind="KIND_CPU"))
    with start_gateway(repo) as gw:
        c = grpcclient.InferenceServerClient(gw.url)
        try:
            state, reason = index_rows(c)[("wants_gpu", "1")]
            assert state == "UNAVAILABLE"
            assert reason == ("instance_group asks for KIND_GPU but this onnxruntime has no CUDA "
                              "provider (install onnxruntime-gpu on a machine with a GPU)")
            with pytest.raises(InferenceServerException) as info:
                infer(c, "wants_gpu", {"input": rows(1, 1, 8)})
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert "no CUDA provider" in info.value.message()
            out = infer(c, "on_cpu", {"input": rows(2, 3, 8)}).as_numpy("output")
            assert out.shape == (3, 4)
            assert not c.is_model_ready("wants_gpu") and c.is_model_ready("on_cpu")
        finally:
            c.close()
    assert gw.process.returncode == 0, gw.log()
