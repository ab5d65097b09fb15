"""KServe V2 protobuf <-> core types. The only place tensors cross the protocol boundary.

Decoding reads every protobuf bytes field once (each read copies) and views raw contents with
``np.frombuffer``; encoding answers with ``raw_output_contents`` only. Every size the client
states is checked against the bytes it actually sent, and against the per-request element cap,
before anything is allocated: a request can never make the server hold more than a small
multiple of what it sent. Every caller's string a message repeats goes through ``echo``.
"""

from __future__ import annotations

import struct
from math import prod

import numpy as np

from gateway.errors import InvalidArgument, ResourceExhausted, echo
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.tensors import DATATYPE_TO_DTYPE, InferRequest, InferResponse, Tensor

MAX_ELEMENTS = 1 << 31  # per tensor; well above any message gRPC lets through
MAX_DIMS = 32  # numpy 1.x's limit (2.x allows 64); no model has more
# Per request: elements decoded one by one into Python objects (BYTES strings, typed
# ``contents`` values), in all inputs together. Each costs ~100 bytes of server memory and
# ~0.3 us of event-loop time, against as little as 1 byte on the wire; raw numeric contents are
# viewed in place (no cost per element) and are bounded by the bytes sent alone.
MAX_DECODED_ELEMENTS = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # the server's default gRPC send/receive limit
MAX_TENSORS = 4096  # inputs, and requested outputs, of one request (no model has nearly as many)

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
    if len(inputs_pb) > MAX_TENSORS:
        raise InvalidArgument(
            f"the request has {len(inputs_pb)} inputs; the limit is {MAX_TENSORS}")
    if raw and len(raw) != len(inputs_pb):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(inputs_pb)} inputs")
    inputs = []
    decoded = 0  # elements decoded one by one so far (see MAX_DECODED_ELEMENTS)
    for index, tensor in enumerate(inputs_pb):
        name = tensor.name
        datatype = tensor.datatype
        dtype = DATATYPE_TO_DTYPE.get(datatype)
        if dtype is None:
            raise InvalidArgument(
                f"input '{echo(name)}' has unsupported datatype '{echo(datatype)}'")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(
                f"input '{echo(name)}' has a negative dimension in shape {list(shape)}")
        if len(shape) > MAX_DIMS:
            raise InvalidArgument(
                f"input '{echo(name)}' has {len(shape)} dimensions; the limit is {MAX_DIMS}")
        count = prod(shape)
        # Zero-size tensors too: numpy refuses shapes whose non-zero dims overflow its size.
        if prod(d for d in shape if d) > MAX_ELEMENTS:
            raise InvalidArgument(
                f"input '{echo(name)}' shape {list(shape)} is too large; the limit is "
                f"{MAX_ELEMENTS} elements")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input '{echo(name)}' has typed contents but the request also uses "
                    "raw_input_contents; use one or the other")
            data = raw[index]
            if datatype == "BYTES":
                # Each element takes at least its 4-byte length: an O(1) check of the stated
                # count against the bytes present comes before the cap and any allocation.
                if 4 * count > len(data):
                    raise InvalidArgument(
                        f"expected {count} string elements for inference input '{echo(name)}' "
                        f"for model '{echo(msg.model_name)}', got {len(data)} bytes, which hold "
                        f"at most {len(data) // 4}")
                decoded = _count_decoded(name, decoded, count)
                array = _split_bytes(name, msg.model_name, data, count).reshape(shape)
            else:
                array = _from_raw(name, datatype, dtype, shape, count, data)
        else:
            field = TYPED_FIELD.get(datatype)
            if field is None:
                raise InvalidArgument(f"input '{echo(name)}': {datatype} has no typed contents "
                                      "field; send it in raw_input_contents")
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise InvalidArgument(
                    f"input '{echo(name)}': shape {list(shape)} needs {count} values but "
                    f"{len(values)} were sent in contents.{field}")
            decoded = _count_decoded(name, decoded, count)
            array = _from_typed(name, datatype, dtype, shape, count, field, values)
        inputs.append(Tensor(name, datatype, array))
    priority, timeout_us = 0, 0
    if msg.parameters:
        params = msg.parameters
        priority = _int_param(params, "priority")
        timeout_us = _int_param(params, "timeout")
        if "routing_key" in params and routing_key is None:
            routing_key = params["routing_key"].string_param or None
    outputs = []
    classes = None  # allocated only for a request that uses the extension
    if msg.outputs:
        # Refused at the first repeat, before touching the rest: each output's parameters map
        # costs ~350 bytes once looked at (200,000 repeats of one name took 70 MB).
        seen = set()
        for out in msg.outputs:
            name = out.name
            if name in seen:
                raise InvalidArgument(f"output '{echo(name)}' already exists in request")
            seen.add(name)
            if len(outputs) == MAX_TENSORS:
                raise InvalidArgument(f"the request asks for {len(msg.outputs)} outputs; the "
                                      f"limit is {MAX_TENSORS}")
            if out.parameters and "classification" in out.parameters:
                classes = classes or {}
                classes[name] = class_count(name, out.parameters["classification"].int64_param)
            outputs.append(name)
    return InferRequest(msg.model_name, msg.model_version, msg.id, inputs, outputs, routing_key,
                        priority, timeout_us, deadline_ns, classes)


def class_count(name: str, count) -> int:
    """The ``classification`` parameter of a requested output: how many top classes."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgument(f"output '{echo(name)}': the classification parameter must be a "
                              f"positive integer (the number of top classes), got {count!r}")
    return count


def _count_decoded(name: str, decoded: int, count: int) -> int:
    decoded += count
    if decoded > MAX_DECODED_ELEMENTS:
        raise InvalidArgument(
            f"input '{echo(name)}': the request's inputs hold more than {MAX_DECODED_ELEMENTS} "
            "BYTES elements and typed-contents values together; send numeric tensors in "
            "raw_input_contents, or split the request")
    return decoded


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
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input '{echo(name)}': shape {list(shape)} of {datatype} needs {expected} bytes but "
            f"{len(data)} were sent")
    array = np.frombuffer(data, dtype=dtype)
    if datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        raise InvalidArgument(f"input '{echo(name)}': BOOL bytes must be 0 or 1")
    return array.reshape(shape)


def _split_bytes(name: str, model: str, data: bytes, count: int) -> np.ndarray:
    """Raw BYTES: each element is a 4-byte little-endian length and then that many bytes.
    The caller has checked ``count`` against the cap and against the data's length (4 bytes
    at least per element), so the array allocated here is at most twice the data's size.
    Refusals use Triton's wording."""
    out = np.empty(count, dtype=object)
    unpack = _LENGTH.unpack_from
    offset, end = 0, len(data)
    for i in range(count):
        if offset + 4 > end:
            if offset == end:
                raise InvalidArgument(
                    f"expected {count} string elements for inference input '{echo(name)}' for "
                    f"model '{echo(model)}', got {i}")
            _incomplete_length(name, model, end - offset)
        (length,) = unpack(data, offset)
        start = offset + 4
        offset = start + length
        if offset > end:
            raise InvalidArgument(f"input '{echo(name)}': string element {i} claims {length} "
                                  f"bytes, only {end - start} remain")
        out[i] = data[start:offset]
    if offset != end:
        if end - offset < 4:
            _incomplete_length(name, model, end - offset)
        raise InvalidArgument(
            f"unexpected number of string elements {count + 1} for inference input "
            f"'{echo(name)}' for model '{echo(model)}', expecting {count}")
    return out


def _incomplete_length(name: str, model: str, left: int):
    raise InvalidArgument(
        f"incomplete string length indicator for inference input '{echo(name)}' for model "
        f"'{echo(model)}', expecting 4 bytes but only {left} bytes available")


def _from_typed(name: str, datatype: str, dtype: np.dtype, shape, count: int, field: str,
                values) -> np.ndarray:
    """Typed contents whose count the caller has checked; read without an intermediate list."""
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.fromiter(values, dtype=_WIDE[field], count=count)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"input '{echo(name)}': a value does not fit in {datatype}")
    return wide.astype(dtype, copy=False).reshape(shape)


_WIDE = {"bool_contents": np.bool_, "int_contents": np.int64, "int64_contents": np.int64,
         "uint_contents": np.uint64, "uint64_contents": np.uint64,
         "fp32_contents": np.float32, "fp64_contents": np.float64}


def encode_response(response: InferResponse,
                    limit: int = DEFAULT_MAX_MESSAGE_BYTES) -> pb.ModelInferResponse:
    """A core InferResponse as a ModelInferResponse with raw output contents.

    ResourceExhausted, before the message is built, when it would be over ``limit`` bytes
    (the server's send limit): gRPC would fail the call (and a whole stream) on sending it.
    The size used is an upper bound of the serialized size (each field's tag and length
    prefix counted at their widest)."""
    outputs = response.outputs
    # A cheap bound first (4 bytes per character); an answer near the limit, or with BYTES
    # outputs (whose budget must be tight), is measured.
    size = 64 + 4 * (len(response.model) + len(response.version) + len(response.id))
    strings = False
    for t in outputs:
        data = t.data
        size += 32 + 4 * len(t.name) + len(t.datatype) + 10 * data.ndim
        if t.datatype != "BYTES":
            size += data.nbytes
        else:
            strings = True
    if size > limit or strings:
        size = _response_size(response)
        if size > limit:
            _too_large(size, limit)
    tensors = []
    raw = []
    for t in outputs:
        tensors.append(pb.ModelInferResponse.InferOutputTensor(
            name=t.name, datatype=t.datatype, shape=t.data.shape))
        if t.datatype == "BYTES":
            part = _join_bytes(t.data, limit - size)
            if part is None:
                _too_large(limit, limit, at_least=True)
            size += len(part)
        else:
            part = t.data.tobytes()
        raw.append(part)
    return pb.ModelInferResponse(model_name=response.model, model_version=response.version,
                                 id=response.id, outputs=tensors, raw_output_contents=raw)


def _response_size(response: InferResponse) -> int:
    """Upper bound of the encoded size, BYTES contents aside, with text measured in UTF-8."""
    size = 64 + text_size(response.model) + text_size(response.version) + \
        text_size(response.id)
    for t in response.outputs:
        size += 32 + text_size(t.name) + len(t.datatype) + 10 * t.data.ndim
        if t.datatype != "BYTES":
            size += t.data.nbytes
    return size


def text_size(text: str) -> int:
    """UTF-8 size of a str (its length when ASCII: an O(1) check)."""
    return len(text) if text.isascii() else len(text.encode())


def _too_large(size: int, limit: int, at_least: bool = False):
    raise ResourceExhausted(
        f"the response would be {'more than' if at_least else 'about'} {size} bytes, over the "
        f"server's message limit of {limit} bytes; ask for fewer outputs or a smaller batch")


def _join_bytes(array: np.ndarray, budget: int) -> bytes | None:
    """BYTES elements as 4-byte length + data each; None once past ``budget`` bytes."""
    parts = []
    append = parts.append
    pack = _LENGTH.pack
    total = 0
    for item in array.reshape(-1):
        value = item if isinstance(item, bytes) else str(item).encode()
        total += 4 + len(value)
        if total > budget:
            return None
        append(pack(len(value)))
        append(value)
    return b"".join(parts)
