#!/usr/bin/env python3
"""Probe a gateway's gRPC health service (grpc.health.v1.Health) and exit 0 when it serves.

Used by the container's HEALTHCHECK (Dockerfile.gpu) and usable as a Kubernetes exec probe.
Standalone: it needs only grpcio and grpcio-health-checking (both installed with the gateway)
and never imports the gateway itself, so it costs one short-lived process per probe.

    python healthcheck.py                       # the server on 127.0.0.1:$GATEWAY_GRPC_PORT
    python healthcheck.py --url host:8001       # another address
    python healthcheck.py --service iris        # one model (the gateway reports each by name)
    python healthcheck.py --live                # any answer counts: loading and draining too

Exit codes: 0 serving (or, with --live, answering at all); 1 otherwise, with one line on
stdout saying why (Docker keeps it in `docker inspect`). 1, never 2: Docker reserves 2.

TLS follows the server's own settings when they come from the environment: with GATEWAY_TLS_CERT
set, the probe connects over TLS and trusts --tls-ca (default $GATEWAY_HEALTH_TLS_CA, else the
server's own certificate file, which is right for a self-signed certificate). With
GATEWAY_TLS_CLIENT_CA set (mutual TLS) it needs --client-cert/--client-key (default
$GATEWAY_HEALTH_CLIENT_CERT / $GATEWAY_HEALTH_CLIENT_KEY). --server-name (default
$GATEWAY_HEALTH_SERVER_NAME) checks the certificate against that name instead of the host.
Health checks need no token: the gateway leaves the health service open when auth is on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _default_url() -> str:
    return f"127.0.0.1:{os.environ.get('GATEWAY_GRPC_PORT') or 8001}"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=_default_url(),
                        help="host:port of the gateway (default 127.0.0.1:$GATEWAY_GRPC_PORT, "
                             "else 8001)")
    parser.add_argument("--service", default="",
                        help="health service name: '' for the server (default) or a model name")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument("--live", action="store_true",
                        help="liveness: succeed on any health answer, SERVING or not")
    tls = os.environ.get("GATEWAY_TLS_CERT")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                        help="connect over TLS (default: on when GATEWAY_TLS_CERT is set or a "
                             "CA or client certificate is given)")
    parser.add_argument("--tls-ca", type=Path,
                        default=_env_path("GATEWAY_HEALTH_TLS_CA") or (Path(tls) if tls else None),
                        help="PEM of the CA to trust (default $GATEWAY_HEALTH_TLS_CA, else "
                             "$GATEWAY_TLS_CERT)")
    parser.add_argument("--client-cert", type=Path, default=_env_path("GATEWAY_HEALTH_CLIENT_CERT"),
                        help="mutual TLS: client certificate chain (PEM)")
    parser.add_argument("--client-key", type=Path, default=_env_path("GATEWAY_HEALTH_CLIENT_KEY"),
                        help="mutual TLS: client private key (PEM)")
    parser.add_argument("--server-name", default=os.environ.get("GATEWAY_HEALTH_SERVER_NAME"),
                        help="name the server certificate must carry (default: the host)")
    args = parser.parse_args(argv)
    if args.tls is None:
        args.tls = args.tls_ca is not None or args.client_cert is not None
    return args


def _channel(args: argparse.Namespace):
    import grpc

    if not args.tls:
        return grpc.insecure_channel(args.url)
    key = args.client_key.read_bytes() if args.client_key else None
    chain = args.client_cert.read_bytes() if args.client_cert else None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
        private_key=key, certificate_chain=chain)
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.url, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[int, str]:
    """(exit code, one line saying why)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    what = f"{args.url} service {args.service!r}" if args.service else args.url
    try:
        with _channel(args) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                               timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 1, f"unhealthy: {what}: NOT_FOUND: the server reports no such service"
        return 1, f"unhealthy: {what}: {exc.code().name}: {exc.details()}"
    except OSError as exc:  # unreadable certificate files
        return 1, f"unhealthy: {what}: {exc}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return 0, f"healthy: {what} is SERVING"
    if args.live:
        return 0, f"live: {what} answers ({status})"
    return 1, f"unhealthy: {what} is {status}"


def main(argv: list[str] | None = None) -> int:
    code, line = check(parse_args(argv))
    print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
