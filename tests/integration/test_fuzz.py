"""Hostile input on the wire: whatever arrives, the answer is a clean status (never INTERNAL or
UNKNOWN) and the server stays up. Hypothesis builds requests; random bytes go on the wire too."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import start_gateway

from bench import models
from gateway.protocol.pb import grpc_service_pb2 as pb

MODELS = ["mlp", "ident_bytes", "ident_fp16", "iris", "nope", "", "../x"]
DATATYPES = ["FP32", "FP16", "FP64", "INT64", "INT8", "UINT64", "BOOL", "BYTES", "fp32", "X", ""]
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    repo = tmp_path_factory.mktemp("fuzz")
    models.make_version(repo, "mlp", 1, models.build_mlp)
    models.make_version(repo, "ident_bytes", 1, models.build_identity, "BYTES")
    models.make_version(repo, "ident_fp16", 1, models.build_identity, "FP16")
    models.make_version(repo, "iris", 1, models.build_iris_classifier)
    with start_gateway(repo) as gw, grpc.insecure_channel(gw.url) as channel:
        gw.channel = channel
        yield gw
    assert gw.process.returncode == 0, gw.log()


params = st.dictionaries(
    st.sampled_from(["priority", "timeout", "routing_key", "x", ""]),
    st.one_of(st.builds(pb.InferParameter, int64_param=st.integers(-2**63, 2**63 - 1)),
              st.builds(pb.InferParameter, string_param=st.text(max_size=20)),
              st.builds(pb.InferParameter, bool_param=st.booleans()),
              st.builds(pb.InferParameter, double_param=st.floats())),
    max_size=3)


@st.composite
def requests(draw):
    n_inputs = draw(st.integers(0, 3))
    inputs, raw = [], []
    for _ in range(n_inputs):
        shape = draw(st.lists(st.integers(-2, 40), max_size=4))
        tensor = pb.ModelInferRequest.InferInputTensor(
            name=draw(st.sampled_from(["input", "INPUT0", "x", ""])),
            datatype=draw(st.sampled_from(DATATYPES)), shape=shape)
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=64)))
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=4)))
        inputs.append(tensor)
        raw.append(draw(st.binary(max_size=600)))
    msg = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(MODELS)),
        model_version=draw(st.sampled_from(["", "1", "2", "-1", "x"])),
        id=draw(st.text(max_size=10)), inputs=inputs,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n)
                 for n in draw(st.lists(st.sampled_from(["output", "OUTPUT0", "label", "zz"]),
                                        max_size=2))])
    for key, value in draw(params).items():
        msg.parameters[key].CopyFrom(value)
    if draw(st.booleans()):
        msg.raw_input_contents.extend(raw[:draw(st.integers(0, len(raw) + 1))])
    return msg.SerializeToString()


def send(channel, body: bytes):
    try:
        channel.unary_unary(INFER)(body, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=requests())
def test_structured_requests_get_clean_statuses(gateway, body):
    code, details = send(gateway.channel, body)
    assert code not in BAD, details


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=2000))
def test_random_bytes_on_the_wire_get_clean_statuses(gateway, body):
    code, details = send(gateway.channel, body)
    assert code not in BAD, details


def test_the_server_is_still_up_and_answering(gateway):
    code, _ = send(gateway.channel, pb.ModelInferRequest(
        model_name="mlp", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, 32])],
        raw_input_contents=[bytes(128)]).SerializeToString())
    assert code == grpc.StatusCode.OK
    assert gateway.process.poll() is None
