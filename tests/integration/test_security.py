"""Authentication, roles and TLS against a real gateway: every method of every service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from support import ROOT, make_pki, start_gateway, wait_for
from tritonclient.utils import InferenceServerException

from bench import models
from gateway.protocol.pb import gateway_admin_pb2, grpc_service_pb2

INFER_TOKEN = "infer-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
ADMIN_ONLY = {"RepositoryModelLoad", "RepositoryModelUnload", "RepositoryIndex"}
# The admin API's reads need viewer, its traffic and rollout changes operator; the rest
# (publish, approve, feedback labels) admin.
VIEWER = {"GetTraffic", "ListTraffic", "TrafficHistory", "GetRollout", "ListVersions",
          "GetFeedback"}
OPERATOR = {"SetTraffic", "ClearTraffic", "SetShadow", "ClearShadow", "StartRollout",
            "PauseRollout", "ResumeRollout", "AbortRollout"}


def all_methods():
    """(full method name, client streaming, server streaming, required role) for every RPC."""
    rows = []
    for descriptor, default_role in ((grpc_service_pb2.DESCRIPTOR, "infer"),
                                     (gateway_admin_pb2.DESCRIPTOR, "admin"),
                                     (health_pb2.DESCRIPTOR, None)):
        for service in descriptor.services_by_name.values():
            for m in service.methods:
                role = ("admin" if m.name in ADMIN_ONLY else "viewer" if m.name in VIEWER
                        else "operator" if m.name in OPERATOR and default_role == "admin"
                        else default_role)
                rows.append((f"/{service.full_name}/{m.name}", m.client_streaming,
                             m.server_streaming, role))
    rows.append(("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True, True,
                 "infer"))
    return rows


def call(channel, method, client_streaming, server_streaming, token=None, timeout=20):
    """Call a method with an empty message; return the status code (OK if it answered)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        if client_streaming and server_streaming:
            list(channel.stream_stream(method)(iter([b""]), metadata=metadata, timeout=timeout))
        elif server_streaming:
            list(channel.unary_stream(method)(b"", metadata=metadata, timeout=timeout))
        elif client_streaming:
            channel.stream_unary(method)(iter([b""]), metadata=metadata, timeout=timeout)
        else:
            channel.unary_unary(method)(b"", metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    models.make_version(root / "repo", "mlp", 1, models.build_mlp)
    tokens = root / "tokens"
    tokens.write_text(f"# role token name\ninfer {INFER_TOKEN} app\nadmin {ADMIN_TOKEN} alice\n")
    with start_gateway(root / "repo", "--auth-tokens", str(tokens), "--control-mode",
                       "explicit", "--load-model", "mlp") as gw:
        gw.tokens = tokens
        yield gw


@pytest.mark.parametrize("method, cstream, sstream, role", all_methods(),
                         ids=[m[0].rsplit("/", 2)[-2].split(".")[-1] + "." + m[0].rsplit("/", 1)[1]
                              for m in all_methods()])
def test_every_method_checks_credentials(secured, method, cstream, sstream, role):
    with grpc.insecure_channel(secured.url) as channel:
        if role is None:  # health stays open (Watch streams until the deadline)
            code, _ = call(channel, method, cstream, sstream, timeout=1)
            assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            return
        anonymous = call(channel, method, cstream, sstream)
        wrong = call(channel, method, cstream, sstream, token="not-a-valid-token-at-all")
        infer = call(channel, method, cstream, sstream, token=INFER_TOKEN)
        admin = call(channel, method, cstream, sstream, token=ADMIN_TOKEN)
    assert anonymous == (grpc.StatusCode.UNAUTHENTICATED,
                         "missing credentials: send 'authorization: Bearer TOKEN'")
    assert wrong == (grpc.StatusCode.UNAUTHENTICATED, "invalid token")
    if role != "infer":
        assert infer == (grpc.StatusCode.PERMISSION_DENIED,
                         f"this call needs the {role} role; the token has 'infer'")
    else:
        assert infer[0] not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert admin[0] not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def test_tritonclient_with_a_token(secured):
    x = np.zeros((1, 32), np.float32)
    with grpcclient.InferenceServerClient(secured.url) as client:
        inp = grpcclient.InferInput("input", [1, 32], "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as info:
            client.infer("mlp", [inp])
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        assert info.value.message() == "missing credentials: send 'authorization: Bearer TOKEN'"
        result = client.infer("mlp", [inp], headers={"authorization": f"Bearer {INFER_TOKEN}"})
        assert result.as_numpy("output").shape == (1, 4)
        with pytest.raises(InferenceServerException) as info:
            client.unload_model("mlp", headers={"authorization": f"Bearer {INFER_TOKEN}"})
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"


def test_the_audit_log_names_the_authenticated_identity(secured):
    done = subprocess.run([sys.executable, "-m", "gateway", "traffic", "set", "mlp", "1=100",
                           "--url", secured.url, "--token", ADMIN_TOKEN],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    history = subprocess.run([sys.executable, "-m", "gateway", "traffic", "history", "mlp",
                              "--url", secured.url],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
                             env={**os.environ, "GATEWAY_TOKEN": ADMIN_TOKEN})
    assert history.returncode == 0, history.stderr
    assert "by alice" in history.stdout


def test_tokens_reload_on_sighup(secured):
    new_token = "rotated-token-0123456789abcdef"
    original = secured.tokens.read_text()
    secured.tokens.write_text(f"admin {new_token} bob\n")
    try:
        secured.process.send_signal(signal.SIGHUP)
        with grpc.insecure_channel(secured.url) as channel:
            method = "/inference.GRPCInferenceService/ServerMetadata"
            wait_for(lambda: call(channel, method, False, False, token=ADMIN_TOKEN)[0]
                     == grpc.StatusCode.UNAUTHENTICATED, what="the old token to be refused")
            assert call(channel, method, False, False, token=new_token)[0] == grpc.StatusCode.OK
        # A broken file keeps the tokens in force.
        secured.tokens.write_text("superuser x\n")
        secured.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "auth tokens not reloaded" in secured.log(), what="reload refusal")
        with grpc.insecure_channel(secured.url) as channel:
            assert call(channel, method, False, False, token=new_token)[0] == grpc.StatusCode.OK
    finally:
        secured.tokens.write_text(original)
        secured.process.send_signal(signal.SIGHUP)


@pytest.mark.parametrize("name", ["../mlp", "..", "a/b", "/etc", "mlp/../../x", "x" * 300, ""])
def test_traversal_names_are_refused_everywhere(secured, name):
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with grpcclient.InferenceServerClient(secured.url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.load_model(name, headers=auth)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert ("invalid model name" if name else "Model name cannot be empty") \
            in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata(name, headers=auth)
        assert info.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")
    with grpc.insecure_channel(secured.url) as channel:
        code, details = call_admin(channel, "GetTraffic",
                                   gateway_admin_pb2.GetTrafficRequest(model=name))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid model name" in details


def call_admin(channel, method, request):
    try:
        channel.unary_unary(f"/gateway.admin.v1.GatewayAdmin/{method}",
                            request_serializer=type(request).SerializeToString)(
            request, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    return d


def test_tls_and_mutual_tls(pki, tmp_path):
    models.make_version(tmp_path, "mlp", 1, models.build_mlp)
    ca = (pki / "ca.pem").read_bytes()
    x = np.zeros((1, 32), np.float32)
    inp = grpcclient.InferInput("input", [1, 32], "FP32")
    inp.set_data_from_numpy(x)
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    with start_gateway(tmp_path, *tls) as gw:
        with grpcclient.InferenceServerClient(gw.url, ssl=True, root_certificates=str(pki / "ca.pem")) as c:
            assert c.infer("mlp", [inp]).as_numpy("output").shape == (1, 4)
        with grpc.insecure_channel(gw.url) as plain:  # a plaintext client cannot talk to it
            with pytest.raises(grpc.RpcError) as info:
                plain.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with start_gateway(tmp_path, *tls, "--tls-client-ca", str(pki / "ca.pem")) as gw:
        creds = grpc.ssl_channel_credentials(ca)
        with grpc.secure_channel(gw.url, creds) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpcclient.InferenceServerClient(
                gw.url, ssl=True, root_certificates=str(pki / "ca.pem"),
                private_key=str(pki / "client.key"),
                certificate_chain=str(pki / "client.pem")) as c:
            assert c.infer("mlp", [inp]).as_numpy("output").shape == (1, 4)
