"""An endpoint under test, seen through the control RPCs of KServe V2 (and Triton's extensions).

Anything a peer does not offer (MLServer has no ModelConfig nor ModelStatistics; the floor
server answers nothing but ModelInfer) comes back as None, and the report leaves it out.
"""

from __future__ import annotations

import grpc

from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

TIMEOUT_S = 10.0


def normalise_url(url: str) -> str:
    """'grpc://host:port' or 'host:port' -> 'host:port' (what grpc wants)."""
    for scheme in ("grpc://", "http://", "dns:///"):
        url = url.removeprefix(scheme)
    return url.rstrip("/")


class Target:
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

    def close(self) -> None:
        self._channel.close()


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
