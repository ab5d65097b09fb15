"""The runtime interface: what the batcher needs from one loaded model instance.

A runtime is one executable copy of a model on one device. ``run`` is blocking and is called
from a worker thread, never from the event loop; implementations must release the GIL while the
model computes (ONNX Runtime does). Everything else about the model (names, types, dims) is
reported once, at load, as ``ModelIO``.

This package imports nothing from ``gateway/``: the tensor spec and the load error it needs are
defined here, and the gateway re-exports them (``gateway.tensors``, ``gateway.errors``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(slots=True)
class TensorSpec:
    """A declared model input or output: name, datatype and dims (-1 = variable).

    ``datatype`` is a KServe V2 name (``FP32``, ``BYTES`` ...). For batching models ``dims``
    excludes the batch dimension, as in Triton's config.pbtxt.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None  # the shape the model sees, when it differs from dims


class ModelLoadError(Exception):
    """A model version could not be loaded; the reason is shown in RepositoryIndex."""


class ExecutionError(Exception):
    """The model failed on a batch; the message is safe to show a caller (no paths)."""


@dataclass(slots=True)
class ModelIO:
    """Inputs and outputs as the model file declares them; dims include the batch dim.

    ``unsupported_outputs`` are outputs the runtime cannot return as tensors (sequences, maps).
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    unsupported_outputs: dict[str, str] = field(default_factory=dict)  # name -> type text


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    device: str = "cpu"  # "cpu" or "gpu"
    device_id: int = 0
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    parameters: tuple[tuple[str, str], ...] = ()  # config.pbtxt parameters, passed through


class Runtime(Protocol):
    io: ModelIO
    device: str

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        """Execute once; ``output_names`` must all be tensor outputs.

        Raises ``ExecutionError`` when the model fails on these inputs.
        """

    def close(self) -> None:
        """Release the session and its memory."""
