"""The bench suite's REST parts (``--protocol http``): request bodies as tritonclient.http builds
them and as the gateway decodes them, the version read from responses, and the HTTP/1.1 client's
framing against a scripted server. No gateway, no timing."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import numpy as np
import pytest

from bench import inputs
from bench.cli import check_binary
from bench.httpclient import (
    AiohttpClient,
    H1Client,
    ResponseError,
    header_variants,
    response_version,
)
from bench.loadgen_http import failure
from gateway.protocol.httpcodec import OutputPlan, decode_infer, encode_infer
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.tensors import InferResponse, Tensor


def _metadata(*tensors):
    return pb.ModelMetadataResponse(name="m", inputs=[
        pb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in tensors])


EVERY_KIND = _metadata(("a", "FP32", [-1, 3]), ("b", "INT64", [-1, 2]), ("h", "FP16", [-1, 2]),
                       ("s", "BYTES", [-1, 1]), ("f", "BOOL", [-1, 2]), ("u", "UINT8", [-1, 4]))


def _decoded(request: inputs.HttpRequest, model: str = "m", version: str = "") -> dict:
    length = None if request.json_length is None else str(request.json_length)
    core, plan = decode_infer(request.body, length, model, version)
    return {t.name: np.asarray(t.data) for t in core.inputs}, plan


@pytest.mark.parametrize("binary", [True, False])
def test_rest_requests_decode_on_the_gateway(binary):
    data = inputs.from_metadata(EVERY_KIND, max_batch_size=8, batch_size=3, pool=2)
    requests = inputs.serialise_http(data, "m", binary=binary)
    assert len(requests) == 2 and {r.path for r in requests} == {"/v2/models/m/infer"}
    for request, tensors in zip(requests, data.pool):
        decoded, plan = _decoded(request)
        assert plan.default is binary  # binary outputs asked for exactly when inputs are binary
        for name, array in tensors.items():  # what the gateway decodes is what was built
            got = decoded[name].reshape(array.shape)
            if array.dtype == object:
                assert [bytes(v) if not isinstance(v, str) else v.encode() for v in got.ravel()] \
                    == list(array.ravel())
            else:
                assert got.dtype == array.dtype
                np.testing.assert_array_equal(got, array)
        assert (request.json_length is not None) is binary
        assert request.content_type == ("application/octet-stream" if binary
                                        else "application/json")


def test_binary_requests_match_tritonclient_http():
    """The same JSON header (up to formatting) and the same bytes after it as tritonclient.http
    builds by default: binary inputs, binary_data_output."""
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    data = inputs.from_metadata(EVERY_KIND, max_batch_size=8, batch_size=2, pool=1)
    (ours,) = inputs.serialise_http(data, "m")
    triton_inputs = []
    for name, array in data.pool[0].items():
        item = httpclient.InferInput(name, list(array.shape), data.datatypes[name])
        item.set_data_from_numpy(array)  # binary_data=True: tritonclient.http's default
        triton_inputs.append(item)
    body, json_size = _get_inference_request(triton_inputs, "", None, 0, False, False, 0, None,
                                             None)
    assert json.loads(ours.body[:ours.json_length]) == json.loads(body[:json_size])
    assert ours.body[ours.json_length:] == body[json_size:]


def test_json_requests_match_tritonclient_http():
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    meta = _metadata(("a", "FP32", [-1, 3]), ("b", "INT32", [-1, 2]), ("s", "BYTES", [-1, 1]),
                     ("f", "BOOL", [-1, 1]))
    data = inputs.from_metadata(meta, max_batch_size=8, batch_size=2, pool=1)
    (ours,) = inputs.serialise_http(data, "m", binary=False)
    triton_inputs = []
    for name, array in data.pool[0].items():
        item = httpclient.InferInput(name, list(array.shape), data.datatypes[name])
        item.set_data_from_numpy(array, binary_data=False)
        triton_inputs.append(item)
    requested = [httpclient.InferRequestedOutput("y", binary_data=False)]
    body, json_size = _get_inference_request(triton_inputs, "", requested, 0, False, False, 0,
                                             None, None)
    assert json_size is None
    theirs = json.loads(body)
    del theirs["outputs"]  # they name the outputs to get JSON back; JSON is the default anyway
    assert json.loads(ours.body) == theirs


def test_infer_path_quotes_names_and_carries_the_version():
    assert inputs.infer_path("m") == "/v2/models/m/infer"
    assert inputs.infer_path("a b/c", "2") == "/v2/models/a%20b%2Fc/versions/2/infer"
    data = inputs.from_metadata(_metadata(("a", "FP32", [-1, 1])), 8, 1, pool=1)
    assert inputs.serialise_http(data, "m", "7")[0].path == "/v2/models/m/versions/7/infer"


def test_non_utf8_bytes_cannot_go_as_json():
    data = inputs.Inputs([{"s": np.array([b"\xff"], dtype=object)}], {"s": "BYTES"}, 1, "x")
    with pytest.raises(inputs.InputError, match="not UTF-8"):
        inputs.serialise_http(data, "m", binary=False)
    assert inputs.serialise_http(data, "m")[0].body.endswith(b"\x01\x00\x00\x00\xff")


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("version", ["1", "", "v\"2"])
def test_response_version_from_gateway_responses(binary, version):
    out = np.arange(4000, dtype=np.float32).reshape(1, 4000)
    response = InferResponse("m", version, "id-1", [Tensor("output", "FP32", out)])
    body, json_length = encode_infer(response, OutputPlan(default=binary))
    assert (json_length is not None) is binary
    expected = json.dumps(version)[1:-1].encode()  # as JSON writes it (escapes kept)
    assert response_version(body, json_length) == expected


def test_response_version_from_an_mlserver_response():
    body = (b'{"model_name":"tiny_mlp","model_version":"1","id":"47cf","parameters":{},'
            b'"outputs":[{"name":"output","shape":[1,4],"datatype":"FP32","data":[1.0,2,3,4]}]}')
    assert response_version(body, None) == b"1"
    assert response_version(b'{"model_name": "m", "model_version" : "12"}', None) == b"12"
    assert response_version(b'{"model_name":"m"}', None) == b""
    # Binary data after the JSON part is never searched.
    assert response_version(b'{"a":1}' + b'"model_version":"9"', 7) == b""


def test_header_variants_and_failure_names():
    assert header_variants(None, ()) == [{}]
    assert header_variants("t", ()) == [{"Authorization": "Bearer t"}]
    assert header_variants("t", ("k0", "k1")) == [
        {"Authorization": "Bearer t", "x-routing-key": "k0"},
        {"Authorization": "Bearer t", "x-routing-key": "k1"}]
    assert failure(TimeoutError()) == "DEADLINE_EXCEEDED"
    assert failure(ConnectionRefusedError()) == "UNAVAILABLE"
    assert failure(ResponseError("closed")) == "UNAVAILABLE"
    assert failure(ValueError("x")) == "CLIENT_ValueError"


def test_a_server_without_the_binary_extension_is_refused_early():
    class Fake:
        label, url = "mlserver", "127.0.0.1:1"

        def __init__(self, extensions):
            self._extensions = extensions

        def extensions(self):
            return self._extensions

        def server_name(self):
            return "mlserver 1.7.1"

    with pytest.raises(RuntimeError, match="--http-data json"):
        check_binary(Fake([]))
    check_binary(Fake(["binary_tensor_data", "statistics"]))
    check_binary(Fake(None))  # no server metadata (the floor): nothing to go by


# ---- the HTTP/1.1 client against a scripted server ----------------------------------------------

@asynccontextmanager
async def scripted(*answers):
    """A server that answers each request on a connection with the next of ``answers`` (bytes,
    a list of bytes written apart, or None to stay silent). Yields (url, requests seen,
    connections accepted)."""
    seen: list[bytes] = []
    accepted: list[int] = []
    script = list(answers)

    handlers = set()

    async def handle(reader, writer):
        accepted.append(1)
        handlers.add(asyncio.current_task())
        try:
            while script:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):  # aiohttp's client warming its pool up
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    continue
                length = int(head.lower().split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
                seen.append(head + await reader.readexactly(length))
                answer = script.pop(0)
                if answer is None:
                    await asyncio.sleep(10)
                    return
                for part in answer if isinstance(answer, list) else [answer]:
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01)  # apart: the client must join them
                if b"connection: close" in (b"".join(answer) if isinstance(answer, list)
                                            else answer).lower():
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", seen, accepted
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


BODY = b'{"model_name":"m","model_version":"3","outputs":[]}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
REQUESTS = [inputs.HttpRequest("/v2/models/m/infer", b"HEAD" + b"\x00" * 12, 4),
            inputs.HttpRequest("/v2/models/m/versions/2/infer", b'{"inputs":[]}')]


@pytest.mark.parametrize("kind", [H1Client, AiohttpClient])
async def test_client_sends_the_built_request_and_reuses_its_connection(kind):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
               b"Inference-Header-Content-Length: 5\r\n\r\n"
               b"5\r\n{\"a\":\r\n3;x=y\r\n1}\x00\r\n0\r\n\r\n")
    async with scripted(OK, [OK[:20], OK[20:]], chunked) as (url, seen, accepted):
        client = kind(url, REQUESTS, header_variants("tok", ("k0", "k1")))
        await client.warm(1)
        accepted_before = len(accepted)
        assert await client.request(0, 1, 5) == (200, None, BODY)
        assert await client.request(1, 0, 5) == (200, None, BODY)  # head split in two writes
        assert await client.request(0, 0, 5) == (200, 5, b'{"a":1}\x00')
        await client.close()
    assert len(accepted) == accepted_before  # one keep-alive connection for all three
    head, _, body = seen[0].partition(b"\r\n\r\n")
    head = head.lower()
    assert head.startswith(b"post /v2/models/m/infer http/1.1\r\n")
    for line in (b"content-type: application/octet-stream", b"content-length: 16",
                 b"inference-header-content-length: 4", b"authorization: bearer tok",
                 b"x-routing-key: k1", b"host: " + url.encode()):
        assert line in head
    assert body == REQUESTS[0].body
    head = seen[1].lower()
    assert head.startswith(b"post /v2/models/m/versions/2/infer")
    assert b"content-type: application/json" in head and b"inference-header" not in head
    assert b"x-routing-key: k0" in head


async def test_h1_client_statuses_close_and_informational_responses():
    not_found = b'{"error":"no model"}'
    async with scripted(
            b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(not_found),
                                                                         not_found),
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY,  # delimited by the close
    ) as (url, _, accepted):
        client = H1Client(url, REQUESTS, [{}])
        assert await client.request(0, 0, 5) == (200, None, BODY)
        assert await client.request(0, 0, 5) == (404, None, not_found)
        assert await client.request(0, 0, 5) == (200, None, BODY)
        assert not client.idle  # a closed connection never goes back to the pool
        await client.close()
    assert len(accepted) == 1


async def test_h1_client_timeout_spends_the_connection():
    async with scripted(None, OK) as (url, _, accepted):
        client = H1Client(url, REQUESTS, [{}])
        with pytest.raises(TimeoutError):
            await client.request(0, 0, 0.2)
        assert not client.idle
        assert await client.request(0, 0, 5) == (200, None, BODY)  # on a new connection
        await client.close()
    assert len(accepted) == 2


async def test_h1_client_reports_a_server_that_closes_mid_response():
    async with scripted(OK[:30] + b"Connection: close\r\n") as (url, _, _):
        client = H1Client(url, REQUESTS, [{}])
        with pytest.raises(ResponseError):
            await client.request(0, 0, 5)
        await client.close()


async def test_h1_client_refused():
    client = H1Client("127.0.0.1:1", REQUESTS, [{}])
    with pytest.raises(OSError) as info:
        await client.request(0, 0, 5)
    assert failure(info.value) == "UNAVAILABLE"
