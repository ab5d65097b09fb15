"""Helpers shared by the integration tests: the gateway launcher, model repositories built from
real ONNX graphs, in-process onnxruntime references, and error assertions.

Everything here talks to a real ``gateway serve`` process through ``tritonclient`` or plain gRPC.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.utils import InferenceServerException

from bench import models

ROOT = Path(__file__).resolve().parents[2]


def _root_conftest():
    """tests/conftest.py by path: a module named ``conftest`` is ambiguous once several exist."""
    spec = importlib.util.spec_from_file_location("_gateway_root_conftest",
                                                  ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_conftest = _root_conftest()
start_gateway = _conftest.start_gateway
free_port = _conftest.free_port  # an ephemeral loopback port, for servers the test starts

LOGREG_IRIS = Path(ort.__file__).parent / "datasets" / "logreg_iris.onnx"
ALL_DATATYPES = sorted(models.DATATYPE_TO_ONNX)
# Iterations of the busy model that keep one instance busy for a long while (~1 s on a fast
# core, longer on a slow one); only ever used as "long enough that others queue behind it".
BUSY_ITERATIONS = 4000
# An absolute path in a message is a leak of the server's filesystem layout.
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:tmp|home|work|usr|var|root|opt|proc)\b")
TIMEOUT = 60.0  # generous client timeout: a hang fails the test instead of the suite


# ---- errors ---------------------------------------------------------------------------------

def assert_no_path(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text, f"message leaks a server path: {text!r}"
    assert not ABSOLUTE_PATH.search(text), f"message leaks a server path: {text!r}"
    assert "Traceback" not in text, f"message leaks a traceback: {text!r}"


def check_error(exc: InferenceServerException, code: str | None, *fragments: str) -> str:
    """Assert status code and message fragments together; return the message."""
    message = exc.message()
    if code is not None:
        assert exc.status() == f"StatusCode.{code}", (exc.status(), message)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r} ({exc.status()})"
    assert_no_path(message)
    return message


@contextmanager
def raises(code: str, *fragments: str):
    """``with raises("NOT_FOUND", "unknown model"):`` around a tritonclient call."""
    with pytest.raises(InferenceServerException) as info:
        yield info
    check_error(info.value, code, *fragments)


def rpc_error(method, request, code: str, *fragments: str) -> str:
    """Call a raw gRPC stub method expecting an error; assert code, fragments, no leaks."""
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=TIMEOUT)
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode[code], (info.value.code(), details)
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    assert_no_path(details)
    return details


# ---- repositories -----------------------------------------------------------------------------

def numpy_dtype(datatype: str) -> np.dtype:
    from tritonclient.utils import triton_to_np_dtype

    return np.dtype(triton_to_np_dtype(datatype))


def sample(datatype: str, shape=(2, 3), seed: int = 0) -> np.ndarray:
    """Values that exercise a datatype: extremes for integers, odd floats, UTF-8 text."""
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    if datatype == "BYTES":
        words = ["", "plain", "naïve café", "日本語テキスト", "emoji 🚀🔥", "x\x00z", "tab\tnew\nline",
                 "ünïcödé", "Ωμέγα", "\u200b"]
        values = [words[(i + seed) % len(words)].encode("utf-8") for i in range(count)]
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    dtype = numpy_dtype(datatype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=count, dtype=dtype, endpoint=True)
        values[0], values[-1] = info.min, info.max
        return values.reshape(shape)
    values = rng.standard_normal(count).astype(dtype) * dtype.type(1000)
    values[0] = np.finfo(dtype).max
    values[-1] = np.finfo(dtype).tiny
    return values.reshape(shape)


def copy_model(repo: Path, name: str, source: Path, version: int = 1) -> Path:
    target = repo / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def write_garbage(repo: Path, name: str, version: int) -> Path:
    target = repo / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"this is not an onnx model \x00\xff\x13" * 20)
    return target


def build_serving_repository(repo: Path) -> Path:
    """The repository shared by the inference, error and metadata tests (control mode none)."""
    mv = models.make_version
    mv(repo, "mlp", 1, models.build_mlp)
    models.write_config(repo / "mlp", """
        name: "mlp"
        platform: "onnxruntime_onnx"
        max_batch_size: 8
        input [ { name: "input" data_type: TYPE_FP32 dims: [ 32 ] } ]
        output [ { name: "output" data_type: TYPE_FP32 dims: [ 4 ] } ]
        dynamic_batching { }
    """)
    mv(repo, "iris", 1, models.build_iris_classifier)  # no config.pbtxt: auto-completed
    copy_model(repo, "logreg_iris", LOGREG_IRIS)  # no config.pbtxt; has a ZipMap output
    mv(repo, "add_sub", 1, models.build_add_sub)
    models.write_config(repo / "add_sub", """
        max_batch_size: 8
        dynamic_batching { }
    """)
    for datatype in ALL_DATATYPES:
        name = f"identity_{datatype.lower()}"
        mv(repo, name, 1, models.build_identity, datatype)
        models.write_config(repo / name, "max_batch_size: 8")
    # BYTES with a queue delay, so that concurrent requests share batches.
    mv(repo, "text_batched", 1, models.build_identity, "BYTES")
    models.write_config(repo / "text_batched", """
        max_batch_size: 8
        dynamic_batching { max_queue_delay_microseconds: 50000 }
    """)
    mv(repo, "failing", 1, models.build_failing_model)
    models.write_config(repo / "failing", """
        max_batch_size: 8
        dynamic_batching { }
        some_future_field: "unknown fields are ignored"
    """)
    mv(repo, "always_failing", 1, models.build_failing_model, always=True)
    mv(repo, "sequence_output", 1, models.build_sequence_output_model)
    # Busy models hold their single instance for as long as a request asks.
    mv(repo, "busy_queue", 1, models.build_busy_model)
    models.write_config(repo / "busy_queue", """
        max_batch_size: 8
        dynamic_batching { default_queue_policy { max_queue_size: 1 } }
    """)
    mv(repo, "busy_timeout", 1, models.build_busy_model)
    models.write_config(repo / "busy_timeout", """
        max_batch_size: 8
        dynamic_batching {
          default_queue_policy { allow_timeout_override: true }
        }
    """)
    # Version policies over versions 1..3, each version a different MLP (seed = version).
    for name, policy in [("latest_default", ""),
                         ("latest_two", "version_policy { latest { num_versions: 2 } }"),
                         ("all_versions", "version_policy { all { } }"),
                         ("specific_versions", "version_policy { specific { versions: [1, 3] } }")]:
        for version in (1, 2, 3):
            mv(repo, name, version, models.build_mlp, (8, 4), seed=version)
        models.write_config(repo / name, f"max_batch_size: 4\n{policy}")
    # Isolation: a version that is garbage, next to a good one; a model that is all garbage.
    mv(repo, "partly_corrupt", 1, models.build_mlp, (8, 4), seed=1)
    write_garbage(repo, "partly_corrupt", 2)
    models.write_config(repo / "partly_corrupt", "max_batch_size: 4\nversion_policy { all { } }")
    write_garbage(repo, "corrupt", 1)
    mv(repo, "bad_config", 1, models.build_mlp, (8, 4))
    models.write_config(repo / "bad_config", 'platform: "tensorflow_savedmodel"')
    return repo


# ---- references -------------------------------------------------------------------------------

_SESSIONS: dict[str, ort.InferenceSession] = {}


def reference(path: Path, feeds: dict, outputs: list[str] | None = None) -> list:
    """The model's answer computed in-process by onnxruntime (the expected value)."""
    key = str(path)
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(key, providers=["CPUExecutionProvider"])
    return _SESSIONS[key].run(outputs, feeds)


def model_file(repo: Path, name: str, version: int = 1) -> Path:
    return repo / name / str(version) / "model.onnx"


# ---- the busy model ----------------------------------------------------------------------------

def busy_inputs(iterations: int, rows: int = 1, marker: float | None = None):
    """Inputs of ``models.build_busy_model``: hold the instance for ``iterations`` passes.
    OUTPUT0 echoes INPUT0 (``marker`` everywhere, else 0, 1, 2, ...)."""
    import tritonclient.grpc as grpcclient

    its = grpcclient.InferInput("ITERATIONS", [rows, 1], "INT64")
    its.set_data_from_numpy(np.full((rows, 1), iterations, np.int64))
    x = grpcclient.InferInput("INPUT0", [rows, 4], "FP32")
    x.set_data_from_numpy(busy_output(rows, marker))
    return [its, x]


def busy_output(rows: int = 1, marker: float | None = None) -> np.ndarray:
    if marker is not None:
        return np.full((rows, 4), marker, np.float32)
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)


def model_stats(client, model: str, version: str = "1"):
    return client.get_inference_statistics(model, version).model_stats[0]


async def start_blocker(aio, client, model: str, iterations: int = BUSY_ITERATIONS, **kwargs):
    """Send a long request to a busy model and return (as a task) once it runs on the model's
    instance: the batcher adds a request's queue time to the statistics when its batch starts."""
    import asyncio

    started = model_stats(client, model).inference_stats.queue.count
    blocker = asyncio.ensure_future(
        aio.infer(model, busy_inputs(iterations, **kwargs), client_timeout=TIMEOUT))
    await asyncio.to_thread(
        wait_for, lambda: model_stats(client, model).inference_stats.queue.count > started,
        interval=0.01, what=f"the blocker to run on {model}")
    assert not blocker.done()
    return blocker


# ---- waiting ----------------------------------------------------------------------------------

class ClientThreads:
    """Client threads sending load until the ``with`` block ends: one thread running
    ``self._run(*args)`` for each entry of ``per_thread``; subclasses write ``_run`` (loop
    until ``self._stop`` is set) and count what they see."""

    def __init__(self, per_thread: list[tuple]):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=args, daemon=True)
                         for args in per_thread]

    def _run(self, *args):
        raise NotImplementedError

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)


def wait_for(predicate, timeout: float = TIMEOUT, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def index_rows(client) -> dict[tuple[str, str], tuple[str, str]]:
    """RepositoryIndex as {(model, version): (state, reason)}."""
    index = client.get_model_repository_index()
    return {(m.name, m.version): (m.state, m.reason) for m in index.models}


def replace_atomically(directory: Path, build) -> Path:
    """Build a version directory next to its final place, then rename it in (poll-mode safe)."""
    staging = directory.parent / f".staging-{directory.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    build(staging / "model.onnx")
    staging.rename(directory)
    return directory


# ---- TLS ---------------------------------------------------------------------------------------

def make_pki(directory: Path) -> Path:
    """A CA (ca.pem/ca.key) and, signed by it for 127.0.0.1 and localhost, a server and a client
    certificate (server.pem/.key, client.pem/.key), made with openssl in ``directory``."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")
    return directory
