"""The operator commands: clients of a running gateway (models, traffic, rollout, publish,
versions, approve, feedback). Each prints what the server answered, or the gRPC status and message and
exit 1 when it refused."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _verb(args) -> str:
    return " ".join(filter(None, (args.command, getattr(args, "action", None))))


def _tls(args):
    """--tls-ca/--tls-cert/--tls-key as a ClientTLS (None: plaintext); exit 2 if unusable."""
    from gateway.tls import client_tls

    try:
        return client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as exc:
        print(f"gateway {_verb(args)}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _channel(args):
    """A channel to the gateway named by --url, over TLS when --tls-* flags are given."""
    import grpc

    tls = _tls(args)
    if tls is not None:
        return grpc.secure_channel(args.url, tls.credentials())
    return grpc.insecure_channel(args.url)


def _rpc_failure(args, exc) -> str:
    """'CODE: details', with a hint where gRPC's own words do not say what is wrong."""
    details = exc.details() or ""
    return f"{exc.code().name}: {details}{_hint(args, exc.code().name, details)}"


def _hint(args, code: str, details: str) -> str:
    """What an UNAVAILABLE most likely means, for gRPC's 'Socket closed' and the like."""
    if code != "UNAVAILABLE":
        return ""
    lowered = details.lower()
    tls = any((args.tls_ca, args.tls_cert, args.tls_key))
    if "connection refused" in lowered:
        return f" (is a gateway serving on {args.url}?)"
    if "handshake" in lowered or "ssl" in lowered or "tls" in lowered:
        return (" (the server may not use TLS: drop --tls-ca/--tls-cert/--tls-key, or its "
                "certificate is not signed by --tls-ca)") if tls else ""
    if "socket closed" in lowered or "connection reset" in lowered:
        if not tls:
            return " (the server may require TLS: use --tls-ca PEM)"
        if not args.tls_cert:
            return (" (the server may require a client certificate: use --tls-cert PEM "
                    "--tls-key PEM)")
        return " (the server may not accept this client certificate)"
    return ""


def _call_metadata(args):
    token = args.token or os.environ.get("GATEWAY_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else None


def list_models(args) -> int:
    import grpc

    from gateway.protocol.pb import grpc_service_pb2 as pb
    from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

    with _channel(args) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=args.timeout,
                                         metadata=_call_metadata(args))
        except grpc.RpcError as exc:
            print(f"gateway models: {args.url}: {_rpc_failure(args, exc)}", file=sys.stderr)
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
            print(f"gateway {_verb(args)}: {_rpc_failure(args, exc)}", file=sys.stderr)
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
    if status.rollout:
        print(f"  rollout:    {status.rollout} (it owns the split)")
    if not status.store_up:
        print(f"  state:      the state store is unreachable: serving revision "
              f"{status.revision}; changes are refused until it is back")


def traffic_command(args) -> int:
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
        status = _admin_call(args, "SetTraffic", apb.SetTrafficRequest(
            model=args.model, split=split, force=args.force))
        if args.force:
            print(f"model {args.model}: any rollout of it was aborted (--force)")
        _print_traffic(status)
    elif args.action == "shadow":
        _print_traffic(_admin_call(args, "SetShadow", apb.SetShadowRequest(
            model=args.model, version=args.to, percent=args.percent)))
    elif args.action == "unshadow":
        _print_traffic(_admin_call(args, "ClearShadow", apb.ClearShadowRequest(model=args.model)))
    elif args.action == "clear":
        status = _admin_call(args, "ClearTraffic", apb.ClearTrafficRequest(
            model=args.model, force=args.force))
        if args.force:
            print(f"model {args.model}: any rollout of it was aborted (--force)")
        _print_traffic(status)
    elif args.action == "history":
        import datetime

        response = _admin_call(args, "TrafficHistory",
                               apb.TrafficHistoryRequest(model=args.model, limit=args.limit))
        for r in response.records:
            when = datetime.datetime.fromtimestamp(r.time, datetime.UTC)
            change = r.summary or f"{r.old_json} -> {r.new_json}"
            print(f"{when:%Y-%m-%d %H:%M:%S}Z  rev {r.revision:<5} {r.model}  {r.action:<16} "
                  f"by {r.who}: {change}")
        if not response.records:
            print("no traffic changes recorded")
    return 0


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '5m' or '1h'."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 5m or 90")


def parse_steps(text: str) -> list[float]:
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
    if status.state == "running":
        print(f"  judge:    {status.owner} (epoch {status.epoch}, lease "
              f"{status.lease_remaining_seconds:.0f}s)")
    for name, w in (("canary", status.canary), ("baseline", status.baseline)):
        rate = w.errors / w.requests if w.requests else 0.0
        print(f"  {name:<9} {w.requests} requests, {rate:.2%} errors, p99 {w.p99_ms:.2f} ms "
              f"(fleet: {w.replicas} replica{'s' if w.replicas != 1 else ''})")
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


def rollout_command(args) -> int:
    from gateway.protocol.pb import gateway_admin_pb2 as apb

    if args.action == "start":
        request = apb.StartRolloutRequest(
            model=args.model, to_version=args.to, from_version=args.from_version or "",
            steps=args.steps or [], interval_seconds=args.interval or 0,
            max_latency_ratio=args.max_latency_ratio or 0, min_requests=args.min_requests,
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


def publish_command(args) -> int:
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
            token=args.token, tls=_tls(args), timeout=args.timeout)
    except GatewayError as exc:
        print(f"gateway publish: refused ({exc.code}): {exc.message}"
              f"{_hint(args, exc.code, exc.message)}", file=sys.stderr)
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


def versions_command(args) -> int:
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


def approve_command(args) -> int:
    import datetime

    from gateway.protocol.pb import gateway_admin_pb2 as apb

    status = _admin_call(args, "ApproveVersion", apb.ApproveVersionRequest(
        model=args.model, version=args.version))
    when = datetime.datetime.fromtimestamp(status.time, datetime.UTC)
    verb = "was already approved" if status.already_approved else "approved"
    print(f"model {status.model} version {status.version} {verb} by {status.approved_by} "
          f"at {when:%Y-%m-%d %H:%M:%S}Z"
          + (f" (published by {status.publisher})" if status.publisher else ""))
    if not status.gated:
        print(f"  note: model {status.model} does not require approval (gateway.yaml "
              "require_approval is off): the approval is recorded for when it does")
    return 0


def _read_labels(path: Path) -> list[tuple[str, list[str]]]:
    """id,label[,label...] rows (a first row 'id,label' is a header)."""
    import csv

    items = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip():
                    continue
                if number == 1 and row[0].strip().lower() in ("id", "request_id"):
                    continue
                if len(row) < 2:
                    raise SystemExit(f"gateway feedback: {path}:{number}: expected id,label")
                items.append((row[0].strip(), [c.strip() for c in row[1:]]))
    except IsADirectoryError:
        raise SystemExit(f"gateway feedback: --file {path} is a directory, not a CSV file") \
            from None
    except OSError as exc:
        raise SystemExit(f"gateway feedback: --file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SystemExit(f"gateway feedback: --file {path} is not a UTF-8 CSV file: {exc}") \
            from None
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


def feedback_command(args) -> int:
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
