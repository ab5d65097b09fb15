"""What to measure: the load points of a run and the per-step orders sent to client processes.

Kept free of grpc and of any I/O so the parent and the spawned client processes share it cheaply
(everything here pickles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
ROUTING_KEY_HEADER = "x-routing-key"


@dataclass(frozen=True)
class LoadPoint:
    """One level of load: a closed loop of ``concurrency`` users or an open loop at ``rate``/s."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.rate is None else f"{self.rate:g}/s"


@dataclass(frozen=True)
class Plan:
    """The whole run: load points, arrivals, measurement rule and request shape."""

    points: tuple[LoadPoint, ...]
    arrivals: str = "constant"  # open loop: constant or poisson
    warmup_s: float = 2.0
    window_s: float = 2.0
    stability: float = 0.10  # last three windows within +-10% of their mean
    stable_windows: int = 3
    max_windows: int = 10
    duration_s: float | None = None  # fixed time bound instead of the stability rule
    requests: int | None = None  # fixed count bound instead of the stability rule
    rounds: int = 1
    clients: int = 1
    timeout_s: float = 10.0
    max_inflight: int = 10_000  # open loop, per client process: beyond it sends fall behind
    routing_keys: int = 0
    seed: int = 0
    http_client: str = "h1"  # --protocol http: bench.httpclient.CLIENTS

    @property
    def rule(self) -> str:
        if self.requests:
            return f"count bound: {self.requests} requests"
        if self.duration_s:
            return f"time bound: {self.duration_s:g} s"
        return (f"stability: last {self.stable_windows} windows of {self.window_s:g} s within "
                f"{self.stability:.0%} (throughput, p99), at most {self.max_windows} windows")

    def windows(self) -> tuple[float, int]:
        """Window length and the most windows a step may take."""
        if self.duration_s:
            count = max(1, math.ceil(self.duration_s / self.window_s - 1e-9))
            return self.duration_s / count, count
        if self.requests:
            return self.window_s, 1_000_000
        return self.window_s, max(self.max_windows, self.stable_windows)


@dataclass
class ClientOrder:
    """One client process's share of one step (sent over a pipe, so plain data only)."""

    url: str
    requests_key: str  # the client caches request pools by key: a pool travels once
    concurrency: int = 0  # closed loop users in this process
    rate: float = 0.0  # open loop arrivals per second from this process
    phase_s: float = 0.0  # open loop, constant arrivals: offset that interleaves the processes
    arrivals: str = "constant"
    warmup_s: float = 2.0
    window_s: float = 2.0
    duration_s: float | None = None  # stop by itself after this much measuring
    quota: int | None = None  # stop by itself after this many measured completions
    timeout_s: float = 10.0
    max_inflight: int = 10_000
    routing_keys: tuple[str, ...] = ()
    offset: int = 0  # where this process starts in the request pool and key list
    token: str | None = None  # bearer token for a gateway with auth on
    tls: object = None  # gateway.tls.ClientTLS: connect over TLS (CA, client certificate)
    seed: int = 0
    protocol: str = "grpc"  # or "http": KServe V2 REST (bench.loadgen_http)
    http_client: str = "h1"  # HTTP: bench.httpclient.CLIENTS
    extra: dict = field(default_factory=dict)


def split(total: float, parts: int) -> list[float]:
    """Shares of ``total`` over ``parts`` processes; integers stay integers and sum to total."""
    if isinstance(total, int):
        return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    return [total / parts] * parts


def parse_list(text: str, kind=int) -> tuple:
    """'1,4,16' -> (1, 4, 16); rejects empty items and non-positive values."""
    values = tuple(kind(v) for v in text.split(",") if v.strip())
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive numbers, got {text!r}")
    return values
