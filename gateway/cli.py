"""The ``gateway`` command: serve, models, traffic, rollout, publish, versions, feedback, bench."""

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
    settings = from_environment()
    changes = {k: v for k, v in {
        "model_repository": args.model_repository,
        "host": args.host,
        "grpc_port": args.grpc_port,
        "metrics_port": args.metrics_port,
        "gpu_sample_interval": args.gpu_sample_interval,
        "drift_interval": args.drift_interval,
        "control_mode": args.control_mode,
        "load_models": tuple(args.load_model) if args.load_model else None,
        "poll_interval": args.poll_interval,
        "drain_seconds": args.drain_seconds,
        "max_message_bytes": args.max_message_bytes,
        "cpu_threads_per_instance": args.cpu_threads,
        "log_level": args.log_level,
        "state_dir": args.state_dir,
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
    workers = args.workers or 1
    if workers > 1:
        if settings.grpc_port == 0:
            print("gateway serve: --workers needs a fixed --grpc-port (they share it)",
                  file=sys.stderr)
            return 2
        from gateway.workers import run_workers

        return run_workers(settings, workers, _run_one)
    return _run_one(settings)


def _run_one(settings) -> int:
    from gateway.server import serve

    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


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
            verb = " ".join(filter(None, (args.command, getattr(args, "action", ""))))
            print(f"gateway {verb}: {exc.code().name}: {exc.details()}", file=sys.stderr)
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


def _duration(text: str) -> float:
    """Seconds from '90', '90s', '5m' or '1h'."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 5m or 90")


def _steps(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 5,25,50,100")


def _print_rollout(status) -> None:
    import datetime

    steps = ",".join(f"{s:g}" for s in status.steps)
    print(f"model {status.model}: rollout to version {status.to_version} "
          f"(baseline {status.from_version}) is {status.state.replace('_', ' ')}")
    print(f"  canary share: {status.percent:g}% (step {status.step + 1} of {len(status.steps)}: "
          f"{steps})")
    if status.state == "running":
        print(f"  next decision in {status.step_remaining_seconds:.0f}s (every "
              f"{status.interval_seconds:g}s; needs {status.min_requests} canary requests)")
    for name, w in (("canary", status.canary), ("baseline", status.baseline)):
        rate = w.errors / w.requests if w.requests else 0.0
        print(f"  {name:<9} {w.requests} requests, {rate:.2%} errors, p99 {w.p99_ms:.2f} ms")
    print(f"  limits:   error rate <= {status.max_error_rate:.2%}, p99 <= "
          f"{status.max_latency_ratio:g}x baseline"
          + (f", accuracy >= {status.min_accuracy_ratio:g}x baseline (after "
             f"{status.min_labels} labels each)" if status.min_accuracy_ratio else ""))
    for f in status.feedback:
        name = "canary" if f.version == status.to_version else "baseline"
        score = (f"accuracy {f.accuracy:.2%}" if f.HasField("accuracy")
                 else f"mean absolute error {f.mean_absolute_error:.4g}")
        print(f"  {name:<9} {f.labelled} labelled predictions, {score}")
    if status.reason:
        print(f"  reason:   {status.reason}")
    for event in status.history[-8:]:
        when = datetime.datetime.fromtimestamp(event.time, datetime.UTC)
        print(f"  {when:%H:%M:%S}Z {event.event:<11} {event.percent:>5g}%  {event.detail} "
              f"({event.who})")


def _rollout(args) -> int:
    from gateway.protocol.pb import gateway_admin_pb2 as apb

    if args.action == "start":
        request = apb.StartRolloutRequest(
            model=args.model, to_version=args.to, from_version=args.from_version or "",
            steps=args.steps or [], interval_seconds=args.interval or 0,
            max_latency_ratio=args.max_latency_ratio or 0, min_requests=args.min_requests or 0,
            min_accuracy_ratio=args.min_accuracy_ratio or 0, min_labels=args.min_labels or 0)
        if args.max_error_rate is not None:
            request.max_error_rate = args.max_error_rate
        _print_rollout(_admin_call(args, "StartRollout", request))
        return 0
    method = {"status": "GetRollout", "pause": "PauseRollout", "resume": "ResumeRollout",
              "abort": "AbortRollout"}[args.action]
    _print_rollout(_admin_call(args, method, apb.RolloutRequest(model=args.model)))
    return 0


def _key_values(items: list[str]) -> dict:
    metadata = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"gateway publish: --metadata {item!r} is not KEY=VALUE")
        metadata[key] = value
    return metadata


def _publish(args) -> int:
    from gateway.errors import GatewayError
    from gateway.hooks import publish

    if (args.file is None) == (args.from_mlflow is None):
        print("gateway publish: give a model FILE or --from-mlflow models:/NAME/VERSION",
              file=sys.stderr)
        return 2
    if args.canary is not None and args.repository is not None:
        print("gateway publish: --canary needs a running gateway: publish with --url",
              file=sys.stderr)
        return 2
    try:
        result = publish(
            args.model, args.file, repository=args.repository,
            url=None if args.repository is not None else args.url,
            metadata=_key_values(args.metadata), baseline=args.baseline, canary=args.canary,
            canary_interval=args.canary_interval, canary_options={
                k: v for k, v in (("max_latency_ratio", args.canary_max_latency_ratio),
                                  ("min_accuracy_ratio", args.canary_min_accuracy_ratio))
                if v is not None},
            allow_signature_change=args.allow_signature_change, from_mlflow=args.from_mlflow,
            token=args.token, tls_ca=args.tls_ca, timeout=args.timeout)
    except GatewayError as exc:
        print(f"gateway publish: refused ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    meta = result.metadata
    where = result.path if result.path is not None else args.url
    print(f"published model {result.model} version {result.version} ({where})")
    print(f"  sha256 {meta.get('sha256', '?')}, {meta.get('size', 0)} bytes"
          + (f", baseline of {', '.join(meta['baseline']['inputs'])}"
             if meta.get("baseline") else ""))
    if result.state == "WRITTEN":
        print("  written to the repository: a gateway in poll mode serves it within its poll "
              "interval")
    else:
        print(f"  state: {result.state}" + (f" ({result.detail})" if result.detail else ""))
    if result.rollout is not None:
        _print_rollout(result.rollout)
    failed = result.state == "UNAVAILABLE" or (args.canary is not None and result.rollout is None)
    if failed and result.detail:
        print(f"gateway publish: {result.detail}", file=sys.stderr)
    return 1 if failed else 0


def _describe(metadata: dict) -> str:
    user = metadata.get("metadata") or {}
    parts = [f"{k}={v}" for k, v in user.items() if k != "mlflow"]
    mlflow = user.get("mlflow")
    if isinstance(mlflow, dict):
        parts.append(f"mlflow={mlflow.get('model_uri', '')} run {mlflow.get('run_id', '')}")
    return " ".join(parts)


def _versions(args) -> int:
    import json

    if args.repository is not None:
        from gateway.registry import list_versions

        try:
            rows = [(str(v["version"]), "ON_DISK" if v["has_model"] else "NO_MODEL_FILE", "",
                     v["metadata"], v["has_baseline"])
                    for v in list_versions(args.repository, args.model)]
        except (FileNotFoundError, ValueError) as exc:
            print(f"gateway versions: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 1
    else:
        from gateway.protocol.pb import gateway_admin_pb2 as apb

        response = _admin_call(args, "ListVersions", apb.ListVersionsRequest(model=args.model))
        rows = [(v.version, v.state, f"{v.traffic_percent:g}%", json.loads(v.metadata_json or
                                                                           "{}"), v.has_baseline)
                for v in response.versions]
    if args.json:
        print(json.dumps([{"version": r[0], "state": r[1], "traffic": r[2], "metadata": r[3],
                           "baseline": r[4]} for r in rows], indent=1, sort_keys=True))
        return 0
    table = [("VERSION", "STATE", "TRAFFIC", "CREATED", "SHA256", "BASELINE", "METADATA")]
    for version, state, traffic, meta, baseline in rows:
        table.append((version, state, traffic or "-", meta.get("created", "-"),
                      str(meta.get("sha256", "-"))[:12], "yes" if baseline else "no",
                      _describe(meta)))
    widths = [max(len(r[i]) for r in table) for i in range(6)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[6])
    if len(table) == 1:
        print(f"model {args.model} has no versions")
    return 0


def _read_labels(path: Path) -> list[tuple[str, list[str]]]:
    """id,label[,label...] rows (a first row 'id,label' is a header)."""
    import csv

    items = []
    with open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if number == 1 and row[0].strip().lower() in ("id", "request_id"):
                continue
            if len(row) < 2:
                raise SystemExit(f"gateway feedback: {path}:{number}: expected id,label")
            items.append((row[0].strip(), [c.strip() for c in row[1:]]))
    return items


def _print_feedback(status) -> None:
    print(f"model {status.model}: {status.kind or 'feedback'} on output "
          f"'{status.output or '?'}'; {status.kept} predictions waiting for labels "
          f"(keeps {status.capacity}); {status.unmatched} labels matched nothing")
    if not status.versions:
        print("  no labelled predictions yet")
        return
    regression = status.kind == "regression"
    print(f"  {'VERSION':<8} {'LABELLED':>9}  {'MAE' if regression else 'ACCURACY':>9}")
    for v in status.versions:
        score = (f"{v.mean_absolute_error:.4g}" if regression else f"{v.accuracy:.2%}")
        print(f"  {v.version:<8} {v.labelled:>9}  {score:>9}")


def _feedback(args) -> int:
    from gateway.protocol.pb import gateway_admin_pb2 as apb

    if args.id is None and args.file is None:
        if args.label:
            print("gateway feedback: --label needs --id", file=sys.stderr)
            return 2
        _print_feedback(_admin_call(args, "GetFeedback", apb.GetFeedbackRequest(model=args.model)))
        return 0
    items = []
    if args.id is not None:
        if not args.label:
            print("gateway feedback: --id needs --label", file=sys.stderr)
            return 2
        items.append((args.id, args.label))
    if args.file is not None:
        items += _read_labels(args.file)
    matched = unknown = 0
    errors, unknown_ids, response = [], [], None
    for start in range(0, max(len(items), 1), 10_000):
        batch = items[start:start + 10_000]
        response = _admin_call(args, "SendFeedback", apb.FeedbackRequest(
            model=args.model, labels=[apb.FeedbackLabel(id=i, labels=labels)
                                      for i, labels in batch]))
        matched += response.matched
        unknown += response.unknown
        unknown_ids += list(response.unknown_ids)
        errors += list(response.errors)
    print(f"{matched} labels joined, {unknown} unknown request ids, {len(errors)} refused")
    if unknown_ids:
        print(f"  unknown: {', '.join(unknown_ids[:10])}")
    for error in errors[:10]:
        print(f"  refused: {error}")
    _print_feedback(response.status)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model repository (default: the demo models)")
    serve.add_argument("--model-repository", type=Path, help="Triton-layout repository directory")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0 = any free)")
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
    serve.add_argument("--workers", type=int, metavar="N",
                       help="processes sharing the gRPC port (SO_REUSEPORT); default 1")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    serve.add_argument("--state-dir", type=Path,
                       help="operator state (traffic splits, audit log); default "
                            "<repository>/.gateway, shared by replicas of one repository")
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

    rollout = sub.add_parser("rollout", help="automatic canary: step up, analyse, promote or "
                                             "roll back")
    ractions = rollout.add_subparsers(dest="action", required=True)
    start = ractions.add_parser("start", parents=[common], help="start a canary rollout")
    start.add_argument("model")
    start.add_argument("--to", required=True, metavar="VERSION", help="the canary version")
    start.add_argument("--from", dest="from_version", metavar="VERSION",
                       help="the baseline (default: the version with most traffic now)")
    start.add_argument("--steps", type=_steps, help="canary percents, default 5,25,50,100")
    start.add_argument("--interval", type=_duration, help="per step, e.g. 60s (default 60s)")
    start.add_argument("--max-error-rate", type=float, help="default 0.01")
    start.add_argument("--max-latency-ratio", type=float,
                       help="canary p99 / baseline p99, default 1.5")
    start.add_argument("--min-requests", type=int,
                       help="canary requests needed to judge a step, default 100")
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
    rollout.set_defaults(func=_rollout)

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
    publish.add_argument("--canary-interval", type=_duration, metavar="DURATION",
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
    publish.set_defaults(func=_publish, timeout=300.0)

    versions = sub.add_parser("versions", parents=[common],
                              help="a model's versions with their metadata")
    versions.add_argument("model")
    versions.add_argument("--repository", type=Path, metavar="DIR",
                          help="read this repository instead of asking a gateway (--url)")
    versions.add_argument("--json", action="store_true", help="print JSON")
    versions.set_defaults(func=_versions)

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
    feedback.set_defaults(func=_feedback)

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
        return _bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
