"""KServe V2 HTTP bodies <-> core types, with Triton's binary tensor data extension.

An inference request body is a JSON object, optionally followed by binary tensor data: the
``Inference-Header-Content-Length`` header gives the JSON part's length, and each input with a
``binary_data_size`` parameter takes that many bytes of what follows, in input order (what
tritonclient.http sends by default). Binary contents are checked and viewed exactly as gRPC raw
contents are (``codec``'s helpers: the same checks, the same messages, no copies for numeric
tensors); JSON ``data`` is checked here (count, type, range). Outputs go back as JSON ``data``,
or as binary data after the JSON when asked (``binary_data`` per output, or the request's
``binary_data_output`` for the rest). Every caller's string a message repeats goes through
``echo``.
"""

from __future__ import annotations

import json
import re
import struct
from math import prod

import numpy as np

from gateway.errors import InvalidArgument, Unimplemented, echo
from gateway.protocol.codec import (
    MAX_DECODED_ELEMENTS,
    MAX_DIMS,
    MAX_ELEMENTS,
    MAX_TENSORS,
    _count_decoded,
    _from_raw,
    _split_bytes,
    class_count,
)
from gateway.tensors import DATATYPE_TO_DTYPE, InferRequest, InferResponse, Tensor

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")
# Parsed JSON costs 10-30 times its size in Python objects ("{}," is 3 bytes, a dict 64): a
# body's JSON may hold at most the data values decoding accepts anyway (MAX_DECODED_ELEMENTS)
# plus names, shapes and parameters, and few objects (a few per input and output), checked
# before it is parsed. Bodies under a MiB are not counted (25 MiB of objects at worst).
JSON_VALUES = MAX_DECODED_ELEMENTS + 16 * MAX_TENSORS
JSON_OBJECTS = 8 * MAX_TENSORS + 16
JSON_COUNTED_FROM = 1 << 20
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class OutputPlan:
    """How each output goes back: binary data after the JSON, or JSON ``data``."""

    __slots__ = ("default", "per_output", "seen")

    def __init__(self, default: bool = False, per_output: dict[str, bool] | None = None):
        self.default = default
        self.per_output = per_output or {}
        self.seen: set[str] = set()  # requested output names

    def binary(self, name: str) -> bool:
        return self.per_output.get(name, self.default)


def parse_json(body, what: str = "request") -> dict:
    """A JSON object, or InvalidArgument saying why not (never the body itself)."""
    if len(body) >= JSON_COUNTED_FROM:
        _check_json_size(body, what)
    try:
        doc = json.loads(body) if len(body) else {}
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = exc.args[0] if isinstance(exc, ValueError) and exc.args else "too deeply nested"
        raise InvalidArgument(f"failed to parse the {what} JSON: {echo(reason)}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"the {what} JSON must be an object")
    return doc


def _check_json_size(body: bytes, what: str) -> None:
    """InvalidArgument when the JSON holds more values or objects than a request needs, counted
    in C before parsing: every value but the last in a container is followed by a comma."""
    for text in (body, None):
        if text is None:  # over on the quick count: count again without strings' contents
            text = _STRING.sub(b'""', body)
        objects = text.count(b"{")
        values = objects + text.count(b"[") + text.count(b",")
        if objects <= JSON_OBJECTS and values <= JSON_VALUES:
            return
    raise InvalidArgument(
        f"the {what} JSON holds more than {JSON_VALUES} values or {JSON_OBJECTS} objects; "
        "send tensors as binary data (binary_data_size), or split the request")


def decode_infer(body: bytes, header_length: str | None, model: str, version: str,
                 routing_key: str | None = None) -> tuple[InferRequest, OutputPlan]:
    """An inference request body as a core InferRequest and its output plan."""
    if header_length is None:
        split = len(body)
    else:
        try:
            split = int(header_length)
        except ValueError:
            split = -1
        if not 0 <= split <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} {echo(header_length)} is not a length within the "
                f"{len(body)}-byte body")
    doc = parse_json(memoryview(body)[:split].tobytes() if split < len(body) else body)
    binary = memoryview(body)[split:]
    inputs_json = doc.get("inputs", [])  # none: the model says which it expects
    if not isinstance(inputs_json, list):
        raise InvalidArgument("'inputs' must be a list")
    if len(inputs_json) > MAX_TENSORS:
        raise InvalidArgument(
            f"the request has {len(inputs_json)} inputs; the limit is {MAX_TENSORS}")
    inputs = []
    offset = 0
    decoded = 0  # elements decoded one by one so far (codec.MAX_DECODED_ELEMENTS)
    for item in inputs_json:
        if not isinstance(item, dict):
            raise InvalidArgument("each input must be a JSON object")
        name, datatype, dtype, shape = _tensor_header(item)
        count = prod(shape)
        params = _object(item.get("parameters"), f"input '{echo(name)}' parameters")
        if "shared_memory_region" in params:
            raise Unimplemented("system shared memory is not supported by this gateway")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidArgument(
                    f"input '{echo(name)}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input '{echo(name)}': binary_data_size {size} is past the end of the "
                    f"binary data ({len(binary) - offset} bytes remain; is "
                    f"{HEADER_LENGTH} set?)")
            data = binary[offset:offset + size]
            offset += size
            if datatype == "BYTES":
                if 4 * count > size:  # each element takes at least its 4-byte length
                    raise InvalidArgument(
                        f"expected {count} string elements for inference input '{echo(name)}' "
                        f"for model '{echo(model)}', got {size} bytes, which hold at most "
                        f"{size // 4}")
                decoded = _count_decoded(name, decoded, count)
                array = _split_bytes(name, model, data.tobytes(), count).reshape(shape)
            else:
                array = _from_raw(name, datatype, dtype, shape, count, data)
        elif "data" in item:
            decoded = _count_decoded(name, decoded, count)
            array = _from_json(name, datatype, dtype, shape, count, item["data"])
        else:
            raise InvalidArgument(f"input '{echo(name)}' has neither 'data' nor a "
                                  "binary_data_size parameter")
        inputs.append(Tensor(name, datatype, array))
    if offset != len(binary):
        raise InvalidArgument(
            f"the request has {len(binary) - offset} bytes of binary data that no input's "
            "binary_data_size claims")
    params = _object(doc.get("parameters"), "request parameters")
    priority = _int_param(params, "priority")
    timeout_us = _int_param(params, "timeout")
    if routing_key is None:
        key = params.get("routing_key")
        if key is not None and not isinstance(key, str):
            raise InvalidArgument("request parameter 'routing_key' must be a string")
        routing_key = key or None
    plan = OutputPlan(_bool_param(params, "binary_data_output", "request parameter"))
    outputs = []
    outputs_json = doc.get("outputs", [])
    if not isinstance(outputs_json, list):
        raise InvalidArgument("'outputs' must be a list")
    if len(outputs_json) > MAX_TENSORS:
        raise InvalidArgument(f"the request asks for {len(outputs_json)} outputs; the limit is "
                              f"{MAX_TENSORS}")
    classes = None  # allocated only for a request that uses the extension
    for item in outputs_json:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise InvalidArgument("each requested output must be an object with a 'name'")
        params = _object(item.get("parameters"), f"output '{echo(name)}' parameters")
        if "classification" in params:
            classes = classes or {}
            classes[name] = class_count(name, params["classification"])
        if "shared_memory_region" in params:
            raise Unimplemented("system shared memory is not supported by this gateway")
        if "binary_data" in params:
            plan.per_output[name] = _bool_param(params, "binary_data", f"output '{echo(name)}'")
        if name in plan.seen:  # at the first repeat, before reading the rest
            raise InvalidArgument(f"output '{echo(name)}' already exists in request")
        plan.seen.add(name)
        outputs.append(name)
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("the request 'id' must be a string")
    return InferRequest(model, version, request_id, inputs, outputs, routing_key, priority,
                        timeout_us, classification=classes), plan


def _tensor_header(item: dict):
    name = item.get("name")
    if not isinstance(name, str):
        raise InvalidArgument("each input must have a 'name' string")
    datatype = item.get("datatype")
    dtype = DATATYPE_TO_DTYPE.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidArgument(
            f"input '{echo(name)}' has unsupported datatype '{echo(datatype)}'")
    shape = item.get("shape")
    if not isinstance(shape, list) or any(type(d) is not int for d in shape):
        raise InvalidArgument(f"input '{echo(name)}': 'shape' must be a list of integers")
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(
            f"input '{echo(name)}' has {len(shape)} dimensions; the limit is {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{echo(name)}' has a negative dimension in shape {shape}")
    if prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidArgument(f"input '{echo(name)}' shape {shape} is too large; the limit is "
                              f"{MAX_ELEMENTS} elements")
    return name, datatype, dtype, tuple(shape)


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _int_param(params: dict, key: str) -> int:
    value = params.get(key)
    if value is None:
        return 0
    if type(value) is not int:
        raise InvalidArgument(f"request parameter '{key}' must be an integer")
    if value < 0:
        raise InvalidArgument(f"request parameter '{key}' must not be negative")
    return value


def _bool_param(params: dict, key: str, owner: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{owner} '{key}' must be true or false")
    return value


def _from_json(name: str, datatype: str, dtype: np.dtype, shape, count: int,
               data) -> np.ndarray:
    """JSON ``data`` (flat or nested lists, row-major) as an array of ``shape``: numbers of the
    datatype's kind only (no strings, no fractions for integers), within its range."""
    values = _flatten(name, data)
    if len(values) != count:
        raise InvalidArgument(f"input '{echo(name)}': shape {list(shape)} needs {count} values "
                              f"but {len(values)} were sent in 'data'")
    kinds = set(map(type, values))
    if datatype == "BYTES":
        if not kinds <= {str}:
            raise InvalidArgument(f"input '{echo(name)}': BYTES data must be strings")
        out = np.empty(count, dtype=object)
        out[:] = [v.encode("utf-8", "surrogatepass") for v in values]
        return out.reshape(shape)
    if datatype == "BOOL":
        allowed, what = {bool}, "true/false"
    elif dtype.kind in "iu":
        allowed, what = {int}, "integer"
    else:
        allowed, what = {int, float}, "number"
    if not kinds <= allowed:
        raise InvalidArgument(f"input '{echo(name)}': {datatype} data must hold {what} values")
    if dtype.kind in "iu" and values:
        info = np.iinfo(dtype)
        if min(values) < info.min or max(values) > info.max:
            raise InvalidArgument(f"input '{echo(name)}': a value does not fit in {datatype}")
    return np.array(values, dtype=dtype).reshape(shape)


def _flatten(name: str, data) -> list:
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{echo(name)}': 'data' must be a list")
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:  # iterative: nesting depth is the caller's
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > MAX_DIMS:
                    raise InvalidArgument(f"input '{echo(name)}': 'data' is nested deeper "
                                          f"than {MAX_DIMS} levels")
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


# ---- responses --------------------------------------------------------------------------------

def encode_infer(response: InferResponse, plan: OutputPlan) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary data follows (else None)."""
    outputs = []
    parts: list = []
    for t in response.outputs:
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.data.shape)}
        if plan.binary(t.name):
            raw = _join_bytes(t.data) if t.datatype == "BYTES" else _raw(t.data)
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = _json_values(t.name, t.datatype, t.data)
        outputs.append(entry)
    doc = {"model_name": response.model, "model_version": response.version}
    if response.id:
        doc["id"] = response.id
    doc["outputs"] = outputs
    header = _dumps(doc).encode("utf-8", "surrogatepass")
    if not parts:
        return header, None
    return b"".join([header, *parts]), len(header)


def _raw(array: np.ndarray):
    """Little-endian bytes of a numeric array, without a copy when it is contiguous."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if not array.size:  # a zero-size tensor (a 0 in its shape): memoryview cannot cast it
        return b""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _join_bytes(array: np.ndarray) -> bytes:
    """BYTES elements as 4-byte little-endian length + data each (Triton's layout)."""
    parts = []
    pack = _LENGTH.pack
    for item in array.reshape(-1):
        value = item if isinstance(item, bytes) else str(item).encode("utf-8", "surrogatepass")
        parts.append(pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def _json_values(name: str, datatype: str, data: np.ndarray) -> list:
    """Flat row-major values for JSON ``data`` (BYTES as strings: text is what JSON holds)."""
    if datatype != "BYTES":
        return data.reshape(-1).tolist()
    values = []
    for item in data.reshape(-1):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"output '{echo(name)}' holds bytes that are not UTF-8 text; ask for it as "
                    "binary data (binary_data: true)") from None
        values.append(item if isinstance(item, str) else str(item))
    return values
