"""Inference through tritonclient equals in-process onnxruntime, for every model kind and datatype.

Raw tensors (tritonclient's default) and typed ``contents`` (built by hand with tritonclient's
service_pb2), the sync and the asyncio clients, unary and streaming.
"""

from __future__ import annotations

import asyncio
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from support import (
    ALL_DATATYPES,
    LOGREG_IRIS,
    TIMEOUT,
    check_error,
    model_file,
    raises,
    reference,
    rpc_error,
    sample,
)
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException


def infer_input(name: str, array: np.ndarray, datatype: str | None = None):
    from tritonclient.utils import np_to_triton_dtype

    tensor = grpcclient.InferInput(name, list(array.shape),
                                   datatype or np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def mlp_input(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 32)).astype(np.float32)


# ---- models ---------------------------------------------------------------------------------

def test_mlp_equals_onnxruntime(client, serving_repo):
    x = mlp_input(5)
    result = client.infer("mlp", [infer_input("input", x)], request_id="req-7",
                          client_timeout=TIMEOUT)
    (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
    out = result.as_numpy("output")
    assert out.dtype == np.float32 and out.shape == (5, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("mlp", "1", "req-7")


def test_mlp_explicit_version_and_batch_limits(client, serving_repo):
    for rows in (1, 8):  # 8 is max_batch_size
        x = mlp_input(rows, seed=rows)
        result = client.infer("mlp", [infer_input("input", x)], model_version="1",
                              client_timeout=TIMEOUT)
        (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
        assert result.get_response().model_version == "1"


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(client, serving_repo):
    """Many callers at once: batches form, and every answer is the caller's own rows."""
    inputs = [mlp_input(1 + i % 4, seed=100 + i) for i in range(48)]

    def call(x):
        return client.infer("mlp", [infer_input("input", x)], client_timeout=TIMEOUT)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, inputs))
    for x, result in zip(inputs, results):
        (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)


def test_sklearn_iris_pipeline(client, serving_repo):
    from sklearn.datasets import load_iris

    x_all, y_all = load_iris(return_X_y=True)
    x_all = x_all.astype(np.float32)
    labels = []
    for start in range(0, len(x_all), 4):  # auto-completed: Triton's max_batch_size, 4
        x = x_all[start:start + 4]
        result = client.infer("iris", [infer_input("input", x)], client_timeout=TIMEOUT)
        label, proba = reference(model_file(serving_repo, "iris"), {"input": x})
        got_label = result.as_numpy("label")
        assert got_label.dtype == np.int64 and got_label.shape == (len(x),)
        np.testing.assert_array_equal(got_label, label)
        np.testing.assert_allclose(result.as_numpy("probabilities"), proba, rtol=1e-5, atol=1e-6)
        labels.append(got_label)
    assert (np.concatenate(labels) == y_all).mean() > 0.9


def test_logreg_iris_tensor_output_only(client):
    """onnxruntime's own logreg_iris.onnx: ask for its tensor output; ZipMap stays out."""
    x = np.array([[5.1, 3.5], [6.2, 2.9], [7.7, 3.0]], np.float32)
    (expected,) = reference(LOGREG_IRIS, {"float_input": x}, ["label"])
    result = client.infer("logreg_iris", [infer_input("float_input", x)],
                          outputs=[grpcclient.InferRequestedOutput("label")],
                          client_timeout=TIMEOUT)
    np.testing.assert_array_equal(result.as_numpy("label"), expected)
    assert [o.name for o in result.get_response().outputs] == ["label"]
    # Asking for nothing in particular returns every tensor output, still without the ZipMap.
    result = client.infer("logreg_iris", [infer_input("float_input", x)], client_timeout=TIMEOUT)
    assert [o.name for o in result.get_response().outputs] == ["label"]
    np.testing.assert_array_equal(result.as_numpy("label"), expected)


def test_logreg_iris_zipmap_output_refused(client):
    x = np.zeros((3, 2), np.float32)
    with raises("INVALID_ARGUMENT", "output 'probabilities'", "seq(map(int64,tensor(float)))",
                "tensor outputs only"):
        client.infer("logreg_iris", [infer_input("float_input", x)],
                     outputs=[grpcclient.InferRequestedOutput("probabilities")],
                     client_timeout=TIMEOUT)


def test_add_sub_all_and_subset_of_outputs(client, serving_repo):
    a = np.arange(48, dtype=np.float32).reshape(3, 16)
    b = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    inputs = [infer_input("INPUT0", a), infer_input("INPUT1", b)]
    result = client.infer("add_sub", inputs, client_timeout=TIMEOUT)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    # Only OUTPUT1 asked for: only OUTPUT1 answered.
    result = client.infer("add_sub", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")],
                          client_timeout=TIMEOUT)
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    assert result.as_numpy("OUTPUT0") is None
    (expected,) = reference(model_file(serving_repo, "add_sub"), {"INPUT0": a, "INPUT1": b},
                            ["OUTPUT1"])
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), expected, rtol=1e-6)
    # Inputs in the other order are matched by name.
    result = client.infer("add_sub", inputs[::-1], client_timeout=TIMEOUT)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def test_sequence_output_model_serves_its_tensor_output(client):
    x = np.array([[0.1, 0.2, 0.7]], np.float32)
    result = client.infer("sequence_output", [infer_input("INPUT0", x)], client_timeout=TIMEOUT)
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT0"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    with raises("INVALID_ARGUMENT", "output 'OUTPUT1'", "cannot return"):
        client.infer("sequence_output", [infer_input("INPUT0", x)],
                     outputs=[grpcclient.InferRequestedOutput("OUTPUT1")], client_timeout=TIMEOUT)


# ---- datatypes: raw contents (tritonclient's default) ---------------------------------------------

@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_identity_raw_round_trip(client, datatype):
    x = sample(datatype, (3, 5), seed=3)
    result = client.infer(f"identity_{datatype.lower()}", [infer_input("INPUT0", x, datatype)],
                          client_timeout=TIMEOUT)
    out = result.as_numpy("OUTPUT0")
    assert result.get_response().outputs[0].datatype == datatype
    assert out.shape == x.shape
    if datatype == "BYTES":
        assert out.tolist() == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


def test_bytes_arbitrary_utf8_strings(client):
    texts = ["", "a", "naïve", "日本語", "🚀" * 50, "zero\x00byte", "ends with space ", "x" * 10000,
             "\u202eright-to-left", "ﬁ ligature", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "line\r\nbreak"]
    x = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(2, 6)
    result = client.infer("identity_bytes", [infer_input("INPUT0", x, "BYTES")],
                          client_timeout=TIMEOUT)
    out = result.as_numpy("OUTPUT0")
    assert [v.decode("utf-8") for v in out.reshape(-1)] == texts


def test_bytes_from_numpy_string_arrays(client):
    """tritonclient also takes numpy bytes_ arrays for BYTES."""
    x = np.array([[b"abc", b"de"]], dtype=np.bytes_)
    result = client.infer("identity_bytes", [infer_input("INPUT0", x, "BYTES")],
                          client_timeout=TIMEOUT)
    assert result.as_numpy("OUTPUT0").tolist() == [[b"abc", b"de"]]


# ---- datatypes: typed contents -------------------------------------------------------------------

TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def typed_request(model: str, name: str, datatype: str, array: np.ndarray,
                  **kwargs) -> service_pb2.ModelInferRequest:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=list(array.shape))
    values = array.reshape(-1).tolist()
    getattr(tensor.contents, TYPED_FIELD[datatype]).extend(values)
    return service_pb2.ModelInferRequest(model_name=model, inputs=[tensor], **kwargs)


@pytest.mark.parametrize("datatype", sorted(TYPED_FIELD))
def test_identity_typed_contents_round_trip(client, datatype):
    """A request built by hand with typed contents; the answer comes back as raw contents."""
    x = sample(datatype, (2, 4), seed=5)
    request = typed_request(f"identity_{datatype.lower()}", "INPUT0", datatype, x, id="typed")
    response = client._client_stub.ModelInfer(request, timeout=TIMEOUT)
    assert response.id == "typed" and response.model_version == "1"
    assert len(response.raw_output_contents) == 1
    out = grpcclient.InferResult(response).as_numpy("OUTPUT0")
    if datatype == "BYTES":
        assert out.tolist() == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


def test_typed_contents_mlp_equals_onnxruntime(client, serving_repo):
    x = mlp_input(3, seed=9)
    response = client._client_stub.ModelInfer(typed_request("mlp", "input", "FP32", x),
                                              timeout=TIMEOUT)
    (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
    np.testing.assert_allclose(grpcclient.InferResult(response).as_numpy("output"), expected,
                               rtol=1e-5, atol=1e-6)


def test_typed_contents_errors(client):
    infer = client._client_stub.ModelInfer
    # FP16 has no typed field: it must travel as raw bytes.
    request = service_pb2.ModelInferRequest(model_name="identity_fp16", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP16",
                                                       shape=[1, 2])])
    rpc_error(infer, request, "INVALID_ARGUMENT", "FP16 has no typed contents field")
    # Too few values for the shape.
    request = typed_request("identity_int32", "INPUT0", "INT32", np.arange(4, dtype=np.int32))
    request.inputs[0].shape[:] = [1, 5]
    rpc_error(infer, request, "INVALID_ARGUMENT",
              "needs 5 values but 4 were sent in contents.int_contents")
    # A value that does not fit the datatype.
    request = typed_request("identity_int8", "INPUT0", "INT8", np.array([[1, 2]], np.int64))
    request.inputs[0].contents.int_contents[1] = 300
    rpc_error(infer, request, "INVALID_ARGUMENT", "does not fit in INT8")
    # Typed and raw contents mixed in one request.
    request = typed_request("add_sub", "INPUT0", "FP32", np.ones((1, 16), np.float32))
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.extend([b"\0" * 64, b"\0" * 64])
    rpc_error(infer, request, "INVALID_ARGUMENT", "use one or the other")


# ---- asyncio client ------------------------------------------------------------------------------

async def test_aio_client_infer_and_metadata(serving_gateway, serving_repo):
    async with aioclient.InferenceServerClient(serving_gateway.url) as client:
        assert await client.is_server_ready()
        assert await client.is_model_ready("mlp")
        meta = await client.get_model_metadata("mlp")
        assert meta.inputs[0].name == "input"
        xs = [mlp_input(1 + i % 3, seed=200 + i) for i in range(24)]
        results = await asyncio.gather(*(
            client.infer("mlp", [infer_input("input", x)], request_id=str(i),
                         client_timeout=TIMEOUT)
            for i, x in enumerate(xs)))
        for i, (x, result) in enumerate(zip(xs, results)):
            (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
            np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
            assert result.get_response().id == str(i)


async def test_aio_client_errors(serving_gateway):
    async with aioclient.InferenceServerClient(serving_gateway.url) as client:
        x = infer_input("input", mlp_input(1))
        with raises("NOT_FOUND", "Request for unknown model: 'nope' is not found"):
            await client.infer("nope", [x], client_timeout=TIMEOUT)
        with raises("INVALID_ARGUMENT", "has shape [1, 31]"):
            await client.infer("mlp", [infer_input("input", np.ones((1, 31), np.float32))],
                               client_timeout=TIMEOUT)
        # The client still works after errors.
        result = await client.infer("mlp", [x], client_timeout=TIMEOUT)
        assert result.as_numpy("output").shape == (1, 4)


async def test_aio_stream_infer(serving_gateway, serving_repo):
    xs = {f"s{i}": mlp_input(1 + i % 2, seed=300 + i) for i in range(6)}

    async def requests():
        for request_id, x in xs.items():
            yield {"model_name": "mlp", "inputs": [infer_input("input", x)],
                   "request_id": request_id}
        yield {"model_name": "mlp", "inputs": [infer_input("input", np.ones((1, 3), np.float32))],
               "request_id": "bad"}
        yield {"model_name": "iris", "inputs": [infer_input("input", np.ones((2, 4), np.float32))],
               "request_id": "iris"}

    async with aioclient.InferenceServerClient(serving_gateway.url) as client:
        results, errors = {}, []
        async for result, error in client.stream_infer(requests(), stream_timeout=TIMEOUT):
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result
    assert len(errors) == 1
    check_error(errors[0], None, "input 'input' has shape [1, 3]")
    assert set(results) == set(xs) | {"iris"}
    for request_id, x in xs.items():
        (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
        np.testing.assert_allclose(results[request_id].as_numpy("output"), expected,
                                   rtol=1e-5, atol=1e-6)
    assert results["iris"].as_numpy("label").shape == (2,)


# ---- streaming with the sync client ---------------------------------------------------------------

def test_stream_several_requests_and_an_error_does_not_kill_the_stream(serving_gateway,
                                                                       serving_repo):
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(serving_gateway.url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        xs = {f"r{i}": mlp_input(1 + i % 3, seed=400 + i) for i in range(5)}
        for request_id, x in xs.items():
            client.async_stream_infer("mlp", [infer_input("input", x)], request_id=request_id)
        # A bad request (unknown model) in the middle of the stream ...
        client.async_stream_infer("no_such_model", [infer_input("input", xs["r0"])],
                                  request_id="bad")
        received = [answers.get(timeout=TIMEOUT) for _ in range(len(xs) + 1)]
        # ... and the same stream keeps serving afterwards.
        a = np.ones((1, 16), np.float32)
        client.async_stream_infer("add_sub", [infer_input("INPUT0", a), infer_input("INPUT1", a)],
                                  request_id="after")
        received.append(answers.get(timeout=TIMEOUT))
    finally:
        client.stop_stream()
        client.close()
    errors = [e for _, e in received if e is not None]
    results = {r.get_response().id: r for r, e in received if e is None}
    assert len(errors) == 1 and isinstance(errors[0], InferenceServerException)
    check_error(errors[0], None, "Request for unknown model: 'no_such_model' is not found")
    assert set(results) == set(xs) | {"after"}
    for request_id, x in xs.items():
        (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
        np.testing.assert_allclose(results[request_id].as_numpy("output"), expected,
                                   rtol=1e-5, atol=1e-6)
        assert results[request_id].get_response().model_version == "1"
    np.testing.assert_array_equal(results["after"].as_numpy("OUTPUT0"), a + a)
