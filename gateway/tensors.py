"""Protocol-free tensor and request types shared by the data plane, batcher and runtimes.

KServe V2 names datatypes with strings (``FP32``, ``BYTES`` ...); the core keeps those names and
holds values as numpy arrays. ``BYTES`` tensors are numpy object arrays of ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Defined with the runtimes (which import nothing of gateway/), used across the core.
from runtimes.base import TensorSpec  # noqa: F401

# KServe V2 datatype name -> numpy dtype (little-endian, as on the wire). BYTES has no fixed size.
DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
DTYPE_TO_DATATYPE: dict[np.dtype, str] = {
    dtype: name for name, dtype in DATATYPE_TO_DTYPE.items() if name != "BYTES"
}
DTYPE_TO_DATATYPE[np.dtype(np.bytes_)] = "BYTES"
DATATYPES = frozenset(DATATYPE_TO_DTYPE)


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype name of a numpy array (object and bytes_ arrays are BYTES)."""
    dtype = array.dtype
    if dtype.kind in ("O", "S"):
        return "BYTES"
    try:
        return DTYPE_TO_DATATYPE[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {dtype} has no KServe datatype") from None


@dataclass(slots=True)
class Tensor:
    """A named tensor value; ``data`` already has the tensor's full shape."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


@dataclass(slots=True)
class InferRequest:
    """One inference call as the core sees it, after decoding at the protocol edge."""

    model: str
    version: str  # "" lets the traffic policy choose
    id: str
    inputs: list[Tensor]
    outputs: list[str] = field(default_factory=list)  # requested output names; empty = all
    routing_key: str | None = None
    priority: int = 0  # 0 = the model's default level
    timeout_us: int = 0  # 0 = the model's default queue timeout
    deadline_ns: int = 0  # absolute time.monotonic_ns() after which the caller has gone; 0 = none
    # Triton's classification extension: output name -> top-k classes asked for it (None: none,
    # so a request allocates nothing for it)
    classification: dict[str, int] | None = None


@dataclass(slots=True)
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[Tensor]
