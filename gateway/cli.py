"""The ``gateway`` command line: `serve` here; the operator commands live in gateway.commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from gateway.batch.cli import add_score_parser
from gateway.commands import (
    approve_command,
    feedback_command,
    list_models,
    parse_duration,
    parse_steps,
    publish_command,
    rollout_command,
    traffic_command,
    versions_command,
)
from gateway.config import CONTROL_MODES, from_environment


def _serve(args) -> int:
    try:
        settings = from_environment()
    except ValueError as exc:
        print(f"gateway serve: {exc}", file=sys.stderr)
        return 2
    changes = {k: v for k, v in {
        "model_repository": args.model_repository,
        "host": args.host,
        "grpc_port": args.grpc_port,
        "metrics_port": args.metrics_port,
        "http_port": args.http_port,
        "gpu_sample_interval": args.gpu_sample_interval,
        "drift_interval": args.drift_interval,
        "control_mode": args.control_mode,
        "load_models": tuple(args.load_model) if args.load_model else None,
        "poll_interval": args.poll_interval,
        "drain_seconds": args.drain_seconds,
        "max_message_bytes": args.max_message_bytes,
        "cpu_threads": args.cpu_threads,
        "default_max_batch_size": args.default_max_batch_size,
        "cache_size": args.cache_size,
        "workers": args.workers,
        "log_level": args.log_level,
        "state_dir": args.state_dir,
        "state_url": args.state_url,
        "rollout_lease": args.rollout_lease,
        "console_allow_changes": args.console_allow_changes or None,
        "auth_tokens": args.auth_tokens,
        "execution_timeout": args.execution_timeout,
        "max_inflight": args.max_inflight,
        "max_inflight_per_model": args.max_inflight_per_model,
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
    # A SIGHUP before the server installs its handler (it logs, or re-reads --auth-tokens)
    # must not stop it either.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _warn_if_empty(settings)
    workers = settings.workers
    if workers > 1:
        if settings.grpc_port == 0:
            print("gateway serve: --workers needs a fixed --grpc-port (they share it)",
                  file=sys.stderr)
            return 2
        from gateway.workers import run_workers

        return run_workers(settings, workers, _run_one)
    return _run_one(settings)


def _warn_if_empty(settings) -> None:
    """An empty repository serves nothing but reports ready: say so where operators look."""
    if settings.control_mode == "explicit":
        return  # models arrive by RepositoryModelLoad
    try:
        models = [p for p in settings.model_repository.iterdir()
                  if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return
    if not models:
        later = (f"; models added later load within {settings.poll_interval:g}s"
                 if settings.control_mode == "poll" else
                 "; add model directories (<model>/config.pbtxt, <model>/1/model.onnx) and "
                 "restart, or serve with --control-mode poll")
        logging.getLogger("gateway").warning(
            "model repository %s holds no model directories: the server will be ready with "
            "nothing to serve%s", settings.model_repository, later)


def _run_one(settings) -> int:
    from gateway.server import serve

    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model repository (default: the demo models)")
    serve.add_argument("--model-repository", type=Path, help="Triton-layout repository directory")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0 = any free)")
    serve.add_argument("--http-port", type=int,
                       help="KServe V2 over HTTP/REST, for curl and tritonclient.http (default "
                            "8000; 0 = any free; -1 = off)")
    serve.add_argument("--metrics-port", type=int,
                       help="Prometheus port (default 8002; 0 = any free; -1 = off, and with "
                            "it all monitoring: statistics, drift, hooks)")
    serve.add_argument("--gpu-sample-interval", type=float, metavar="S",
                       help="seconds between GPU (NVML) samples (default 5; 0 = no GPU metrics)")
    serve.add_argument("--drift-interval", type=float, metavar="S",
                       help="seconds between input statistics and drift updates (default 1)")
    serve.add_argument("--control-mode", choices=CONTROL_MODES, help="default none")
    serve.add_argument("--load-model", action="append", metavar="NAME",
                       help="explicit mode: load this model at start (repeatable; '*' = all)")
    serve.add_argument("--poll-interval", type=float, help="poll mode: seconds between scans")
    serve.add_argument("--drain-seconds", type=float, help="grace for in-flight requests on stop")
    serve.add_argument("--max-message-bytes", type=int, help="largest gRPC message accepted")
    serve.add_argument("--cpu-threads", type=int, help="ONNX Runtime threads per CPU instance")
    serve.add_argument("--default-max-batch-size", type=int, metavar="N",
                       help="max_batch_size of a model without one whose tensors all have a "
                            "dynamic first dim (Triton's default: 4; 0: no batching)")
    serve.add_argument("--cache-size", type=int, metavar="BYTES",
                       help="response cache for models whose config enables response_cache "
                            "(LRU, bounded in bytes); default 0: none")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="processes sharing the gRPC port (SO_REUSEPORT); default 1")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    serve.add_argument("--state-dir", type=Path,
                       help="operator state (traffic splits, rollouts, audit log) of the "
                            "embedded file store; default <repository>/.gateway (one host)")
    serve.add_argument("--state-url", metavar="URL",
                       help="operator state store: file://DIR (default: the --state-dir file "
                            "store) or redis://HOST:PORT/DB, rediss:// for TLS, shared by a "
                            "fleet; password in the URL or GATEWAY_STATE_PASSWORD")
    serve.add_argument("--console-allow-changes", action="store_true",
                       help="without --auth-tokens the console (/ui/) is read-only; this lets "
                            "a browser on this machine (localhost) change splits and rollouts")
    serve.add_argument("--rollout-lease", type=float, metavar="S",
                       help="seconds after which a silent rollout judge is replaced by another "
                            "replica (default 15)")
    serve.add_argument("--auth-tokens", type=Path, metavar="FILE",
                       help="require 'authorization: Bearer TOKEN'; FILE has 'ROLE TOKEN [NAME]' "
                            "lines, roles infer and admin; re-read on SIGHUP")
    serve.add_argument("--execution-timeout", type=float, metavar="S",
                       help="a batch running longer takes its instance out of service "
                            "(default 120; 0 = never; model parameter execution_timeout_ms wins)")
    serve.add_argument("--max-inflight", type=int, metavar="N",
                       help="requests in the server at once (default 8192)")
    serve.add_argument("--max-inflight-per-model", type=int, metavar="N",
                       help="requests for one model at once (default 2048)")
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
    common.add_argument("--tls-cert", type=Path, metavar="PEM",
                        help="client certificate chain, for a server that requires one "
                             "(with --tls-key)")
    common.add_argument("--tls-key", type=Path, metavar="PEM",
                        help="the client certificate's private key")

    models = sub.add_parser("models", parents=[common],
                            help="list models, versions and their state")
    models.set_defaults(func=list_models)

    traffic = sub.add_parser("traffic", help="show and change traffic splits between versions")
    actions = traffic.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", parents=[common], help="a model's split (all if omitted)")
    show.add_argument("model", nargs="?")
    setter = actions.add_parser("set", parents=[common],
                                help="set a split, e.g. `set MODEL 1=90 2=10`")
    setter.add_argument("model")
    setter.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT",
                        help="percents summing to 100 (or fractions summing to 1)")
    setter.add_argument("--force", action="store_true",
                        help="the model has a rollout: abort it and set this split")
    shadow = actions.add_parser("shadow", parents=[common],
                                help="mirror a share of requests to a version, off the "
                                     "response path")
    shadow.add_argument("model")
    shadow.add_argument("--to", required=True, metavar="VERSION")
    shadow.add_argument("--percent", type=float, required=True)
    unshadow = actions.add_parser("unshadow", parents=[common], help="stop mirroring")
    unshadow.add_argument("model")
    clear = actions.add_parser("clear", parents=[common],
                               help="remove split and shadow: the newest version serves")
    clear.add_argument("model")
    clear.add_argument("--force", action="store_true",
                       help="the model has a rollout: abort it and clear the split")
    history = actions.add_parser("history", parents=[common], help="audit log of changes")
    history.add_argument("model", nargs="?", default="")
    history.add_argument("--limit", type=int, default=50)
    traffic.set_defaults(func=traffic_command)

    rollout = sub.add_parser("rollout", help="automatic canary: step up, analyse, promote or "
                                             "roll back")
    ractions = rollout.add_subparsers(dest="action", required=True)
    start = ractions.add_parser("start", parents=[common], help="start a canary rollout")
    start.add_argument("model")
    start.add_argument("--to", required=True, metavar="VERSION", help="the canary version")
    start.add_argument("--from", dest="from_version", metavar="VERSION",
                       help="the baseline (default: the version with most traffic now)")
    start.add_argument("--steps", type=parse_steps, help="canary percents, default 5,25,50,100")
    start.add_argument("--interval", type=parse_duration, help="per step, e.g. 60s (default 60s)")
    start.add_argument("--max-error-rate", type=float, help="default 0.01")
    start.add_argument("--max-latency-ratio", type=float,
                       help="canary p99 / baseline p99, default 1.5")
    start.add_argument("--min-requests", type=int,
                       help="canary requests (all replicas) needed to judge a step, default "
                            "100; 0: judge on time alone")
    start.add_argument("--min-accuracy-ratio", type=float, metavar="R",
                       help="also roll back when the canary's feedback accuracy is below R x "
                            "the baseline's (needs feedback on; default off)")
    start.add_argument("--min-labels", type=int,
                       help="labelled predictions per version before accuracy counts, "
                            "default 50")
    for verb, text in (("status", "show a rollout"), ("pause", "hold the current step"),
                       ("resume", "continue a paused rollout"),
                       ("abort", "stop and send all traffic back to the baseline")):
        p = ractions.add_parser(verb, parents=[common], help=text)
        p.add_argument("model")
    rollout.set_defaults(func=rollout_command)

    publish = sub.add_parser(
        "publish", parents=[common],
        help="check an ONNX file and publish it as the model's next version",
        description="Check FILE (onnx checker, ONNX Runtime, the model's inputs and outputs) "
                    "and write it as the next version, atomically, with metadata.json and an "
                    "optional drift baseline; through a running gateway (--url, default) it is "
                    "loaded at once and can start a canary.")
    publish.add_argument("model")
    publish.add_argument("file", nargs="?", type=Path, help="the .onnx file")
    publish.add_argument("--repository", type=Path, metavar="DIR",
                         help="write into this model repository instead of going through a "
                              "gateway (--url)")
    publish.add_argument("--metadata", action="append", metavar="KEY=VALUE",
                         help="recorded in metadata.json (repeatable): run id, data, metrics")
    publish.add_argument("--baseline", type=Path, metavar="DATA.npy|.npz",
                         help="training inputs for drift: .npy = the first input's, .npz "
                              "keys = input names")
    publish.add_argument("--canary", type=float, metavar="PCT",
                         help="start a rollout at PCT%% once the version is ready (--url)")
    publish.add_argument("--canary-interval", type=parse_duration, metavar="DURATION",
                         help="seconds per canary step (default: the rollout's 60s)")
    publish.add_argument("--canary-max-latency-ratio", type=float, metavar="R",
                         help="canary p99 / baseline p99 allowed (default 1.5)")
    publish.add_argument("--canary-min-accuracy-ratio", type=float, metavar="R",
                         help="also judge the canary by feedback accuracy (see rollout start "
                              "--min-accuracy-ratio)")
    publish.add_argument("--allow-signature-change", action="store_true",
                         help="accept inputs/outputs that differ from the model's config and "
                              "last version")
    publish.add_argument("--from-mlflow", metavar="models:/NAME/VERSION",
                         help="take the ONNX file and run metadata from an MLflow registry")
    publish.set_defaults(func=publish_command, timeout=300.0)

    versions = sub.add_parser("versions", parents=[common],
                              help="a model's versions with their metadata")
    versions.add_argument("model")
    versions.add_argument("--repository", type=Path, metavar="DIR",
                          help="read this repository instead of asking a gateway (--url)")
    versions.add_argument("--json", action="store_true", help="print JSON")
    versions.set_defaults(func=versions_command)

    approve = sub.add_parser(
        "approve", parents=[common],
        help="approve a version for live traffic (models with require_approval in gateway.yaml)",
        description="Governance: record your approval of MODEL VERSION, so that splits, rollouts "
                    "and promotions may give it traffic. The version's publisher cannot approve "
                    "it; needs the admin role when auth is on.")
    approve.add_argument("model")
    approve.add_argument("version")
    approve.set_defaults(func=approve_command)

    feedback = sub.add_parser(
        "feedback", parents=[common],
        help="send ground-truth labels for earlier request ids; show accuracy per version",
        description="Without --id or --file: show the model's feedback per version.")
    feedback.add_argument("model")
    feedback.add_argument("--id", metavar="REQUEST_ID", help="the request's id")
    feedback.add_argument("--label", action="append", metavar="VALUE",
                          help="its true label (repeat once per row of a batched request)")
    feedback.add_argument("--file", type=Path, metavar="labels.csv",
                          help="id,label rows (more label columns for batched requests)")
    feedback.set_defaults(func=feedback_command)

    add_score_parser(sub)  # gateway score: batch scoring (gateway/batch/)

    bench = sub.add_parser("bench", add_help=False,
                           help="load-test an endpoint (python -m bench; `gateway bench --help`)")
    bench.set_defaults(func=_bench)
    return parser


def _bench(args, rest: list[str]) -> int:
    from bench.cli import main as bench_main

    return bench_main(rest, prog="gateway bench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func is _bench:  # everything after `bench` belongs to the bench suite
        return _run(lambda: _bench(args, rest), "bench")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    verb = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    return _run(lambda: args.func(args), verb)


def _run(command, verb: str) -> int:
    """Run a command; errors any command can meet become one line on stderr, not a traceback."""
    try:
        return command()
    except BrokenPipeError:
        # The reader went away (`gateway rollout status M | head -3`): stop quietly, as other
        # command-line tools do; point stdout at /dev/null so the exit flush cannot fail too.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print(f"gateway {verb}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as exc:  # a file named on the command line: missing, a directory, unreadable
        if exc.filename is None:
            raise
        print(f"gateway {verb}: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
