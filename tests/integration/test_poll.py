"""Poll control mode: new versions and models on disk are picked up under load, without a single
failed request; a corrupt or half-written new version never disturbs the version that serves.

The tests of this module share one gateway and run in order (each starts where the last ended).
"""

from __future__ import annotations

import shutil
import threading
from collections import defaultdict

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from support import (
    TIMEOUT,
    assert_no_path,
    index_rows,
    model_file,
    raises,
    reference,
    replace_atomically,
    start_gateway,
    wait_for,
)
from tritonclient.utils import InferenceServerException

from bench import models

LAYERS = (8, 16, 4)


def build_version(path, version: int):
    return models.build_mlp(path, LAYERS, seed=version)


@pytest.fixture(scope="module")
def poll_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("poll_repo")
    models.make_version(repo, "rolling", 1, build_version, 1)
    models.write_config(repo / "rolling", "max_batch_size: 8\ndynamic_batching { }")
    return repo


@pytest.fixture(scope="module")
def poll_gateway(poll_repo):
    with start_gateway(poll_repo, "--control-mode", "poll", "--poll-interval", "0.5") as gw:
        yield gw
    assert gw.process.returncode == 0, gw.log()


@pytest.fixture
def poll_client(poll_gateway):
    c = grpcclient.InferenceServerClient(poll_gateway.url)
    yield c
    c.close()


class Load:
    """Background callers of one model; every answer is checked against its version's file."""

    def __init__(self, url: str, repo, model: str, threads: int = 4):
        self.url, self.repo, self.model = url, repo, model
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.versions: dict[int, list[str]] = defaultdict(list)  # per thread, in order
        self.count = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self._threads:
            t.join(TIMEOUT)

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self.stop.is_set():
                x = rng.standard_normal((1 + index % 3, LAYERS[0])).astype(np.float32)
                t = grpcclient.InferInput("input", list(x.shape), "FP32")
                t.set_data_from_numpy(x)
                try:
                    result = client.infer(self.model, [t], client_timeout=TIMEOUT)
                    version = result.get_response().model_version
                    (expected,) = reference(model_file(self.repo, self.model, int(version)),
                                            {"input": x})
                    np.testing.assert_allclose(result.as_numpy("output"), expected,
                                               rtol=1e-5, atol=1e-6)
                except (InferenceServerException, AssertionError) as exc:
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    self.versions[index].append(version)
                    self.count += 1

    def seen(self, version: str) -> int:
        with self._lock:
            return sum(v.count(version) for v in self.versions.values())

    def wait_seen(self, version: str, at_least: int = 20) -> None:
        wait_for(lambda: self.seen(version) >= at_least or self.errors,
                 what=f"{at_least} answers from version {version}")
        assert not self.errors, self.errors[:5]


def assert_switched_once(load: Load, old: str, new: str) -> None:
    """Per caller: answers from ``old`` and then only from ``new`` (no flapping back)."""
    for thread, versions in load.versions.items():
        assert set(versions) <= {old, new}, (thread, set(versions))
        if new in versions:
            first_new = versions.index(new)
            assert old not in versions[first_new:], f"thread {thread} went back to {old}"


def test_new_version_picked_up_under_load(poll_gateway, poll_client, poll_repo):
    with Load(poll_gateway.url, poll_repo, "rolling") as load:
        load.wait_seen("1")
        replace_atomically(poll_repo / "rolling" / "2", lambda p: build_version(p, 2))
        load.wait_seen("2")
    assert not load.errors, load.errors[:5]
    assert_switched_once(load, "1", "2")
    rows = index_rows(poll_client)
    assert rows[("rolling", "2")] == ("READY", "")
    assert ("rolling", "1") not in rows  # the latest policy retired it
    assert poll_client.get_model_metadata("rolling").versions == ["2"]


def test_corrupt_new_version_keeps_the_old_one_serving(poll_gateway, poll_client, poll_repo):
    """Version 3 appears half-written (a truncated model file); version 2 keeps serving, the index
    says why 3 is unavailable; when the file is complete, 3 takes over."""
    with Load(poll_gateway.url, poll_repo, "rolling") as load:
        load.wait_seen("2")
        complete = build_version(poll_repo / "staging-3.onnx", 3).read_bytes()
        (poll_repo / "staging-3.onnx").unlink()
        target = poll_repo / "rolling" / "3" / "model.onnx"
        target.parent.mkdir()
        target.write_bytes(complete[: len(complete) // 2])  # half written
        wait_for(lambda: index_rows(poll_client).get(("rolling", "3"), ("",))[0] == "UNAVAILABLE",
                 what="version 3 to be reported UNAVAILABLE")
        _, reason = index_rows(poll_client)[("rolling", "3")]
        assert "onnxruntime could not load the model" in reason
        assert_no_path(reason, poll_repo)
        assert index_rows(poll_client)[("rolling", "2")] == ("READY", "")
        with raises("UNAVAILABLE", "model 'rolling' version 3 is not available"):
            t = grpcclient.InferInput("input", [1, LAYERS[0]], "FP32")
            t.set_data_from_numpy(np.ones((1, LAYERS[0]), np.float32))
            poll_client.infer("rolling", [t], model_version="3", client_timeout=TIMEOUT)
        seen_before = load.seen("2")
        load.wait_seen("2", at_least=seen_before + 20)  # still serving after the failed load
        assert load.seen("3") == 0
        # The writer finishes the file: version 3 loads and takes over.
        target.write_bytes(complete)
        load.wait_seen("3")
    assert not load.errors, load.errors[:5]
    assert_switched_once(load, "2", "3")
    assert index_rows(poll_client)[("rolling", "3")] == ("READY", "")


def test_new_model_directory_is_loaded_and_a_removed_one_unloaded(poll_client, poll_repo):
    staging = poll_repo / ".staging-newcomer"
    models.make_version(staging, "", 1, models.build_add_sub)
    staging.rename(poll_repo / "newcomer")
    wait_for(lambda: poll_client.is_model_ready("newcomer"), what="newcomer to load")
    a = np.ones((1, 16), np.float32)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        t = grpcclient.InferInput(name, [1, 16], "FP32")
        t.set_data_from_numpy(a)
        inputs.append(t)
    result = poll_client.infer("newcomer", inputs, client_timeout=TIMEOUT)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)

    shutil.rmtree(poll_repo / "newcomer")
    wait_for(lambda: not poll_client.is_model_ready("newcomer"), what="newcomer to unload")
    with raises("UNAVAILABLE", "model 'newcomer' is not available"):
        poll_client.infer("newcomer", inputs, client_timeout=TIMEOUT)
    assert poll_client.is_model_ready("rolling")  # the others are untouched
