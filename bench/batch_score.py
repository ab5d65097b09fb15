"""Batch scoring throughput: `gateway score` in-process and through a gateway, against the limit.

For each model, one Parquet file of random rows is scored three ways in one run:
- the limit: a plain loop of onnxruntime ``session.run`` over the file's rows, already in
  memory as one array, at the best of several batch sizes (one intra-op thread, as a gateway
  instance has), with no reading, conversion or writing;
- ``gateway.batch.score`` in this process (``--model-repository``): read, convert, run through
  the model's batcher, write Parquet, checkpoint every chunk;
- ``gateway.batch.score`` through a ``gateway serve`` process on this machine (``--url``).
Figures are rows per second from the model ready (loaded in-process; the gateway's was loaded
when it started) to the output file written, and their ratio to the limit.

    python -m bench.batch_score --rows 1000000 --heavy-rows 20000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

from bench import models
from bench.peers import start, stop

ROOT = Path(__file__).resolve().parents[1]
READY = r"gateway ready: grpc \S+:(\d+)"


def build_repository(root: Path) -> dict[str, tuple[int, int]]:
    """{model: (input width, max_batch_size)}: the demo's tiny MLP as served (64), the same file
    allowed 1024 rows per request, and the heavy MLP."""
    shutil.copytree(ROOT / "gateway" / "demo_repository" / "tiny_mlp", root / "tiny_mlp")
    shutil.copytree(root / "tiny_mlp" / "1", root / "tiny_mlp_1024" / "1")
    models.write_config(root / "tiny_mlp_1024", """
        max_batch_size: 1024
        dynamic_batching { }
    """)
    models.make_version(root, "heavy_mlp", 1, models.build_mlp, models.HEAVY_MLP)
    models.write_config(root / "heavy_mlp", """
        max_batch_size: 64
        dynamic_batching { }
    """)
    return {"tiny_mlp": (models.TINY_MLP[0], 64), "tiny_mlp_1024": (models.TINY_MLP[0], 1024),
            "heavy_mlp": (models.HEAVY_MLP[0], 64)}


def write_rows(path: Path, rows: int, width: int, block: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    schema = pa.schema([("input", pa.list_(pa.float32(), width))])
    with pq.ParquetWriter(path, schema) as writer:
        for start_row in range(0, rows, block):
            x = rng.standard_normal((min(block, rows - start_row), width)).astype(np.float32)
            writer.write_table(pa.table({"input": pa.FixedSizeListArray.from_arrays(
                pa.array(x.reshape(-1)), width)}, schema=schema))


def limit(model_file: Path, source: Path, batch_sizes: list[int]) -> tuple[float, int]:
    """Best rows/s of a plain session.run loop over the file's rows (in memory), and its batch."""
    column = pq.read_table(source).column("input").combine_chunks()
    x = column.values.to_numpy().reshape(len(column), -1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    best = (0.0, 0)
    for size in batch_sizes:
        session.run(None, {"input": x[:size]})  # warm up this shape
        started = time.perf_counter()
        for a in range(0, len(x), size):
            session.run(None, {"input": x[a:a + size]})
        best = max(best, (len(x) / (time.perf_counter() - started), size))
    return best


def scored(model: str, source: Path, out: Path, **engine) -> tuple[float, float]:
    """(rows/s from the model ready to the output written, seconds to get the model ready)."""
    from gateway.batch import score

    report = score(model, source, out, progress=False, **engine)
    assert report.rows_in == report.rows_out == report.ok, report.lines()
    return report.rows_per_second, report.load_seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the tiny MLP file")
    parser.add_argument("--heavy-rows", type=int, default=20_000,
                        help="rows of the heavy MLP file (512 -> 2048x3 -> 10)")
    parser.add_argument("--models", default="tiny_mlp,tiny_mlp_1024,heavy_mlp")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each figure this many times and keep the best (a shared "
                             "machine's other work only ever slows a round down)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    results = []
    gateway = None
    try:
        repo = work / "repo"
        shapes = build_repository(repo)
        gateway, port = start([sys.executable, "-m", "gateway", "serve", "--model-repository",
                               str(repo), "--host", "127.0.0.1", "--grpc-port", "0",
                               "--http-port", "-1", "--metrics-port", "-1"], READY, cwd=ROOT)
        for model in args.models.split(","):
            width, max_batch = shapes[model]
            rows = args.heavy_rows if model.startswith("heavy") else args.rows
            source = work / f"{model}.parquet"
            write_rows(source, rows, width)
            sizes = [64, 256, 1024] if model.startswith("heavy") else [64, 256, 1024, 4096]
            best, best_batch, local, load, remote = 0.0, 0, 0.0, 0.0, 0.0
            for _ in range(args.rounds):
                best, best_batch = max((best, best_batch),
                                       limit(repo / model / "1" / "model.onnx", source, sizes))
                round_local, round_load = scored(model, source, work / f"{model}.local.parquet",
                                                 model_repository=repo)
                if round_local > local:
                    local, load = round_local, round_load
                remote = max(remote, scored(model, source, work / f"{model}.remote.parquet",
                                            url=f"127.0.0.1:{port}")[0])
            row = {"model": model, "rows": rows, "max_batch_size": max_batch,
                   "limit_rows_per_s": best, "limit_batch": best_batch,
                   "in_process_rows_per_s": local, "in_process_load_s": load,
                   "gateway_rows_per_s": remote}
            results.append(row)
            print(f"{model:<14} {rows:>9} rows  limit {best:>11,.0f}/s (batch {best_batch})  "
                  f"in-process {local:>11,.0f}/s ({local / best:.0%}; load {load:.1f} s)  "
                  f"gateway {remote:>11,.0f}/s ({remote / best:.0%})", flush=True)
    finally:
        if gateway is not None:
            stop(gateway)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
