"""The ``gateway`` command: serve, models (and, as they land, traffic, rollout, publish, bench)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from gateway.config import CONTROL_MODES, from_environment


def _serve(args) -> int:
    from gateway.server import serve

    settings = from_environment()
    changes = {k: v for k, v in {
        "model_repository": args.model_repository,
        "host": args.host,
        "grpc_port": args.grpc_port,
        "metrics_port": args.metrics_port,
        "control_mode": args.control_mode,
        "load_models": tuple(args.load_model) if args.load_model else None,
        "poll_interval": args.poll_interval,
        "drain_seconds": args.drain_seconds,
        "max_message_bytes": args.max_message_bytes,
        "cpu_threads_per_instance": args.cpu_threads,
        "log_level": args.log_level,
    }.items() if v is not None}
    try:
        settings = replace(settings, **changes).validated()
    except ValueError as exc:
        print(f"gateway serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0


def _models(args) -> int:
    import grpc

    from gateway.protocol.pb import grpc_service_pb2 as pb
    from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"gateway models: {args.url}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    rows = [("MODEL", "VERSION", "STATE", "REASON")]
    rows += [(m.name, m.version or "-", m.state, m.reason) for m in index.models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model repository (default: the demo models)")
    serve.add_argument("--model-repository", type=Path, help="Triton-layout repository directory")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0 = any free)")
    serve.add_argument("--metrics-port", type=int,
                       help="Prometheus port (default 8002; 0 = any free; -1 = off)")
    serve.add_argument("--control-mode", choices=CONTROL_MODES, help="default none")
    serve.add_argument("--load-model", action="append", metavar="NAME",
                       help="explicit mode: load this model at start (repeatable; '*' = all)")
    serve.add_argument("--poll-interval", type=float, help="poll mode: seconds between scans")
    serve.add_argument("--drain-seconds", type=float, help="grace for in-flight requests on stop")
    serve.add_argument("--max-message-bytes", type=int, help="largest gRPC message accepted")
    serve.add_argument("--cpu-threads", type=int, help="ONNX Runtime threads per CPU instance")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="list models, versions and their state")
    models.add_argument("--url", default="localhost:8001", help="gateway address (host:port)")
    models.add_argument("--timeout", type=float, default=10.0)
    models.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
