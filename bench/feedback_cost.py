"""What keeping predictions for feedback costs on the serving path.

One gateway serves the same ONNX file as two models: ``fb`` (``feedback: {}`` in its
gateway.yaml, so every request with an id has its prediction recorded and sent to the fleet's
prediction table) and ``plain`` (feedback off). Closed-loop callers send requests with unique
ids to one model, then the other, alternating for ``--rounds``; the gateway's CPU time per
request comes from /proc. The ratio of the two is the cost of the feedback path.

    python -m bench.feedback_cost --streams 16 --seconds 5 --rounds 4
    python -m bench.feedback_cost --state-url redis://127.0.0.1:6379/0   # the Redis table
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.models import TINY_MLP, build_mlp, write_config
from bench.peers import start, stop
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, model: str, streams: int, seconds: float, prefix: str) -> int:
    x = np.random.default_rng(0).standard_normal((1, TINY_MLP[0]), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 32])
    done = 0
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stop_at = time.monotonic() + seconds

        async def caller(k):
            nonlocal done
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                await stub.ModelInfer(pb.ModelInferRequest(
                    model_name=model, id=f"{prefix}-{k}-{n}", inputs=[tensor],
                    raw_input_contents=[x.tobytes()]), timeout=30)
                done += 1

        await asyncio.gather(*(caller(k) for k in range(streams)))
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--state-url", default="", help="the state store (default: file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        repo = Path(tmp) / "repo"
        for name in ("fb", "plain"):
            build_mlp(repo / name / "1" / "model.onnx", TINY_MLP, seed=1)
            write_config(repo / name, "max_batch_size: 16\ndynamic_batching { }")
        (repo / "fb" / "gateway.yaml").write_text("feedback: {}\n")
        extra = ["--state-url", args.state_url] if args.state_url else []
        gateway, port = start([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                               "--grpc-port", "0", "--metrics-port", "0", "--http-port", "-1",
                               "--model-repository", str(repo), "--state-dir",
                               str(Path(tmp) / "state"), "--log-level", "WARNING", *extra],
                              r"gateway ready: grpc \S+:(\d+)")
        url = f"127.0.0.1:{port}"
        try:
            for model in ("fb", "plain"):  # warm up both
                asyncio.run(load(url, model, args.streams, 1.0, "warm"))
            results: dict[str, list] = {"fb": [], "plain": []}
            for r in range(args.rounds):
                for model in ("plain", "fb") if r % 2 else ("fb", "plain"):
                    before = cpu_seconds(gateway.pid)
                    count = asyncio.run(load(url, model, args.streams, args.seconds,
                                             f"r{r}"))
                    cpu = cpu_seconds(gateway.pid) - before
                    results[model].append((count / args.seconds, cpu / count * 1e6))
        finally:
            stop(gateway)
    summary = {m: {"req_per_s": round(statistics.median(v[0] for v in rows), 1),
                   "cpu_us_per_request": round(statistics.median(v[1] for v in rows), 1)}
               for m, rows in results.items()}
    summary["ratio_req_per_s_fb_over_plain"] = round(
        summary["fb"]["req_per_s"] / summary["plain"]["req_per_s"], 3)
    summary["ratio_cpu_fb_over_plain"] = round(
        summary["fb"]["cpu_us_per_request"] / summary["plain"]["cpu_us_per_request"], 3)
    print(json.dumps({"streams": args.streams, "seconds": args.seconds, "rounds": args.rounds,
                      "store": args.state_url or "file", **summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
