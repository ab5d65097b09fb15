"""Bearer-token authentication and roles for every RPC on the gRPC port (and every HTTP endpoint,
which stands for the gRPC method it mirrors).

The token file holds one ``ROLE TOKEN [NAME]`` per line (``#`` comments allowed). Roles:

- ``infer``: inference and metadata;
- ``viewer``: read-only operator views (splits, rollouts, versions, feedback, the audit trail,
  the console);
- ``operator``: also changes splits and shadows and runs rollouts, and may infer;
- ``admin``: everything: also publishing, approving versions, feedback labels and repository
  control.

Each method needs one permission (``infer``, ``view``, ``operate`` or ``admin``), which a role
grants or not (``GRANTS``). Health checks stay open so orchestrators can probe. Every other
method, including ones added later, needs a permission: a method missing from the tables needs
``admin`` (deny by default). Tokens are compared in constant time, each against all known ones.
The file is re-read on SIGHUP; a file that fails to parse keeps the previous tokens.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

ROLES = ("infer", "viewer", "operator", "admin")
GRANTS = {  # role -> the permissions it holds
    "infer": frozenset({"infer"}),
    "viewer": frozenset({"view"}),
    "operator": frozenset({"infer", "view", "operate"}),
    "admin": frozenset({"infer", "view", "operate", "admin"}),
}
ROLE_OF = {"infer": "infer", "view": "viewer", "operate": "operator", "admin": "admin"}
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
INFERENCE_SERVICE = "/inference.GRPCInferenceService/"
ADMIN_METHODS = {"RepositoryModelLoad", "RepositoryModelUnload", "RepositoryIndex"}
INFER_PREFIXES = ("/grpc.reflection.",)
ADMIN_SERVICE = "/gateway.admin.v1.GatewayAdmin/"
VIEW_METHODS = {"GetTraffic", "ListTraffic", "TrafficHistory", "GetRollout", "ListVersions",
                "GetFeedback"}
OPERATE_METHODS = {"SetTraffic", "ClearTraffic", "SetShadow", "ClearShadow", "StartRollout",
                   "PauseRollout", "ResumeRollout", "AbortRollout"}
# Everything else of the admin service (PublishVersion, ApproveVersion, SendFeedback) is admin.

# The caller's name for audit records, set for the duration of an authenticated call.
IDENTITY: contextvars.ContextVar[str | None] = contextvars.ContextVar("identity", default=None)


@dataclass(frozen=True, slots=True)
class Credential:
    role: str
    token: bytes
    name: str


def parse_tokens(text: str) -> list[Credential]:
    creds = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or parts[0] not in ROLES:
            raise ValueError(f"line {number}: expected 'ROLE TOKEN [NAME]' with ROLE one of "
                             f"{', '.join(ROLES)}")
        if len(parts[1]) < 16:
            raise ValueError(f"line {number}: tokens must be at least 16 characters")
        name = parts[2] if len(parts) == 3 else f"{parts[0]}-token-{number}"
        creds.append(Credential(parts[0], parts[1].encode(), name))
    if not creds:
        raise ValueError("no tokens defined")
    return creds


def required_permission(method: str) -> str | None:
    """The permission a full method name needs (None: open to everyone)."""
    if method.startswith(OPEN_SERVICES):
        return None
    if method.startswith(INFERENCE_SERVICE):
        return "admin" if method[len(INFERENCE_SERVICE):] in ADMIN_METHODS else "infer"
    if method.startswith(INFER_PREFIXES):
        return "infer"
    if method.startswith(ADMIN_SERVICE):
        name = method[len(ADMIN_SERVICE):]
        if name in VIEW_METHODS:
            return "view"
        if name in OPERATE_METHODS:
            return "operate"
    return "admin"


def required_role(method: str) -> str | None:
    """The least role that may call a full method name (None: open to everyone)."""
    need = required_permission(method)
    return None if need is None else ROLE_OF[need]


def allows(role: str, permission: str) -> bool:
    return permission in GRANTS.get(role, ())


class TokenAuthenticator:
    def __init__(self, path: Path):
        self.path = path
        self.credentials = parse_tokens(path.read_text())

    def reload(self) -> None:
        try:
            self.credentials = parse_tokens(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.error("auth tokens not reloaded, keeping the previous ones: %s", exc)
            return
        log.info("auth tokens reloaded: %d tokens", len(self.credentials))

    def check(self, method: str, metadata) -> Credential | None:
        """The caller's credential if allowed; raises Unauthenticated / PermissionDenied."""
        need = required_permission(method)
        if need is None:
            return None
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        if header is None:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer TOKEN'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed authorization header: expected 'Bearer TOKEN'")
        presented = token.strip().encode("utf-8", "surrogateescape")
        match = None
        for cred in self.credentials:  # compare with all: timing says nothing about which
            if hmac.compare_digest(cred.token, presented):
                match = cred
        if match is None:
            raise Unauthenticated("invalid token")
        if not allows(match.role, need):
            raise PermissionDenied(f"this call needs the {ROLE_OF[need]} role; the token has "
                                   f"'{match.role}'")
        return match


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call before its handler runs; refusals never reach the service code."""

    def __init__(self, authenticator: TokenAuthenticator):
        self.authenticator = authenticator

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        try:
            credential = self.authenticator.check(details.method, details.invocation_metadata)
        except (Unauthenticated, PermissionDenied) as exc:
            return _refusal(handler, grpc.StatusCode[exc.code], exc.message)
        if credential is None:
            return handler
        return _with_identity(handler, credential.name)


def _refusal(handler, code: grpc.StatusCode, message: str):
    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": None, "response_serializer": None}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)


def _with_identity(handler, name: str):
    """The same handler, with IDENTITY set while it runs (for audit records)."""
    def wrap_unary(behavior):
        async def run(request, context):
            IDENTITY.set(name)
            return await behavior(request, context)
        return run

    def wrap_stream(behavior):
        async def run(request, context):
            IDENTITY.set(name)
            async for item in behavior(request, context):
                yield item
        return run

    common = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **common)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **common)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **common)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **common)
