"""Every status code the gateway answers, asserted with its message, through tritonclient.

Messages must say what is wrong and never leak the server's filesystem layout.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from support import (
    TIMEOUT,
    assert_no_path,
    busy_inputs,
    busy_output,
    check_error,
    index_rows,
    model_stats,
    raises,
    rpc_error,
    start_blocker,
)
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException


def tensor(name: str, array: np.ndarray, datatype: str = "FP32"):
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def mlp_in(rows: int = 1, cols: int = 32, dtype=np.float32, datatype="FP32"):
    return tensor("input", np.ones((rows, cols), dtype), datatype)


# ---- NOT_FOUND --------------------------------------------------------------------------------------

def test_unknown_model_not_found(client):
    with raises("NOT_FOUND", "Request for unknown model: 'no_such_model' is not found"):
        client.infer("no_such_model", [mlp_in()], client_timeout=TIMEOUT)


def test_unknown_version_not_found(client):
    with raises("NOT_FOUND", "Request for unknown model: 'mlp' version 2 is not found"):
        client.infer("mlp", [mlp_in()], model_version="2", client_timeout=TIMEOUT)
    # On disk, but not selected by the version policy (specific: [1, 3]).
    with raises("NOT_FOUND",
                "Request for unknown model: 'specific_versions' version 2 is not found"):
        client.infer("specific_versions", [tensor("input", np.ones((1, 8), np.float32))],
                     model_version="2", client_timeout=TIMEOUT)


def test_unknown_repository_not_found(client):
    rpc_error(client._client_stub.RepositoryIndex,
              service_pb2.RepositoryIndexRequest(repository_name="other"), "NOT_FOUND",
              "unknown repository 'other'")


# ---- INVALID_ARGUMENT -----------------------------------------------------------------------------

def test_wrong_datatype(client):
    with raises("INVALID_ARGUMENT", "input 'input' must be FP32, got FP64"):
        client.infer("mlp", [mlp_in(dtype=np.float64, datatype="FP64")], client_timeout=TIMEOUT)


def test_unsupported_datatype(client):
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP8", shape=[1, 32])
    request.raw_input_contents.append(b"\0" * 32)
    rpc_error(client._client_stub.ModelInfer, request, "INVALID_ARGUMENT",
              "input 'input' has unsupported datatype 'FP8'")


def test_wrong_shape(client):
    with raises("INVALID_ARGUMENT", "input 'input' has shape [2, 31]; the model expects [-1, 32]"):
        client.infer("mlp", [mlp_in(2, 31)], client_timeout=TIMEOUT)
    with raises("INVALID_ARGUMENT", "input 'input' has shape [2, 32, 1]"):
        client.infer("mlp", [tensor("input", np.ones((2, 32, 1), np.float32))],
                     client_timeout=TIMEOUT)
    # A non-batching model checks every dim.
    with raises("INVALID_ARGUMENT", "input 'float_input' has shape [4, 2]; the model expects [3, 2]"):
        client.infer("logreg_iris", [tensor("float_input", np.ones((4, 2), np.float32))],
                     client_timeout=TIMEOUT)


def test_batch_over_max_batch_size(client):
    with raises("INVALID_ARGUMENT", "the first dimension is the batch size and must be 1 to 8",
                "got shape [9, 32]"):
        client.infer("mlp", [mlp_in(9)], client_timeout=TIMEOUT)
    with raises("INVALID_ARGUMENT", "must be 1 to 8", "got shape [0, 32]"):
        client.infer("mlp", [mlp_in(0)], client_timeout=TIMEOUT)


def test_inputs_with_different_batch_sizes(client):
    with raises("INVALID_ARGUMENT", "all inputs must have the same batch size"):
        client.infer("add_sub", [tensor("INPUT0", np.ones((2, 16), np.float32)),
                                 tensor("INPUT1", np.ones((3, 16), np.float32))],
                     client_timeout=TIMEOUT)


def test_byte_size_mismatch(client):
    """tritonclient checks sizes itself, so the request is built by hand."""
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(b"\0" * 100)
    rpc_error(client._client_stub.ModelInfer, request, "INVALID_ARGUMENT",
              "input 'input': shape [1, 32] of FP32 needs 128 bytes but 100 were sent")
    # Raw BYTES whose length prefix claims more than was sent.
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x10\x00\x00\x00abc")
    rpc_error(client._client_stub.ModelInfer, request, "INVALID_ARGUMENT",
              "input 'INPUT0': string element 0 claims 16 bytes, only 3 remain")
    # More raw entries than inputs.
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.extend([b"\0" * 128, b"\0" * 128])
    rpc_error(client._client_stub.ModelInfer, request, "INVALID_ARGUMENT",
              "raw_input_contents has 2 entries for 1 inputs")


def test_bool_bytes_must_be_zero_or_one(client):
    request = service_pb2.ModelInferRequest(model_name="identity_bool")
    request.inputs.add(name="INPUT0", datatype="BOOL", shape=[1, 3])
    request.raw_input_contents.append(b"\x00\x01\x07")
    rpc_error(client._client_stub.ModelInfer, request, "INVALID_ARGUMENT",
              "BOOL bytes must be 0 or 1")


def test_missing_input(client):
    with raises("INVALID_ARGUMENT", "model 'add_sub' expects input(s) INPUT1"):
        client.infer("add_sub", [tensor("INPUT0", np.ones((1, 16), np.float32))],
                     client_timeout=TIMEOUT)


def test_unknown_and_duplicate_input(client):
    with raises("INVALID_ARGUMENT", "model 'mlp' has no input 'wrong'; its inputs are input"):
        client.infer("mlp", [tensor("wrong", np.ones((1, 32), np.float32))],
                     client_timeout=TIMEOUT)
    x = np.ones((1, 16), np.float32)
    with raises("INVALID_ARGUMENT", "input 'INPUT0' already exists in request"):
        client.infer("add_sub", [tensor("INPUT0", x), tensor("INPUT0", x)],
                     client_timeout=TIMEOUT)


def test_unknown_output(client):
    with raises("INVALID_ARGUMENT", "unexpected inference output 'nope' for model 'mlp'"):
        client.infer("mlp", [mlp_in()], outputs=[grpcclient.InferRequestedOutput("nope")],
                     client_timeout=TIMEOUT)


def test_classification_extension_answers_the_top_classes(client):
    """Triton's extension: the top 2 of the 4 outputs, highest first, as "value:index"."""
    x = mlp_in()
    plain = client.infer("mlp", [x], client_timeout=TIMEOUT).as_numpy("output")
    result = client.infer("mlp", [x],
                          outputs=[grpcclient.InferRequestedOutput("output", class_count=2)],
                          client_timeout=TIMEOUT).as_numpy("output")
    top = np.argsort(-plain, axis=1, kind="stable")[:, :2]
    assert result.shape == (plain.shape[0], 2)
    for row in range(plain.shape[0]):
        assert [v.decode() for v in result[row]] == [
            f"{plain[row, i]:f}:{i}" for i in top[row]]


def test_bad_request_parameters(client):
    """tritonclient reserves 'priority' and 'timeout' for its own arguments: build by hand."""
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(b"\0" * 128)
    request.parameters["priority"].string_param = "high"
    rpc_error(client._client_stub.ModelInfer, request, "INVALID_ARGUMENT",
              "request parameter 'priority' must be an integer")


# ---- UNAVAILABLE ------------------------------------------------------------------------------------

def test_model_that_failed_to_load_is_unavailable(client):
    with raises("UNAVAILABLE", "model 'corrupt' is not available",
                "onnxruntime could not load the model"):
        client.infer("corrupt", [mlp_in()], client_timeout=TIMEOUT)
    with raises("UNAVAILABLE", "model 'partly_corrupt' version 2 is not available",
                "onnxruntime could not load the model"):
        client.infer("partly_corrupt", [tensor("input", np.ones((1, 8), np.float32))],
                     model_version="2", client_timeout=TIMEOUT)
    with raises("UNAVAILABLE", "'bad_config'",
                "platform 'tensorflow_savedmodel' is not served"):
        client.infer("bad_config", [tensor("input", np.ones((1, 8), np.float32))],
                     client_timeout=TIMEOUT)
    # Version 1 of the partly corrupt model serves.
    result = client.infer("partly_corrupt", [tensor("input", np.ones((1, 8), np.float32))],
                          client_timeout=TIMEOUT)
    assert result.get_response().model_version == "1"


# ---- INTERNAL: the model fails at run time ------------------------------------------------------

def test_model_failure_fails_only_its_request_and_the_next_succeeds(client):
    good = np.array([[0, 1.5, 2, 9.9]], np.float32)
    bad = np.array([[0, 1, 10, 2]], np.float32)  # index 10 is out of the model's table
    with raises("INTERNAL", "model 'failing' version 1 failed to execute",
                "out of", "bounds") as info:
        client.infer("failing", [tensor("INPUT0", bad)], client_timeout=TIMEOUT)
    assert "ONNXRuntimeError" not in info.value.message()
    result = client.infer("failing", [tensor("INPUT0", good)], client_timeout=TIMEOUT)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [[0, 1, 2, 9]])


async def test_model_failure_under_concurrency_spares_other_batches(serving_gateway):
    """Bad and good requests at once: every good one that did not share a batch with a bad one
    succeeds, and every failure names the model failure, never something else."""
    good = np.array([[1, 2, 3, 4]], np.float32)
    bad = np.array([[11, 2, 3, 4]], np.float32)
    async with aioclient.InferenceServerClient(serving_gateway.url) as client:
        async def call(x):
            try:
                return await client.infer("failing", [tensor("INPUT0", x)],
                                          client_timeout=TIMEOUT)
            except InferenceServerException as exc:
                return exc

        outcomes = await asyncio.gather(*(call(bad if i % 8 == 0 else good) for i in range(32)))
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, InferenceServerException):
                check_error(outcome, "INTERNAL", "model 'failing' version 1 failed to execute")
            else:
                assert i % 8 != 0
                np.testing.assert_array_equal(outcome.as_numpy("OUTPUT0"), good)
        assert all(isinstance(outcomes[i], InferenceServerException) for i in range(0, 32, 8))
        # Afterwards the model serves normally.
        result = await client.infer("failing", [tensor("INPUT0", good)], client_timeout=TIMEOUT)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), good)


def test_model_that_always_fails(client):
    with raises("INTERNAL", "model 'always_failing' version 1 failed to execute", "Reshape"):
        client.infer("always_failing", [tensor("INPUT0", np.ones((2, 4), np.float32))],
                     client_timeout=TIMEOUT)
    assert client.is_model_ready("always_failing")  # a run-time failure does not unload it


def test_bytes_that_are_not_utf8(client):
    """ONNX string tensors hold UTF-8 text: other bytes are the caller's error."""
    x = np.array([[b"ok", b"\xff\xfe not utf-8"]], dtype=object)
    with raises("INVALID_ARGUMENT", "input 'INPUT0'", "not valid UTF-8",
                "ONNX Runtime passes them to the model as UTF-8 only"):
        client.infer("identity_bytes", [tensor("INPUT0", x, "BYTES")], client_timeout=TIMEOUT)
    ok = np.array([[b"fine"]], dtype=object)
    result = client.infer("identity_bytes", [tensor("INPUT0", ok, "BYTES")],
                          client_timeout=TIMEOUT)
    assert result.as_numpy("OUTPUT0").tolist() == [[b"fine"]]


async def test_bytes_that_are_not_utf8_do_not_fail_other_callers(serving_gateway):
    """One caller's bad bytes must not fail the requests batched with it (dynamic batching)."""
    async with aioclient.InferenceServerClient(serving_gateway.url) as client:
        async def call(i):
            value = b"\xc3\x28" if i % 8 == 3 else f"caller {i} \u00e9".encode()
            x = np.array([[value]], dtype=object)
            try:
                return await client.infer("text_batched", [tensor("INPUT0", x, "BYTES")],
                                          client_timeout=TIMEOUT)
            except InferenceServerException as exc:
                return exc

        outcomes = await asyncio.gather(*(call(i) for i in range(32)))
    for i, outcome in enumerate(outcomes):
        if i % 8 == 3:
            assert isinstance(outcome, InferenceServerException)
            check_error(outcome, "INVALID_ARGUMENT", "not valid UTF-8")
        else:
            assert not isinstance(outcome, InferenceServerException), (i, outcome.message())
            assert outcome.as_numpy("OUTPUT0").tolist() == [[f"caller {i} \u00e9".encode()]]


# ---- RESOURCE_EXHAUSTED -------------------------------------------------------------------------

async def test_queue_full_is_resource_exhausted(serving_gateway, client):
    """busy_queue: one instance, max_queue_size 1. While a long request runs, three more arrive:
    one waits in the queue (and is served), the other two are refused at once."""
    async with aioclient.InferenceServerClient(serving_gateway.url) as aio:
        async def call():
            try:
                return await aio.infer("busy_queue", busy_inputs(0), client_timeout=TIMEOUT)
            except InferenceServerException as exc:
                return exc

        blocker = await start_blocker(aio, client, "busy_queue")
        outcomes = await asyncio.gather(*(call() for _ in range(3)))
        refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
        served = [o for o in outcomes if not isinstance(o, InferenceServerException)]
        assert len(refused) == 2 and len(served) == 1, [str(o) for o in refused]
        for exc in refused:
            check_error(exc, "RESOURCE_EXHAUSTED", "model 'busy_queue' version 1",
                        "queue is full (1 requests waiting)")
        for result in [*served, await blocker]:
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), busy_output())
        # Once the queue drains the model takes requests again.
        result = await aio.infer("busy_queue", busy_inputs(0), client_timeout=TIMEOUT)
        assert result.as_numpy("OUTPUT0").shape == (1, 4)


# ---- DEADLINE_EXCEEDED ------------------------------------------------------------------------------

async def test_client_deadline_passes_while_queued(serving_gateway, client):
    """A request queued behind a long one with a tiny client deadline: DEADLINE_EXCEEDED, and the
    server drops it instead of running it."""
    before = model_stats(client, "busy_timeout").execution_count
    async with aioclient.InferenceServerClient(serving_gateway.url) as aio:
        blocker = await start_blocker(aio, client, "busy_timeout")
        with raises("DEADLINE_EXCEEDED", "Deadline Exceeded"):
            await aio.infer("busy_timeout", busy_inputs(0), client_timeout=0.2)
        result = await blocker
        assert result.as_numpy("OUTPUT0").shape == (1, 4)
    # Only the blocker ran: the expired request never reached the model.
    assert model_stats(client, "busy_timeout").execution_count == before + 1


async def test_queue_timeout_is_deadline_exceeded(serving_gateway, client):
    """The request's own ``timeout`` parameter (allowed by the queue policy) expires in the queue:
    the server answers DEADLINE_EXCEEDED with its own message."""
    before = model_stats(client, "busy_timeout").execution_count
    async with aioclient.InferenceServerClient(serving_gateway.url) as aio:
        blocker = await start_blocker(aio, client, "busy_timeout")
        with raises("DEADLINE_EXCEEDED", "model 'busy_timeout' version 1",
                    "request timed out in the queue"):
            await aio.infer("busy_timeout", busy_inputs(0), timeout=1000,  # microseconds
                            client_timeout=TIMEOUT)
        await blocker
    assert model_stats(client, "busy_timeout").execution_count == before + 1


# ---- UNIMPLEMENTED --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, what", [
    (lambda c: c.get_system_shared_memory_status(), "system shared memory"),
    (lambda c: c.register_system_shared_memory("r", "/key", 64), "system shared memory"),
    (lambda c: c.unregister_system_shared_memory(), "system shared memory"),
    (lambda c: c.get_cuda_shared_memory_status(), "CUDA shared memory"),
    (lambda c: c.register_cuda_shared_memory("r", base64.b64encode(b"handle"), 0, 64), "CUDA shared memory"),
    (lambda c: c.unregister_cuda_shared_memory(), "CUDA shared memory"),
    (lambda c: c.get_trace_settings(), "tracing"),
    (lambda c: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}), "tracing"),
    (lambda c: c.get_log_settings(), "LogSettings"),
    (lambda c: c.update_log_settings({"log_verbose_level": 1}), "LogSettings"),
])
def test_unimplemented_rpcs(client, call, what):
    with raises("UNIMPLEMENTED", what, "not supported by this gateway"):
        call(client)


# ---- no leaks ----------------------------------------------------------------------------------

def test_index_reasons_and_messages_do_not_leak_paths(client, serving_repo):
    rows = index_rows(client)
    reasons = [reason for (_state, reason) in rows.values() if reason]
    assert reasons, "the corrupt models should have reasons"
    for reason in reasons:
        assert_no_path(reason, serving_repo, serving_repo.resolve())
    for model in ("corrupt", "partly_corrupt", "bad_config"):
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, [mlp_in()], model_version="2" if model == "partly_corrupt" else "",
                         client_timeout=TIMEOUT)
        assert_no_path(info.value.message(), serving_repo, serving_repo.resolve())
