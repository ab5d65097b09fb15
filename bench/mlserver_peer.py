"""Serve an ONNX file with Seldon MLServer (adaptive batching on), as a peer to compare with.

MLServer pins versions that conflict with ours, so it runs from its own virtual environment,
``bench/.mlserver-venv`` (git-ignored), created on first use. The model goes through
``bench/mlserver_runtime.py`` (onnxruntime, one intra-op thread), the same file as the gateway.

    python -m bench.mlserver_peer --model-file gateway/demo_repository/tiny_mlp/1/model.onnx \\
        --name tiny_mlp               # serves until Ctrl-C, prints its gRPC and REST addresses
    python -m bench --model tiny_mlp --compare mlserver --model-file ...   # all in one command
    python -m bench --protocol http --http-data json ... --compare mlserver   # its REST port
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from bench.peers import start, stop

HERE = Path(__file__).resolve().parent
VENV = HERE / ".mlserver-venv"
REQUIREMENTS = ["mlserver==1.7.*", "onnxruntime", "numpy"]


def ensure_venv(venv: Path = VENV) -> Path:
    """The ``mlserver`` executable, installing MLServer into ``venv`` the first time."""
    exe = venv / "bin" / "mlserver"
    if not exe.exists():
        print(f"creating {venv} for MLServer (first use only) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *REQUIREMENTS],
                       check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_settings(folder: Path, model_file: Path, name: str, grpc_port: int,
                   max_batch_size: int, max_batch_time: float, parallel_workers: int,
                   http_port: int = 0) -> None:
    """settings.json (server) and model-settings.json (the model) in MLServer's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "grpc_port": grpc_port,
        "http_port": http_port or free_port(),
        "metrics_port": free_port(), "parallel_workers": parallel_workers,
        "load_models_at_startup": True}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": name, "implementation": "mlserver_runtime.OnnxModel",
        "max_batch_size": max_batch_size, "max_batch_time": max_batch_time,
        "parameters": {"uri": str(Path(model_file).resolve()), "version": "1"}}))


@contextmanager
def serve(model_file, name: str, grpc_port: int = 0, max_batch_size: int = 64,
          max_batch_time: float = 0.001, parallel_workers: int = 0, threads: int = 1,
          timeout: float = 180, http_port: int = 0):
    """Run MLServer on ``model_file`` until the block ends; yields its addresses,
    ``{"grpc": HOST:PORT, "http": HOST:PORT}`` (the same server, model and batching behind
    both: MLServer's REST API is FastAPI under uvicorn, in the same process)."""
    exe = ensure_venv()
    grpc_port = grpc_port or free_port()
    http_port = http_port or free_port()
    with tempfile.TemporaryDirectory(prefix="mlserver-peer-") as tmp:
        write_settings(Path(tmp), Path(model_file), name, grpc_port, max_batch_size,
                       max_batch_time, parallel_workers, http_port)
        env = {**os.environ, "PYTHONPATH": str(HERE), "BENCH_ORT_THREADS": str(threads),
               "VIRTUAL_ENV": str(VENV)}
        env.pop("PYTHONHOME", None)
        proc, port = start([str(exe), "start", tmp], r"gRPC server running on \S+:(\d+)",
                           timeout=timeout, env=env, cwd=tmp)
        try:
            _wait_model(f"127.0.0.1:{port}", name, timeout)
            _wait_http(f"127.0.0.1:{http_port}", name, timeout)
            yield {"grpc": f"127.0.0.1:{port}", "http": f"127.0.0.1:{http_port}"}
        finally:
            stop(proc)


def _wait_http(url: str, name: str, timeout: float) -> None:
    """MLServer's REST server (uvicorn) may start after its gRPC server."""
    import http.client
    import time
    from urllib.parse import quote

    host, _, port = url.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", f"/v2/models/{quote(name, safe='')}/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError(f"MLServer's REST port {url} did not answer in {timeout:.0f} s")


def _wait_model(url: str, name: str, timeout: float) -> None:
    """MLServer opens its port before its models finish loading."""
    import time

    import grpc

    from gateway.protocol.pb import grpc_service_pb2 as pb
    from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"MLServer did not load {name!r} in {timeout:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-file", type=Path, required=True)
    parser.add_argument("--name", required=True, help="model name to serve it under")
    parser.add_argument("--grpc-port", type=int, default=0, help="default: any free port")
    parser.add_argument("--http-port", type=int, default=0,
                        help="REST (KServe V2 HTTP) port; default: any free port")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-batch-time", type=float, default=0.001, help="seconds")
    parser.add_argument("--parallel-workers", type=int, default=0,
                        help="MLServer inference processes (0: in the server process)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    with serve(args.model_file, args.name, args.grpc_port, args.max_batch_size,
               args.max_batch_time, args.parallel_workers, args.threads,
               http_port=args.http_port) as urls:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        print(f"mlserver ready: grpc {urls['grpc']} http {urls['http']}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
