"""KServe V2 protobuf <-> core types. The only place tensors cross the protocol boundary.

Decoding reads every protobuf bytes field once (each read copies) and views raw contents with
``np.frombuffer``; encoding answers with ``raw_output_contents`` only. Every size the client
states is checked against the bytes it actually sent before anything is allocated.
"""

from __future__ import annotations

import struct
from math import prod

import numpy as np

from gateway.errors import InvalidArgument
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.tensors import DATATYPE_TO_DTYPE, InferRequest, InferResponse, Tensor

MAX_ELEMENTS = 1 << 31  # per tensor; well above any message gRPC lets through
MAX_DIMS = 32  # numpy 1.x's limit (2.x allows 64); no model has more

# KServe datatype -> the typed contents field that may carry it (FP16 has none).
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")


def decode_request(msg: pb.ModelInferRequest, routing_key: str | None = None,
                   deadline_ns: int = 0) -> InferRequest:
    """A ModelInferRequest as a core InferRequest, or InvalidArgument saying what is wrong."""
    raw = msg.raw_input_contents
    inputs_pb = msg.inputs
    if raw and len(raw) != len(inputs_pb):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(inputs_pb)} inputs")
    inputs = []
    for index, tensor in enumerate(inputs_pb):
        name = tensor.name
        datatype = tensor.datatype
        dtype = DATATYPE_TO_DTYPE.get(datatype)
        if dtype is None:
            raise InvalidArgument(f"input '{name}' has unsupported datatype {datatype!r}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input '{name}' has a negative dimension in shape {list(shape)}")
        if len(shape) > MAX_DIMS:
            raise InvalidArgument(
                f"input '{name}' has {len(shape)} dimensions; the limit is {MAX_DIMS}")
        count = prod(shape)
        # Zero-size tensors too: numpy refuses shapes whose non-zero dims overflow its size.
        if prod(d for d in shape if d) > MAX_ELEMENTS:
            raise InvalidArgument(
                f"input '{name}' shape {list(shape)} is too large; the limit is {MAX_ELEMENTS} "
                "elements")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input '{name}' has typed contents but the request also uses "
                    "raw_input_contents; use one or the other")
            data = _from_raw(name, datatype, dtype, shape, count, raw[index])
        else:
            data = _from_typed(name, datatype, dtype, shape, count, tensor)
        inputs.append(Tensor(name, datatype, data))
    priority, timeout_us = 0, 0
    if msg.parameters:
        params = msg.parameters
        priority = _int_param(params, "priority")
        timeout_us = _int_param(params, "timeout")
        if "routing_key" in params and routing_key is None:
            routing_key = params["routing_key"].string_param or None
    outputs = []
    for out in msg.outputs:
        if out.parameters and "classification" in out.parameters:
            raise InvalidArgument(
                f"output '{out.name}': the classification extension is not supported")
        outputs.append(out.name)
    return InferRequest(msg.model_name, msg.model_version, msg.id, inputs, outputs, routing_key,
                        priority, timeout_us, deadline_ns)


def _int_param(params, key: str) -> int:
    if key not in params:
        return 0
    param = params[key]
    which = param.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"request parameter '{key}' must be an integer")
    value = getattr(param, which)
    if value < 0:
        raise InvalidArgument(f"request parameter '{key}' must not be negative")
    return value


def _from_raw(name: str, datatype: str, dtype: np.dtype, shape, count: int,
              data: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return _split_bytes(name, data, count).reshape(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input '{name}': shape {list(shape)} of {datatype} needs {expected} bytes but "
            f"{len(data)} were sent")
    array = np.frombuffer(data, dtype=dtype)
    if datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        raise InvalidArgument(f"input '{name}': BOOL bytes must be 0 or 1")
    return array.reshape(shape)


def _split_bytes(name: str, data: bytes, count: int) -> np.ndarray:
    """Raw BYTES: each element is a 4-byte little-endian length and then that many bytes."""
    out = np.empty(count, dtype=object)
    offset, end = 0, len(data)
    for i in range(count):
        if offset + 4 > end:
            raise InvalidArgument(f"input '{name}': raw BYTES data ends after {i} of {count} elements")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > end:
            raise InvalidArgument(f"input '{name}': raw BYTES element {i} claims {length} bytes, "
                                  f"only {end - offset} remain")
        out[i] = data[offset:offset + length]
        offset += length
    if offset != end:
        raise InvalidArgument(f"input '{name}': {end - offset} bytes left after {count} BYTES elements")
    return out


def _from_typed(name: str, datatype: str, dtype: np.dtype, shape, count: int,
                tensor) -> np.ndarray:
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"input '{name}': {datatype} has no typed contents field; send it "
                              "in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': shape {list(shape)} needs {count} values but "
                              f"{len(values)} were sent in contents.{field}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.array(values, dtype=_WIDE[field])
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"input '{name}': a value does not fit in {datatype}")
    return wide.astype(dtype, copy=False).reshape(shape)


_WIDE = {"bool_contents": np.bool_, "int_contents": np.int64, "int64_contents": np.int64,
         "uint_contents": np.uint64, "uint64_contents": np.uint64,
         "fp32_contents": np.float32, "fp64_contents": np.float64}


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """A core InferResponse as a ModelInferResponse with raw output contents."""
    tensors = []
    raw = []
    for t in response.outputs:
        tensors.append(pb.ModelInferResponse.InferOutputTensor(
            name=t.name, datatype=t.datatype, shape=t.data.shape))
        raw.append(_join_bytes(t.data) if t.datatype == "BYTES" else t.data.tobytes())
    return pb.ModelInferResponse(model_name=response.model, model_version=response.version,
                                 id=response.id, outputs=tensors, raw_output_contents=raw)


def _join_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        value = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)
