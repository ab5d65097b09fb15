"""Side-by-side throughput: the gateway against the bare grpc.aio floor, in one run, with h2load.

h2load (C) drives the most load with the least client CPU, but sees only HTTP status and mean
latency; ``python -m bench --compare floor`` measures the same pair with percentiles, errors by
gRPC status and the server's queue/compute split.

Both servers run as separate processes on this machine; h2load replays one pre-serialised
ModelInfer request at each in interleaved rounds (floor, gateway, floor, gateway ...) so drift in
machine load hits both alike. Success is checked on the gateway itself (ModelStatistics), because
h2load sees only HTTP status, not gRPC status.

    python -m bench.compare --model tiny_mlp --streams 64 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import h2load
from bench.models import HEAVY_MLP, TINY_MLP, build_mlp, write_config
from bench.peers import start, stop
from gateway.protocol.pb import grpc_service_pb2 as pb

MLP_CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
dynamic_batching {{ }}
instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]
"""
SIZES = {"tiny_mlp": TINY_MLP, "heavy_mlp": HEAVY_MLP}


def build_repository(root: Path, model: str, instances: int) -> Path:
    model_dir = root / model
    (model_dir / "1").mkdir(parents=True)
    build_mlp(model_dir / "1" / "model.onnx", SIZES[model])
    write_config(model_dir, MLP_CONFIG.format(name=model, instances=instances))
    return root


def request_bytes(model: str, batch: int) -> bytes:
    features = SIZES[model][0]
    x = np.random.default_rng(0).standard_normal((batch, features), dtype=np.float32)
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                      shape=x.shape)],
        raw_input_contents=[x.tobytes()]).SerializeToString()


def probe_all_succeed(port: int, request: bytes, count: int = 200) -> None:
    """Send ``count`` requests over fresh connections; any gRPC error fails the run."""
    import grpc

    for _ in range(count // 20):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for _ in range(20):
                call(request, timeout=10)


def free_port() -> int:
    """A port free right now (--workers needs a fixed one to share)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def successes(port: int, model: str) -> int:
    import grpc

    from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10)
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def add_load_arguments(parser: argparse.ArgumentParser, seconds: float) -> None:
    """The h2load plan shared by this comparison and ``bench.monitoring_cost``."""
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny_mlp")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each configuration")
    parser.add_argument("--instances", type=int, default=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, seconds=10)
    parser.add_argument("--gateway-arg", action="append", default=[],
                        help="extra argument for gateway serve (repeatable)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    workers = next((int(a.split("=", 1)[1]) for a in args.gateway_arg
                    if a.startswith("--workers=")), 1)
    if not h2load.available():
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp), args.model, args.instances)
        floor, floor_port = start([sys.executable, "-m", "bench.floor"], r"floor ready: grpc \S+:(\d+)")
        gateway, gw_port = start([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                                  "--grpc-port", str(free_port()), "--metrics-port", "-1",
                                  "--http-port", "-1",
                                  "--model-repository", str(repo), "--log-level", "WARNING",
                                  *args.gateway_arg], r"gateway ready: grpc \S+:(\d+)")
        try:
            request = request_bytes(args.model, args.batch)
            rows = {"floor": [], "gateway": []}
            cpu_us = {"floor": [], "gateway": []}
            for _ in range(args.rounds):
                for name, port, proc in (("floor", floor_port, floor),
                                         ("gateway", gw_port, gateway)):
                    before = successes(port, args.model) if name == "gateway" else 0
                    cpu_before = cpu_seconds(proc.pid)
                    result = h2load.run(f"127.0.0.1:{port}", request, args.streams,
                                        args.connections, args.seconds)
                    # h2load counts warm-up requests in CPU time but not in "done": approximate.
                    cpu_us[name].append(round((cpu_seconds(proc.pid) - cpu_before) * 1e6
                                              / max(1, result.done * (1 + 1 / args.seconds)), 1))
                    # With --workers each stats call reaches one worker: count errors by probing.
                    if name == "gateway" and workers > 1:
                        probe_all_succeed(port, request)
                    elif name == "gateway":
                        ok = successes(port, args.model) - before
                        if ok < result.done:
                            raise RuntimeError(f"gateway answered {result.done - ok} requests "
                                               "with a gRPC error")
                    rows[name].append(result)
        finally:
            for proc in (floor, gateway):
                stop(proc)
    floor_rps = statistics.median(r.requests_per_s for r in rows["floor"])
    gw_rps = statistics.median(r.requests_per_s for r in rows["gateway"])
    summary = {
        "model": args.model, "batch": args.batch, "streams": args.streams,
        "seconds": args.seconds, "rounds": args.rounds, "instances": args.instances,
        "floor_rps": [r.requests_per_s for r in rows["floor"]],
        "gateway_rps": [r.requests_per_s for r in rows["gateway"]],
        "floor_mean_ms": [r.mean_ms for r in rows["floor"]],
        "gateway_mean_ms": [r.mean_ms for r in rows["gateway"]],
        "ratio_median": round(gw_rps / floor_rps, 3),
        "floor_cpu_us_per_request": cpu_us["floor"],
        "gateway_cpu_us_per_request": cpu_us["gateway"],
    }
    print(f"{args.model} batch {args.batch}, {args.streams} streams, {args.rounds} rounds of "
          f"{args.seconds:g}s")
    print(f"  floor   : {floor_rps:9.0f} req/s  (rounds: "
          f"{', '.join(f'{r.requests_per_s:.0f}' for r in rows['floor'])})")
    print(f"  gateway : {gw_rps:9.0f} req/s  (rounds: "
          f"{', '.join(f'{r.requests_per_s:.0f}' for r in rows['gateway'])})")
    print(f"  ratio gateway/floor (medians): {summary['ratio_median']:.2f}")
    print(f"  server CPU per request (us): floor {cpu_us['floor']}, gateway {cpu_us['gateway']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
