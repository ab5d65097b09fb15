"""Metadata, configuration, liveness/readiness, gRPC health and reflection, via tritonclient."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import TIMEOUT, raises

import gateway


def test_server_live_ready_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "gateway"
    assert meta.version == gateway.__version__
    assert {"model_repository", "model_configuration", "statistics"} <= set(meta.extensions)


def test_model_ready(client):
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "2")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("corrupt")  # on disk but no version loads
    assert client.is_model_ready("partly_corrupt", "1")
    assert not client.is_model_ready("partly_corrupt", "2")


def test_model_metadata_from_config(client):
    meta = client.get_model_metadata("mlp", as_json=True)
    assert meta == {
        "name": "mlp", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": ["-1", "32"]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": ["-1", "4"]}],
    }
    # The explicit version answers the same; the protobuf form agrees.
    meta_pb = client.get_model_metadata("mlp", "1")
    assert meta_pb.name == "mlp" and list(meta_pb.versions) == ["1"]
    assert list(meta_pb.inputs[0].shape) == [-1, 32]


def test_model_metadata_two_inputs_two_outputs(client):
    meta = client.get_model_metadata("add_sub")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("OUTPUT0", "FP32", [-1, 16]), ("OUTPUT1", "FP32", [-1, 16])]


def test_model_metadata_skips_non_tensor_outputs(client):
    """logreg_iris.onnx (shipped with onnxruntime) has a ZipMap sequence<map> output."""
    meta = client.get_model_metadata("logreg_iris", as_json=True)
    assert meta["inputs"] == [{"name": "float_input", "datatype": "FP32", "shape": ["3", "2"]}]
    assert meta["outputs"] == [{"name": "label", "datatype": "INT64", "shape": ["3"]}]
    meta = client.get_model_metadata("sequence_output", as_json=True)
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT0"]


def test_model_metadata_lists_serving_versions(client):
    assert client.get_model_metadata("all_versions").versions == ["1", "2", "3"]
    assert client.get_model_metadata("latest_two").versions == ["2", "3"]
    assert client.get_model_metadata("latest_default").versions == ["3"]
    assert client.get_model_metadata("specific_versions").versions == ["1", "3"]
    assert client.get_model_metadata("partly_corrupt").versions == ["1"]


def test_model_metadata_errors(client):
    with raises("NOT_FOUND", "Request for unknown model: 'no_such_model' is not found"):
        client.get_model_metadata("no_such_model")
    with raises("NOT_FOUND", "Request for unknown model: 'mlp' version 9 is not found"):
        client.get_model_metadata("mlp", "9")
    with raises("UNAVAILABLE", "model 'corrupt' is not available"):
        client.get_model_metadata("corrupt")


def test_model_config_as_written(client):
    config = client.get_model_config("mlp", as_json=True)["config"]
    assert config["name"] == "mlp"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["32"]}]
    assert config["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": ["4"]}]
    assert "dynamic_batching" in config


def test_model_config_partly_written_is_completed(client):
    """add_sub's config.pbtxt says only max_batch_size and dynamic_batching."""
    config = client.get_model_config("add_sub").config
    assert config.name == "add_sub" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT0", [16]), ("INPUT1", [16])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("OUTPUT0", [16]),
                                                               ("OUTPUT1", [16])]


def test_model_config_autocompleted_without_config_file(client):
    """iris has no config.pbtxt: everything comes from the ONNX graph (dynamic batch dim)."""
    config = client.get_model_config("iris", as_json=True)["config"]
    assert config["name"] == "iris"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] > 0
    assert "dynamic_batching" in config
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["4"]}]
    outputs = {o["name"]: o for o in config["output"]}
    assert set(outputs) == {"label", "probabilities"}
    assert outputs["label"]["data_type"] == "TYPE_INT64"
    assert outputs["label"].get("dims", []) == []  # one scalar per row
    assert outputs["probabilities"] == {"name": "probabilities", "data_type": "TYPE_FP32",
                                        "dims": ["3"]}
    # What Triton's auto-complete and normalisation fill (L0_model_config compare_status).
    assert config["backend"] == "onnxruntime"
    assert config["default_model_filename"] == "model.onnx"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["max_batch_size"] == 4  # Triton's default
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]
    assert config["instance_group"] == [{"name": "iris", "count": 1, "kind": "KIND_CPU"}]


def test_model_config_autocompleted_fixed_shape_model(client):
    """logreg_iris has fixed dims [3, 2]: no batching; the ZipMap output is left out."""
    config = client.get_model_config("logreg_iris", as_json=True)["config"]
    assert config.get("max_batch_size", 0) == 0
    assert "dynamic_batching" not in config
    assert config["input"] == [{"name": "float_input", "data_type": "TYPE_FP32",
                                "dims": ["3", "2"]}]
    assert config["output"] == [{"name": "label", "data_type": "TYPE_INT64", "dims": ["3"]}]


def test_model_config_errors(client):
    with raises("NOT_FOUND", "Request for unknown model: 'nope' is not found"):
        client.get_model_config("nope")
    with raises("NOT_FOUND", "Request for unknown model: 'mlp' version 7 is not found"):
        client.get_model_config("mlp", "7")
    with raises("UNAVAILABLE", "'bad_config'", "tensorflow_savedmodel"):
        client.get_model_config("bad_config")


def test_statistics_after_inference(client):
    import numpy as np
    import tritonclient.grpc as grpcclient

    x = grpcclient.InferInput("input", [2, 32], "FP32")
    x.set_data_from_numpy(np.ones((2, 32), np.float32))
    before = client.get_inference_statistics("mlp", "1").model_stats[0]
    client.infer("mlp", [x], client_timeout=TIMEOUT)
    after = client.get_inference_statistics("mlp", "1").model_stats[0]
    assert (after.name, after.version) == ("mlp", "1")
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 2  # rows, as Triton counts
    assert after.execution_count >= before.execution_count + 1
    with raises("NOT_FOUND", "Request for unknown model: 'nope' is not found"):
        client.get_inference_statistics("nope")


# ---- grpc.health.v1 and reflection --------------------------------------------------------------

def _health(channel, service: str):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


def test_health_overall_and_per_model(channel):
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(channel, "") == serving
    assert _health(channel, "mlp") == serving
    assert _health(channel, "iris") == serving
    assert _health(channel, "partly_corrupt") == serving  # version 1 serves
    assert _health(channel, "corrupt") == not_serving


def test_health_unknown_service_is_not_found(channel):
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        _health(channel, "no_such_model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    services = {s.name for s in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_reflection_describes_the_inference_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="inference.GRPCInferenceService")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    methods = {m.name for f in files for s in f.service if s.name == "GRPCInferenceService"
               for m in s.method}
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryIndex", "ModelConfig"} <= methods
