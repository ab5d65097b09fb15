"""Requests for the load: tensors from the model's metadata (random or zero data of the right
datatype and shape) or from a .npy/.npz file, serialised once into ModelInferRequest bytes (gRPC)
or KServe V2 REST bodies (HTTP: Triton's binary tensor data, as tritonclient.http sends by
default, or plain JSON).

Serialising up front keeps the client loop to "send these bytes"; a small pool of distinct
requests (not one) keeps a server from answering from a cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from gateway.protocol.pb import grpc_service_pb2 as pb

DTYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
INT_HIGH = 10  # random integers fall in [0, 10): safe as indices, counts and labels


class InputError(ValueError):
    """The requests cannot be built (unknown shape, file that does not fit the model)."""


@dataclass
class Inputs:
    """A pool of distinct requests' tensors (name -> array) and how they were made."""

    pool: list[dict[str, np.ndarray]]
    datatypes: dict[str, str]
    batch_size: int
    source: str

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(array.shape) for name, array in self.pool[0].items()}


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    for name, dtype in DTYPES.items():
        if dtype == array.dtype:
            return name
    raise InputError(f"no KServe V2 datatype for numpy {array.dtype}")


def _specs(metadata, max_batch_size: int | None, shapes: dict[str, list[int]]):
    """[(name, datatype, dims without batch)], and whether the model takes a batch dimension."""
    first = [list(t.shape) for t in metadata.inputs]
    if max_batch_size is None:  # no ModelConfig (MLServer): a leading -1 means batch
        batching = all(s and s[0] == -1 for s in first)
    else:
        batching = max_batch_size > 0
    specs = []
    for tensor, shape in zip(metadata.inputs, first):
        dims = shape[1:] if batching else shape
        if tensor.name in shapes:
            dims = shapes[tensor.name]
        if any(d < 0 for d in dims):
            raise InputError(f"input {tensor.name!r} has variable dimensions {shape}: give them "
                             f"with --shape {tensor.name}:D1,D2,...")
        specs.append((tensor.name, tensor.datatype, dims))
    return specs, batching


def _random(datatype: str, shape: list[int], rng: np.random.Generator, zero: bool) -> np.ndarray:
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InputError(f"datatype {datatype} is not supported")
    if datatype == "BYTES":
        words = [b"" if zero else bytes(rng.integers(97, 123, 8, dtype=np.uint8))
                 for _ in range(int(np.prod(shape)))]
        array = np.empty(len(words), dtype=object)
        array[:] = words
        return array.reshape(shape)
    if zero:
        return np.zeros(shape, dtype)
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, INT_HIGH, shape).astype(dtype)


def from_metadata(metadata, max_batch_size: int | None, batch_size: int, zero: bool = False,
                  shapes: dict | None = None, pool: int = 16, seed: int = 0) -> Inputs:
    specs, batching = _specs(metadata, max_batch_size, shapes or {})
    if not batching and batch_size != 1:
        raise InputError(f"model {metadata.name!r} takes no batch dimension: "
                         "--batch-size must be 1")
    if batching and max_batch_size and batch_size > max_batch_size:
        raise InputError(f"--batch-size {batch_size} exceeds the model's max_batch_size "
                         f"{max_batch_size}")
    rng = np.random.default_rng(seed)
    lead = [batch_size] if batching else []
    requests = [{name: _random(dt, lead + list(dims), rng, zero) for name, dt, dims in specs}
                for _ in range(1 if zero else pool)]
    return Inputs(requests, {name: dt for name, dt, _ in specs}, batch_size,
                  "zeros" if zero else f"random ({pool} distinct requests)")


def from_file(path: Path, metadata, max_batch_size: int | None, batch_size: int,
              pool: int = 16) -> Inputs:
    """Tensors from ``path``: .npz keyed by input name, or .npy for a model with one input.

    When the model batches (or nothing says otherwise), the first axis holds samples and each
    request takes the next ``batch_size`` of them, wrapping around; else arrays go as they are.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    else:
        array = np.load(path, allow_pickle=False)
        if metadata is None or len(metadata.inputs) != 1:
            raise InputError(f"{path.name}: a .npy file feeds a model with exactly one known "
                             "input; use .npz keyed by input name")
        arrays = {metadata.inputs[0].name: array}
    datatypes = {name: datatype_of(a) for name, a in arrays.items()}
    batching = True
    if metadata is not None:
        known = {t.name: t for t in metadata.inputs}
        missing = set(known) - set(arrays)
        if missing:
            raise InputError(f"{path.name} lacks input(s) {sorted(missing)}")
        arrays = {name: arrays[name].astype(DTYPES[known[name].datatype], copy=False)
                  if known[name].datatype != "BYTES" else arrays[name] for name in known}
        datatypes = {name: known[name].datatype for name in known}
        _, batching = _specs(metadata, max_batch_size, {n: list(a.shape[1:])
                                                        for n, a in arrays.items()})
    if not batching:
        return Inputs([arrays], datatypes, 1, f"{path.name} (as is)")
    rows = min(len(a) for a in arrays.values())
    if rows == 0:
        raise InputError(f"{path.name} holds no samples")
    count = max(1, min(pool, rows // batch_size)) if rows >= batch_size else 1
    requests = []
    for r in range(count):
        index = (np.arange(batch_size) + r * batch_size) % rows
        requests.append({name: a[index] for name, a in arrays.items()})
    return Inputs(requests, datatypes, batch_size, f"{path.name} ({count} distinct requests)")


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in
                        (v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()))
    return np.ascontiguousarray(array).tobytes()


def serialise(inputs: Inputs, model: str, version: str = "") -> list[bytes]:
    """One ModelInferRequest (raw_input_contents) per pool entry, as bytes."""
    out = []
    for tensors in inputs.pool:
        names = list(tensors)
        out.append(pb.ModelInferRequest(
            model_name=model, model_version=version,
            inputs=[pb.ModelInferRequest.InferInputTensor(
                name=n, datatype=inputs.datatypes[n], shape=tensors[n].shape) for n in names],
            raw_input_contents=[_raw(tensors[n], inputs.datatypes[n]) for n in names],
        ).SerializeToString())
    return out


@dataclass(frozen=True)
class HttpRequest:
    """One REST inference request: its path, body and, for binary tensor data, the length of the
    body's JSON part (the ``Inference-Header-Content-Length`` header; None for plain JSON)."""

    path: str
    body: bytes
    json_length: int | None = None

    @property
    def content_type(self) -> str:
        return "application/json" if self.json_length is None else "application/octet-stream"


def infer_path(model: str, version: str = "") -> str:
    """``/v2/models/{m}[/versions/{v}]/infer``, the names quoted as tritonclient.http does."""
    name = quote(model, safe="")
    if version:
        return f"/v2/models/{name}/versions/{quote(version, safe='')}/infer"
    return f"/v2/models/{name}/infer"


def _json_data(array: np.ndarray, datatype: str) -> list:
    """Flat row-major values for JSON ``data`` (BYTES as text, as tritonclient.http sends it)."""
    if datatype == "BYTES":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return array.ravel().tolist()


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def serialise_http(inputs: Inputs, model: str, version: str = "",
                   binary: bool = True) -> list[HttpRequest]:
    """One REST request per pool entry.

    ``binary`` (tritonclient.http's default): a JSON header whose inputs carry
    ``binary_data_size``, then each input's raw bytes in order (BYTES as 4-byte length + data
    per element), and ``binary_data_output`` so outputs come back as binary data too. Otherwise
    plain JSON both ways (``data`` lists; what servers without the extension, MLServer, take).
    """
    path = infer_path(model, version)
    out = []
    for tensors in inputs.pool:
        header: dict = {"inputs": []}
        raw = []
        for name, array in tensors.items():
            datatype = inputs.datatypes[name]
            entry = {"name": name, "shape": list(array.shape), "datatype": datatype}
            if binary:
                data = _raw(array, datatype)
                entry["parameters"] = {"binary_data_size": len(data)}
                raw.append(data)
            else:
                try:
                    entry["data"] = _json_data(array, datatype)
                except UnicodeDecodeError:
                    raise InputError(f"input {name!r} holds bytes that are not UTF-8 text: JSON "
                                     "cannot carry them; use binary data") from None
            header["inputs"].append(entry)
        if binary:
            header["parameters"] = {"binary_data_output": True}
            head = _dumps(header).encode()
            out.append(HttpRequest(path, b"".join([head, *raw]), len(head)))
        else:
            out.append(HttpRequest(path, _dumps(header).encode()))
    return out
