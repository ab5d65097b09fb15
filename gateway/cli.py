"""The ``gateway`` command: serve, models (and, as they land, traffic, rollout, publish, bench)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
        "state_dir": args.state_dir,
        "auth_tokens": args.auth_tokens,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
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


def _channel(args):
    """A channel to the gateway named by --url, with --tls-ca and the token if given."""
    import grpc

    if args.tls_ca:
        return grpc.secure_channel(args.url, grpc.ssl_channel_credentials(args.tls_ca.read_bytes()))
    return grpc.insecure_channel(args.url)


def _call_metadata(args):
    token = args.token or os.environ.get("GATEWAY_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else None


def _models(args) -> int:
    import grpc

    from gateway.protocol.pb import grpc_service_pb2 as pb
    from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

    with _channel(args) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=args.timeout,
                                         metadata=_call_metadata(args))
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


def _admin_call(args, method: str, request):
    """Call one GatewayAdmin method; print the gRPC status and exit 1 on refusal."""
    import grpc

    from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc

    with _channel(args) as channel:
        stub = apb_grpc.GatewayAdminStub(channel)
        try:
            return getattr(stub, method)(request, timeout=args.timeout,
                                         metadata=_call_metadata(args))
        except grpc.RpcError as exc:
            print(f"gateway {args.command} {args.action}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            raise SystemExit(1) from None


def _percent(value: float) -> str:
    return f"{value:g}%"


def _print_traffic(status) -> None:
    split = " ".join(f"{w.version}={_percent(w.percent)}" for w in status.split)
    effective = " ".join(f"{w.version}={_percent(w.percent)}" for w in status.effective)
    print(f"model {status.model}")
    print(f"  split:      {split or '(none: the newest version serves)'}")
    print(f"  effective:  {effective or '(no serving version)'}")
    if status.HasField("shadow"):
        print(f"  shadow:     version {status.shadow.version} gets a copy of "
              f"{_percent(status.shadow.percent)} of requests")
    print(f"  serving:    {', '.join(status.serving_versions) or 'none'}")
    if status.note:
        print(f"  note:       {status.note}")


def _traffic(args) -> int:
    from gateway.protocol.pb import gateway_admin_pb2 as apb

    if args.action == "show":
        if args.model:
            _print_traffic(_admin_call(args, "GetTraffic", apb.GetTrafficRequest(model=args.model)))
        else:
            for status in _admin_call(args, "ListTraffic", apb.ListTrafficRequest()).models:
                _print_traffic(status)
    elif args.action == "set":
        split = []
        for item in args.weights:
            version, sep, weight = item.partition("=")
            try:
                split.append(apb.VersionWeight(version=version, percent=float(weight)))
            except ValueError:
                sep = ""
            if not sep:
                print(f"gateway traffic set: {item!r} is not VERSION=WEIGHT", file=sys.stderr)
                return 2
        _print_traffic(_admin_call(args, "SetTraffic",
                                   apb.SetTrafficRequest(model=args.model, split=split)))
    elif args.action == "shadow":
        _print_traffic(_admin_call(args, "SetShadow", apb.SetShadowRequest(
            model=args.model, version=args.to, percent=args.percent)))
    elif args.action == "unshadow":
        _print_traffic(_admin_call(args, "ClearShadow", apb.ClearShadowRequest(model=args.model)))
    elif args.action == "clear":
        _print_traffic(_admin_call(args, "ClearTraffic", apb.ClearTrafficRequest(model=args.model)))
    elif args.action == "history":
        import datetime

        response = _admin_call(args, "TrafficHistory",
                               apb.TrafficHistoryRequest(model=args.model, limit=args.limit))
        for r in response.records:
            when = datetime.datetime.fromtimestamp(r.time, datetime.UTC)
            print(f"{when:%Y-%m-%d %H:%M:%S}Z  {r.model}  {r.action:<12}  by {r.who}\n"
                  f"    old: {r.old_json}\n    new: {r.new_json}")
        if not response.records:
            print("no traffic changes recorded")
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
    serve.add_argument("--state-dir", type=Path,
                       help="operator state (traffic splits, audit log); default "
                            "<repository>/.gateway, shared by replicas of one repository")
    serve.add_argument("--auth-tokens", type=Path, metavar="FILE",
                       help="require 'authorization: Bearer TOKEN'; FILE has 'ROLE TOKEN [NAME]' "
                            "lines, roles infer and admin; re-read on SIGHUP")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve gRPC over TLS")
    serve.add_argument("--tls-key", type=Path, metavar="PEM")
    serve.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                       help="mutual TLS: require client certificates signed by this CA")
    serve.set_defaults(func=_serve)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="localhost:8001", help="gateway address (host:port)")
    common.add_argument("--timeout", type=float, default=10.0)
    common.add_argument("--token", help="bearer token (default: $GATEWAY_TOKEN)")
    common.add_argument("--tls-ca", type=Path, metavar="PEM",
                        help="connect over TLS, trusting this CA")

    models = sub.add_parser("models", parents=[common],
                            help="list models, versions and their state")
    models.set_defaults(func=_models)

    traffic = sub.add_parser("traffic", help="show and change traffic splits between versions")
    actions = traffic.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", parents=[common], help="a model's split (all if omitted)")
    show.add_argument("model", nargs="?")
    setter = actions.add_parser("set", parents=[common],
                                help="set a split, e.g. `set MODEL 1=90 2=10`")
    setter.add_argument("model")
    setter.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT",
                        help="percents summing to 100 (or fractions summing to 1)")
    shadow = actions.add_parser("shadow", parents=[common],
                                help="mirror a share of requests to a version, off the response path")
    shadow.add_argument("model")
    shadow.add_argument("--to", required=True, metavar="VERSION")
    shadow.add_argument("--percent", type=float, required=True)
    unshadow = actions.add_parser("unshadow", parents=[common], help="stop mirroring")
    unshadow.add_argument("model")
    clear = actions.add_parser("clear", parents=[common],
                               help="remove split and shadow: the newest version serves")
    clear.add_argument("model")
    history = actions.add_parser("history", parents=[common], help="audit log of changes")
    history.add_argument("model", nargs="?", default="")
    history.add_argument("--limit", type=int, default=50)
    traffic.set_defaults(func=_traffic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
