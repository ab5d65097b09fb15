"""KServe V2 codec: real protobuf messages in, numpy out, and back.

The expected wire layout (raw little-endian bytes, BYTES as 4-byte length + data, the typed
``contents`` field of each datatype) is written out here from the protocol, independently of
the codec's own tables, so the tests check the codec against the spec rather than itself.
"""

from __future__ import annotations

import struct
from math import prod

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.errors import InvalidArgument, ResourceExhausted
from gateway.protocol import codec
from gateway.protocol.codec import decode_request, encode_response
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.tensors import InferResponse, Tensor

# The KServe V2 datatypes and their little-endian numpy layout.
DTYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
DATATYPES = sorted(DTYPES)
# The InferTensorContents field of each datatype (FP16 has none), from grpc_service.proto.
TYPED = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
TYPED_DATATYPES = sorted(TYPED)

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- wire helpers (spec, not codec)

def join_bytes(items) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def split_bytes(data: bytes, count: int) -> list[bytes] | None:
    """Raw BYTES per the protocol; None when ``data`` is not exactly ``count`` elements."""
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(data):
            return None
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            return None
        items.append(data[offset:offset + length])
        offset += length
    return items if offset == len(data) else None


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return join_bytes(array.reshape(-1))
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def from_raw(data: bytes, datatype: str, shape) -> np.ndarray:
    if datatype == "BYTES":
        items = split_bytes(data, prod(shape))
        assert items is not None, "raw BYTES output is malformed"
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out.reshape(shape)
    return np.frombuffer(data, dtype=DTYPES[datatype]).reshape(shape)


def request(*tensors, raw: list[bytes] | None = None, **fields) -> pb.ModelInferRequest:
    """A ModelInferRequest with inputs given as (name, datatype, shape[, contents])."""
    msg = pb.ModelInferRequest(model_name=fields.pop("model_name", "m"), **fields)
    for name, datatype, shape, *contents in tensors:
        t = msg.inputs.add(name=name, datatype=datatype, shape=list(shape))
        if contents:
            t.contents.CopyFrom(contents[0])
    if raw is not None:
        msg.raw_input_contents.extend(raw)
    return msg


def typed(datatype: str, values) -> pb.InferTensorContents:
    contents = pb.InferTensorContents()
    getattr(contents, TYPED[datatype]).extend(values)
    return contents


def refused(msg: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidArgument) as info:
        decode_request(msg)
    assert info.value.code == "INVALID_ARGUMENT"
    return info.value.message


def assert_same(got: np.ndarray, want: np.ndarray, datatype: str, exact_bits: bool = True):
    assert got.shape == want.shape
    assert got.dtype == DTYPES[datatype]
    if datatype == "BYTES":
        assert all(type(x) is bytes for x in got.reshape(-1))
        assert list(got.reshape(-1)) == list(want.reshape(-1))
    elif exact_bits:
        assert got.tobytes() == np.ascontiguousarray(want).tobytes()
    else:  # typed floats go through Python floats: values (NaN as NaN, signed zeros) survive
        np.testing.assert_array_equal(got, want)
        assert (np.signbit(got) == np.signbit(want)).all()


# ---------------------------------------------------------------- strategies

shapes = st.lists(st.integers(0, 4), max_size=4).map(tuple)


@st.composite
def arrays(draw, datatypes=None):
    datatype = draw(st.sampled_from(DATATYPES) if datatypes is None else datatypes)
    shape = draw(shapes)
    if datatype == "BYTES":
        count = prod(shape)
        items = draw(st.lists(st.binary(max_size=24), min_size=count, max_size=count))
        array = np.empty(count, dtype=object)
        array[:] = items
        return datatype, array.reshape(shape)
    return datatype, draw(hnp.arrays(DTYPES[datatype], shape))


named_arrays = st.lists(arrays(), min_size=1, max_size=3)
named_typed_arrays = st.lists(arrays(st.sampled_from(TYPED_DATATYPES)), min_size=1, max_size=3)


# ---------------------------------------------------------------- round trips

@FAST
@given(named_arrays)
def test_any_tensor_as_raw_contents_decodes_to_the_same_array(tensors):
    msg = request(*[(f"in{i}", dt, a.shape) for i, (dt, a) in enumerate(tensors)],
                  raw=[to_raw(a, dt) for dt, a in tensors])
    msg = pb.ModelInferRequest.FromString(msg.SerializeToString())  # as it comes off the wire
    decoded = decode_request(msg)
    assert [t.name for t in decoded.inputs] == [f"in{i}" for i in range(len(tensors))]
    for got, (datatype, want) in zip(decoded.inputs, tensors):
        assert got.datatype == datatype
        assert_same(got.data, want, datatype)


@FAST
@given(named_typed_arrays)
def test_any_tensor_as_typed_contents_decodes_to_the_same_array(tensors):
    msg = request(*[(f"in{i}", dt, a.shape, typed(dt, a.reshape(-1).tolist()))
                    for i, (dt, a) in enumerate(tensors)])
    msg = pb.ModelInferRequest.FromString(msg.SerializeToString())
    decoded = decode_request(msg)
    for got, (datatype, want) in zip(decoded.inputs, tensors):
        assert got.datatype == datatype
        assert_same(got.data, want, datatype, exact_bits=not datatype.startswith("FP"))


@FAST
@given(named_arrays, st.booleans())
def test_encode_response_round_trips_through_raw_output_contents(tensors, transpose):
    outputs = [Tensor(f"out{i}", dt, a.T if transpose else a) for i, (dt, a) in enumerate(tensors)]
    response = encode_response(InferResponse("m", "7", "req-1", outputs))
    response = pb.ModelInferResponse.FromString(response.SerializeToString())
    assert (response.model_name, response.model_version, response.id) == ("m", "7", "req-1")
    assert len(response.raw_output_contents) == len(outputs)
    for out, raw, sent in zip(response.outputs, response.raw_output_contents, outputs):
        assert (out.name, out.datatype, tuple(out.shape)) == (sent.name, sent.datatype,
                                                                 sent.data.shape)
        assert not out.HasField("contents")  # answers are raw only
        assert_same(from_raw(raw, out.datatype, tuple(out.shape)), sent.data, sent.datatype)
    # ... and what the gateway answers, the gateway reads back as the same tensors.
    again = decode_request(request(*[(o.name, o.datatype, o.shape) for o in response.outputs],
                                   raw=list(response.raw_output_contents)))
    for got, sent in zip(again.inputs, outputs):
        assert_same(got.data, sent.data, sent.datatype)


def test_encode_response_writes_str_elements_of_bytes_outputs_as_utf8():
    data = np.array(["a", "é", ""], dtype=object)
    response = encode_response(InferResponse("m", "1", "", [Tensor("s", "BYTES", data)]))
    assert response.raw_output_contents[0] == join_bytes([b"a", "é".encode(), b""])


@FAST
@given(named_arrays, st.text(max_size=300), st.text(max_size=40))
def test_the_response_size_bound_is_never_below_the_real_size_and_close_to_it(tensors, rid,
                                                                               name):
    outputs = [Tensor(f"{name}{i}", dt, a) for i, (dt, a) in enumerate(tensors)]
    response = InferResponse("mé", "7", rid, outputs)
    size = pb.ModelStreamInferResponse(infer_response=encode_response(response)).ByteSize()
    # Sound: no answer gRPC would refuse to send (stream wrapper included) gets through ...
    with pytest.raises(ResourceExhausted) as info:
        encode_response(response, size - 1)
    assert "over the server's message limit of" in info.value.message
    # ... and tight: a small, fixed allowance per output above the real size always passes.
    slack = 64 + sum(32 + 10 * t.data.ndim for t in outputs)
    assert encode_response(response, size + slack).ByteSize() <= size


def test_a_response_over_the_limit_is_refused_before_it_is_built():
    import tracemalloc

    big = np.zeros((1024, 1024), dtype=np.float32)  # 4 MiB
    response = InferResponse("m", "1", "", [Tensor(f"y{i}", "FP32", big) for i in range(4)])
    tracemalloc.start()
    try:
        with pytest.raises(ResourceExhausted) as info:
            encode_response(response, 8 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"refusing built {peak} bytes"
    assert info.value.code == "RESOURCE_EXHAUSTED"
    size = 4 * big.nbytes
    message = info.value.message
    assert message.startswith("the response would be about 167") and message.endswith(
        " bytes, over the server's message limit of 8388608 bytes; ask for fewer outputs or a "
        "smaller batch")
    assert size < int(message.split()[5]) < size + 1000


def test_a_bytes_response_over_the_limit_is_refused_while_joining():
    data = np.empty(100_000, dtype=object)
    data[:] = [b"x" * 100] * 100_000  # ~10 MB joined
    response = InferResponse("m", "1", "", [Tensor("s", "BYTES", data)])
    with pytest.raises(ResourceExhausted) as info:
        encode_response(response, 1 << 20)
    assert info.value.message == (
        "the response would be more than 1048576 bytes, over the server's message limit of "
        "1048576 bytes; ask for fewer outputs or a smaller batch")
    assert len(encode_response(response, 16 << 20).raw_output_contents[0]) == 100_000 * 104


# ---------------------------------------------------------------- robustness

@st.composite
def raw_payloads(draw):
    """A datatype, a shape and raw bytes that may or may not match them."""
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3).map(tuple))
    count = prod(shape)
    if datatype == "BYTES":
        near = st.lists(st.binary(max_size=6), min_size=max(count - 1, 0), max_size=count + 1)
        valid = near.map(join_bytes)
    else:
        itemsize = DTYPES[datatype].itemsize
        valid = st.binary(min_size=count * itemsize, max_size=count * itemsize)
    data = draw(st.one_of(st.binary(max_size=48), valid, valid.map(lambda b: b[:-1]),
                          valid.map(lambda b: b + b"\x00")))
    return datatype, shape, data


@FAST
@given(raw_payloads())
def test_random_raw_content_is_decoded_consistently_or_refused(payload):
    datatype, shape, data = payload
    count = prod(shape)
    if datatype == "BYTES":
        items = split_bytes(data, count)
        valid = items is not None
    else:
        valid = len(data) == count * DTYPES[datatype].itemsize and (
            datatype != "BOOL" or all(b <= 1 for b in data))
    try:
        decoded = decode_request(request(("x", datatype, shape), raw=[data]))
    except InvalidArgument as exc:
        assert not valid, f"valid {datatype} {list(shape)} data refused: {exc.message}"
        assert "input 'x'" in exc.message, exc.message
        return
    assert valid, f"malformed {datatype} {list(shape)} data accepted"
    array = decoded.inputs[0].data
    assert array.shape == shape and array.dtype == DTYPES[datatype]
    if datatype == "BYTES":
        assert list(array.reshape(-1)) == items
    else:
        assert array.tobytes() == data


PARAM_TYPES = ["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]
junk_datatypes = st.sampled_from(DATATYPES + ["", "FP8", "fp32", "STRING", "BF16", "INT128"])
dims = st.one_of(st.integers(-3, 4), st.integers(-(2**63), 2**63 - 1),
                 st.sampled_from([2**31, 2**32, 2**40, 2**62]))
fuzz_shapes = st.one_of(st.lists(dims, max_size=5),
                        st.lists(st.sampled_from([0, 1]), min_size=30, max_size=70))
param_values = {
    "bool_param": st.booleans(), "int64_param": st.integers(-(2**63), 2**63 - 1),
    "string_param": st.text(max_size=8), "double_param": st.floats(allow_nan=True),
    "uint64_param": st.integers(0, 2**64 - 1),
}
content_values = {
    "bool_contents": st.booleans(), "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1), "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8),
}


@st.composite
def fuzz_requests(draw):
    msg = pb.ModelInferRequest(model_name=draw(st.text(max_size=4)),
                               model_version=draw(st.text(max_size=3)), id=draw(st.text(max_size=4)))
    for _ in range(draw(st.integers(0, 3))):
        t = msg.inputs.add(name=draw(st.text(max_size=4)), datatype=draw(junk_datatypes),
                           shape=draw(fuzz_shapes))
        for field in draw(st.lists(st.sampled_from(sorted(content_values)), max_size=2)):
            getattr(t.contents, field).extend(draw(st.lists(content_values[field], max_size=6)))
    if draw(st.booleans()):
        n = draw(st.sampled_from([len(msg.inputs), max(len(msg.inputs) - 1, 0), len(msg.inputs) + 1]))
        msg.raw_input_contents.extend(draw(st.lists(st.binary(max_size=40), min_size=n, max_size=n)))
    for key in draw(st.lists(st.sampled_from(["priority", "timeout", "routing_key", "other"]),
                             max_size=3, unique=True)):
        kind = draw(st.sampled_from(PARAM_TYPES))
        setattr(msg.parameters[key], kind, draw(param_values[kind]))
    for name in draw(st.lists(st.text(max_size=3), max_size=2)):
        out = msg.outputs.add(name=name)
        if draw(st.booleans()):
            out.parameters["classification"].int64_param = draw(st.integers(0, 3))
    return msg


def decode_or_refuse(msg: pb.ModelInferRequest) -> None:
    """Decoding any message either succeeds with a consistent request or is InvalidArgument."""
    try:
        decoded = decode_request(msg)
    except InvalidArgument as exc:
        assert exc.message
        return
    assert len(decoded.inputs) == len(msg.inputs)
    for got, sent in zip(decoded.inputs, msg.inputs):
        assert got.name == sent.name and got.datatype == sent.datatype
        assert got.data.shape == tuple(sent.shape)
        assert got.data.dtype == DTYPES[sent.datatype]
    assert decoded.priority >= 0 and decoded.timeout_us >= 0
    assert decoded.outputs == [o.name for o in msg.outputs]


@settings(FAST, max_examples=300)
@given(fuzz_requests())
def test_any_structurally_valid_message_decodes_or_is_refused_with_invalid_argument(msg):
    decode_or_refuse(msg)


@settings(FAST, max_examples=300)
@given(fuzz_requests(), st.data())
def test_corrupted_messages_that_still_parse_decode_or_are_refused(msg, data):
    wire = bytearray(msg.SerializeToString())
    for _ in range(data.draw(st.integers(1, 2))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(wire)))
        if op == "flip" and at < len(wire):
            wire[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del wire[at:at + data.draw(st.integers(1, 8))]
        else:
            wire[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        parsed = pb.ModelInferRequest.FromString(bytes(wire))
    except DecodeError:
        return  # most corruptions do not parse; those that do must decode or be refused
    decode_or_refuse(parsed)


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_that_parse_as_a_request_decode_or_are_refused(wire):
    try:
        parsed = pb.ModelInferRequest.FromString(wire)
    except DecodeError:
        return
    decode_or_refuse(parsed)


# ---------------------------------------------------------------- explicit refusals

def test_raw_contents_count_must_match_the_inputs():
    msg = request(("a", "FP32", [1]), ("b", "FP32", [1]), raw=[b"\0" * 4])
    assert refused(msg) == "raw_input_contents has 1 entries for 2 inputs"


def test_raw_contents_size_must_match_the_shape():
    msg = request(("x", "FP32", [2, 3]), raw=[b"\0" * 20])
    assert refused(msg) == "input 'x': shape [2, 3] of FP32 needs 24 bytes but 20 were sent"


def test_raw_and_typed_contents_cannot_be_mixed():
    msg = request(("a", "FP32", [1]), ("b", "INT32", [1], typed("INT32", [1])),
                  raw=[b"\0" * 4, b"\0" * 4])
    assert refused(msg) == ("input 'b' has typed contents but the request also uses "
                            "raw_input_contents; use one or the other")


def test_negative_dimensions_are_refused():
    assert refused(request(("x", "FP32", [2, -1]), raw=[b""])) == (
        "input 'x' has a negative dimension in shape [2, -1]")
    assert refused(request(("x", "INT64", [-3]))) == (
        "input 'x' has a negative dimension in shape [-3]")


def test_unsupported_datatype_is_refused():
    assert refused(request(("x", "FP8", [1]), raw=[b"\0"])) == (
        "input 'x' has unsupported datatype 'FP8'")
    assert refused(request(("x", "fp32", [1]), raw=[b"\0" * 4])) == (
        "input 'x' has unsupported datatype 'fp32'")


@pytest.mark.parametrize("shape", [[2**31 + 1], [2**20, 2**20], [0, 2**63 - 1], [2**40, 0, 2**40]])
def test_oversized_shapes_are_refused_even_with_a_zero_dimension(shape):
    for msg in (request(("x", "FP32", shape), raw=[b""]), request(("x", "FP32", shape))):
        message = refused(msg)
        assert message == f"input 'x' shape {shape} is too large; the limit is 2147483648 elements"


def test_too_many_dimensions_are_refused():
    shape = [1] * 33
    message = refused(request(("x", "INT8", shape), raw=[b"\x01"]))
    assert message == "input 'x' has 33 dimensions; the limit is 32"
    assert decode_request(request(("x", "INT8", [1] * 32), raw=[b"\x01"])).inputs[0].data.ndim == 32


def test_bool_raw_bytes_must_be_zero_or_one():
    assert refused(request(("x", "BOOL", [3]), raw=[b"\x00\x01\x02"])) == (
        "input 'x': BOOL bytes must be 0 or 1")


@pytest.mark.parametrize("data, message", [
    (b"\x05\x00\x00\x00abcd", "input 's': string element 0 claims 5 bytes, only 4 remain"),
    (b"\x01\x00\x00\x00a\x01\x00\x00", ("incomplete string length indicator for "
     "inference input 's' for model 'm', expecting 4 bytes but only 3 bytes available")),
    (join_bytes([b"a", b"b"]) + b"!", ("incomplete string length indicator for inference input "
     "'s' for model 'm', expecting 4 bytes but only 1 bytes available")),
    # Triton's wording for a count that does not match the data.
    (join_bytes([b"abcdef"]), ("expected 2 string elements for inference input 's' for model "
     "'m', got 1")),
    (join_bytes([b"a", b"b", b""]), ("unexpected number of string elements 3 for inference "
     "input 's' for model 'm', expecting 2")),
])
def test_malformed_raw_bytes_are_refused(data, message):
    assert refused(request(("s", "BYTES", [2]), raw=[data])) == message


# ---------------------------------------------------------------- bounds before allocation
# Every size a client states is checked against the bytes it sent (and the per-request cap)
# before anything of that size is allocated. ``tracemalloc`` sees numpy's allocations: the
# peak while refusing stays a few KiB whatever the stated size.

def refused_within(msg: pb.ModelInferRequest, max_bytes: int = 1 << 20) -> str:
    import tracemalloc

    tracemalloc.start()
    try:
        message = refused(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < max_bytes, f"refusing allocated {peak} bytes"
    return message


@pytest.mark.parametrize("count", [2**20 + 1, 2**27, 2**31])
def test_a_huge_bytes_count_with_no_data_is_refused_without_allocating(count):
    message = refused_within(request(("s", "BYTES", [count]), raw=[b""], model_name="strings"))
    assert message == (f"expected {count} string elements for inference input 's' for model "
                       "'strings', got 0 bytes, which hold at most 0")


def test_a_bytes_count_beyond_the_data_is_refused_before_walking_it():
    data = join_bytes([b"x"] * 1000)  # 5000 bytes: room for at most 1250 elements
    message = refused_within(request(("s", "BYTES", [2**27]), raw=[data]))
    assert message == ("expected 134217728 string elements for inference input 's' for model "
                       "'m', got 5000 bytes, which hold at most 1250")


def test_the_per_request_cap_counts_bytes_elements_of_all_inputs():
    half = codec.MAX_DECODED_ELEMENTS // 2
    data = b"\0" * (4 * (half + 1))  # enough empty strings for the O(1) check
    msg = request(("a", "BYTES", [half]), ("b", "BYTES", [half + 1]),
                  raw=[b"\0" * (4 * half), data])
    assert refused_within(msg, 64 << 20) == (
        f"input 'b': the request's inputs hold more than {codec.MAX_DECODED_ELEMENTS} BYTES "
        "elements and typed-contents values together; send numeric tensors in "
        "raw_input_contents, or split the request")
    # Exactly at the cap is served.
    ok = request(("a", "BYTES", [half]), ("b", "BYTES", [half]), raw=[b"\0" * (4 * half)] * 2)
    got = decode_request(ok)
    assert [t.data.shape for t in got.inputs] == [(half,), (half,)]


def test_the_per_request_cap_counts_typed_contents_values():
    n = codec.MAX_DECODED_ELEMENTS + 1
    contents = pb.InferTensorContents()
    contents.bool_contents.extend([True] * n)
    message = refused_within(request(("x", "BOOL", [n], contents)))
    assert message.startswith(f"input 'x': the request's inputs hold more than "
                              f"{codec.MAX_DECODED_ELEMENTS} BYTES elements")


def test_raw_numeric_tensors_are_not_capped_by_count_only_by_their_bytes():
    n = codec.MAX_DECODED_ELEMENTS * 2
    got = decode_request(request(("x", "UINT8", [n]), raw=[b"\1" * n]))
    assert got.inputs[0].data.shape == (n,)


@pytest.mark.parametrize("datatype", ["FP32", "INT8", "BOOL", "FP64"])
def test_a_huge_numeric_shape_is_refused_without_allocating(datatype):
    for shape in ([2**31], [2**30, 2], [2**16, 2**15]):
        message = refused_within(request(("x", datatype, shape), raw=[b"\0" * 8]))
        assert message.startswith(f"input 'x': shape {shape} of {datatype} needs ")
        message = refused_within(request(("x", datatype, shape)))
        assert message.startswith(f"input 'x': shape {shape} needs {prod(shape)} values")


def test_long_names_are_truncated_in_messages():
    name = "n" * 20000
    message = refused_within(request((name, "BYTES", [2**27]), raw=[b""], model_name=name))
    assert len(message) < 600
    assert "...(20000 characters)" in message
    message = refused(request((name, "FP9", [1]), raw=[b"\0"]))
    assert message == f"input '{'n' * 128}...(20000 characters)' has unsupported datatype 'FP9'"


@pytest.mark.parametrize("datatype, value", [
    ("INT8", 128), ("INT8", -129), ("INT16", 2**15), ("INT16", -(2**15) - 1),
    ("UINT8", 256), ("UINT16", 2**16),
])
def test_out_of_range_typed_integers_are_refused(datatype, value):
    msg = request(("x", datatype, [2], typed(datatype, [0, value])))
    assert refused(msg) == f"input 'x': a value does not fit in {datatype}"


@pytest.mark.parametrize("datatype", ["INT8", "INT16", "UINT8", "UINT16"])
def test_typed_integers_at_the_limits_are_kept(datatype):
    info = np.iinfo(DTYPES[datatype])
    got = decode_request(request(("x", datatype, [2], typed(datatype, [info.min, info.max]))))
    assert got.inputs[0].data.tolist() == [info.min, info.max]
    assert got.inputs[0].data.dtype == DTYPES[datatype]


def test_fp16_has_no_typed_contents():
    contents = pb.InferTensorContents(fp32_contents=[1.0, 2.0])
    assert refused(request(("h", "FP16", [2], contents))) == (
        "input 'h': FP16 has no typed contents field; send it in raw_input_contents")
    half = np.array([1.5, -2.0], dtype="<f2")
    assert decode_request(request(("h", "FP16", [2]), raw=[half.tobytes()])).inputs[0].data.tolist() \
        == [1.5, -2.0]


def test_typed_contents_count_must_match_the_shape():
    msg = request(("x", "FP32", [3], typed("FP32", [1.0, 2.0])))
    assert refused(msg) == ("input 'x': shape [3] needs 3 values but 2 were sent in "
                            "contents.fp32_contents")
    assert refused(request(("x", "INT64", [1]))) == (
        "input 'x': shape [1] needs 1 values but 0 were sent in contents.int64_contents")


def test_a_repeated_output_is_refused_at_the_first_repeat():
    msg = request(("x", "INT32", [1], typed("INT32", [1])))
    for name in ["a", "b"] + ["a"] * 200_000:
        msg.outputs.add(name=name)
    assert refused_within(msg) == "output 'a' already exists in request"


def test_inputs_and_requested_outputs_are_capped_in_number():
    msg = request(*[(f"x{i}", "INT32", [0]) for i in range(codec.MAX_TENSORS + 1)])
    assert refused(msg) == "the request has 4097 inputs; the limit is 4096"
    msg = request(("x", "INT32", [1], typed("INT32", [1])))
    for i in range(codec.MAX_TENSORS + 1):
        msg.outputs.add(name=f"y{i}")
    assert refused(msg) == "the request asks for 4097 outputs; the limit is 4096"
    del msg.outputs[-1]
    assert len(decode_request(msg).outputs) == codec.MAX_TENSORS


def test_classification_parameters_are_read_per_output():
    msg = request(("x", "INT32", [1], typed("INT32", [1])))
    msg.outputs.add(name="probs").parameters["classification"].int64_param = 3
    msg.outputs.add(name="other")
    assert decode_request(msg).classification == {"probs": 3}
    msg.outputs[0].parameters["classification"].int64_param = 0
    assert refused(msg) == ("output 'probs': the classification parameter must be a positive "
                            "integer (the number of top classes), got 0")


# ---------------------------------------------------------------- request fields and parameters

def test_request_fields_and_defaults_pass_through():
    msg = request(("x", "INT32", [1], typed("INT32", [7])), model_name="net", model_version="2",
                  id="abc")
    msg.outputs.add(name="y")
    decoded = decode_request(msg, deadline_ns=123)
    assert (decoded.model, decoded.version, decoded.id) == ("net", "2", "abc")
    assert decoded.outputs == ["y"]
    assert (decoded.priority, decoded.timeout_us, decoded.routing_key) == (0, 0, None)
    assert decoded.deadline_ns == 123


def test_priority_timeout_and_routing_key_parameters():
    msg = request(("x", "INT32", [1], typed("INT32", [7])))
    msg.parameters["priority"].int64_param = 2
    msg.parameters["timeout"].uint64_param = 5000
    msg.parameters["routing_key"].string_param = "user-42"
    decoded = decode_request(msg)
    assert (decoded.priority, decoded.timeout_us, decoded.routing_key) == (2, 5000, "user-42")
    # The x-routing-key metadata (passed in by the servicer) wins over the parameter.
    assert decode_request(msg, routing_key="from-metadata").routing_key == "from-metadata"
    msg.parameters["routing_key"].string_param = ""
    assert decode_request(msg).routing_key is None


@pytest.mark.parametrize("key", ["priority", "timeout"])
@pytest.mark.parametrize("kind, value", [("string_param", "1"), ("double_param", 1.0),
                                         ("bool_param", True)])
def test_non_integer_priority_or_timeout_is_refused(key, kind, value):
    msg = request(("x", "INT32", [1], typed("INT32", [7])))
    setattr(msg.parameters[key], kind, value)
    assert refused(msg) == f"request parameter '{key}' must be an integer"


@pytest.mark.parametrize("key", ["priority", "timeout"])
def test_negative_priority_or_timeout_is_refused(key):
    msg = request(("x", "INT32", [1], typed("INT32", [7])))
    msg.parameters[key].int64_param = -1
    assert refused(msg) == f"request parameter '{key}' must not be negative"
