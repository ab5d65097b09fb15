"""KServe V2 over HTTP/REST (--http-port) through tritonclient.http (sync and asyncio) and plain
JSON over urllib: the same data plane, errors, auth, limits, routing and drain as gRPC."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from support import (
    ALL_DATATYPES,
    BUSY_ITERATIONS,
    ROOT,
    TIMEOUT,
    assert_no_path,
    busy_output,
    check_error,
    make_pki,
    model_file,
    reference,
    sample,
    start_gateway,
    wait_for,
)
from tritonclient.utils import InferenceServerException

import gateway
from bench import models
from gateway.protocol.http import STATUS

INFER_TOKEN = "infer-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
SMALL_LIMIT = 65536  # --max-message-bytes of the secured gateway


@pytest.fixture
def http(serving_gateway):
    with httpclient.InferenceServerClient(serving_gateway.http_url,
                                          network_timeout=TIMEOUT) as c:
        yield c


def tensor(module, name: str, array: np.ndarray, datatype: str | None = None,
           binary: bool = True):
    from tritonclient.utils import np_to_triton_dtype

    t = module.InferInput(name, list(array.shape), datatype or np_to_triton_dtype(array.dtype))
    if module is httpclient:
        t.set_data_from_numpy(array, binary_data=binary)
    else:
        t.set_data_from_numpy(array)
    return t


def mlp_input(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 32)).astype(np.float32)


@contextmanager
def http_raises(status: int, *fragments: str):
    """``with http_raises(404, "unknown model"):`` around a tritonclient.http call."""
    with pytest.raises(InferenceServerException) as info:
        yield info
    assert info.value.status() == str(status), (info.value.status(), info.value.message())
    check_error(info.value, None, *fragments)


def fetch(url: str, body: bytes | None = None, headers=None, method: str | None = None,
          context=None):
    """(status, headers, body) of a plain HTTP request; errors are answers too."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


# ---- health, metadata, configuration, statistics ------------------------------------------------

def test_health_and_server_metadata(http):
    assert http.is_server_live() and http.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "gateway" and meta["version"] == gateway.__version__
    assert {"binary_tensor_data", "model_repository", "model_configuration",
            "statistics"} <= set(meta["extensions"])
    assert http.is_model_ready("mlp") and http.is_model_ready("mlp", "1")
    assert not http.is_model_ready("mlp", "2")
    assert not http.is_model_ready("no_such_model")
    assert not http.is_model_ready("corrupt")


@pytest.mark.parametrize("model", ["mlp", "iris", "add_sub", "logreg_iris", "latest_two",
                                   "identity_bytes"])
def test_metadata_and_config_equal_grpc(http, client, model):
    """The same documents as gRPC's (whose 64-bit integers tritonclient prints as strings)."""
    def same(grpc_doc, http_doc, where=model):
        if isinstance(grpc_doc, dict):
            for key, value in grpc_doc.items():
                assert key in http_doc, f"{where}.{key} missing over HTTP"
                same(value, http_doc[key], f"{where}.{key}")
        elif isinstance(grpc_doc, list):
            assert len(grpc_doc) == len(http_doc), where
            for a, b in zip(grpc_doc, http_doc):
                same(a, b, where)
        else:
            assert str(grpc_doc) == str(http_doc), (where, grpc_doc, http_doc)

    same(client.get_model_metadata(model, as_json=True), http.get_model_metadata(model))
    config = http.get_model_config(model)
    same(client.get_model_config(model, as_json=True)["config"], config)
    # Triton's JSON: 64-bit integers as numbers, defaults written out.
    assert isinstance(config["max_batch_size"], int)
    assert all(isinstance(d, int) for t in config["input"] for d in t["dims"])
    assert all(isinstance(d, int) for t in http.get_model_metadata(model)["inputs"]
               for d in t["shape"])
    assert http.get_model_config(model, "1" if model != "latest_two" else "3")["name"] == model


def test_metadata_errors_and_versions(http):
    assert http.get_model_metadata("latest_two")["versions"] == ["2", "3"]
    with http_raises(404, "Request for unknown model: 'no_such_model' is not found"):
        http.get_model_metadata("no_such_model")
    with http_raises(404, "Request for unknown model: 'mlp' version 9 is not found"):
        http.get_model_config("mlp", "9")
    with http_raises(503, "model 'corrupt' is not available"):
        http.get_model_metadata("corrupt")


def test_statistics(http):
    before = http.get_inference_statistics("mlp", "1")["model_stats"][0]
    for rows in (1, 3):
        http.infer("mlp", [tensor(httpclient, "input", mlp_input(rows))])
    after = http.get_inference_statistics("mlp")["model_stats"][0]
    assert (after["name"], after["version"]) == ("mlp", "1")
    success = after["inference_stats"]["success"]
    assert success["count"] >= before["inference_stats"]["success"]["count"] + 2
    assert success["ns"] > 0 and after["inference_count"] >= before["inference_count"] + 4
    assert {b["batch_size"] for b in after["batch_stats"]} & {1, 3}
    every = http.get_inference_statistics()["model_stats"]
    assert {"mlp", "iris", "identity_fp16"} <= {s["name"] for s in every}
    with http_raises(404, "Request for unknown model: 'no_such_model' is not found"):
        http.get_inference_statistics("no_such_model")


def test_repository_index_and_control_mode(http):
    rows = {(m["name"], m.get("version", "")): m for m in http.get_model_repository_index()}
    assert rows[("mlp", "1")]["state"] == "READY"
    corrupt = rows[("corrupt", "1")]
    assert corrupt["state"] == "UNAVAILABLE" and "onnxruntime" in corrupt["reason"]
    assert_no_path(corrupt["reason"])
    with http_raises(400, "cannot load models", "--control-mode explicit"):
        http.load_model("mlp")
    with http_raises(400, "cannot unload models"):
        http.unload_model("mlp")


def test_unsupported_extensions_are_501(http):
    with http_raises(501, "system shared memory is not supported by this gateway"):
        http.get_system_shared_memory_status()
    with http_raises(501, "CUDA shared memory is not supported"):
        http.unregister_cuda_shared_memory()
    with http_raises(501, "tracing (TraceSetting) is not supported"):
        http.get_trace_settings()
    with http_raises(501, "LogSettings"):
        http.update_log_settings({"log_verbose_level": 1})


# ---- inference ----------------------------------------------------------------------------------

@pytest.mark.parametrize("binary_in, binary_out", [(True, True), (False, False), (True, False),
                                                   (False, True)])
def test_mlp_equals_onnxruntime(http, serving_repo, binary_in, binary_out):
    x = mlp_input(5, seed=int(binary_in) * 2 + int(binary_out))
    result = http.infer("mlp", [tensor(httpclient, "input", x, binary=binary_in)],
                        outputs=[httpclient.InferRequestedOutput("output", binary_data=binary_out)],
                        request_id="req-7")
    (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
    out = result.as_numpy("output")
    assert out.dtype == np.float32 and out.shape == (5, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == \
        ("mlp", "1", "req-7")
    assert ("data" in response["outputs"][0]) is not binary_out


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
@pytest.mark.parametrize("binary_in, binary_out", [(True, True), (False, False), (True, False),
                                                   (False, True)], ids=["bin", "json",
                                                                         "bin-json", "json-bin"])
def test_every_datatype_round_trips(http, datatype, binary_in, binary_out):
    x = sample(datatype, (3, 4), seed=7)
    result = http.infer(f"identity_{datatype.lower()}",
                        [tensor(httpclient, "INPUT0", x, datatype, binary=binary_in)],
                        outputs=[httpclient.InferRequestedOutput("OUTPUT0",
                                                                 binary_data=binary_out)])
    out = result.as_numpy("OUTPUT0")
    assert out.shape == x.shape
    if datatype == "BYTES":
        if not binary_out:  # JSON carries text: tritonclient gives str elements
            out = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(out)
        assert out.tolist() == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


def test_two_inputs_one_binary_one_json_and_binary_data_output(http, serving_repo):
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)
    result = http.infer("add_sub", [tensor(httpclient, "INPUT0", a, binary=True),
                                    tensor(httpclient, "INPUT1", b, binary=False)],
                        outputs=[httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    result = http.infer("add_sub", [tensor(httpclient, "INPUT0", a),
                                    tensor(httpclient, "INPUT1", b)])  # binary_data_output
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert all("data" not in o for o in result.get_response()["outputs"])


async def test_asyncio_client_concurrent_and_metadata(serving_gateway, serving_repo):
    async with httpaio.InferenceServerClient(serving_gateway.http_url) as aio:
        assert await aio.is_server_ready() and await aio.is_model_ready("mlp")
        assert (await aio.get_model_metadata("mlp"))["inputs"][0]["shape"] == [-1, 32]
        assert (await aio.get_model_config("mlp"))["max_batch_size"] == 8
        xs = [mlp_input(1 + i % 4, seed=200 + i) for i in range(24)]
        results = await asyncio.gather(*(
            aio.infer("mlp", [tensor(httpclient, "input", x)], request_id=str(i))
            for i, x in enumerate(xs)))
        for i, (x, result) in enumerate(zip(xs, results)):
            assert result.get_response()["id"] == str(i)
            (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
            np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5,
                                       atol=1e-6)
        # aiohttp asks for gzip/deflate: a large answer comes compressed and reads back equal.
        big = sample("FP32", (8, 300), seed=3)
        result = await aio.infer("identity_fp32", [tensor(httpclient, "INPUT0", big)])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), big)
        with pytest.raises(InferenceServerException) as info:
            await aio.infer("no_such_model", [tensor(httpclient, "input", xs[0])])
        assert info.value.status() == "404" and "unknown model" in info.value.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_request_and_response_compression(http, serving_gateway, algorithm):
    x = mlp_input(4, seed=11)
    plain = http.infer("mlp", [tensor(httpclient, "input", x)]).as_numpy("output")
    packed = http.infer("mlp", [tensor(httpclient, "input", x)],
                        request_compression_algorithm=algorithm,
                        response_compression_algorithm=algorithm).as_numpy("output")
    np.testing.assert_array_equal(plain, packed)
    big = sample("FP64", (8, 200), seed=5)
    result = http.infer("identity_fp64", [tensor(httpclient, "INPUT0", big)],
                        request_compression_algorithm=algorithm,
                        response_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), big)
    # On the wire: the answer says how it is encoded, and decodes to the binary layout.
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP64", "shape": [8, 200],
                                   "data": big.ravel().tolist()}],
                       "parameters": {"binary_data_output": True}}).encode()
    status, headers, answer = fetch(
        f"http://{serving_gateway.http_url}/v2/models/identity_fp64/infer",
        gzip.compress(body) if algorithm == "gzip" else zlib.compress(body),
        {"Content-Encoding": algorithm, "Accept-Encoding": algorithm})
    assert status == 200 and headers["Content-Encoding"] == algorithm
    raw = gzip.decompress(answer) if algorithm == "gzip" else zlib.decompress(answer)
    split = int(headers["Inference-Header-Content-Length"])
    np.testing.assert_array_equal(np.frombuffer(raw[split:], np.float64).reshape(8, 200), big)


# ---- errors: the status of the error's gRPC code, the same message -----------------------------

def _bad_utf8():
    array = np.empty((1, 1), dtype=object)
    array[0, 0] = b"\xff\xfe"
    return array


ERROR_CASES = {  # id: (model, version, inputs as (name, array, datatype), gRPC code)
    "unknown model": ("no_such_model", "", [("input", np.ones((1, 32), np.float32), None)],
                      "NOT_FOUND"),
    "unknown version": ("mlp", "2", [("input", np.ones((1, 32), np.float32), None)],
                        "NOT_FOUND"),
    "wrong datatype": ("mlp", "", [("input", np.ones((1, 32), np.float64), None)],
                       "INVALID_ARGUMENT"),
    "wrong shape": ("mlp", "", [("input", np.ones((1, 31), np.float32), None)],
                    "INVALID_ARGUMENT"),
    "batch too large": ("mlp", "", [("input", np.ones((9, 32), np.float32), None)],
                        "INVALID_ARGUMENT"),
    "unknown input": ("mlp", "", [("nope", np.ones((1, 32), np.float32), None)],
                      "INVALID_ARGUMENT"),
    "missing input": ("add_sub", "", [("INPUT0", np.ones((1, 16), np.float32), None)],
                      "INVALID_ARGUMENT"),
    "bytes not utf-8": ("identity_bytes", "", [("INPUT0", _bad_utf8(), "BYTES")],
                        "INVALID_ARGUMENT"),
    "model failed to load": ("corrupt", "", [("input", np.ones((1, 32), np.float32), None)],
                             "UNAVAILABLE"),
    "model fails": ("always_failing", "", [("INPUT0", np.zeros((1, 4), np.float32), None)],
                    "INTERNAL"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_have_grpc_messages_and_http_statuses(http, client, case):
    model, version, inputs, code = ERROR_CASES[case]
    with pytest.raises(InferenceServerException) as over_grpc:
        client.infer(model, [tensor(grpcclient, n, a, d) for n, a, d in inputs],
                     model_version=version, client_timeout=TIMEOUT)
    with pytest.raises(InferenceServerException) as over_http:
        http.infer(model, [tensor(httpclient, n, a, d) for n, a, d in inputs],
                   model_version=version)
    assert over_grpc.value.status() == f"StatusCode.{code}"
    assert over_http.value.status() == str(STATUS[code])
    assert over_http.value.message() == over_grpc.value.message()
    assert_no_path(over_http.value.message())


def test_status_table_is_triton_and_google_mapping():
    assert (STATUS["INVALID_ARGUMENT"], STATUS["NOT_FOUND"], STATUS["UNAVAILABLE"],
            STATUS["RESOURCE_EXHAUSTED"], STATUS["UNAUTHENTICATED"],
            STATUS["PERMISSION_DENIED"], STATUS["INTERNAL"]) == (400, 404, 503, 429, 401, 403,
                                                                  500)


def binary_body(stated: int, sent: int, fragment: str):
    """mlp's [1, 32] FP32 input stated as ``stated`` binary bytes, ``sent`` bytes following."""
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32],
                                     "parameters": {"binary_data_size": stated}}]}).encode()
    return ({"Inference-Header-Content-Length": str(len(header))}, header + b"\0" * sent,
            fragment)


def doc(*inputs: dict, **rest) -> tuple[dict, bytes]:
    """A JSON inference request (no binary data): (headers, body)."""
    return {}, json.dumps({"inputs": list(inputs), **rest}).encode()


def fp32(shape, **fields) -> dict:
    return {"name": "input", "datatype": "FP32", "shape": shape, **fields}


BAD_BODIES = {  # id: (headers, body, fragment of the message)
    "not json": ({}, b"{nope", "failed to parse the request JSON"),
    "not an object": ({}, b"[1, 2]", "the request JSON must be an object"),
    "shape not integers": (*doc(fp32(["1"], data=[1])), "'shape' must be a list of integers"),
    "unknown datatype": (*doc({**fp32([1], data=[1]), "datatype": "FP8"}),
                         "unsupported datatype 'FP8'"),
    "count mismatch": (*doc(fp32([1, 32], data=[1, 2])), "needs 32 values but 2 were sent"),
    "strings for numbers": (*doc(fp32([1], data=["1"])), "FP32 data must hold number values"),
    "no data": (*doc(fp32([1, 32])), "neither 'data' nor a binary_data_size"),
    "binary past the end": binary_body(128, 64, "binary_data_size 128 is past the end"),
    "binary size wrong": binary_body(64, 64, "needs 128 bytes but 64 were sent"),
    "unclaimed binary": binary_body(128, 130, "2 bytes of binary data that no input"),
    "bad header length": ({"Inference-Header-Content-Length": "999999"}, b"{}",
                          "is not a length within the 2-byte body"),
    "classification": (*doc(fp32([1, 32], data=[0] * 32),
                            outputs=[{"name": "output", "parameters": {"classification": -1}}]),
                       "the classification parameter must be a positive integer"),
    "priority": (*doc(parameters={"priority": "high"}),
                 "request parameter 'priority' must be an integer"),
    "json bomb": ({}, b'{"inputs": [' + b"[]," * 1_200_000 + b"[]]}",
                  "the request JSON holds more than"),
    "too many inputs": (*doc(*[fp32([0], data=[])] * 4097), "4097 inputs; the limit is 4096"),
    "output twice": (*doc(fp32([1, 32], data=[0] * 32),
                          outputs=[{"name": "output"}, {"name": "output"}]),
                     "output 'output' already exists in request"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_malformed_bodies_are_400_with_a_reason(serving_gateway, case):
    headers, body, fragment = BAD_BODIES[case]
    status, answer_headers, answer = fetch(
        f"http://{serving_gateway.http_url}/v2/models/mlp/infer", body, headers)
    message = json.loads(answer)["error"]
    assert status == 400 and fragment in message, (status, message)
    assert answer_headers["Content-Type"].startswith("application/json")
    assert_no_path(message)


def test_corrupt_compressed_body_is_400_and_the_connection_closes(serving_gateway):
    status, headers, body = fetch(f"http://{serving_gateway.http_url}/v2/models/mlp/infer",
                                  b"not gzip at all", {"Content-Encoding": "gzip"})
    message = json.loads(body)["error"]
    assert status == 400 and message == ("the request body could not be read: Can not decode "
                                         "content-encoding: gzip")
    assert headers["Connection"] == "close"
    assert "Traceback" not in serving_gateway.log()


def test_unknown_paths_and_methods_answer_json(serving_gateway):
    base = f"http://{serving_gateway.http_url}"
    status, _, body = fetch(f"{base}/v1/models")
    assert status == 404 and "is not an endpoint" in json.loads(body)["error"]
    status, headers, body = fetch(f"{base}/v2/health/ready", b"{}")
    assert status == 405 and headers["Allow"] == "GET, HEAD", headers
    assert "use GET" in json.loads(body)["error"]
    assert fetch(f"{base}/v2/health/ready", method="HEAD")[0] == 200  # probes may use HEAD
    status, _, body = fetch(f"{base}/v2/models/mlp/infer")
    assert status == 405 and "use POST" in json.loads(body)["error"]


async def test_queue_full_is_429(serving_gateway, client):
    """busy_queue: one instance, max_queue_size 1. While a long request runs, three more arrive
    over HTTP: one waits in the queue (and is served), the other two are shed at once
    (RESOURCE_EXHAUSTED -> 429) with gRPC's message."""
    import tritonclient.grpc.aio as grpcaio
    from support import start_blocker

    def busy_inputs():
        its = httpclient.InferInput("ITERATIONS", [1, 1], "INT64")
        its.set_data_from_numpy(np.zeros((1, 1), np.int64))
        x = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(busy_output())
        return [its, x]

    async with grpcaio.InferenceServerClient(serving_gateway.url) as aio, \
            httpaio.InferenceServerClient(serving_gateway.http_url) as hc:
        async def call():
            try:
                return await hc.infer("busy_queue", busy_inputs())
            except InferenceServerException as exc:
                return exc

        blocker = await start_blocker(aio, client, "busy_queue")
        outcomes = await asyncio.gather(*(call() for _ in range(3)))
        refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
        served = [o for o in outcomes if not isinstance(o, InferenceServerException)]
        assert len(refused) == 2 and len(served) == 1, [str(o) for o in refused]
        for exc in refused:
            assert exc.status() == "429", exc.message()
            check_error(exc, None, "model 'busy_queue' version 1",
                        "queue is full (1 requests waiting)")
        for result in served:
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), busy_output())
        await blocker


# ---- plain JSON, no client library -------------------------------------------------------------

def test_plain_json_like_curl(serving_gateway, serving_repo):
    base = f"http://{serving_gateway.http_url}"
    assert fetch(f"{base}/v2/health/live")[0] == 200
    assert fetch(f"{base}/v2/health/ready")[0] == 200
    status, _, body = fetch(f"{base}/v2/models/mlp")
    assert status == 200 and json.loads(body)["inputs"][0]["name"] == "input"
    x = mlp_input(2, seed=5)
    request = {"id": "curl-1", "inputs": [{"name": "input", "shape": [2, 32], "datatype": "FP32",
                                           "data": x.tolist()}]}
    status, headers, body = fetch(f"{base}/v2/models/mlp/infer", json.dumps(request).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert (answer["model_name"], answer["model_version"], answer["id"]) == \
        ("mlp", "1", "curl-1")
    (out,) = answer["outputs"]
    (expected,) = reference(model_file(serving_repo, "mlp"), {"input": x})
    assert out["shape"] == [2, 4] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 4), expected,
                               rtol=1e-5, atol=1e-6)
    # The binary extension by hand: JSON header, then raw little-endian bytes.
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "output",
                                      "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = fetch(f"{base}/v2/models/mlp/versions/1/infer",
                                  header + x.tobytes(),
                                  {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    split = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:split])["outputs"][0]
    assert meta["parameters"]["binary_data_size"] == 32 == len(body) - split
    np.testing.assert_allclose(np.frombuffer(body[split:], "<f4").reshape(2, 4), expected,
                               rtol=1e-5, atol=1e-6)
    status, _, body = fetch(f"{base}/v2/models/nope/infer", json.dumps(request).encode())
    assert status == 404
    assert json.loads(body) == {"error": "Request for unknown model: 'nope' is not found"}


def test_the_bench_request_is_what_tritonclient_sends(serving_gateway):
    """bench.http_cost replays this body: the gateway must answer it (mlp has tiny_mlp's input)."""
    from bench.http_cost import http_request

    body, header_length = http_request("tiny_mlp", 2)
    status, headers, answer = fetch(f"http://{serving_gateway.http_url}/v2/models/mlp/infer",
                                    body, {"Inference-Header-Content-Length": str(header_length)})
    assert status == 200, answer
    split = int(headers["Inference-Header-Content-Length"])
    assert json.loads(answer[:split])["outputs"][0]["parameters"]["binary_data_size"] == 32


# ---- auth, explicit repository control, routing, limits ------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("http_secure")
    repo = root / "repo"
    for version in (1, 2):
        models.make_version(repo, "ab", version, models.build_mlp, (8, 4), seed=version)
    models.write_config(repo / "ab", "max_batch_size: 4\nversion_policy { all { } }")
    tokens = root / "tokens"
    tokens.write_text(f"infer {INFER_TOKEN} app\nadmin {ADMIN_TOKEN} alice\n")
    with start_gateway(repo, "--auth-tokens", str(tokens), "--control-mode", "explicit",
                       "--load-model", "ab", "--max-message-bytes", str(SMALL_LIMIT)) as gw:
        yield gw


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def ab_input(rows: int = 1):
    return [tensor(httpclient, "input", np.ones((rows, 8), np.float32))]


def test_auth_roles_match_grpc(secured):
    with httpclient.InferenceServerClient(secured.http_url, network_timeout=TIMEOUT) as c:
        assert c.is_server_live() and c.is_server_ready()  # probes need no token
        with http_raises(401, "missing credentials: send 'authorization: Bearer TOKEN'"):
            c.infer("ab", ab_input())
        with http_raises(401, "invalid token"):
            c.get_model_metadata("ab", headers=bearer("not-a-valid-token-at-all"))
        with http_raises(401, "malformed authorization header"):
            c.get_model_metadata("ab", headers={"Authorization": "Basic abc"})
        assert c.infer("ab", ab_input(), headers=bearer(INFER_TOKEN)).as_numpy("output").shape \
            == (1, 4)
        assert c.get_model_metadata("ab", headers=bearer(INFER_TOKEN))["name"] == "ab"
        for call in (c.get_model_repository_index, lambda headers: c.unload_model(
                "ab", headers=headers), lambda headers: c.load_model("ab", headers=headers)):
            with http_raises(403, "this call needs the admin role; the token has 'infer'"):
                call(headers=bearer(INFER_TOKEN))
        assert c.get_model_repository_index(headers=bearer(ADMIN_TOKEN))
    status, headers, _ = fetch(f"http://{secured.http_url}/v2/models/ab")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"


def test_load_and_unload_in_explicit_mode(secured):
    admin = bearer(ADMIN_TOKEN)
    with httpclient.InferenceServerClient(secured.http_url, network_timeout=TIMEOUT) as c:
        c.unload_model("ab", headers=admin)
        assert not c.is_model_ready("ab", headers=admin)
        with http_raises(503, "model 'ab' is not available: unloaded"):
            c.infer("ab", ab_input(), headers=admin)
        with http_raises(400, "load parameter 'config' is refused"):
            c.load_model("ab", headers=admin, config='{"max_batch_size": 1}')
        with http_raises(404, "model 'nope' is not in the repository"):
            c.load_model("nope", headers=admin)
        c.load_model("ab", headers=admin)
        assert c.is_model_ready("ab", headers=admin)
        rows = c.get_model_repository_index(headers=admin)
        assert {(r["name"], r["version"], r["state"]) for r in rows} == {
            ("ab", "1", "READY"), ("ab", "2", "READY")}


def test_routing_key_header_and_parameter_are_sticky(secured):
    done = subprocess.run([sys.executable, "-m", "gateway", "traffic", "set", "ab", "1=50", "2=50",
                           "--url", secured.url, "--token", ADMIN_TOKEN],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    headers = bearer(INFER_TOKEN)
    with httpclient.InferenceServerClient(secured.http_url, network_timeout=TIMEOUT) as c:
        def served(key: str, by_header: bool) -> str:
            if by_header:
                result = c.infer("ab", ab_input(), headers={**headers, "x-routing-key": key})
            else:
                result = c.infer("ab", ab_input(), headers=headers,
                                 parameters={"routing_key": key})
            return result.get_response()["model_version"]

        seen = set()
        for i in range(20):
            key = f"user-{i}"
            versions = {served(key, True) for _ in range(3)} | {served(key, False)}
            assert len(versions) == 1, (key, versions)
            seen |= versions
        assert seen == {"1", "2"}
        result = c.infer("ab", ab_input(), model_version="1", headers=headers)
        assert result.get_response()["model_version"] == "1"


def test_body_limit_counts_decompressed_bytes(secured):
    url = f"http://{secured.http_url}/v2/models/ab/infer"
    big = b'{"inputs": [], "pad": "' + b"x" * SMALL_LIMIT + b'"}'
    for body, headers in ((big, {}), (gzip.compress(big), {"Content-Encoding": "gzip"})):
        assert len(body) < SMALL_LIMIT or not headers
        status, _, answer = fetch(url, body, {**bearer(INFER_TOKEN), **headers})
        message = json.loads(answer)["error"]
        assert status == 413 and f"limit of {SMALL_LIMIT} bytes" in message, (status, message)


# ---- TLS, drain, settings -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("http_pki")
    make_pki(d)
    return d


async def test_tls_and_mutual_tls(pki, tmp_path):
    models.make_version(tmp_path, "mlp", 1, models.build_mlp)
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    trusting = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    x = np.zeros((1, 32), np.float32)
    with start_gateway(tmp_path, *tls) as gw:
        assert fetch(f"https://{gw.http_url}/v2/health/ready", context=trusting)[0] == 200
        async with httpaio.InferenceServerClient(gw.http_url, ssl=True,
                                                 ssl_context=trusting) as c:
            result = await c.infer("mlp", [tensor(httpclient, "input", x)])
            assert result.as_numpy("output").shape == (1, 4)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            fetch(f"http://{gw.http_url}/v2/health/ready")  # plaintext is not spoken
    with start_gateway(tmp_path, *tls, "--tls-client-ca", str(pki / "ca.pem")) as gw:
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            fetch(f"https://{gw.http_url}/v2/health/ready", context=trusting)
        identified = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        identified.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        async with httpaio.InferenceServerClient(gw.http_url, ssl=True,
                                                 ssl_context=identified) as c:
            result = await c.infer("mlp", [tensor(httpclient, "input", x)])
            assert result.as_numpy("output").shape == (1, 4)


async def test_sigterm_drains_http_requests(tmp_path):
    models.make_version(tmp_path, "busy", 1, models.build_busy_model)
    models.write_config(tmp_path / "busy", "max_batch_size: 8")
    models.make_version(tmp_path, "mlp", 1, models.build_mlp)
    with start_gateway(tmp_path) as gw:
        async with httpaio.InferenceServerClient(gw.http_url, conn_timeout=TIMEOUT) as c:
            def busy(i):
                its = httpclient.InferInput("ITERATIONS", [1, 1], "INT64")
                its.set_data_from_numpy(np.full((1, 1), BUSY_ITERATIONS // 2, np.int64))
                x = httpclient.InferInput("INPUT0", [1, 4], "FP32")
                x.set_data_from_numpy(busy_output(marker=float(i)))
                return c.infer("busy", [its, x], request_id=str(i))

            calls = [asyncio.ensure_future(busy(i)) for i in range(3)]
            _, pending = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
            assert len(pending) >= 2, "requests finished before the test could stop the server"
            gw.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for, lambda: fetch(
                f"http://{gw.http_url}/v2/health/ready")[0] == 503, what="not ready")
            assert await c.is_server_live()

            def refused():
                status, _, body = fetch(f"http://{gw.http_url}/v2/models/mlp/infer", json.dumps(
                    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32],
                                 "data": [0.0] * 32}]}).encode())
                return status == 503 and "the server is shutting down" in json.loads(body)["error"]

            await asyncio.to_thread(wait_for, refused, what="new requests to be refused")
            results = await asyncio.gather(*calls)
        for i, result in enumerate(results):
            assert result.get_response()["id"] == str(i)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                          busy_output(marker=float(i)))
        assert await asyncio.to_thread(gw.process.wait, TIMEOUT) == 0, gw.log()


def serve(*args: str, env=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                           "--grpc-port", "0", "--metrics-port", "-1", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
                          env={**os.environ, **(env or {})})


def test_http_port_settings(tmp_path):
    models.make_version(tmp_path, "mlp", 1, models.build_mlp)
    result = serve("--http-port", "70000")
    assert result.returncode == 2 and "HTTP port 70000 is not -1 (off) or 0-65535" in \
        result.stderr, result.stderr
    result = serve(env={"GATEWAY_HTTP_PORT": "eighty"})
    assert result.returncode == 2 and "GATEWAY_HTTP_PORT='eighty' is not an integer" in \
        result.stderr, result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--model-repository", str(tmp_path), "--http-port", str(port))
    assert result.returncode == 1, result.stderr
    assert f"HTTP port {port}" in result.stderr and "--http-port" in result.stderr
    with start_gateway(tmp_path, "--http-port", "-1") as gw:
        assert gw.http_port == -1 and " http -1" in gw.log()


def test_classification_with_labels_over_both_protocols(tmp_path):
    """A model whose output names a label_filename: tritonclient.http and .grpc both get the
    top classes with their labels, and ServerMetadata names the extension."""
    import tritonclient.grpc as grpcclient

    models.make_version(tmp_path, "cls", 1, models.build_mlp, (4, 8, 3), seed=4)
    models.write_config(tmp_path / "cls", """
        max_batch_size: 8
        input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "output" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
    """)
    (tmp_path / "cls" / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    expected = reference(tmp_path / "cls" / "1" / "model.onnx", {"input": x})[0]
    names = ("setosa", "versicolor", "virginica")
    with start_gateway(tmp_path) as gw:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{gw.http_port}")
        assert "classification" in client.get_server_metadata()["extensions"]
        inp = httpclient.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("cls", [inp], outputs=[
            httpclient.InferRequestedOutput("output", class_count=1)]).as_numpy("output")
        with grpcclient.InferenceServerClient(gw.url) as grpc_client:
            ginp = grpcclient.InferInput("input", [2, 4], "FP32")
            ginp.set_data_from_numpy(x)
            over_grpc = grpc_client.infer("cls", [ginp], outputs=[
                grpcclient.InferRequestedOutput("output", class_count=1)]).as_numpy("output")
    for row in range(2):
        best = int(np.argmax(expected[row]))
        value, index, label = got[row][0].decode().split(":")
        assert (int(index), label) == (best, names[best])
        assert float(value) == pytest.approx(float(expected[row][best]), abs=1e-5)
    assert over_grpc.tolist() == got.tolist()
