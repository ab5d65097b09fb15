"""An endpoint under test, seen through the control RPCs of KServe V2 (and Triton's extensions):
``Target`` over gRPC, ``HttpTarget`` over the REST API (``--protocol http``).

Anything a peer does not offer (MLServer has no ModelConfig nor ModelStatistics; the floor
server answers nothing but ModelInfer) comes back as None, and the report leaves it out.
"""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import quote

import grpc
from google.protobuf import json_format

from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

TIMEOUT_S = 10.0


def normalise_url(url: str) -> str:
    """'grpc://host:port' or 'host:port' -> 'host:port' (what grpc wants)."""
    for scheme in ("grpc://", "http://", "dns:///"):
        url = url.removeprefix(scheme)
    return url.rstrip("/")


class Target:
    protocol = "grpc"

    def __init__(self, url: str, label: str, model: str, version: str = "",
                 token: str | None = None, tls=None):
        """``tls``: a gateway.tls.ClientTLS (CA, client certificate) or None (plaintext)."""
        self.url, self.label, self.model, self.version = normalise_url(url), label, model, version
        self.token, self.tls = token, tls
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_receive_message_length", -1)]
        if tls is not None:
            self._channel = grpc.secure_channel(self.url, tls.credentials(), options)
        else:
            self._channel = grpc.insecure_channel(self.url, options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"{self.label}: no gRPC server at {self.url}") from None

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=TIMEOUT_S,
                                               metadata=self._metadata)
        except grpc.RpcError:
            return None

    def metadata(self) -> pb.ModelMetadataResponse | None:
        """The model's metadata, for the asked version if it has one, else the default."""
        found = None
        if self.version:
            found = self._call("ModelMetadata", pb.ModelMetadataRequest(
                name=self.model, version=self.version))
        return found or self._call("ModelMetadata", pb.ModelMetadataRequest(name=self.model))

    def max_batch_size(self) -> int | None:
        """From ModelConfig where the server has it (Triton, the gateway); None otherwise."""
        response = self._call("ModelConfig", pb.ModelConfigRequest(name=self.model))
        return None if response is None else response.config.max_batch_size

    def server_name(self) -> str:
        response = self._call("ServerMetadata", pb.ServerMetadataRequest())
        return "" if response is None else f"{response.name} {response.version}".strip()

    def statistics(self) -> dict | None:
        """Cumulative ModelStatistics of the model, summed over its versions."""
        response = self._call("ModelStatistics", pb.ModelStatisticsRequest(
            name=self.model, version=self.version))
        if response is None or not response.model_stats:
            return None
        return sum_statistics(response)

    def close(self) -> None:
        self._channel.close()


def sum_statistics(response: pb.ModelStatisticsResponse) -> dict:
    """The counters the report uses, summed over the response's versions."""
    total = dict.fromkeys(("inference_count", "execution_count", "success_count", "fail_count",
                           "queue_ns", "queue_count", "input_ns", "infer_ns", "output_ns",
                           "compute_count"), 0)
    for s in response.model_stats:
        st = s.inference_stats
        total["inference_count"] += s.inference_count
        total["execution_count"] += s.execution_count
        total["success_count"] += st.success.count
        total["fail_count"] += st.fail.count
        total["queue_ns"] += st.queue.ns
        total["queue_count"] += st.queue.count
        total["input_ns"] += st.compute_input.ns
        total["infer_ns"] += st.compute_infer.ns
        total["output_ns"] += st.compute_output.ns
        total["compute_count"] += st.compute_infer.count
    return total


class HttpTarget:
    """The same questions over the KServe V2 REST API (one keep-alive connection, the parent's
    only): ``GET /v2``, ``/v2/models/{m}[/versions/{v}]``, ``.../config``, ``.../stats``."""

    protocol = "http"

    def __init__(self, url: str, label: str, model: str, version: str = "",
                 token: str | None = None, tls=None):
        if url.startswith("https://") and tls is None:
            from gateway.tls import ClientTLS

            tls = ClientTLS()  # the system's CAs
        self.url = normalise_url(url.removeprefix("https://"))
        self.label, self.model, self.version = label, model, version
        self.token, self.tls = token, tls
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._conn: http.client.HTTPConnection | None = None
        self._server: dict | None = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            host, _, port = self.url.rpartition(":")
            host = host.strip("[]")
            if self.tls is not None:
                from bench.httpclient import ssl_context

                self._conn = http.client.HTTPSConnection(host, int(port), timeout=timeout,
                                                         context=ssl_context(self.tls))
            else:
                self._conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self._conn.timeout = timeout
        return self._conn

    def get(self, path: str, timeout: float = TIMEOUT_S) -> tuple[int, object]:
        """(HTTP status, the JSON body or None). OSError when no server answers."""
        for attempt in (1, 2):  # a kept-alive connection the server closed: once more, anew
            conn = self._connection(timeout)
            try:
                conn.request("GET", path, headers=self._headers)
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._conn = None
                if attempt == 2 or isinstance(exc, (ConnectionRefusedError, TimeoutError)):
                    raise OSError(str(exc) or type(exc).__name__) from exc
                continue
            try:
                return response.status, json.loads(body) if body else None
            except ValueError:
                return response.status, None
        raise AssertionError("unreachable")

    def _doc(self, path: str):
        try:
            status, doc = self.get(path)
        except OSError:
            return None
        return doc if status == 200 and isinstance(doc, dict) else None

    def _model_path(self, version: str | None = None) -> str:
        version = self.version if version is None else version
        path = f"/v2/models/{quote(self.model, safe='')}"
        return path + f"/versions/{quote(version, safe='')}" if version else path

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the server answers HTTP at all (any status: the floor answers only inference)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/v2/health/ready", timeout=5)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"{self.label}: no HTTP server at {self.url} "
                                          f"({exc})") from None
                time.sleep(0.2)

    def probe(self) -> None:
        """ConnectionError with the reason and a likely cause unless an HTTP server answers."""
        try:
            self.get("/v2/health/live", timeout=5)
        except OSError as exc:
            details = str(exc)
            lowered = details.lower()
            if "refused" in lowered:
                hint = "is the server running? check --url (the REST port, 8000 by default)"
            elif self.tls is None and ("reset" in lowered or "remote end closed" in lowered
                                       or "badstatusline" in lowered):
                hint = "the server may require TLS: use --tls-ca PEM"
            elif self.tls is not None and ("ssl" in lowered or "certificate" in lowered):
                hint = "the server may not use TLS, or --tls-ca did not sign its certificate"
            else:
                hint = "check --url and the TLS flags"
            raise ConnectionError(f"cannot reach an HTTP server at {self.url}: {details} "
                                  f"({hint})") from None

    def server_metadata(self) -> dict | None:
        if self._server is None:
            self._server = self._doc("/v2") or {}
        return self._server or None

    def extensions(self) -> list[str] | None:
        """The server's extensions, or None when it does not say (no server metadata)."""
        doc = self.server_metadata()
        return None if doc is None else list(doc.get("extensions") or [])

    def metadata(self) -> pb.ModelMetadataResponse | None:
        doc = (self._doc(self._model_path()) if self.version else None) or \
            self._doc(self._model_path(""))
        if doc is None:
            return None
        try:
            return json_format.ParseDict(doc, pb.ModelMetadataResponse(),
                                         ignore_unknown_fields=True)
        except json_format.ParseError:
            return None

    def max_batch_size(self) -> int | None:
        doc = self._doc(self._model_path("") + "/config")
        if doc is None:
            return None
        config = doc.get("config", doc)  # Triton and the gateway answer the config itself
        return int(config.get("max_batch_size", 0) or 0)

    def server_name(self) -> str:
        doc = self.server_metadata()
        return "" if doc is None else f"{doc.get('name', '')} {doc.get('version', '')}".strip()

    def statistics(self) -> dict | None:
        doc = self._doc(self._model_path() + "/stats")
        if not doc or not doc.get("model_stats"):
            return None
        try:
            response = json_format.ParseDict(doc, pb.ModelStatisticsResponse(),
                                             ignore_unknown_fields=True)
        except json_format.ParseError:
            return None
        return sum_statistics(response)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def server_split(before: dict | None, after: dict | None) -> dict | None:
    """Where the server spent a request's time during a step: queue vs compute, in microseconds
    per request, and the mean batch it ran (ModelStatistics after minus before)."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in after}
    if d["compute_count"] <= 0:
        return None
    per = d["compute_count"]
    compute = d["input_ns"] + d["infer_ns"] + d["output_ns"]
    return {
        "requests": d["success_count"] + d["fail_count"],
        "succeeded": d["success_count"],
        "failed": d["fail_count"],
        "queue_us": round(d["queue_ns"] / max(1, d["queue_count"]) / 1e3, 2),
        "compute_us": round(compute / per / 1e3, 2),
        "compute_input_us": round(d["input_ns"] / per / 1e3, 2),
        "compute_infer_us": round(d["infer_ns"] / per / 1e3, 2),
        "compute_output_us": round(d["output_ns"] / per / 1e3, 2),
        "batch_mean": round(d["inference_count"] / d["execution_count"], 2)
        if d["execution_count"] else None,
    }
