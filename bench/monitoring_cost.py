"""What monitoring costs: the gateway with monitoring on against the same gateway with it off.

Two gateway processes serve the same repository, one with the defaults (metrics, input statistics
and drift on; /metrics scraped every ``--scrape-interval`` seconds as Prometheus would) and one
with ``--metrics-port -1`` (all monitoring off). h2load replays one pre-serialised ModelInfer
request at each in interleaved rounds, in ABBA order (on, off, off, on, ...) so drift in machine
load hits both alike, the same way as ``bench.compare``. Success is checked on the servers.

    python -m bench.monitoring_cost --model tiny_mlp --streams 64 --seconds 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from bench import h2load
from bench.compare import (
    add_load_arguments,
    build_repository,
    cpu_seconds,
    request_bytes,
    successes,
)
from bench.peers import start, stop

READY = r"gateway ready: grpc \S+:(\d+)"


def scrape_loop(port: int, interval: float, done: threading.Event, counts: list) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while not done.wait(interval):
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            counts.append(len(response.read()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, seconds=8)
    parser.add_argument("--scrape-interval", type=float, default=5.0,
                        help="seconds between scrapes of /metrics while monitoring is on")
    parser.add_argument("--gateway-arg", action="append", default=[],
                        help="extra argument for both gateways (repeatable)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the gateways to CPU 1 and h2load to CPU 0 (less noise)")
    parser.add_argument("--aa", action="store_true",
                        help="noise check: run both gateways with monitoring off")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if not h2load.available():
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp), args.model, args.instances)
        pin = ["taskset", "-c", "1"] if args.pin else []
        base = [*pin, sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                "--grpc-port", "0", "--http-port", "-1", "--model-repository", str(repo),
                "--log-level", "WARNING",
                "--state-dir", str(Path(tmp) / "state")]
        metrics_port = _free_port()
        on_port = "-1" if args.aa else str(metrics_port)
        procs = {"on": start(base + ["--metrics-port", on_port, *args.gateway_arg], READY),
                 "off": start(base + ["--metrics-port", "-1", *args.gateway_arg], READY)}
        done = threading.Event()
        scrapes: list[int] = []
        scraper = threading.Thread(target=scrape_loop, daemon=True,
                                   args=(metrics_port, args.scrape_interval, done, scrapes))
        if not args.aa:
            scraper.start()
        rows = {"on": [], "off": []}
        cpu_us = {"on": [], "off": []}
        try:
            request = request_bytes(args.model, args.batch)
            order = []
            for i in range(args.rounds):
                order += ["on", "off"] if i % 2 == 0 else ["off", "on"]
            for name in order:
                proc, port = procs[name]
                before = successes(port, args.model)
                cpu_before = cpu_seconds(proc.pid)
                result = h2load.run(f"127.0.0.1:{port}", request, args.streams, args.connections,
                                    args.seconds, cpu=0 if args.pin else None)
                cpu_us[name].append(round((cpu_seconds(proc.pid) - cpu_before) * 1e6
                                          / max(1, result.done * (1 + 1 / args.seconds)), 1))
                ok = successes(port, args.model) - before
                if ok < result.done:
                    raise RuntimeError(f"gateway ({name}) answered {result.done - ok} requests "
                                       "with a gRPC error")
                rows[name].append(result)
        finally:
            done.set()
            for proc, _ in procs.values():
                stop(proc)
    on = statistics.median(r.requests_per_s for r in rows["on"])
    off = statistics.median(r.requests_per_s for r in rows["off"])
    # rounds run in ABBA order: each on round has an off round right before or after it
    pairs = [rows["on"][i].requests_per_s / rows["off"][i].requests_per_s
             for i in range(args.rounds)]
    summary = {
        "model": args.model, "batch": args.batch, "streams": args.streams,
        "seconds": args.seconds, "rounds": args.rounds, "instances": args.instances,
        "scrape_interval": args.scrape_interval, "scrapes": len(scrapes),
        "order": order,
        "on_rps": [r.requests_per_s for r in rows["on"]],
        "off_rps": [r.requests_per_s for r in rows["off"]],
        "on_mean_ms": [r.mean_ms for r in rows["on"]],
        "off_mean_ms": [r.mean_ms for r in rows["off"]],
        "ratio_median": round(on / off, 3),
        "pair_ratios": [round(p, 3) for p in pairs],
        "pair_ratio_median": round(statistics.median(pairs), 3),
        "pinned": args.pin, "aa": args.aa,
        "on_cpu_us_per_request": cpu_us["on"],
        "off_cpu_us_per_request": cpu_us["off"],
    }
    print(f"{args.model} batch {args.batch}, {args.streams} streams, {args.rounds} rounds of "
          f"{args.seconds:g}s each, order {' '.join(order)}")
    for name, label in (("on", "monitoring on "), ("off", "monitoring off")):
        print(f"  {label}: {statistics.median(r.requests_per_s for r in rows[name]):9.0f} req/s "
              f"(rounds: {', '.join(f'{r.requests_per_s:.0f}' for r in rows[name])}); "
              f"server CPU/request (us): {cpu_us[name]}")
    print(f"  ratio on/off (medians): {summary['ratio_median']:.3f}; median of the "
          f"{args.rounds} adjacent on/off pairs: {summary['pair_ratio_median']:.3f}")
    print(f"  ({len(scrapes)} scrapes of /metrics, {max(scrapes, default=0)} bytes)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
