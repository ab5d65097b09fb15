"""Training hooks: publish a model version from training code, the CLI, or an MLflow registry.

    from gateway import publish

    result = publish("iris", "model.onnx", url="localhost:8001",
                     metadata={"run_id": run_id, "accuracy": 0.97},
                     baseline=x_train, canary=10)
    print(result.version, result.state)

With ``repository=DIR`` the version is written straight into a model repository (a gateway
polling it picks it up); with ``url=HOST:PORT`` it goes through a running gateway's admin API,
which writes it into its own repository, loads it, and can start a canary rollout. Refusals
raise the gateway's errors (``gateway.errors.InvalidArgument`` for a bad file, ...) with the
same message either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import GatewayError, InvalidArgument, ModelExecutionError, Unavailable

CHUNK = 1 << 20  # bytes of model file per PublishChunk


@dataclass
class PublishResult:
    model: str
    version: int
    state: str  # "WRITTEN" (repository publish), or the gateway's READY / UNAVAILABLE
    detail: str = ""
    metadata: dict = field(default_factory=dict)
    rollout: object = None  # gateway_admin_pb2.RolloutStatus when a canary started
    path: Path | None = None  # the version directory (repository publish)


def publish(model: str, file=None, *, repository=None, url: str | None = None,
            metadata: dict | None = None, baseline=None, canary: float | None = None,
            canary_interval: float | None = None, canary_options: dict | None = None,
            allow_signature_change: bool = False,
            from_mlflow: str | None = None, token: str | None = None, tls_ca=None,
            timeout: float = 300.0, tls=None) -> PublishResult:
    """Publish ``file`` (an ONNX model) as the next version of ``model``.

    Exactly one of ``repository`` (a model repository directory) and ``url`` (a running
    gateway). ``baseline``: training inputs for the drift monitor, a ``.npy`` path (the first
    input's data), a ``.npz`` path (keys = input names), an array, or {input name: array}.
    ``canary``: start a rollout at this percent once the version is ready (``url`` only), with
    ``canary_interval`` seconds per step and ``canary_options``: other limits by their
    StartRolloutRequest names (max_error_rate, max_latency_ratio, min_requests, steps,
    min_accuracy_ratio, min_labels).
    ``from_mlflow``: a ``models:/NAME/VERSION`` URI to take the file and run metadata from.
    ``tls_ca``: a CA file to trust over TLS; or ``tls``: a :class:`gateway.tls.ClientTLS`
    (CA and client certificate, for a gateway that requires one).
    """
    if (repository is None) == (url is None):
        raise InvalidArgument("give either repository (a directory) or url (a running gateway)")
    if canary and url is None:
        raise InvalidArgument("a canary needs a running gateway: publish with url=HOST:PORT")
    metadata = dict(metadata or {})
    with tempfile.TemporaryDirectory(prefix="gateway-publish-") as tmp:
        if from_mlflow:
            if file is not None:
                raise InvalidArgument("give a model file or an MLflow model URI, not both")
            from gateway.mlflow_source import fetch

            file, provenance = fetch(from_mlflow, Path(tmp))
            metadata = {**provenance, **metadata}
        if file is None:
            raise InvalidArgument("no model file given")
        file = Path(file)
        if not file.is_file():
            raise InvalidArgument(f"{file}: no such file")
        if repository is not None:
            return _publish_local(Path(repository), model, file, metadata, baseline,
                                  allow_signature_change)
        options = dict(canary_options or {})
        if canary_interval:
            options["interval_seconds"] = float(canary_interval)
        return _publish_remote(url, model, file, metadata, baseline, canary, options,
                               allow_signature_change, token, tls or tls_ca, timeout, Path(tmp))


def _baseline_source(baseline):
    import numpy as np

    if baseline is None or isinstance(baseline, (dict, str, os.PathLike)):
        return baseline
    return np.asarray(baseline)  # an array: the first input's data


def _publish_local(root, model, file, metadata, baseline, allow) -> PublishResult:
    from gateway.registry import publish_version

    done = publish_version(root, model, file, metadata=metadata,
                           baseline=_baseline_source(baseline), allow_signature_change=allow)
    return PublishResult(done.model, done.version, "WRITTEN", "", done.metadata, None, done.path)


def _publish_remote(url, model, file, metadata, baseline, canary, canary_options, allow,
                    token, tls_ca, timeout, tmp: Path) -> PublishResult:
    import grpc

    from gateway.protocol.pb import gateway_admin_pb2 as apb
    from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc
    from gateway.registry import baseline_data, inspect_model

    io = inspect_model(file)  # fail fast on this side; the gateway checks again
    baseline_npz = b""
    source = _baseline_source(baseline)
    if source is not None:
        from gateway.monitoring.stats import write_baseline

        try:
            path = write_baseline(tmp / "baseline.npz", baseline_data(source, io))
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"baseline: {exc}") from None
        baseline_npz = path.read_bytes()
    try:
        metadata_json = json.dumps(metadata, sort_keys=True)
    except TypeError as exc:
        raise InvalidArgument(f"metadata must be JSON-serialisable: {exc}") from None
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    try:
        limits = apb.StartRolloutRequest(**canary_options)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"canary_options: {exc}") from None
    header = apb.PublishHeader(
        model=model, metadata_json=metadata_json, allow_signature_change=allow,
        canary_percent=float(canary or 0), canary=limits, baseline_npz=baseline_npz,
        size=file.stat().st_size, sha256=digest.hexdigest(), source=file.name)

    def chunks():
        yield apb.PublishChunk(header=header)
        with open(file, "rb") as f:
            while block := f.read(CHUNK):
                yield apb.PublishChunk(data=block)

    with open_channel(url, tls_ca) as channel:
        try:
            result = apb_grpc.GatewayAdminStub(channel).PublishVersion(
                chunks(), timeout=timeout, metadata=auth_metadata(token))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, url) from None
    return PublishResult(result.model, int(result.version), result.state, result.detail,
                         json.loads(result.metadata_json or "{}"),
                         result.rollout if result.HasField("rollout") else None)


# ---- admin API plumbing (shared with the CLI) ---------------------------------------------------

def open_channel(url: str, tls_ca=None):
    """``tls_ca``: a CA file (TLS trusting it), a gateway.tls.ClientTLS, or None (plaintext)."""
    import grpc

    from gateway.tls import ClientTLS

    options = [("grpc.max_send_message_length", 64 << 20),
               ("grpc.max_receive_message_length", 64 << 20)]
    if isinstance(tls_ca, ClientTLS):
        return grpc.secure_channel(url, tls_ca.credentials(), options=options)
    if tls_ca:
        creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
        return grpc.secure_channel(url, creds, options=options)
    return grpc.insecure_channel(url, options=options)


def auth_metadata(token: str | None):
    token = token or os.environ.get("GATEWAY_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else None


def error_from_rpc(exc, url: str) -> GatewayError:
    """The gateway's refusal as the matching GatewayError (same class as a local refusal)."""
    name = exc.code().name
    for cls in _error_classes():
        if cls.code == name and cls not in (GatewayError, ModelExecutionError):
            return cls(exc.details() or name)
    if name == "UNAVAILABLE":
        return Unavailable(f"{url}: {exc.details()}")
    error = GatewayError(exc.details() or name)
    error.code = name
    return error


def _error_classes():
    stack, seen = [GatewayError], []
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return [c for c in seen if c.__module__ == "gateway.errors"]
