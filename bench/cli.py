"""Load-test a KServe V2 endpoint (this gateway, Triton, MLServer, ...) and compare it.

    python -m bench --url localhost:8001 --model tiny_mlp --concurrency 1,4,16,64
    python -m bench --protocol http --url localhost:8000 --model tiny_mlp --concurrency 1,64
    python -m bench --model tiny_mlp --rate 500,1000 --arrivals poisson --json out.json
    python -m bench --model tiny_mlp --concurrency 1,16 --compare mlserver --compare floor \\
        --limit --model-file gateway/demo_repository/tiny_mlp/1/model.onnx --plot out.png

Closed loop (--concurrency) or open loop (--rate, latency from the scheduled send time); each
step warms up, then measures in windows until the last three agree within 10% (or for a fixed
--duration / --requests). Also `gateway bench ...`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from contextlib import ExitStack
from pathlib import Path

from bench import inputs as inputs_mod
from bench import peers, plot, report, summary
from bench.plan import LoadPoint, Plan, parse_list
from bench.runner import run_step
from bench.target import HttpTarget, Target
from bench.workers import BenchError, ClientPool
from gateway.tls import client_tls


def default_clients() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None,
                   help="address (default localhost:8001, with --protocol http localhost:8000), "
                        "or 'gateway' to start one here")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                   help="KServe V2 over gRPC (default), or its REST API over HTTP/1.1 for every "
                        "target")
    p.add_argument("--http-data", choices=("binary", "json"), default="binary",
                   help="--protocol http: request and response tensors as Triton's binary data "
                        "(default, what tritonclient.http sends) or plain JSON")
    p.add_argument("--http-client", choices=("h1", "aiohttp"), default="h1",
                   help="--protocol http: the bench's own HTTP/1.1 client (default, least CPU "
                        "per request) or aiohttp's ClientSession")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--model-version", default="", help="ask for this version explicitly")
    p.add_argument("--label", help="name of the target in reports (default: its server name)")
    p.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"),
                   help="bearer token (default: $GATEWAY_TOKEN); also sent to --compare URLs")
    p.add_argument("--tls-ca", type=Path, metavar="PEM",
                   help="connect over TLS trusting this CA (also for --compare URLs)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="client certificate chain, for a server that requires one (with "
                        "--tls-key; also for --compare URLs)")
    p.add_argument("--tls-key", type=Path, metavar="PEM",
                   help="the client certificate's private key")

    load = p.add_argument_group("load")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", default=None,
                      help="closed loop: users in flight, a list sweeps (default 1)")
    mode.add_argument("--rate", default=None,
                      help="open loop: requests per second, a list sweeps (e.g. 500,1000)")
    load.add_argument("--arrivals", choices=("constant", "poisson"), default="constant",
                      help="open loop: spacing of sends (default %(default)s)")
    load.add_argument("--clients", type=int, default=default_clients(),
                      help="client processes (default %(default)s: half the cores)")
    load.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    load.add_argument("--max-inflight", type=int, default=10_000,
                      help="open loop: in-flight cap per client process (default %(default)s)")
    load.add_argument("--routing-key-count", type=int, default=0, metavar="N",
                      help="cycle through N sticky keys in x-routing-key metadata")

    measure = p.add_argument_group("measurement")
    measure.add_argument("--warmup", type=float, default=2.0, help="seconds (default 2)")
    measure.add_argument("--window", type=float, default=2.0, help="seconds (default 2)")
    measure.add_argument("--stability", type=float, default=10.0,
                         help="percent: the last 3 windows must agree within this (default 10)")
    measure.add_argument("--max-windows", type=int, default=10,
                         help="give up on stability after this many windows (default 10)")
    bound = measure.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, help="measure each step this long instead")
    bound.add_argument("--requests", type=int, help="measure each step this many requests instead")
    measure.add_argument("--rounds", type=int, default=1,
                         help="repeat the plan; targets interleave within each round")

    data = p.add_argument_group("inputs")
    data.add_argument("--batch-size", type=int, default=1, help="rows per request (default 1)")
    data.add_argument("--input-data", default="random",
                      help="random (default), zero, or a .npy/.npz file (npz keyed by input)")
    data.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2",
                      help="dims (without batch) of an input with variable dimensions")
    data.add_argument("--pool", type=int, default=16, help="distinct requests to cycle through")
    data.add_argument("--seed", type=int, default=0)

    peer = p.add_argument_group("comparison")
    peer.add_argument("--compare", action="append", default=[],
                      metavar="URL|floor|mlserver|gateway",
                      help="also measure this endpoint, interleaved (repeatable); 'floor', "
                           "'mlserver' and 'gateway' start that server here")
    peer.add_argument("--model-repository", type=Path,
                      help="for a gateway started here (default: its demo models)")
    peer.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                      help="extra argument for a gateway started here (repeatable), "
                           "e.g. --gateway-arg=--cpu-threads=2")
    peer.add_argument("--limit", action="store_true",
                      help="measure in-process onnxruntime on --model-file as the ceiling")
    peer.add_argument("--model-file", type=Path, help="the model's ONNX file (--limit, mlserver)")
    peer.add_argument("--limit-threads", type=int, default=1,
                      help="onnxruntime intra-op threads for --limit (default 1, as the gateway)")
    peer.add_argument("--limit-seconds", type=float, default=3.0, help="default %(default)s")

    out = p.add_argument_group("reports")
    out.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    out.add_argument("--plot", type=Path, metavar="FILE",
                     help="PNG of latency against throughput (needs matplotlib)")
    out.add_argument("--plain", action="store_true", help="plain text even when rich is there")
    out.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def make_plan(args) -> Plan:
    for name in ("clients", "batch_size", "pool", "max_windows", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("window", "timeout"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive")
    if args.warmup < 0 or args.routing_key_count < 0:
        raise ValueError("--warmup and --routing-key-count cannot be negative")
    if args.rate:
        points = tuple(LoadPoint(rate=r) for r in parse_list(args.rate, float))
    else:
        points = tuple(LoadPoint(concurrency=c) for c in parse_list(args.concurrency or "1", int))
    return Plan(points=points, arrivals=args.arrivals, warmup_s=args.warmup,
                window_s=args.window, stability=args.stability / 100, max_windows=args.max_windows,
                duration_s=args.duration, requests=args.requests, rounds=args.rounds,
                clients=args.clients, timeout_s=args.timeout, max_inflight=args.max_inflight,
                routing_keys=args.routing_key_count, seed=args.seed,
                http_client=args.http_client)


def make_inputs(args, target: Target) -> inputs_mod.Inputs:
    metadata = target.metadata()
    max_batch = target.max_batch_size() if metadata is not None else None
    shapes = {}
    for item in args.shape:
        name, _, dims = item.partition(":")
        shapes[name] = [int(d) for d in dims.split(",") if d]
    if args.input_data not in ("random", "zero"):
        return inputs_mod.from_file(Path(args.input_data), metadata, max_batch, args.batch_size,
                                    args.pool)
    if metadata is None:
        raise inputs_mod.InputError(
            f"no metadata for model {args.model!r} at {target.url}: the model may not exist, or "
            "the server offers no ModelMetadata; give the data with --input-data FILE.npz")
    return inputs_mod.from_metadata(metadata, max_batch, args.batch_size,
                                    zero=args.input_data == "zero", shapes=shapes, pool=args.pool,
                                    seed=args.seed)


def _label(target: Target, wanted: str | None, taken: set[str]) -> str:
    label = wanted or target.server_name().split(" ")[0] or "target"
    base, n = label, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    return label


def run(args) -> dict:
    plan = make_plan(args)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    if args.limit and args.model_file is None:
        raise SystemExit("--limit needs --model-file (the model's ONNX file)")
    tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)  # checked in main()
    http = args.protocol == "http"
    with ExitStack() as stack:

        def open_target(spec: str, label: str | None, taken: set[str]) -> Target | HttpTarget:
            name, url = stack.enter_context(peers.resolve(
                spec, args.model_file, args.model, log, args.model_repository,
                args.gateway_arg, args.protocol))
            remote = name is None  # a URL: the given credentials; a peer started here: none
            if remote and not http:
                probe(url, tls)  # fail fast, and say why, rather than wait in silence
            kind = HttpTarget if http else Target
            target = stack.enter_context(_closing(kind(
                url, "", args.model, args.model_version,
                args.token if remote else None, tls if remote else None)))
            if remote and http:
                target.probe()
            target.wait_ready()
            target.label = _label(target, label or name, taken)
            if http and args.http_data == "binary":
                check_binary(target)
            return target

        primary = open_target(args.url or ("localhost:8000" if http else "localhost:8001"),
                              args.label, set())
        targets = [primary]
        data = make_inputs(args, primary)
        for spec in args.compare:
            targets.append(open_target(spec, None, {t.label for t in targets}))
        pool = stack.enter_context(_closing(ClientPool(plan.clients)))
        # Every target gets the very same requests.
        if http:
            pool.send_pool("requests", inputs_mod.serialise_http(
                data, args.model, args.model_version, binary=args.http_data == "binary"))
            over = f"REST, {args.http_data} tensors, {args.http_client} client"
        else:
            pool.send_pool("requests", inputs_mod.serialise(data, args.model, args.model_version))
            over = "gRPC"
        log(f"{args.model}: {data.source}, shapes {data.shapes()}; {over}; {plan.rule}; "
            f"{plan.clients} client process(es)")
        steps = []
        _, max_windows = plan.windows()
        interrupted = False
        try:
            with report.Progress(plain=args.plain, quiet=args.quiet) as progress:
                for r in range(plan.rounds):
                    for point in plan.points:
                        for t in targets:  # interleaved: drift in the machine hits all alike
                            label = f"{t.label} {point.label}" + (
                                f" r{r + 1}" if plan.rounds > 1 else "")
                            step = run_step(pool, t, plan, point, "requests", data.batch_size,
                                            progress.step(label, min(max_windows, 10_000)))
                            step["round"] = r + 1
                            progress.done(label, step)
                            steps.append(step)
        except KeyboardInterrupt:
            interrupted = True
            log(f"interrupted: reporting the {len(steps)} step(s) that finished")
        limit = None
        if args.limit and not interrupted:
            from bench import limit as limit_mod

            log(f"limit: onnxruntime in-process on {args.model_file}")
            limit = limit_mod.measure(args.model_file, data.pool, data.batch_size,
                                      args.limit_threads, args.limit_seconds)
        rows = summary.combine(steps)
        return {
            "model": args.model, "model_version": args.model_version, "interrupted": interrupted,
            "batch_size": data.batch_size, "inputs": {"source": data.source,
                                                       "shapes": data.shapes(),
                                                       "datatypes": data.datatypes},
            "protocol": args.protocol,
            "http": {"data": args.http_data, "client": args.http_client} if http else None,
            "plan": {"rule": plan.rule, "mode": plan.points[0].mode,
                     "points": [p.label for p in plan.points], "arrivals": plan.arrivals,
                     "warmup_s": plan.warmup_s, "window_s": plan.windows()[0],
                     "stability": plan.stability, "max_windows": plan.max_windows,
                     "duration_s": plan.duration_s, "requests": plan.requests,
                     "rounds": plan.rounds, "clients": plan.clients,
                     "routing_keys": plan.routing_keys, "timeout_s": plan.timeout_s},
            "targets": [{"label": t.label, "url": t.url, "protocol": t.protocol,
                         "server": t.server_name()} for t in targets],
            "rows": rows,
            "ratios": summary.ratios(rows, primary.label, limit),
            "limit": limit,
            "steps": steps,
            "client_host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "grpcio": _grpc_version(), "platform": platform.platform(),
                            "time": _now()},
        }


def check_binary(target: HttpTarget) -> None:
    """RuntimeError when a server says it lacks the binary tensor data extension (MLServer)."""
    extensions = target.extensions()
    if extensions is not None and "binary_tensor_data" not in extensions:
        raise RuntimeError(
            f"{target.label} at {target.url} ({target.server_name() or 'no name'}) does not list "
            "Triton's binary_tensor_data extension, so it cannot read binary tensors: use "
            "--http-data json (plain JSON for every target)")


def probe(url: str, tls, timeout: float = 5.0) -> None:
    """ConnectionError with the reason (and a likely cause) unless a gRPC server answers at url.

    One ServerLive call without waiting for the channel: a refused connection or a TLS
    mismatch fails in milliseconds instead of after the 30 s readiness wait. Any answer, even
    UNIMPLEMENTED or UNAUTHENTICATED, proves a server is there.
    """
    import grpc

    from bench.target import normalise_url

    address = normalise_url(url)
    channel = (grpc.secure_channel(address, tls.credentials()) if tls is not None
               else grpc.insecure_channel(address))
    try:
        channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return
        details = exc.details() or exc.code().name
        lowered = details.lower()
        if "refused" in lowered:
            hint = "is the server running? check --url"
        elif tls is None and ("socket closed" in lowered or "reset" in lowered):
            hint = "the server may require TLS: use --tls-ca PEM"
        elif tls is not None and ("handshake" in lowered or "ssl" in lowered):
            hint = "the server may not use TLS, or --tls-ca did not sign its certificate"
        elif tls is not None and tls.certificate_chain is None and "socket closed" in lowered:
            hint = "the server may require a client certificate: use --tls-cert and --tls-key"
        else:
            hint = "check --url and the TLS flags"
        raise ConnectionError(f"cannot reach a gRPC server at {address}: {details} ({hint})") \
            from None
    finally:
        channel.close()


class _closing:
    """Context manager that calls ``close()``, for objects that are not context managers."""

    def __init__(self, thing):
        self.thing = thing

    def __enter__(self):
        return self.thing

    def __exit__(self, *exc):
        self.thing.close()


def _now() -> str:
    utc = datetime.timezone.utc  # noqa: UP017 - datetime.UTC needs Python 3.11
    return datetime.datetime.now(utc).isoformat(timespec="seconds")


def _grpc_version() -> str:
    import grpc

    return grpc.__version__


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        make_plan(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.plot and not plot.available():
        print("--plot needs matplotlib: pip install '.[bench]'", file=sys.stderr)
        return 2
    try:
        client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as exc:  # a TLS file named on the command line: missing, not PEM...
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        doc = run(args)
    except (BenchError, ConnectionError, inputs_mod.InputError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    report.render(doc, plain=args.plain)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
    if args.plot:
        plot.write(doc, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
