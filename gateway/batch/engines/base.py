"""The engine interface: what a scoring job needs from whatever runs the model.

Two engines implement it: ``RemoteEngine`` (a running gateway or fleet over gRPC) and
``LocalEngine`` (the model in this process, loaded as ``gateway serve`` loads it). An engine
answers one request at a time; the job decides how many run at once, and retries through
``call_with_retries``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from math import prod
from typing import Protocol

import numpy as np

from gateway.batch.errors import InferenceFailure
from gateway.tensors import TensorSpec


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as a client sees it: dims exclude the batch dimension when ``max_batch_size`` > 0
    (Triton's config convention); with 0, every request is one row without a batch dimension."""

    name: str
    version: str  # the version whose config this is ("" when the server chooses per request)
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)


def describe(spec: TensorSpec) -> str:
    """``input 'x' (FP32 [32])`` for messages."""
    dims = ",".join(str(d) for d in spec.dims)
    return f"'{spec.name}' ({spec.datatype} [{dims}])"


def elements(spec: TensorSpec) -> int | None:
    """Values per row, or None when a dim is variable."""
    return None if any(d < 0 for d in spec.dims) else prod(spec.dims)


class Engine(Protocol):
    """Runs requests of one model. ``infer`` raises ``InferenceFailure`` with a status code."""

    description: str  # "gateway at host:port" or "in-process (repository DIR)"

    async def start(self) -> ModelInfo:
        """Connect or load; the model's metadata."""

    async def infer(self, inputs: dict[str, np.ndarray],
                    outputs: list[str]) -> tuple[str, list[np.ndarray]]:
        """(the version that served, one array per name in ``outputs``, batch dim first)."""

    async def close(self) -> None:
        """Release the channel or the loaded model."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter for UNAVAILABLE and RESOURCE_EXHAUSTED.

    The defaults wait about 0.2, 0.4, 0.8 ... up to 10 s between tries, about 40 s in all over
    ``attempts`` tries: long enough to ride out a replica's restart or a full queue."""

    attempts: int = 8
    base_seconds: float = 0.2
    max_seconds: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds before try ``attempt + 1`` (attempt counts from 1): half fixed, half random,
        so many clients retrying at once spread out."""
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


async def call_with_retries(call: Callable[[], Awaitable], policy: RetryPolicy,
                            on_retry: Callable[[InferenceFailure], None] | None = None):
    """``await call()``, again after a backoff while it fails with a retryable status; the
    last failure once ``policy.attempts`` tries are spent. Other failures are raised at once:
    a caller's error is never retried."""
    attempt = 1
    while True:
        try:
            return await call()
        except InferenceFailure as exc:
            if not exc.retryable or attempt >= policy.attempts:
                raise
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(policy.delay(attempt))
            attempt += 1
