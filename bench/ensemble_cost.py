"""What an ensemble costs against the same two models called by the client.

One gateway serves two real ONNX MLPs, ``pre`` (32 -> 128 -> 32) and ``post`` (32 -> 128 -> 4),
and the ensemble ``pipeline`` = pre then post. Closed-loop callers run, alternating for
``--rounds``, three ways of getting the same answer:

- ``ensemble``: one request to ``pipeline`` (two steps inside the gateway),
- ``client chain``: a request to ``pre``, then one to ``post`` with its answer (two round trips),
- ``one model``: a request to ``pre`` alone (the floor: one step, one round trip).

Requests per second, median latency and the gateway's CPU time per answer (from /proc) are
reported with the ratios ensemble / client chain and ensemble / one model.

    python -m bench.ensemble_cost --streams 1,64 --seconds 5 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.feedback_cost import cpu_seconds
from bench.models import build_mlp, write_config
from bench.peers import start, stop
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

WAYS = ("ensemble", "client chain", "one model")
PIPELINE = """
platform: "ensemble"
max_batch_size: 16
input [ { name: "features" data_type: TYPE_FP32 dims: [ 32 ] } ]
output [ { name: "scores" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "pre" model_version: -1
    input_map { key: "input" value: "features" } output_map { key: "output" value: "mid" } },
  { model_name: "post" model_version: -1
    input_map { key: "input" value: "mid" } output_map { key: "output" value: "scores" } } ] }
"""


def build_repository(repo: Path) -> None:
    build_mlp(repo / "pre" / "1" / "model.onnx", (32, 128, 32), seed=1)
    build_mlp(repo / "post" / "1" / "model.onnx", (32, 128, 4), seed=2)
    for name in ("pre", "post"):
        write_config(repo / name, "max_batch_size: 16\ndynamic_batching { }")
    (repo / "pipeline" / "1").mkdir(parents=True)
    write_config(repo / "pipeline", PIPELINE)


def request(model: str, input_name: str, data: bytes) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name=input_name, datatype="FP32",
                                                   shape=[1, 32])
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[data])


async def load(url: str, way: str, streams: int, seconds: float) -> list[float]:
    """Latencies (seconds) of every answer the callers got in ``seconds``."""
    x = np.random.default_rng(0).standard_normal((1, 32), dtype=np.float32).tobytes()
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(url) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        stop_at = time.monotonic() + seconds

        async def caller():
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                if way == "ensemble":
                    await infer(request("pipeline", "features", x), timeout=30)
                elif way == "one model":
                    await infer(request("pre", "input", x), timeout=30)
                else:
                    mid = await infer(request("pre", "input", x), timeout=30)
                    await infer(request("post", "input", mid.raw_output_contents[0]),
                                timeout=30)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(caller() for _ in range(streams)))
    return latencies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,64", help="comma-separated caller counts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    report = {"seconds": args.seconds, "rounds": args.rounds, "points": []}
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as tmp:
        repo = Path(tmp) / "repo"
        build_repository(repo)
        gateway, port = start([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                               "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1",
                               "--model-repository", str(repo), "--state-dir",
                               str(Path(tmp) / "state"), "--log-level", "WARNING"],
                              r"gateway ready: grpc \S+:(\d+)")
        url = f"127.0.0.1:{port}"
        try:
            for way in WAYS:  # warm up every path
                asyncio.run(load(url, way, 4, 1.0))
            for n in streams:
                rows: dict[str, list] = {way: [] for way in WAYS}
                for r in range(args.rounds):
                    order = WAYS if r % 2 == 0 else tuple(reversed(WAYS))
                    for way in order:
                        before = cpu_seconds(gateway.pid)
                        latencies = asyncio.run(load(url, way, n, args.seconds))
                        cpu = cpu_seconds(gateway.pid) - before
                        rows[way].append((len(latencies) / args.seconds,
                                          statistics.median(latencies) * 1e3,
                                          cpu / len(latencies) * 1e6))
                point = {"streams": n}
                for way, values in rows.items():
                    point[way] = {"answers_per_s": round(statistics.median(v[0] for v in values)),
                                  "p50_ms": round(statistics.median(v[1] for v in values), 3),
                                  "gateway_cpu_us_per_answer":
                                      round(statistics.median(v[2] for v in values), 1)}
                ens, chain, one = (point[w] for w in WAYS)
                point["ensemble_over_client_chain"] = round(
                    ens["answers_per_s"] / chain["answers_per_s"], 2)
                point["ensemble_over_one_model"] = round(
                    ens["answers_per_s"] / one["answers_per_s"], 2)
                report["points"].append(point)
        finally:
            stop(gateway)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
