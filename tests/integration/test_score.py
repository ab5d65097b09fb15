"""`gateway score` end to end: the real command in a subprocess, in-process and through a real
`gateway serve`, on real ONNX models (the demo MLP, the skl2onnx iris pipeline, the busy Loop
model), every answer compared row by row with onnxruntime run directly on the same file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from support import ROOT, start_gateway

from bench import models

DEMO = ROOT / "gateway" / "demo_repository"
MLP_FILE = DEMO / "tiny_mlp" / "1" / "model.onnx"
IRIS_FILE = DEMO / "iris_classifier" / "1" / "model.onnx"


def gateway(*args, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def scored(result: subprocess.CompletedProcess, rows: int, failed: int = 0) -> str:
    """Assert a finished job: exit 0 and the accounting line, together."""
    line = f"rows in {rows} = rows out {rows}: {rows - failed} scored, {failed} failed"
    assert (result.returncode, line in result.stdout) == (0, True), \
        result.stdout + result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    missing = [f for f in fragments if f not in result.stderr]
    assert (result.returncode, missing) == (code, []), result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def onnx_run(path: Path, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("score_repo")
    for name in ("tiny_mlp", "iris_classifier"):
        shutil.copytree(DEMO / name, root / name)
    models.make_version(root, "busy", 1, models.build_busy_model, width=128)
    models.write_config(root / "busy", """
        name: "busy"
        max_batch_size: 64
        dynamic_batching { }
    """)
    for version, seed in ((1, 1), (2, 2)):
        models.make_version(root, "split_mlp", version, models.build_mlp, (8, 16, 3), seed=seed)
    models.write_config(root / "split_mlp", """
        name: "split_mlp"
        max_batch_size: 16
        version_policy: { all { } }
        dynamic_batching { }
    """)
    return root


@pytest.fixture(scope="module")
def served(repo):
    with start_gateway(repo) as gw:
        yield gw


@pytest.fixture(scope="module")
def mlp_rows() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((3000, 32)).astype(np.float32)


def _vectors(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).to_pylist())


# ---- both engines agree with onnxruntime -----------------------------------------------------

@pytest.mark.parametrize("engine", ["in-process", "gateway"])
def test_parquet_rows_match_onnxruntime(engine, repo, served, mlp_rows, tmp_path):
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"input": _vectors(mlp_rows)}), source, row_group_size=700)
    where = ["--model-repository", repo] if engine == "in-process" else ["--url", served.url]
    out = tmp_path / "scores.parquet"
    result = gateway("score", "tiny_mlp", source, "-o", out, "--chunk-rows", 1000, *where)
    stdout = scored(result, 3000)
    assert "versions: 1 (3000 rows)" in stdout
    assert result.stderr == ""  # no progress bar when not on a terminal, no warnings
    table = pq.read_table(out)
    assert table.column_names == ["row_id", "output", "model_version", "error"]
    assert table.schema.field("output").type == pa.list_(pa.float32(), 4)
    assert table.column("row_id").to_pylist() == list(range(3000))
    assert set(table.column("model_version").to_pylist()) == {"1"}
    assert table.column("error").null_count == 3000
    [expected] = onnx_run(MLP_FILE, {"input": mlp_rows})
    np.testing.assert_allclose(_column(table, "output"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["in-process", "gateway"])
def test_csv_of_iris_features_through_the_sklearn_pipeline(engine, repo, served, tmp_path):
    from sklearn.datasets import load_iris

    iris = load_iris()
    x = iris.data.astype(np.float32)
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    source = tmp_path / "iris.csv"
    columns = {"sample": [f"s{i:03d}" for i in range(len(x))],
               **{n: x[:, i] for i, n in enumerate(names)}}
    pacsv.write_csv(pa.table(columns), source)
    where = ["--model-repository", repo] if engine == "in-process" else ["--url", served.url]
    out = tmp_path / "iris_scores.csv"
    scored(gateway("score", "iris_classifier", source, "-o", out, *where, "--input",
                   "input=sepal_*,petal_*", "--id-column", "sample", "--chunk-rows", 64), 150)
    table = pacsv.read_csv(out)
    assert table.column_names == ["sample", "label", "probabilities", "model_version", "error"]
    assert table.column("sample").to_pylist() == columns["sample"]
    label, probabilities = onnx_run(IRIS_FILE, {"input": x})
    assert table.column("label").to_pylist() == label.ravel().tolist()
    got = np.array([json.loads(p) for p in table.column("probabilities").to_pylist()])
    np.testing.assert_allclose(got, probabilities, rtol=1e-5, atol=1e-6)
    assert (label.ravel() == iris.target).mean() > 0.9  # a real classifier on real data


def test_npy_and_npz_to_json_lines(repo, served, mlp_rows, tmp_path):
    np.save(tmp_path / "rows.npy", mlp_rows[:500])
    np.savez_compressed(tmp_path / "rows.npz", input=mlp_rows[:500])
    [expected] = onnx_run(MLP_FILE, {"input": mlp_rows[:500]})
    for name, where in (("rows.npy", ["--model-repository", repo]),
                        ("rows.npz", ["--url", served.url])):
        out = tmp_path / f"{name}.jsonl"
        scored(gateway("score", "tiny_mlp", tmp_path / name, "-o", out, "--chunk-rows", 128,
                       *where), 500)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["row_id"] for r in rows] == list(range(500))
        np.testing.assert_allclose([r["output"] for r in rows], expected, rtol=1e-5, atol=1e-6)


def test_python_api_reports_what_it_did(repo, mlp_rows, tmp_path):
    from gateway.batch import score

    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"input": _vectors(mlp_rows[:200])}), source)
    report = score("tiny_mlp", source, tmp_path / "out.parquet", model_repository=MLP_FILE,
                   chunk_rows=64, batch_size=2)
    assert (report.rows_in, report.rows_out, report.ok, report.failed, report.chunks) == (
        200, 200, 200, 0, 4)
    assert dict(report.versions) == {"1": 200}  # a bare .onnx file serves as version 1
    [expected] = onnx_run(MLP_FILE, {"input": mlp_rows[:200]})
    np.testing.assert_allclose(_column(pq.read_table(tmp_path / "out.parquet"), "output"),
                               expected, rtol=1e-5, atol=1e-6)


# ---- bad rows, bad columns -------------------------------------------------------------------

def _busy_csv(path: Path, cells: list[tuple[str, str]]) -> None:
    lines = ["id,ITERATIONS,a,b,c,d"]
    lines += [f"r{i},{it},{a},2,3,4" for i, (it, a) in enumerate(cells)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("engine", ["in-process", "gateway"])
def test_bad_values_fail_their_rows_with_the_column_named(engine, repo, served, tmp_path):
    source = tmp_path / "bad.csv"
    cells = [("0", "1.5")] * 10
    cells[3] = ("0", "abc")  # not a number
    cells[5] = ("1.5", "1")  # not an integer
    cells[6] = ("", "1")  # missing integer
    cells[7] = ("0", "")  # missing float: NaN, as pandas writes it
    _busy_csv(source, cells)
    where = ["--model-repository", repo] if engine == "in-process" else ["--url", served.url]
    out = tmp_path / "bad.parquet"
    stdout = scored(gateway("score", "busy", source, "-o", out, *where, "--id-column", "id",
                            "--input", "INPUT0=a,b,c,d", "--chunk-rows", 4), 10, failed=3)
    assert "failed: row r3: column 'a': cannot convert 'abc' to FP32" in stdout
    table = pq.read_table(out)
    errors = table.column("error").to_pylist()
    assert errors[3] == "column 'a': cannot convert 'abc' to FP32"
    assert errors[5] == "column 'ITERATIONS': cannot convert '1.5' to INT64"
    assert errors[6] == "column 'ITERATIONS' has no value"
    assert [i for i, e in enumerate(errors) if e] == [3, 5, 6]
    outputs = table.column("OUTPUT0").to_pylist()
    assert outputs[3] is None and table.column("model_version").to_pylist()[3] is None
    assert outputs[0] == [1.5, 2.0, 3.0, 4.0] and np.isnan(outputs[7][0])

    fail_fast = gateway("score", "busy", source, "-o", tmp_path / "ff.parquet", *where,
                        "--id-column", "id", "--input", "INPUT0=a,b,c,d", "--fail-fast")
    refused(fail_fast, 1, "gateway score: row r3: column 'a': cannot convert 'abc' to FP32 "
                          "(--fail-fast)", "rerun the same command with --resume")
    assert not (tmp_path / "ff.parquet").exists()


def test_columns_that_cannot_feed_the_model_stop_before_scoring(repo, served, tmp_path):
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.timestamp("s")), "y": [1.0, 2.0]}),
                   source)
    out = tmp_path / "out.parquet"
    local = ["--model-repository", repo]
    refused(gateway("score", "tiny_mlp", source, "-o", out, *local), 2,
            "model input 'input' (FP32 [32]) has no column of that name; map it with --input "
            "input=COLUMN[,COLUMN...] (the file has columns x, y)")
    refused(gateway("score", "tiny_mlp", source, "-o", out, *local, "--input", "input=x"), 2,
            "column 'x' is timestamp[ms]; input 'input' (FP32 [32]) takes FP32 values")
    refused(gateway("score", "tiny_mlp", source, "-o", out, *local, "--input", "input=y"), 2,
            "column 'y' holds one value per row; input 'input' (FP32 [32]) takes 32 per row")
    refused(gateway("score", "nope", source, "-o", out, "--url", served.url), 2,
            f"the gateway at {served.url} refused model 'nope': NOT_FOUND: "
            "Request for unknown model: 'nope' is not found")
    refused(gateway("score", "nope", source, "-o", out, *local), 2,
            "model 'nope' is not in the repository")
    refused(gateway("score", "tiny_mlp", source, "-o", out), 2,
            "give --url HOST:PORT to score through a running gateway, or --model-repository")
    refused(gateway("score", "tiny_mlp", tmp_path / "none.csv", "-o", out, *local), 2,
            "none.csv is not a file")
    refused(gateway("score", "tiny_mlp", source, "-o", out, *local, "--id-column", "z",
                    "--input", "input=y"), 2, "--id-column 'z' is not a column of rows.parquet")
    assert not out.exists() and not (tmp_path / "out.parquet.parts").exists()


# ---- traffic split, retries --------------------------------------------------------------------

def test_a_split_in_force_records_both_versions(repo, served, tmp_path):
    result = gateway("traffic", "set", "split_mlp", "1=50", "2=50", "--url", served.url)
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(3).standard_normal((400, 8)).astype(np.float32)
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"input": _vectors(x)}), source)
    out = tmp_path / "out.parquet"
    stdout = scored(gateway("score", "split_mlp", source, "-o", out, "--url", served.url,
                            "--batch-size", 4), 400)
    table = pq.read_table(out)
    versions = np.array(table.column("model_version").to_pylist())
    assert set(versions) == {"1", "2"}
    for version in ("1", "2"):
        assert f"{version} ({(versions == version).sum()} rows)" in stdout
        [expected] = onnx_run(repo / "split_mlp" / version / "model.onnx", {"input": x})
        rows = versions == version
        np.testing.assert_allclose(_column(table, "output")[rows], expected[rows], rtol=1e-5,
                                   atol=1e-6)
    # an explicit version bypasses the split
    pinned = tmp_path / "pinned.parquet"
    scored(gateway("score", "split_mlp", source, "-o", pinned, "--url", served.url,
                   "--model-version", "2"), 400)
    assert set(pq.read_table(pinned).column("model_version").to_pylist()) == {"2"}


def test_gateway_that_starts_late_and_sheds_load_is_retried(repo, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = 600
    source = tmp_path / "rows.parquet"
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    pq.write_table(pa.table({"ITERATIONS": np.zeros(rows, np.int64), "INPUT0": _vectors(x)}),
                   source)
    out = tmp_path / "out.parquet"
    job = subprocess.Popen(
        [sys.executable, "-m", "gateway", "score", "busy", str(source), "-o", str(out),
         "--url", f"127.0.0.1:{port}", "--batch-size", "2", "--concurrency", "6",
         "--retries", "20"],  # a generous budget: a loaded machine starts a gateway slowly
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the job starts against nothing: UNAVAILABLE, retried
        with start_gateway(repo, "--grpc-port", str(port), "--max-inflight-per-model", "2"):
            stdout, stderr = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    result = subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
    stdout = scored(result, rows)
    assert "requests were retried (UNAVAILABLE or RESOURCE_EXHAUSTED)" in stdout
    np.testing.assert_array_equal(_column(pq.read_table(out), "OUTPUT0"), x)


# ---- kill -9 and resume, memory --------------------------------------------------------------

def _log_lines(parts: Path) -> int:
    try:
        return (parts / "chunks.log").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_at_any_point_then_resume_gives_the_uninterrupted_output(repo, tmp_path):
    rows = 3000
    rng = np.random.default_rng(11)
    x = rng.standard_normal((rows, 4)).astype(np.float32)
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"ITERATIONS": np.full(rows, 6, np.int64), "INPUT0": _vectors(x),
                             "key": [f"k{i}" for i in range(rows)]}), source)
    command = ["score", "busy", source, "--model-repository", repo, "--chunk-rows", 100,
               "--batch-size", 25, "--id-column", "key"]
    reference = tmp_path / "reference.parquet"
    scored(gateway(*command, "-o", reference), rows)

    out = tmp_path / "out.parquet"
    parts = tmp_path / "out.parquet.parts"
    argv = [sys.executable, "-m", "gateway", *map(str, command), "-o", str(out)]
    kills = 0
    for wanted in (3, 9, 16):  # kill -9 three times, each later in the run
        resume = ["--resume"] if kills else []
        job = subprocess.Popen(argv + resume, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _log_lines(parts) < wanted and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if job.poll() is not None:
            break  # this machine finished before the kill: the resume below still runs
        os.kill(job.pid, signal.SIGKILL)
        job.wait(30)
        kills += 1
    assert kills >= 1
    assert not out.exists()
    refused(gateway(*command, "-o", out), 2, "holds the checkpoint of an unfinished run: add "
                                             "--resume to continue it")
    stdout = scored(gateway(*command, "-o", out, "--resume"), rows)
    assert "chunks were finished by an earlier run" in stdout
    assert pq.read_table(out).equals(pq.read_table(reference))
    assert not parts.exists()


def _peak_rss_mb(argv: list[str]) -> tuple[int, float]:
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024


def test_memory_stays_flat_on_a_file_many_chunks_long(repo, tmp_path):
    chunk = 10_000
    rng = np.random.default_rng(5)
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    block = rng.standard_normal((chunk * 2, 32)).astype(np.float32)
    pq.write_table(pa.table({"input": _vectors(block)}), small)
    with pq.ParquetWriter(large, pa.schema([("input", pa.list_(pa.float32(), 32))])) as w:
        for _ in range(40):  # 800,000 rows, 40 times the small file, 80 chunks
            w.write_table(pa.table({"input": _vectors(block)}), row_group_size=chunk)
    size_mb = large.stat().st_size / 2**20
    runs = {}
    for path in (small, large):
        argv = [sys.executable, "-m", "gateway", "score", "tiny_mlp", str(path), "-o",
                str(tmp_path / f"{path.stem}.out.parquet"), "--model-repository", str(repo),
                "--chunk-rows", str(chunk)]
        runs[path.stem] = _peak_rss_mb(argv)
    assert runs["small"][0] == runs["large"][0] == 0
    growth = runs["large"][1] - runs["small"][1]
    # The large file is ~100 MB; holding it, or its scores, would add at least that.
    assert growth < size_mb / 3, (runs, size_mb)
    assert pq.ParquetFile(tmp_path / "large.out.parquet").metadata.num_rows == 800_000
