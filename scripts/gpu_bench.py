"""The GPU bench of issue 19, in one run with a time budget (scripts/gpu_check.sh runs it on the
device; docs/gpu.md says what it records and what goes into bench/RESULTS.md).

Two models built here with onnx.helper: the heavy MLP of bench/models.py (HEAVY_MLP) and a
ResNet-style conv net (``build_resnet``: three stages of residual blocks, 64x64 RGB in, about
1 GFLOP per image). For each, in this order, as long as the budget lasts:

1. the limit: onnxruntime in-process on the GPU (one session, CUDA provider, the gateway's
   session options) at batch sizes 1..256, by ``run()`` on host arrays and by IOBinding as the
   gateway runs it; the best batch size up to the gateway's max_batch_size is the limit;
2. one gateway process (KIND_GPU, one instance, dynamic batching up to 64) against MLServer
   serving the same file on the GPU (adaptive batching up to 64, 1 ms), interleaved by
   ``python -m bench`` at 1, 8 and 64 streams of one-row requests; GPU memory of each process;
3. ``--workers N`` against one process at 8 and 64 streams, interleaved; GPU memory per worker.

Every figure comes from this run; the JSON (``--out``) is rewritten after each step, so a run cut
short still leaves what it measured. ``--provider cpu`` runs the same plan on the CPU (KIND_CPU,
a dry run of the plumbing on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import models

MAX_BATCH = 64
BATCH_SIZES = (1, 8, 16, 32, 64, 128, 256)
READY = re.compile(r"gateway ready: grpc (\S+):(\d+) metrics (-?\d+)")


# ---- models -------------------------------------------------------------------------------

def build_resnet(path, image: int = 64, widths=(32, 64, 128), blocks: int = 2,
                 classes: int = 10, seed: int = 0) -> Path:
    """A ResNet-style conv net: a 3x3 stem, then per stage ``blocks`` residual blocks (two 3x3
    convolutions, ReLU, identity or 1x1 projection shortcut; the first block of a later stage
    halves the resolution), global average pooling and a linear classifier.

    input FP32 [batch, 3, image, image] -> logits FP32 [batch, classes]. Seeded He weights;
    the second convolution of a block is scaled by 0.5 so activations stay O(1).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name, relu=True, scale=1.0):
        w = rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k)) * scale
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}_w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}_b"))
        y = f"{name}_y"
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4))
        if not relu:
            return y
        nodes.append(helper.make_node("Relu", [y], [f"{name}_r"], name=f"{name}_relu"))
        return f"{name}_r"

    x = conv("input", 3, widths[0], 3, 1, "stem")
    cin = widths[0]
    for s, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            name = f"s{s}b{b}"
            h = conv(x, cin, width, 3, stride, f"{name}c1")
            h = conv(h, width, width, 3, 1, f"{name}c2", relu=False, scale=0.5)
            shortcut = x if stride == 1 and cin == width else conv(
                x, cin, width, 1, stride, f"{name}proj", relu=False)
            nodes.append(helper.make_node("Add", [h, shortcut], [f"{name}_sum"], name=f"{name}add"))
            nodes.append(helper.make_node("Relu", [f"{name}_sum"], [f"{name}_out"],
                                          name=f"{name}relu"))
            x, cin = f"{name}_out", width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1))
    w = rng.standard_normal((cin, classes)) * np.sqrt(1.0 / cin)
    inits.append(numpy_helper.from_array(w.astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"))
    graph = helper.make_graph(
        nodes, "resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)],
                              producer_name=models.PRODUCER)
    model.ir_version = models.IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


MODELS = {
    # name: (builder, args, per-row input shape, what it is)
    "mlp": (models.build_mlp, (models.HEAVY_MLP,), (models.HEAVY_MLP[0],),
            f"heavy MLP {'-'.join(map(str, models.HEAVY_MLP))} (bench/models.py HEAVY_MLP)"),
    "resnet": (build_resnet, (), (3, 64, 64),
               ("ResNet-style conv net: 64x64 RGB, stages of 32/64/128 channels, 2 residual "
                "blocks each, ~1 GFLOP/image")),
}


def build_repository(root: Path, names: list[str], kind: str) -> dict[str, Path]:
    files = {}
    for name in names:
        builder, args, _, _ = MODELS[name]
        files[name] = models.make_version(root, name, 1, builder, *args)
        models.write_config(root / name, f"""
            max_batch_size: {MAX_BATCH}
            instance_group [ {{ kind: {kind} count: 1 }} ]
            dynamic_batching {{ }}
        """)
    return files


# ---- the limit: onnxruntime in-process ----------------------------------------------------

def providers(provider: str) -> list:
    if provider == "cuda":
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(model_file: Path, provider: str):
    import onnxruntime as ort

    so = ort.SessionOptions()  # as runtimes/ort.py opens an instance
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(str(model_file), so, providers=providers(provider))
    if provider == "cuda" and s.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"the CUDA provider did not start: {s.get_providers()}")
    return s


def _timed(call, seconds: float, warmup_s: float) -> dict:
    clock = time.perf_counter
    end = clock() + warmup_s
    while clock() < end:
        call()
    times = []
    start = clock()
    while True:
        t0 = clock()
        call()
        t1 = clock()
        times.append(t1 - t0)
        if t1 - start >= seconds:
            break
    elapsed = clock() - start
    arr = np.asarray(times) * 1e3
    return {"runs": len(times), "runs_per_s": round(len(times) / elapsed, 2),
            "p50_ms": round(float(np.percentile(arr, 50)), 4),
            "p99_ms": round(float(np.percentile(arr, 99)), 4)}


def inprocess(model_file: Path, row_shape: tuple, provider: str, sizes, seconds: float) -> dict:
    """Back-to-back runs of one session at each batch size, two ways: ``run()`` with host
    arrays in and out, and IOBinding as the gateway's GPU instances run (host inputs bound,
    outputs bound on the device, copied out)."""
    sess = session(model_file, provider)
    rng = np.random.default_rng(0)
    rows = []
    warmup = min(0.3, seconds / 3)
    for size in sizes:
        x = rng.random((size, *row_shape), dtype=np.float32)
        row = {"batch_size": size, "run": _timed(_plain_run(sess, x), seconds, warmup)}
        row["run"]["rows_per_s"] = round(row["run"]["runs_per_s"] * size, 1)
        if provider == "cuda":
            row["iobinding"] = _timed(_bound_run(sess, x), seconds, warmup)
            row["iobinding"]["rows_per_s"] = round(row["iobinding"]["runs_per_s"] * size, 1)
        rows.append(row)
        print(f"  in-process {provider} batch {size:>3}: {row['run']['rows_per_s']:>12,.0f} rows/s"
              + (f"  iobinding {row['iobinding']['rows_per_s']:>12,.0f}" if "iobinding" in row
                 else ""), flush=True)
    sess = None
    gc.collect()
    return {"sizes": rows, "limit": limit_of(rows)}


def _plain_run(sess, x):
    name = sess.get_inputs()[0].name
    outputs = [o.name for o in sess.get_outputs()]
    return lambda: sess.run(outputs, {name: x})


def _bound_run(sess, x):
    name = sess.get_inputs()[0].name
    outputs = [o.name for o in sess.get_outputs()]
    binding = sess.io_binding()

    def bound():
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input(name, x)
        for o in outputs:
            binding.bind_output(o, "cuda", 0)
        sess.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    return bound


def limit_of(rows: list[dict]) -> dict:
    """The best rows/s at a batch size the gateway can form (<= MAX_BATCH), either way."""
    best = {"rows_per_s": 0.0}
    for row in rows:
        if row["batch_size"] > MAX_BATCH:
            continue
        for mode in ("run", "iobinding"):
            if mode in row and row[mode]["rows_per_s"] > best["rows_per_s"]:
                best = {"rows_per_s": row[mode]["rows_per_s"], "batch_size": row["batch_size"],
                        "mode": mode, "p50_ms": row[mode]["p50_ms"]}
    return best


# ---- servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process with its output drained into a tail (and a log file)."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, cwd=None):
        self.name, self.log = name, log
        self.tail: deque[str] = deque(maxlen=200)
        self.lines: list[str] = []
        self._fh = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=cwd, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            self.lines.append(line)
            self._fh.write(line)
            self._fh.flush()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 240) -> list[re.Match]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in map(rx.search, list(self.lines)) if m]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not get ready ({pattern!r} x{count}):\n"
                           + "\n".join(list(self.tail)[-30:]))

    def pids(self) -> list[int]:
        """The process and its descendants (a --workers gateway forks its workers)."""
        pids, frontier = [self.proc.pid], [self.proc.pid]
        while frontier:
            parent = frontier.pop()
            try:
                children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                children = []
            for child in map(int, children):
                pids.append(child)
                frontier.append(child)
        return pids

    def stop(self, timeout: float = 40) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._fh.close()


def start_gateway(repo: Path, workers: int, logs: Path, label: str) -> tuple[Server, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(repo),
           "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", "0",
           "--metrics-port", str(free_port()), "--gpu-sample-interval", "1"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    server = Server(label, cmd, dict(os.environ), logs / f"{label}.log", cwd=ROOT)
    server.wait_for(r"gateway ready: grpc", count=max(workers, 1))
    return server, f"127.0.0.1:{port}"


MLSERVER_RUNTIME = ROOT / "bench" / "mlserver_runtime.py"


def start_mlserver(files: dict[str, Path], provider: str, python: str, logs: Path,
                   folder: Path) -> tuple[Server, str]:
    """MLServer 1.7 over the same files, adaptive batching as bench.mlserver_peer sets it
    (max_batch_size 64, max_batch_time 1 ms, inference in the server process), through
    bench/mlserver_runtime.py (onnxruntime; on the GPU with BENCH_ORT_PROVIDER=cuda)."""
    grpc_port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": free_port(),
        "metrics_port": free_port(), "parallel_workers": 0, "load_models_at_startup": True}))
    for name, path in files.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_runtime.OnnxModel",
            "max_batch_size": MAX_BATCH, "max_batch_time": 0.001,
            "parameters": {"uri": str(path.resolve()), "version": "1"}}))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MLSERVER_RUNTIME.parent),
                                                     env.get("PYTHONPATH", "")) if p)
    env["BENCH_ORT_PROVIDER"] = provider
    launcher = ("import sys; from mlserver.cli import main; sys.argv[0] = 'mlserver'; "
                "sys.exit(main())")
    cmd = [python, "-c", launcher, "start", str(folder)]
    server = Server("mlserver", cmd, env, logs / "mlserver.log", cwd=folder)
    server.wait_for(r"gRPC server running on", timeout=180)
    url = f"127.0.0.1:{grpc_port}"
    wait_models(url, list(files), 180, server)
    return server, url


def wait_models(url: str, names: list[str], timeout: float, server: Server) -> None:
    import grpc

    from gateway.protocol.pb import grpc_service_pb2 as pb
    from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name in names:
            while True:
                try:
                    if stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5).ready:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or server.proc.poll() is not None:
                    raise RuntimeError(f"{server.name} did not load {name!r}:\n"
                                       + "\n".join(list(server.tail)[-30:]))
                time.sleep(0.2)


# ---- GPU memory (NVML) ---------------------------------------------------------------------

class Nvml:
    def __init__(self):
        self.ok = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.ok = True
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def device(self) -> dict:
        if not self.ok:
            return {"nvml": self.error}
        n, h = self.nvml, self.handle
        name = n.nvmlDeviceGetName(h)
        mem = n.nvmlDeviceGetMemoryInfo(h)
        return {"name": name.decode() if isinstance(name, bytes) else name,
                "driver": _text(n.nvmlSystemGetDriverVersion()),
                "cuda_driver_version": n.nvmlSystemGetCudaDriverVersion(),
                "memory_total_mib": mem.total // 2**20}

    def used_mib(self) -> int | None:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used // 2**20 if self.ok else None

    def by_process(self) -> dict[int, int]:
        """{pid: MiB} of the compute processes on GPU 0 (as NVML reports them)."""
        if not self.ok:
            return {}
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:
            return {}
        return {p.pid: (p.usedGpuMemory or 0) // 2**20 for p in procs}

    def utilization(self) -> float | None:
        if not self.ok:
            return None
        return self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def memory_of(nvml: Nvml, server: Server) -> dict:
    per = nvml.by_process()
    pids = server.pids()
    mine = {pid: per[pid] for pid in pids if pid in per}
    return {"processes": len(mine), "mib_by_pid": mine, "mib_total": sum(mine.values()),
            "all_gpu_processes": per}


# ---- load: python -m bench --------------------------------------------------------------------

def bench(url: str, compare: list[str], model: str, concurrency: str, args, out: Path,
          nvml: Nvml, roles: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "bench", "--url", url, "--model", model,
           "--concurrency", concurrency, "--batch-size", "1", "--warmup", str(args.warmup),
           "--duration", str(args.seconds), "--timeout", "30", "--json", str(out),
           "--plain", "--quiet"]
    for c in compare:
        cmd += ["--compare", c]
    samples: list[float] = []
    stop = threading.Event()

    def sample():  # GPU utilisation while the load runs
        while not stop.wait(0.5):
            u = nvml.utilization()
            if u is not None:
                samples.append(u)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, text=True, capture_output=True)
    stop.set()
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench exited {proc.returncode}: {proc.stderr[-1500:]}")
    report = json.loads(out.read_text())
    role_of = {t["label"]: roles.get(t["url"], t["label"]) for t in report.get("targets", [])}
    rows = [{"target": role_of.get(r["target"], r["target"]), "point": r["point"],
             "rows_per_s": r["throughput_rps"],  # one row per request
             "p50_ms": (r.get("latency_ms") or {}).get("p50"),
             "p99_ms": (r.get("latency_ms") or {}).get("p99"),
             "errors": r.get("errors_all_rounds") or r.get("errors"),
             "server": r.get("server"),  # queue/compute split and mean batch (ModelStatistics)
             "client_cores": (r.get("client") or {}).get("cores"),
             "client_busiest": (r.get("client") or {}).get("busiest_process")}
            for r in report["rows"]]
    return {"seconds": round(time.monotonic() - t0, 1), "targets": report.get("targets"),
            "rows": rows, "ratios": [dict(r, of=role_of.get(r["of"], r["of"]),
                                          over=role_of.get(r["over"], r["over"]))
                                     for r in report.get("ratios") or []],
            "gpu_utilization_max": max(samples) if samples else None,
            "gpu_utilization_mean": round(sum(samples) / len(samples), 3) if samples else None}


# ---- the run ---------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.out = Path(args.out)
        self.result: dict = {"issue": 19, "provider": args.provider, "started": _now(),
                             "budget_s": args.budget_s, "max_batch_size": MAX_BATCH,
                             "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                      "platform": platform.platform()},
                             "models": {}, "inprocess": {}, "serving": {}, "workers": {},
                             "memory": {}, "skipped": [], "errors": []}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def save(self):
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out)

    def step(self, what: str, need_s: float, call):
        """Run ``call`` if the budget allows; record a failure and go on."""
        if self.left() < need_s:
            self.result["skipped"].append(f"{what}: {self.left():.0f}s left, needs ~{need_s:.0f}s")
            print(f"-- skipped {what} (budget)", flush=True)
            self.save()
            return None
        print(f"-- {what} ({self.left():.0f}s left)", flush=True)
        try:
            return call()
        except Exception as exc:
            self.result["errors"].append(f"{what}: {type(exc).__name__}: {exc}"[:3000])
            print(f"!! {what} failed: {exc}", flush=True)
            return None
        finally:
            self.save()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON report")
    p.add_argument("--budget-s", type=float, default=280)
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--models", default="mlp,resnet")
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--workers-concurrency", default="8,64")
    p.add_argument("--seconds", type=float, default=3.0, help="per load step (and in-process)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--inprocess-seconds", type=float, default=1.0)
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--no-mlserver", action="store_true")
    p.add_argument("--mlserver-python", default=sys.executable,
                   help="a Python that imports mlserver (default: this one)")
    args = p.parse_args(argv)
    if os.sep in args.mlserver_python:  # MLServer runs in its own folder (not resolved: a venv)
        args.mlserver_python = os.path.abspath(args.mlserver_python)
    names = [n for n in args.models.split(",") if n]
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    run = Run(args)
    nvml = Nvml()
    run.result["gpu"] = nvml.device()
    try:
        import onnxruntime as ort

        run.result["onnxruntime"] = {"version": ort.__version__,
                                     "providers": ort.get_available_providers()}
    except Exception as exc:
        run.result["errors"].append(f"onnxruntime: {exc}")
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    logs = work / "logs"  # packed into one file beside --out at the end
    logs.mkdir(parents=True, exist_ok=True)
    kind = "KIND_GPU" if args.provider == "cuda" else "KIND_CPU"
    files = build_repository(work / "repo", names, kind)
    for name in names:
        run.result["models"][name] = {"what": MODELS[name][3], "bytes": files[name].stat().st_size,
                                      "row_shape": MODELS[name][2]}
    run.save()
    servers: list[Server] = []
    try:
        # 1. the limit, in-process
        for name in names:
            need = len(sizes) * args.inprocess_seconds * 2.6 + 5
            res = run.step(f"in-process {name}", need, lambda n=name: inprocess(
                files[n], MODELS[n][2], args.provider, sizes, args.inprocess_seconds))
            if res:
                run.result["inprocess"][name] = res
        # 2. one gateway process against MLServer, both on the GPU
        points = len(args.concurrency.split(","))
        gw1 = run.step("start gateway (1 process)", 30,
                       lambda: start_gateway(work / "repo", 1, logs, "gateway-1"))
        roles: dict[str, str] = {}
        if gw1:
            servers.append(gw1[0])
            roles[gw1[1]] = "gateway_1_process"
            run.result["memory"]["gateway_1_process"] = memory_of(nvml, gw1[0])
        mls = None
        if gw1 and not args.no_mlserver:
            mls = run.step("start MLServer", 40, lambda: start_mlserver(
                files, args.provider, args.mlserver_python, logs, work / "mlserver"))
            if mls:
                servers.append(mls[0])
                roles[mls[1]] = "mlserver"
                run.result["memory"]["mlserver"] = memory_of(nvml, mls[0])
        for name in names if gw1 else []:
            targets = 2 if mls else 1
            need = points * targets * (args.seconds + args.warmup + 1) + 10
            res = run.step(f"serving {name}", need, lambda n=name: bench(
                gw1[1], [mls[1]] if mls else [], n, args.concurrency, args,
                work / f"serving-{n}.json", nvml, roles))
            if res:
                res["limit"] = run.result["inprocess"].get(name, {}).get("limit")
                res["share_of_limit"] = share(res["rows"], res["limit"])
                run.result["serving"][name] = res
        if mls:
            mls[0].stop()
            servers.remove(mls[0])
        # 3. --workers N against one process
        if gw1 and args.workers > 1:
            gwn = run.step(f"start gateway (--workers {args.workers})", 45,
                           lambda: start_gateway(work / "repo", args.workers, logs, "gateway-n"))
            if gwn:
                servers.append(gwn[0])
                roles[gwn[1]] = f"gateway_{args.workers}_workers"
                time.sleep(1)
                run.result["memory"][f"gateway_{args.workers}_workers"] = memory_of(nvml, gwn[0])
                run.result["memory"]["gateway_1_process"] = memory_of(nvml, gw1[0])
                wpoints = len(args.workers_concurrency.split(","))
                for name in names:
                    need = wpoints * 2 * (args.seconds + args.warmup + 1) + 10
                    res = run.step(f"workers {name}", need, lambda n=name: bench(
                        gwn[1], [gw1[1]], n, args.workers_concurrency, args,
                        work / f"workers-{n}.json", nvml, roles))
                    if res:
                        res["workers"] = args.workers
                        run.result["workers"][name] = res
    finally:
        for server in servers:
            server.stop()
        run.result["gpu_after"] = {"memory_used_mib": nvml.used_mib()}
        run.save()
        with tarfile.open(run.out.parent / "gpu_bench_logs.tar.gz", "w:gz") as tar:
            tar.add(logs, arcname="gpu_bench_logs")
        shutil.rmtree(work, ignore_errors=True)
    print(f"-- wrote {run.out} ({len(run.result['errors'])} errors, "
          f"{len(run.result['skipped'])} skipped)", flush=True)
    return 1 if run.result["errors"] else 0


def share(rows: list[dict], limit: dict | None) -> list[dict]:
    if not limit or not limit.get("rows_per_s"):
        return []
    return [{"target": r["target"], "point": r["point"],
             "of_limit": round(r["rows_per_s"] / limit["rows_per_s"], 3)} for r in rows]


if __name__ == "__main__":
    raise SystemExit(main())
