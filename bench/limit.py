"""The ceiling: the same model file and batch run in-process by onnxruntime, with no RPC at all.

A server can only approach this; the gap between the two is what serving costs. Measured in
the bench process itself, between steps, so it never competes with a load step for the CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.measure import latency_figures

ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
             "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(int16)": np.int16, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
             "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
             "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_, "tensor(string)": object}


def feeds_for(session, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Match request tensors to the session's inputs by name, else by position; cast types."""
    inputs = session.get_inputs()
    if set(tensors) >= {i.name for i in inputs}:
        arrays = [tensors[i.name] for i in inputs]
    elif len(tensors) == len(inputs):
        arrays = list(tensors.values())
    else:
        raise ValueError(f"model file inputs {[i.name for i in inputs]} do not match the "
                         f"request's {sorted(tensors)}")
    return {i.name: a.astype(ORT_TYPES.get(i.type, a.dtype), copy=False)
            for i, a in zip(inputs, arrays)}


def measure(model_file: Path, pool: list[dict[str, np.ndarray]], batch_size: int,
            threads: int = 1, seconds: float = 3.0, warmup_s: float = 0.5) -> dict:
    """Back-to-back ``run()`` calls on one session for ``seconds``: runs/s and run latency."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    feeds = [feeds_for(session, tensors) for tensors in pool]
    clock, n = time.perf_counter, len(feeds)
    end = clock() + warmup_s
    i = 0
    while clock() < end:
        session.run(None, feeds[i % n])
        i += 1
    times = []
    start = clock()
    end = start + seconds
    i = 0
    while True:
        t0 = clock()
        session.run(None, feeds[i % n])
        t1 = clock()
        times.append(t1 - t0)
        i += 1
        if t1 >= end:
            break
    elapsed = clock() - start
    return {"model_file": str(model_file), "batch_size": batch_size, "threads": threads,
            "runs": i, "throughput_rps": round(i / elapsed, 2),
            "inferences_per_s": round(i * batch_size / elapsed, 2),
            "latency_ms": latency_figures(np.asarray(times))}


def sweep(model_file: Path, batch_sizes: list[int], threads: int = 1, seconds: float = 3.0):
    """The ceiling at several batch sizes (random inputs shaped from the file's own inputs):
    which batch size in-process onnxruntime does best at."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    rows = []
    for size in batch_sizes:
        tensors = {}
        for arg in session.get_inputs():
            shape = [size if i == 0 else (d if isinstance(d, int) and d > 0 else 1)
                     for i, d in enumerate(arg.shape)]
            tensors[arg.name] = rng.standard_normal(shape).astype(ORT_TYPES.get(arg.type,
                                                                                np.float32))
        rows.append(measure(model_file, [tensors], size, threads, seconds))
    return rows


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="in-process onnxruntime at several batch sizes")
    parser.add_argument("model_file", type=Path)
    parser.add_argument("--batch-sizes", default="1,8,16,32,64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    for row in sweep(args.model_file, sizes, args.threads, args.seconds):
        print(f"batch {row['batch_size']:>4}: {row['inferences_per_s']:>10,.0f} rows/s "
              f"({row['throughput_rps']:,.0f} runs/s, {args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
