"""``gateway score MODEL INPUT -o OUTPUT``: the command line of gateway.batch."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def add_score_parser(sub) -> argparse.ArgumentParser:
    score = sub.add_parser(
        "score", help="score a file of any size: through a gateway (--url) or in-process",
        description="Score every row of INPUT (Parquet, CSV, JSON Lines, .npy, .npz) with "
                    "MODEL and write OUTPUT (Parquet, or CSV/JSON Lines by its suffix) with "
                    "the row id, every output, the version that served the row and an error "
                    "column. Memory stays flat whatever the file's size; an interrupted run "
                    "continues with --resume.")
    score.add_argument("model")
    score.add_argument("input", type=Path, help="the file to score")
    score.add_argument("-o", "--output", type=Path, required=True,
                       help="the scored file (.parquet default, .csv, .jsonl)")
    where = score.add_argument_group("engine (one of)")
    where.add_argument("--url", metavar="HOST:PORT",
                       help="a running gateway, fleet or Triton server (KServe V2 gRPC)")
    where.add_argument("--model-repository", type=Path, metavar="DIR|FILE.onnx",
                       help="run the model in this process, loaded as `gateway serve` loads it")
    score.add_argument("--model-version", default="", metavar="V",
                       help="score with this version (default: the traffic split through a "
                            "gateway, the newest version in-process)")
    score.add_argument("--input", dest="inputs", action="append", metavar="NAME=COLUMNS",
                       help="feed model input NAME from these columns (comma-separated names "
                            "or globs, stacked in order; one list column fills the input); "
                            "default: the column named like the input")
    score.add_argument("--output-name", dest="outputs", action="append", metavar="NAME",
                       help="an output to write (repeatable; default: every output)")
    score.add_argument("--id-column", metavar="COLUMN",
                       help="copy this input column as the row id (default: row_id, the "
                            "row's number in INPUT from 0)")
    score.add_argument("--input-format", choices=("parquet", "csv", "jsonl", "npy", "npz"))
    score.add_argument("--format", choices=("parquet", "csv", "jsonl"),
                       help="output format (default: OUTPUT's suffix, else parquet)")
    score.add_argument("--chunk-rows", type=positive, default=65536,
                       help="rows read, scored and checkpointed together (default 65536)")
    score.add_argument("--batch-size", type=positive,
                       help="rows per request (default: the model's max_batch_size)")
    score.add_argument("--concurrency", type=positive,
                       help="requests in flight (default 8 through a gateway, 2 per model "
                            "instance in-process)")
    score.add_argument("--retries", type=positive, default=8,
                       help="tries of a request answered UNAVAILABLE or RESOURCE_EXHAUSTED, "
                            "with exponential backoff (default 8)")
    score.add_argument("--timeout", type=float, default=60.0,
                       help="seconds per request (default 60)")
    score.add_argument("--resume", action="store_true",
                       help="continue an interrupted run of the same command")
    score.add_argument("--fail-fast", action="store_true",
                       help="stop at the first row that fails instead of writing its error")
    score.add_argument("--cpu-threads", type=positive, default=1,
                       help="in-process: ONNX Runtime threads per model instance (default 1)")
    score.add_argument("--no-progress", action="store_true",
                       help="no progress bar (it shows only on a terminal anyway)")
    score.add_argument("--token", help="bearer token (default: $GATEWAY_TOKEN)")
    score.add_argument("--tls-ca", type=Path, metavar="PEM")
    score.add_argument("--tls-cert", type=Path, metavar="PEM")
    score.add_argument("--tls-key", type=Path, metavar="PEM")
    score.set_defaults(func=score_command)
    return score


def score_command(args) -> int:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print("gateway score: needs pyarrow: pip install 'model-serving-gateway[batch]'",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gateway.batch import RetryPolicy, score
    from gateway.batch.errors import BatchError
    from gateway.tls import client_tls

    try:
        tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as exc:
        print(f"gateway score: {exc}", file=sys.stderr)
        return 2
    try:
        report = score(
            args.model, args.input, args.output, url=args.url,
            model_repository=args.model_repository, model_version=args.model_version,
            inputs=args.inputs, outputs=args.outputs, id_column=args.id_column,
            input_format=args.input_format, format=args.format, chunk_rows=args.chunk_rows,
            batch_size=args.batch_size, concurrency=args.concurrency,
            retry=RetryPolicy(attempts=args.retries), timeout=args.timeout,
            token=args.token or os.environ.get("GATEWAY_TOKEN"), tls=tls,
            cpu_threads=args.cpu_threads, resume=args.resume, fail_fast=args.fail_fast,
            progress=False if args.no_progress else None)
    except BatchError as exc:
        print(f"gateway score: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gateway score: interrupted; finished chunks are kept: rerun the same command "
              "with --resume to go on", file=sys.stderr)
        return 130
    for line in report.lines():
        print(line)
    return 0
