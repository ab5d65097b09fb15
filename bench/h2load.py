"""Drive a KServe V2 ModelInfer endpoint with h2load, the C HTTP/2 load generator.

One pre-serialised gRPC request is replayed over ``--streams`` concurrent HTTP/2 streams, so the
client costs next to nothing and the server is what gets measured. h2load counts HTTP status
only; gRPC errors travel in trailers, so callers check success on the server side
(ModelStatistics) as ``bench.compare`` does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PATH = "/inference.GRPCInferenceService/ModelInfer"


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class H2loadResult:
    requests_per_s: float
    done: int
    succeeded: int
    failed: int
    errored: int
    mean_ms: float
    max_ms: float


def available() -> bool:
    return shutil.which("h2load") is not None


def run(target: str, request: bytes, streams: int = 64, connections: int = 1,
        seconds: float = 10.0, warmup: float = 2.0, cpu: int | None = None) -> H2loadResult:
    """Closed-loop load: ``connections`` x (streams / connections) requests always in flight."""
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "request.bin"
        body.write_bytes(grpc_frame(request))
        cmd = ["h2load", f"http://{target}{PATH}", "-d", str(body),
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               "-c", str(connections), "-m", str(max(1, streams // connections)),
               "-D", f"{max(1, round(seconds))}", "--warm-up-time", f"{max(1, round(warmup))}", "-t", "1"]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return parse(out)


def parse(text: str) -> H2loadResult:
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text).group(1))
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored", text)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
    return H2loadResult(rps, int(m.group(2)), int(m.group(3)), int(m.group(4)),
                        int(m.group(5)), _ms(lat.group(3)), _ms(lat.group(2)))


def _ms(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group(0))
    if text.endswith("us"):
        return value / 1000
    if text.endswith("ms"):
        return value
    return value * 1000
