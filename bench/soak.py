"""A bounded soak test: minutes of mixed load while the gateway is reconfigured under it.

One gateway (poll mode) serves model ``soak``. Client threads send good requests (which must all
succeed: an accepted request is never lost) and bad ones (which must all get their status: see
``bad_requests``); meanwhile new versions are published into the repository (picked up by
polling, old ones retired by the version policy) and the traffic split is changed through the admin API. Every
interval it records requests, errors by status, p99 latency and the gateway's resident memory,
so a leak or a lost request shows as a trend.

    python -m bench.soak --minutes 3 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from bench.models import TINY_MLP, build_mlp, write_config
from bench.peers import start, stop
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"
CONFIG = """
max_batch_size: 16
version_policy { latest { num_versions: 2 } }
dynamic_batching { }
"""


def request(rows: int, good: bool) -> bytes:
    x = np.random.default_rng(rows).standard_normal((rows, TINY_MLP[0] if good else 7),
                                                    dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="soak", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=x.shape)],
        raw_input_contents=[x.tobytes()]).SerializeToString()


def bad_requests() -> list[tuple[bytes, str]]:
    """The bad mix, each with the status it must get: a wrong shape; sizes declared far beyond
    the bytes sent (a 2**27-element BYTES tensor, a 2**31-element FP32 one), which must be
    refused before anything is allocated; the same output asked for 1000 times; a 20 KB model
    name (echoed truncated, so the answer is NOT_FOUND, not "metadata too large"); bytes that
    do not parse as a request."""
    tensor = pb.ModelInferRequest.InferInputTensor
    wanted = pb.ModelInferRequest.InferRequestedOutputTensor
    x = np.zeros((1, TINY_MLP[0]), np.float32).tobytes()
    return [
        (request(1, False), "INVALID_ARGUMENT"),
        (pb.ModelInferRequest(model_name="soak", inputs=[tensor(
            name="input", datatype="BYTES", shape=[2**27])],
            raw_input_contents=[b""]).SerializeToString(), "INVALID_ARGUMENT"),
        (pb.ModelInferRequest(model_name="soak", inputs=[tensor(
            name="input", datatype="FP32", shape=[2**31, TINY_MLP[0]])],
            raw_input_contents=[x]).SerializeToString(), "INVALID_ARGUMENT"),
        (pb.ModelInferRequest(model_name="soak", inputs=[tensor(
            name="input", datatype="FP32", shape=[1, TINY_MLP[0]])], raw_input_contents=[x],
            outputs=[wanted(name="output")] * 1000).SerializeToString(), "INVALID_ARGUMENT"),
        (pb.ModelInferRequest(model_name="m" * 20_000, inputs=[tensor(
            name="input", datatype="FP32", shape=[1, TINY_MLP[0]])],
            raw_input_contents=[x]).SerializeToString(), "NOT_FOUND"),
        (b"\xff\x00not a protobuf message\xff", "INVALID_ARGUMENT"),
    ]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Tally:
    """Outcomes of the current interval, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.codes: Counter = Counter()
        self.latencies: list[float] = []
        self.lost = 0  # good requests that failed
        self.misjudged = 0  # bad requests not refused with their status

    def take(self):
        with self.lock:
            snapshot = (self.codes, self.latencies, self.lost, self.misjudged)
            self.reset()
        return snapshot


def client(url: str, tally: Tally, stop_at: float, bad_every: int) -> None:
    good = [request(r, True) for r in (1, 2, 4)]
    bad = bad_requests()
    with grpc.insecure_channel(url, options=[("grpc.max_send_message_length", -1)]) as channel:
        call = channel.unary_unary(INFER)
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            is_bad = n % bad_every == 0
            message, expected = bad[(n // bad_every) % len(bad)] if is_bad else (good[n % 3],
                                                                                 "OK")
            start_t = time.perf_counter()
            try:
                call(message, timeout=30)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            elapsed = time.perf_counter() - start_t
            with tally.lock:
                tally.codes[code] += 1
                if not is_bad:
                    tally.latencies.append(elapsed)
                    if code != "OK":
                        tally.lost += 1
                elif code != expected:
                    tally.misjudged += 1


def publish(repo: Path, version: int, seed: int) -> None:
    """Write a version the way a training job should: a temporary directory, then a rename."""
    tmp = repo / "soak" / f".incoming-{version}"
    tmp.mkdir()
    build_mlp(tmp / "model.onnx", TINY_MLP, seed=seed)
    os.rename(tmp, repo / "soak" / str(version))


def run(minutes: float, clients: int, interval: float, bad_every: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / "soak").mkdir()
        write_config(repo / "soak", CONFIG)
        publish(repo, 1, 1)
        publish(repo, 2, 2)
        gateway, port = start([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                               "--grpc-port", "0", "--metrics-port", "0", "--http-port", "-1",
                               "--model-repository",
                               str(repo), "--control-mode", "poll", "--poll-interval", "1",
                               "--log-level", "WARNING"], r"gateway ready: grpc \S+:(\d+)")
        url = f"127.0.0.1:{port}"
        tally = Tally()
        stop_at = time.monotonic() + minutes * 60
        threads = [threading.Thread(target=client, args=(url, tally, stop_at, bad_every),
                                    daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        rows, version, changes = [], 2, 0
        admin = grpc.insecure_channel(url).unary_unary(
            "/gateway.admin.v1.GatewayAdmin/SetTraffic",
            request_serializer=apb.SetTrafficRequest.SerializeToString,
            response_deserializer=apb.TrafficStatus.FromString)
        started = time.monotonic()
        try:
            while time.monotonic() < stop_at:
                time.sleep(interval)
                tick = len(rows)
                if tick % 3 == 2:  # a new version: the oldest of three retires (latest: 2)
                    version += 1
                    publish(repo, version, version)
                    changes += 1
                elif tick % 3 == 1:  # move the split between the two newest versions
                    share = 10 + (tick * 37) % 80
                    try:
                        admin(apb.SetTrafficRequest(model="soak", split=[
                            apb.VersionWeight(version=str(version), percent=share),
                            apb.VersionWeight(version=str(version - 1), percent=100 - share)]),
                            timeout=10)
                        changes += 1
                    except grpc.RpcError as exc:  # the older version may be retiring: fine
                        print(f"  split refused: {exc.details()}", file=sys.stderr)
                codes, latencies, lost, misjudged = tally.take()
                p99 = (float(np.percentile(latencies, 99)) * 1000) if latencies else 0.0
                row = {"t_s": round(time.monotonic() - started, 1), "requests": sum(codes.values()),
                       "codes": dict(codes), "lost": lost, "misjudged": misjudged,
                       "p99_ms": round(p99, 2), "rss_mb": round(rss_mb(gateway.pid), 1),
                       "version": version}
                rows.append(row)
                print(f"  t={row['t_s']:>6}s  {row['requests']:>6} requests  lost {lost}  "
                      f"misjudged {misjudged}  p99 {row['p99_ms']:>7} ms  RSS {row['rss_mb']} MB  "
                      f"codes {dict(codes)}", flush=True)
        finally:
            for t in threads:
                t.join(60)
            stop(gateway)
        exit_code = gateway.returncode
    rss = [r["rss_mb"] for r in rows]
    half = max(1, len(rss) // 2)
    return {
        "minutes": minutes, "clients": clients, "changes": changes, "versions_published": version,
        "requests": sum(r["requests"] for r in rows),
        "lost": sum(r["lost"] for r in rows), "misjudged": sum(r["misjudged"] for r in rows),
        "p99_ms_median": statistics.median(r["p99_ms"] for r in rows) if rows else 0.0,
        "rss_mb_first_half_max": max(rss[:half]) if rss else 0.0,
        "rss_mb_second_half_max": max(rss[half:]) if rss[half:] else 0.0,
        "gateway_exit_code": exit_code, "intervals": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds per record")
    parser.add_argument("--bad-every", type=int, default=10, help="every Nth request is bad")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    summary = run(args.minutes, args.clients, args.interval, args.bad_every)
    print(f"soak: {summary['requests']} requests over {args.minutes:g} min, "
          f"{summary['changes']} reconfigurations, {summary['versions_published']} versions; "
          f"lost {summary['lost']}, misjudged bad requests {summary['misjudged']}; "
          f"RSS max {summary['rss_mb_first_half_max']} MB (first half) -> "
          f"{summary['rss_mb_second_half_max']} MB (second half); gateway exit "
          f"{summary['gateway_exit_code']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    ok = not summary["lost"] and not summary["misjudged"] and summary["gateway_exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
