"""The model repository: index with states and reasons, explicit load/unload, isolation of
corrupt versions, version policies. tritonclient against the real server.
"""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    BUSY_ITERATIONS,
    TIMEOUT,
    assert_no_path,
    busy_inputs,
    busy_output,
    check_error,
    index_rows,
    model_file,
    raises,
    reference,
    rpc_error,
    start_blocker,
    start_gateway,
    wait_for,
    write_garbage,
)
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from bench import models


def small_input(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)


def infer_small(client, model: str, x: np.ndarray, version: str = ""):
    t = grpcclient.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return client.infer(model, [t], model_version=version, client_timeout=TIMEOUT)


# ---- index and isolation (shared gateway, control mode none) ------------------------------------

def test_index_lists_states_and_reasons(client):
    rows = index_rows(client)
    assert rows[("mlp", "1")] == ("READY", "")
    assert rows[("iris", "1")] == ("READY", "")
    # A corrupt version is UNAVAILABLE with its reason; the good version next to it is READY.
    assert rows[("partly_corrupt", "1")] == ("READY", "")
    state, reason = rows[("partly_corrupt", "2")]
    assert state == "UNAVAILABLE"
    assert "onnxruntime could not load the model" in reason and "Protobuf parsing failed" in reason
    state, reason = rows[("corrupt", "1")]
    assert state == "UNAVAILABLE" and "onnxruntime could not load the model" in reason
    state, reason = rows[("bad_config", "1")]
    assert state == "UNAVAILABLE"
    assert "platform 'tensorflow_savedmodel' is not served" in reason
    # Versions outside the policy are not listed as serving.
    assert ("latest_default", "3") in rows and ("latest_default", "1") not in rows
    assert all(state in ("READY", "UNAVAILABLE") for state, _ in rows.values())


def test_index_ready_only(client):
    response = client._client_stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True),
                                                   timeout=TIMEOUT)
    names = {(m.name, m.version) for m in response.models}
    assert ("mlp", "1") in names and ("partly_corrupt", "1") in names
    assert ("corrupt", "1") not in names and ("partly_corrupt", "2") not in names
    assert all(m.state == "READY" for m in response.models)


def test_corrupt_model_does_not_affect_others(client, serving_repo):
    assert client.is_server_ready()  # a corrupt model never makes the server unready
    x = np.ones((1, 32), np.float32)
    t = grpcclient.InferInput("input", [1, 32], "FP32")
    t.set_data_from_numpy(x)
    result = client.infer("mlp", [t], client_timeout=TIMEOUT)
    (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)


def test_load_and_unload_refused_in_none_mode(client):
    with raises("FAILED_PRECONDITION",
                "explicit model load / unload is not allowed if polling is enabled",
                "cannot load models", "'none' control mode", "--control-mode explicit"):
        client.load_model("mlp")
    with raises("FAILED_PRECONDITION", "cannot unload models", "'none' control mode"):
        client.unload_model("mlp")
    assert client.is_model_ready("mlp")


# ---- version policies (shared gateway) ---------------------------------------------------------

@pytest.mark.parametrize("model, served, newest", [
    ("latest_default", ["3"], "3"),
    ("latest_two", ["2", "3"], "3"),
    ("all_versions", ["1", "2", "3"], "3"),
    ("specific_versions", ["1", "3"], "3"),
])
def test_version_policies(client, serving_repo, model, served, newest):
    rows = index_rows(client)
    assert sorted(v for (m, v), (state, _) in rows.items()
                  if m == model and state == "READY") == served
    for version in ("1", "2", "3"):
        assert client.is_model_ready(model, version) == (version in served)
    x = small_input(3, seed=11)
    for version in served:
        result = infer_small(client, model, x, version)
        assert result.get_response().model_version == version
        (expected,) = reference(model_file(serving_repo, model, int(version)), {"input": x})
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
    for version in {"1", "2", "3"} - set(served):
        with raises("NOT_FOUND",
                    f"Request for unknown model: '{model}' version {version} is not found"):
            infer_small(client, model, x, version)
    # No version asked: the newest serving version answers.
    result = infer_small(client, model, x)
    assert result.get_response().model_version == newest
    (expected,) = reference(model_file(serving_repo, model, int(newest)), {"input": x})
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)


# ---- explicit control mode (its own gateway) --------------------------------------------------------

@pytest.fixture(scope="module")
def explicit_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("explicit_repo")
    for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
        models.make_version(repo, name, 1, models.build_mlp, (8, 4), seed=seed)
        models.write_config(repo / name, "max_batch_size: 4")
    write_garbage(repo, "corrupt", 1)
    models.make_version(repo, "busy", 1, models.build_busy_model)
    models.write_config(repo / "busy", "max_batch_size: 8")
    # Slow to load: a big MLP warmed up at every batch size from 1 to 64 (about a second).
    models.make_version(repo, "slow_loader", 1, models.build_mlp, models.HEAVY_MLP)
    models.write_config(repo / "slow_loader", "max_batch_size: 64\ndynamic_batching { }")
    # A model directory that is a symlink out of the repository must never load.
    outside = tmp_path_factory.mktemp("outside_repo")
    models.make_version(outside, "escaped", 1, models.build_mlp, (8, 4))
    (repo / "escaped").symlink_to(outside / "escaped", target_is_directory=True)
    return repo


@pytest.fixture(scope="module")
def explicit_gateway(explicit_repo):
    with start_gateway(explicit_repo, "--control-mode", "explicit", "--load-model", "alpha") as gw:
        yield gw


@pytest.fixture
def explicit_client(explicit_gateway):
    c = grpcclient.InferenceServerClient(explicit_gateway.url)
    yield c
    c.close()


def _health(url: str, service: str):
    with grpc.insecure_channel(url) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


def test_explicit_mode_loads_only_named_models_at_start(explicit_client):
    rows = index_rows(explicit_client)
    assert rows[("alpha", "1")] == ("READY", "")
    assert rows[("beta", "")] == ("UNAVAILABLE", "not loaded")
    assert rows[("corrupt", "")] == ("UNAVAILABLE", "not loaded")
    assert explicit_client.is_model_ready("alpha")
    assert not explicit_client.is_model_ready("beta")
    with raises("NOT_FOUND", "Request for unknown model: 'beta' is not found"):
        infer_small(explicit_client, "beta", small_input())


def test_explicit_load_infer_unload_reload(explicit_client, explicit_gateway, explicit_repo):
    x = small_input(2, seed=5)
    explicit_client.load_model("beta")
    assert explicit_client.is_model_ready("beta")
    assert index_rows(explicit_client)[("beta", "1")] == ("READY", "")
    assert _health(explicit_gateway.url, "beta") == health_pb2.HealthCheckResponse.SERVING
    result = infer_small(explicit_client, "beta", x)
    (expected,) = reference(model_file(explicit_repo, "beta"), {"input": x})
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)

    explicit_client.unload_model("beta")
    assert not explicit_client.is_model_ready("beta")
    assert index_rows(explicit_client)[("beta", "")] == ("UNAVAILABLE", "unloaded")
    assert _health(explicit_gateway.url, "beta") == health_pb2.HealthCheckResponse.NOT_SERVING
    with raises("UNAVAILABLE", "model 'beta' is not available: unloaded"):
        infer_small(explicit_client, "beta", x)
    # alpha was never touched.
    assert explicit_client.is_model_ready("alpha")

    explicit_client.load_model("beta")
    result = infer_small(explicit_client, "beta", x)
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)


async def test_unload_lets_in_flight_requests_finish(explicit_gateway, explicit_client):
    """Unload with one request running and two queued: all three are answered; afterwards the
    model is UNAVAILABLE."""
    explicit_client.load_model("busy")
    async with aioclient.InferenceServerClient(explicit_gateway.url) as aio:
        blocker = await start_blocker(aio, explicit_client, "busy", BUSY_ITERATIONS // 2,
                                      marker=7.0)
        queued = [asyncio.ensure_future(aio.infer("busy", busy_inputs(0, marker=float(i)),
                                                  client_timeout=TIMEOUT)) for i in range(2)]
        await asyncio.sleep(0.05)  # let them reach the queue
        await aio.unload_model("busy", client_timeout=TIMEOUT)
        results = await asyncio.gather(blocker, *queued)
        for result, marker in zip(results, (7.0, 0.0, 1.0)):
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), busy_output(1, marker))
        with raises("UNAVAILABLE", "model 'busy' is not available: unloaded"):
            await aio.infer("busy", busy_inputs(0), client_timeout=TIMEOUT)


def test_explicit_load_picks_up_a_new_version(explicit_client, explicit_repo):
    models.make_version(explicit_repo, "gamma", 1, models.build_mlp, (8, 4), seed=3)
    explicit_client.load_model("gamma")
    assert infer_small(explicit_client, "gamma", small_input()).get_response().model_version == "1"
    models.make_version(explicit_repo, "gamma", 2, models.build_mlp, (8, 4), seed=30)
    explicit_client.load_model("gamma")  # a load of a loaded model reloads it from disk
    x = small_input(1, seed=8)
    result = infer_small(explicit_client, "gamma", x)
    assert result.get_response().model_version == "2"
    (expected,) = reference(model_file(explicit_repo, "gamma", 2), {"input": x})
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
    assert not explicit_client.is_model_ready("gamma", "1")  # latest policy: 1 retired


def test_explicit_load_of_corrupt_model_is_unavailable_and_isolated(explicit_client,
                                                                     explicit_repo):
    with raises("UNAVAILABLE", "model 'corrupt' failed to load", "version 1",
                "onnxruntime could not load the model") as info:
        explicit_client.load_model("corrupt")
    assert_no_path(info.value.message(), explicit_repo)
    state, reason = index_rows(explicit_client)[("corrupt", "1")]
    assert state == "UNAVAILABLE" and "Protobuf parsing failed" in reason
    assert_no_path(reason, explicit_repo)
    assert explicit_client.is_server_ready()
    assert infer_small(explicit_client, "alpha", small_input()).as_numpy("output").shape == (2, 4)


def test_model_that_is_loading_is_unavailable(explicit_gateway, explicit_client):
    """While a load runs the index says LOADING and requests get UNAVAILABLE '... is loading'."""
    seen: dict = {}

    def load():
        with grpcclient.InferenceServerClient(explicit_gateway.url) as c:
            c.load_model("slow_loader", client_timeout=TIMEOUT)
        seen["loaded"] = True

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: index_rows(explicit_client).get(("slow_loader", ""), ("",))[0]
                 == "LOADING", interval=0.005, what="slow_loader to be LOADING")
        x = np.ones((1, 512), np.float32)
        t = grpcclient.InferInput("input", [1, 512], "FP32")
        t.set_data_from_numpy(x)
        try:
            explicit_client.infer("slow_loader", [t], client_timeout=TIMEOUT)
        except InferenceServerException as exc:
            seen["error"] = exc
    finally:
        loader.join(TIMEOUT)
    assert seen.get("loaded")
    assert "error" in seen, "the request ran although the model was still loading"
    check_error(seen["error"], "UNAVAILABLE", "model 'slow_loader' is loading")
    assert explicit_client.is_model_ready("slow_loader")
    assert index_rows(explicit_client)[("slow_loader", "1")] == ("READY", "")


def test_explicit_load_refuses_config_and_file_overrides(explicit_client):
    config = json.dumps({"name": "alpha", "max_batch_size": 1})
    with raises("INVALID_ARGUMENT", "load parameter 'config' is refused",
                "read only from the server's repository"):
        explicit_client.load_model("alpha", config=config)
    with raises("INVALID_ARGUMENT", "is refused"):
        explicit_client.load_model("alpha", config=config,
                                   files={"file:1/model.onnx": b"not a model"})
    request = service_pb2.RepositoryModelLoadRequest(model_name="alpha")
    request.parameters["file:1/model.onnx"].bytes_param = b"not a model"
    rpc_error(explicit_client._client_stub.RepositoryModelLoad, request, "INVALID_ARGUMENT",
              "load parameter 'file:1/model.onnx' is refused")
    assert explicit_client.is_model_ready("alpha")


@pytest.mark.parametrize("name", ["../alpha", "..", "a/b", "/etc", "alpha/../beta", " .. "])
def test_explicit_load_refuses_traversal_names_in_tritons_words(explicit_client, name):
    with raises("INVALID_ARGUMENT", f"invalid model name '{name}', model name must not contain "
                "path traversal characters"):
        explicit_client.load_model(name)
    with raises("INVALID_ARGUMENT", "invalid model name"):
        explicit_client.unload_model(name)


@pytest.mark.parametrize("name", ["", " ", "\t \n"])
def test_explicit_load_refuses_blank_names_in_tritons_words(explicit_client, name):
    with raises("INVALID_ARGUMENT",
                "Model name cannot be empty. Please enter a valid name to deploy."):
        explicit_client.load_model(name)


@pytest.mark.parametrize("name", ["x" * 200, "a b", "caf\u00e9"])
def test_explicit_load_refuses_names_that_are_not_plain_directories(explicit_client, name):
    with raises("INVALID_ARGUMENT", "invalid model name", "use letters, digits"):
        explicit_client.load_model(name)
    with raises("INVALID_ARGUMENT", "invalid model name"):
        explicit_client.unload_model(name)


@pytest.mark.parametrize("name", [".hidden", "...", "..my_model", "model..1", "-dash", ".gateway"])
def test_explicit_load_of_a_name_never_served_is_not_found(explicit_client, name):
    """Valid names to Triton (its ModelNameValidationTest), but never model directories here:
    not found, in Triton's words, and never a path traversal refusal."""
    with raises("NOT_FOUND", f"failed to load '{name}', failed to poll from model repository"):
        explicit_client.load_model(name)


def test_explicit_load_refuses_a_symlink_out_of_the_repository(explicit_client):
    with raises("INVALID_ARGUMENT", "invalid model name 'escaped'"):
        explicit_client.load_model("escaped")
    assert not explicit_client.is_model_ready("escaped")


def test_explicit_load_and_unload_unknown_model(explicit_client):
    with raises("NOT_FOUND", "failed to load 'missing', failed to poll from model repository",
                "model 'missing' is not in the repository"):
        explicit_client.load_model("missing")
    with raises("NOT_FOUND", "Request for unknown model: 'missing' is not found"):
        explicit_client.unload_model("missing")


def test_explicit_mode_server_stays_ready(explicit_client):
    assert explicit_client.is_server_live() and explicit_client.is_server_ready()
