"""What HTTP/REST costs against gRPC on the same gateway process, model and request, with h2load.

One gateway serves both ports; h2load replays one pre-built request at each in interleaved
rounds: gRPC as a ModelInfer over HTTP/2 (``streams`` on one connection), HTTP as the request
tritonclient.http sends by default (JSON header, binary tensor data, binary outputs) over
HTTP/1.1 (``streams`` connections, one request in flight on each: HTTP/1.1 has no streams).
Both go through the same ``DataPlane.infer``, so the difference is the protocol edge: HTTP/1.1
parsing and aiohttp against grpc.aio's HTTP/2, JSON against protobuf. Every request must have
succeeded on the gateway (its statistics), for both protocols.

    python -m bench.http_cost --model tiny_mlp --streams 1,64 --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import h2load
from bench.compare import SIZES, build_repository, cpu_seconds, free_port, request_bytes, successes
from bench.peers import start, stop


def http_request(model: str, batch: int) -> tuple[bytes, int]:
    """tritonclient.http's default body for the same input as ``request_bytes``: (body, JSON
    header length)."""
    features = SIZES[model][0]
    x = np.random.default_rng(0).standard_normal((batch, features), dtype=np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), len(header)


def run_h1(target: str, path: str, body: bytes, header_length: int, connections: int,
           seconds: float, warmup: float = 2.0) -> h2load.H2loadResult:
    """Closed-loop HTTP/1.1 load: ``connections`` requests always in flight, one per connection."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "request.bin"
        data.write_bytes(body)
        cmd = ["h2load", "--h1", f"http://{target}{path}", "-d", str(data),
               "-H", "content-type: application/octet-stream",
               "-H", f"inference-header-content-length: {header_length}",
               "-c", str(connections), "-m", "1", "-D", f"{max(1, round(seconds))}",
               "--warm-up-time", f"{max(1, round(warmup))}", "-t", "1"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = h2load.parse(out)
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if statuses and int(statuses.group(3)) + int(statuses.group(4)):
        raise RuntimeError(f"HTTP answered errors: {statuses.group(0)}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny_mlp")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--streams", default="1,64",
                        help="requests in flight, comma-separated (default 1,64)")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if not h2load.available():
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    levels = [int(s) for s in args.streams.split(",")]
    grpc_request = request_bytes(args.model, args.batch)
    body, header_length = http_request(args.model, args.batch)
    path = f"/v2/models/{args.model}/infer"
    rows: dict[tuple[str, int], list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp), args.model, args.instances)
        grpc_port, http_port = free_port(), free_port()
        gateway, _ = start([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                            "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                            "--metrics-port", "-1", "--model-repository", str(repo),
                            "--log-level", "WARNING", "--state-dir", str(Path(tmp) / "state")],
                           r"gateway ready: grpc \S+:(\d+)")
        try:
            for _ in range(args.rounds):
                for level in levels:
                    for protocol in ("grpc", "http"):
                        before = successes(grpc_port, args.model)
                        cpu_before = cpu_seconds(gateway.pid)
                        if protocol == "grpc":
                            result = h2load.run(f"127.0.0.1:{grpc_port}", grpc_request, level, 1,
                                                args.seconds)
                        else:
                            result = run_h1(f"127.0.0.1:{http_port}", path, body, header_length,
                                            level, args.seconds)
                        ok = successes(grpc_port, args.model) - before
                        if ok < result.done:
                            raise RuntimeError(f"{protocol}: {result.done - ok} requests failed")
                        # Per request the gateway served (warm-up included, as in the CPU time).
                        cpu_us = (cpu_seconds(gateway.pid) - cpu_before) * 1e6 / max(1, ok)
                        rows.setdefault((protocol, level), []).append(
                            {"rps": result.requests_per_s, "mean_ms": result.mean_ms,
                             "cpu_us": round(cpu_us, 1)})
        finally:
            stop(gateway)
    summary = {"model": args.model, "batch": args.batch, "seconds": args.seconds,
               "rounds": args.rounds, "levels": {}}
    print(f"{args.model} batch {args.batch}: HTTP/1.1 (binary tensors) vs gRPC, same gateway, "
          f"{args.rounds} rounds of {args.seconds:g}s (medians)")
    print(f"{'in flight':>9} {'protocol':>8} {'req/s':>9} {'mean ms':>8} {'CPU us/req':>10}")
    for level in levels:
        figures = {}
        for protocol in ("grpc", "http"):
            runs = rows[(protocol, level)]
            figures[protocol] = {k: statistics.median(r[k] for r in runs)
                                 for k in ("rps", "mean_ms", "cpu_us")}
            figures[protocol]["runs"] = runs
            f = figures[protocol]
            print(f"{level:>9} {protocol:>8} {f['rps']:>9.0f} {f['mean_ms']:>8.3f} "
                  f"{f['cpu_us']:>10.1f}")
        ratio = figures["http"]["rps"] / figures["grpc"]["rps"]
        figures["http_over_grpc_rps"] = round(ratio, 3)
        print(f"{level:>9} {'http/grpc':>8} {ratio:>9.2f}")
        summary["levels"][str(level)] = figures
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
