"""HTTP bodies <-> core types (gateway.protocol.httpcodec), without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.errors import InvalidArgument, Unimplemented
from gateway.modelconfig_pb import model_config_pb2 as mc
from gateway.protocol.http import STATUS, proto_json
from gateway.protocol.httpcodec import (
    JSON_VALUES,
    OutputPlan,
    decode_infer,
    encode_infer,
    parse_json,
)
from gateway.tensors import InferResponse, Tensor


def body(doc: dict, *binary: bytes) -> tuple[bytes, str | None]:
    header = json.dumps(doc).encode()
    return header + b"".join(binary), (str(len(header)) if binary else None)


def test_binary_and_json_inputs_in_one_request():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    text = b"".join(len(s).to_bytes(4, "little") + s for s in (b"x", b"", b"yz"))
    raw, length = body({"id": "r1", "inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2, 3],
         "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "datatype": "INT8", "shape": [2, 2], "data": [[1, -2], [3, 4]]},
        {"name": "t", "datatype": "BYTES", "shape": [3],
         "parameters": {"binary_data_size": len(text)}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        "parameters": {"priority": 2, "timeout": 100, "routing_key": "k"}}, a.tobytes(), text)
    request, plan = decode_infer(raw, length, "m", "3")
    assert (request.model, request.version, request.id, request.routing_key) == \
        ("m", "3", "r1", "k")
    assert (request.priority, request.timeout_us, request.outputs) == (2, 100, ["y", "z"])
    np.testing.assert_array_equal(request.inputs[0].data, a)
    assert request.inputs[1].data.dtype == np.int8
    assert request.inputs[1].data.tolist() == [[1, -2], [3, 4]]
    assert request.inputs[2].data.tolist() == [b"x", b"", b"yz"]
    assert plan.binary("y") and not plan.binary("z")


def test_header_routing_key_wins_over_the_parameter():
    raw, _ = body({"inputs": [], "parameters": {"routing_key": "param"}})
    assert decode_infer(raw, None, "m", "", "header")[0].routing_key == "header"


@pytest.mark.parametrize("doc, fragment", [
    ({"inputs": [{"name": "a", "datatype": "UINT8", "shape": [1], "data": [256]}]},
     "does not fit in UINT8"),
    ({"inputs": [{"name": "a", "datatype": "INT32", "shape": [1], "data": [True]}]},
     "INT32 data must hold integer values"),
    ({"inputs": [{"name": "a", "datatype": "BOOL", "shape": [1], "data": [1]}]},
     "BOOL data must hold true/false values"),
    ({"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": [1]}]},
     "BYTES data must be strings"),
    ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1], "data": []}]},
     "negative dimension"),
    ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1] * 33, "data": [1]}]},
     "33 dimensions; the limit is 32"),
    ({"inputs": [], "parameters": {"timeout": -1}}, "'timeout' must not be negative"),
    ({"inputs": [], "parameters": {"binary_data_output": "yes"}}, "must be true or false"),
    ({"inputs": [], "id": 7}, "'id' must be a string"),
])
def test_refusals(doc, fragment):
    raw, _ = body(doc)
    with pytest.raises(InvalidArgument, match=fragment):
        decode_infer(raw, None, "m", "")


def test_shared_memory_is_unimplemented():
    raw, _ = body({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1],
                               "parameters": {"shared_memory_region": "r"}}]})
    with pytest.raises(Unimplemented, match="system shared memory"):
        decode_infer(raw, None, "m", "")


def test_json_is_counted_before_it_is_parsed():
    parse_json(json.dumps({"data": [0] * (JSON_VALUES - 100)}).encode())
    with pytest.raises(InvalidArgument, match="holds more than"):
        parse_json(b"[" + b"{}," * 40_000 + b"{}]" + b" " * (1 << 20))
    # Commas and braces inside strings are not structure: such text passes.
    parse_json(json.dumps({"t": ["{,}" * 1000] * 1000}).encode())


def test_encode_binary_and_json_outputs():
    text = np.array([b"a", "\u00e9".encode()], dtype=object)
    response = InferResponse("m", "2", "r", [
        Tensor("y", "FP16", np.array([[1.5, -2]], np.float16)),
        Tensor("t", "BYTES", text), Tensor("b", "BOOL", np.array([True, False]))])
    payload, split = encode_infer(response, OutputPlan(True, {"b": False}))
    header = json.loads(payload[:split])
    assert (header["model_name"], header["model_version"], header["id"]) == ("m", "2", "r")
    y, t, b = header["outputs"]
    assert y["parameters"]["binary_data_size"] == 4
    assert t["parameters"]["binary_data_size"] == 4 + 1 + 4 + 2
    assert b["data"] == [True, False] and "parameters" not in b
    assert np.frombuffer(payload[split:split + 4], np.float16).tolist() == [1.5, -2]
    payload, split = encode_infer(response, OutputPlan())
    assert split is None
    assert json.loads(payload)["outputs"][1]["data"] == ["a", "\u00e9"]


def test_config_json_has_numbers_for_64_bit_integers():
    config = mc.ModelConfig(name="m", max_batch_size=8)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[3, -1])
    config.dynamic_batching.max_queue_delay_microseconds = 100
    doc = proto_json(config)
    assert doc["max_batch_size"] == 8 and doc["input"][0]["dims"] == [3, -1]
    assert doc["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert doc["input"][0]["data_type"] == "TYPE_FP32"


def test_every_gateway_error_code_has_an_http_status():
    from gateway import errors

    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.GatewayError)}
    assert codes <= set(STATUS), codes - set(STATUS)


def test_zero_size_outputs_encode_as_empty_binary_and_json():
    response = InferResponse("m", "1", "", [Tensor("y", "FP32", np.zeros((0, 4), np.float32)),
                                            Tensor("z", "INT64", np.zeros((2, 0), np.int64))])
    payload, split = encode_infer(response, OutputPlan(True, {}))
    header = json.loads(payload[:split])
    assert [o["shape"] for o in header["outputs"]] == [[0, 4], [2, 0]]
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [0, 0]
    assert payload[split:] == b""
    payload, _ = encode_infer(response, OutputPlan())
    assert [o["data"] for o in json.loads(payload)["outputs"]] == [[], []]
