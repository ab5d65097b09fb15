"""The Open Inference Protocol over HTTP/REST (``--http-port``), for curl and tritonclient.http.

aiohttp serves it on the gRPC server's event loop. Each endpoint converts at the edge
(``httpcodec`` for inference bodies, plain JSON for the rest) and calls the same core as the gRPC
servicer: ``DataPlane.infer`` for inference (one request path: validation, routing, limits,
batching and drain live there), the repository for metadata, configuration, statistics and
repository control. Each endpoint stands for the gRPC method it mirrors (``ROUTES``), so
``TokenAuthenticator`` grants both protocols the same roles; the health endpoints stand for
``grpc.health.v1`` and stay open for probes. Errors answer ``{"error": message}`` with the
message gRPC would send and the HTTP status of the error's gRPC code (``STATUS``).
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib

from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict

from gateway import __version__
from gateway.auth import IDENTITY
from gateway.errors import (
    GatewayError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    echo,
)
from gateway.protocol.httpcodec import HEADER_LENGTH, decode_infer, encode_infer, parse_json
from gateway.protocol.servicer import EXTENSIONS

log = logging.getLogger(__name__)

# gRPC status code name -> HTTP status: Google's mapping (google.rpc.Code), which Triton's
# HTTP server follows for the codes both have (a full queue: 429 here, UNAVAILABLE/503 there).
STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "CANCELLED": 499, "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
HEALTH = "/grpc.health.v1.Health/Check"  # open: orchestrator probes carry no token
INFERENCE = "/inference.GRPCInferenceService/"
COMPRESS_MIN_BYTES = 1024  # smaller responses go uncompressed (allowed by HTTP; cheaper)
SHUTDOWN_SECONDS = 1.0  # after the drain: connections still open get this long to finish
MODEL = "/v2/models/{model}"
VERSION = "/v2/models/{model}/versions/{version}"
UNSUPPORTED = {  # path prefix -> (gRPC method it stands for, what gRPC calls it)
    "/v2/systemsharedmemory": ("SystemSharedMemoryStatus", "system shared memory"),
    "/v2/cudasharedmemory": ("CudaSharedMemoryStatus", "CUDA shared memory"),
    "/v2/trace": ("TraceSetting", "tracing (TraceSetting)"),
    "/v2/logging": ("LogSettings", "LogSettings (use the server's --log-level)"),
}


class _TooLarge(ResourceExhausted):
    status = 413


class _Unreadable(InvalidArgument):
    close = True  # the rest of the stream cannot be trusted: answer, then close the connection


class HttpFrontend:
    """The HTTP endpoints of one gateway; ``start`` binds them, ``stop`` closes them."""

    def __init__(self, dataplane, repository, ready, authenticator=None,
                 max_message_bytes: int = 64 << 20):
        self.dataplane = dataplane
        self.policies = dataplane.router.policies  # models with a traffic policy (live dict)
        self.repository = repository
        self.ready = ready  # () -> bool: started and not draining
        self.authenticator = authenticator
        self.max_message_bytes = max_message_bytes
        self.console = None  # gateway.protocol.console.Console: the operator console, /ui/
        self._runner: web.AppRunner | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_message_bytes)
        for path, methods, handler, rpc in self.routes():
            app.router.add_route("*", path, self._endpoint(methods, handler, rpc))
        for prefix, (rpc, what) in UNSUPPORTED.items():
            handler = self._endpoint(("GET", "POST"), _unsupported(what), INFERENCE + rpc)
            app.router.add_route("*", prefix + "{tail:(/.*)?}", handler)
            app.router.add_route("*", MODEL + prefix[3:] + "{tail:(/.*)?}", handler)
        if self.console is not None:
            self.console.register(app)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def routes(self):
        """(path, methods, handler, the gRPC method it stands for) of every endpoint."""
        rows = [("/v2/health/live", "GET", self.live, HEALTH),
                ("/v2/health/ready", "GET", self.server_ready, HEALTH),
                ("/v2", "GET", self.server_metadata, "ServerMetadata"),
                ("/v2/models/stats", "GET", self.statistics, "ModelStatistics"),
                ("/v2/repository/index", "POST", self.repository_index, "RepositoryIndex"),
                ("/v2/repository/models/{model}/load", "POST", self.load, "RepositoryModelLoad"),
                ("/v2/repository/models/{model}/unload", "POST", self.unload,
                 "RepositoryModelUnload")]
        for base in (MODEL, VERSION):
            rows += [(base, "GET", self.model_metadata, "ModelMetadata"),
                     (base + "/ready", "GET", self.model_ready, "ModelReady"),
                     (base + "/config", "GET", self.model_config, "ModelConfig"),
                     (base + "/stats", "GET", self.statistics, "ModelStatistics"),
                     (base + "/infer", "POST", self.infer, "ModelInfer")]
        return [(path, ("GET", "HEAD") if method == "GET" else (method,), handler,
                 rpc if rpc.startswith("/") else INFERENCE + rpc)
                for path, method, handler, rpc in rows]

    async def start(self, host: str, port: int, ssl_context=None, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: a free port); the port bound."""
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     shutdown_timeout=SHUTDOWN_SECONDS)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]"), port, ssl_context=ssl_context,
                           reuse_port=reuse_port or None, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise RuntimeError(f"HTTP port {port}: {exc.strerror or exc}; choose another with "
                               "--http-port (-1 turns HTTP off)") from None
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ---- the edge: auth and errors ----------------------------------------------------------

    def _endpoint(self, methods, handler, rpc: str):
        authenticator = self.authenticator

        async def endpoint(request: web.Request) -> web.StreamResponse:
            if request.method not in methods:
                return error(405, f"{request.method} is not allowed on this path; use "
                                  f"{', '.join(methods)}", {"Allow": ", ".join(methods)})
            token = None
            try:
                if authenticator is not None:
                    header = request.headers.get("Authorization")
                    credential = authenticator.check(
                        rpc, (("authorization", header),) if header is not None else ())
                    if credential is not None:
                        token = IDENTITY.set(credential.name)
                return await handler(request)
            except GatewayError as exc:
                response = error(getattr(exc, "status", None) or STATUS.get(exc.code, 500),
                                 exc.message)
                if getattr(exc, "close", False):
                    response.force_close()
                return response
            except Exception:
                log.exception("unexpected error in HTTP %s %s", request.method, rpc)
                return error(500, "internal error; see the server log")
            finally:
                if token is not None:
                    IDENTITY.reset(token)

        return endpoint

    async def _not_found(self, request: web.Request) -> web.Response:
        return error(404, f"not found: {echo(request.method)} {echo(request.path)} is not an "
                          "endpoint of this server (the KServe V2 API is under /v2)")

    async def _body(self, request: web.Request) -> bytes:
        try:
            return await request.read()  # gzip/deflate bodies arrive decompressed, size-checked
        except web.HTTPRequestEntityTooLarge:
            raise _TooLarge(f"the request body is larger than the server's limit of "
                            f"{self.max_message_bytes} bytes (--max-message-bytes)") from None
        except web.RequestPayloadError as exc:  # corrupt gzip/deflate, a cut chunked body
            request.content.feed_eof()  # nothing more to read (or to log) after the answer
            cause = exc.__cause__ or exc
            reason = str(getattr(cause, "message", "") or cause).strip()
            raise _Unreadable(f"the request body could not be read: {echo(reason)}") from None

    # ---- inference --------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        body = await self._body(request)
        key = (request.headers.get("x-routing-key")
               if model in self.policies or model in self.repository.ensembles else None)
        core, plan = decode_infer(body, request.headers.get(HEADER_LENGTH), model,
                                  request.match_info.get("version", ""), key)
        # Encoded inside the data plane's accounting, as over gRPC.
        payload, header_length = await self.dataplane.infer(
            core, lambda response: encode_infer(response, plan))
        headers = {}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
            content_type = "application/octet-stream"
        else:
            content_type = "application/json"
        accepted = request.headers.get("Accept-Encoding")
        if accepted and len(payload) >= COMPRESS_MIN_BYTES:
            payload = _compress(payload, accepted, headers)
        return web.Response(body=payload, headers=headers, content_type=content_type)

    # ---- health and metadata ----------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.Response()

    async def server_ready(self, request: web.Request) -> web.Response:
        if not self.ready():
            raise Unavailable("the server is not ready: starting or shutting down")
        return web.Response()

    async def model_ready(self, request: web.Request) -> web.Response:
        self.repository.ready(request.match_info["model"],  # NotFound / Unavailable say why not
                              request.match_info.get("version", ""))
        if not self.ready():
            raise Unavailable("the server is not ready: starting or shutting down")
        return web.Response()

    async def server_metadata(self, request: web.Request) -> web.Response:
        return answer({"name": "gateway", "version": __version__,
                       "extensions": ["binary_tensor_data", *EXTENSIONS]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        served = self._served(request)
        name = request.match_info["model"]
        config = served.config
        batch = [-1] if config.max_batch_size > 0 else []

        def meta(specs):
            return [{"name": s.name, "datatype": s.datatype, "shape": batch + list(s.dims)}
                    for s in specs]

        versions = sorted(self.repository.get(name).serving, key=int)
        return answer({"name": name, "versions": versions, "platform": config.platform,
                       "inputs": meta(config.inputs), "outputs": meta(config.outputs)})

    async def model_config(self, request: web.Request) -> web.Response:
        return answer(proto_json(self._served(request).config.proto))

    async def statistics(self, request: web.Request) -> web.Response:
        name = request.match_info.get("model")
        if name is None:
            served = [v for e in self.repository.models.values() for v in e.serving.values()]
        elif "version" in request.match_info:
            served = [self._served(request)]
        else:
            served = list(self.repository.get(name).serving.values())
        return answer({"model_stats": [_statistics(v) for v in served]})

    def _served(self, request: web.Request):
        return self.repository.version(request.match_info["model"],
                                       request.match_info.get("version", ""))

    # ---- repository -------------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        doc = parse_json(await self._body(request), "repository index")
        ready = doc.get("ready", False)
        rows = self.repository.index(ready_only=ready is True)
        return answer([{k: v for k, v in (("name", n), ("version", ver), ("state", s),
                                          ("reason", r)) if v or k in ("name", "state")}
                       for n, ver, s, r in rows])

    async def load(self, request: web.Request) -> web.Response:
        doc = parse_json(await self._body(request), "load request")
        params = doc.get("parameters") or {}
        keys = list(params) if isinstance(params, dict) else []
        await self.repository.load_requested(request.match_info["model"], keys)
        return web.Response()

    async def unload(self, request: web.Request) -> web.Response:
        parse_json(await self._body(request), "unload request")
        await self.repository.unload_requested(request.match_info["model"])
        return web.Response()


def _unsupported(what: str):
    async def handler(request: web.Request) -> web.Response:
        raise Unimplemented(f"{what} is not supported by this gateway")
    return handler


def answer(doc, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc, separators=(",", ":")).encode(),
                        content_type="application/json")


def error(status: int, message: str, headers=None) -> web.Response:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    response = answer({"error": message}, status)
    response.headers.update(headers)
    return response


def _compress(payload: bytes, accepted: str, headers: dict) -> bytes:
    """gzip or deflate (zlib format, as tritonclient reads it) when the client accepts one."""
    accepted = accepted.lower()
    if "gzip" in accepted:
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(payload, compresslevel=1)
    if "deflate" in accepted:
        headers["Content-Encoding"] = "deflate"
        return zlib.compress(payload, 1)
    return payload


def _statistics(served) -> dict:
    s = served.stats

    def duration(d):
        return {"count": d.count, "ns": d.ns}

    return {
        "name": served.model, "version": served.version, "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {k: duration(getattr(s, k)) for k in (
            "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
            "cache_hit", "cache_miss")},
        "batch_stats": [{"batch_size": size, "compute_input": duration(b.compute_input),
                         "compute_infer": duration(b.compute_infer),
                         "compute_output": duration(b.compute_output)}
                        for size, b in sorted(s.batches.items())]}


# ---- protobuf -> JSON as Triton writes it (64-bit integers as numbers) ---------------------------

def proto_json(message) -> dict:
    doc = MessageToDict(message, preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, doc)


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _numbers(descriptor, doc: dict) -> dict:
    """MessageToDict writes 64-bit integers as strings (JSON's numbers are doubles); Triton
    writes numbers, and clients use them as numbers (``config["max_batch_size"] > 0``)."""
    for field in descriptor.fields:
        value = doc.get(field.name)
        if value is None:
            continue
        sub = field.message_type
        if sub is not None and sub.GetOptions().map_entry:
            inner = sub.fields_by_name["value"]
            for key in value:
                if inner.message_type is not None:
                    _numbers(inner.message_type, value[key])
                elif inner.type in _INT64:
                    value[key] = int(value[key])
        elif sub is not None:
            for item in value if isinstance(value, list) else (value,):
                _numbers(sub, item)
        elif field.type in _INT64:
            doc[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return doc

