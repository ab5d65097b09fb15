"""Publishing versions into a real gateway: from the CLI into a polled repository under load,
through the admin API in explicit and none modes, canaries, refusals that leave nothing behind,
and `gateway versions`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import defaultdict

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from support import ROOT, TIMEOUT, assert_no_path, reference, start_gateway, wait_for
from tritonclient.utils import InferenceServerException

from bench import models
from gateway import publish
from gateway.errors import InvalidArgument
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc

LAYERS = (8, 16, 4)


def gateway_cli(*args, timeout=120):
    done = subprocess.run([sys.executable, "-m", "gateway", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
    return done.returncode, done.stdout, done.stderr


def tree(root):
    """Every path under root, hidden ones included (staging directories would show here)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {
        "v2": models.build_mlp(d / "mlp-v2.onnx", LAYERS, seed=2),
        "v3": models.build_mlp(d / "mlp-v3.onnx", LAYERS, seed=3),
        "wide": models.build_mlp(d / "wide.onnx", (9, 16, 4)),
        "iris": models.build_iris_classifier(d / "iris.onnx"),
        "garbage": _garbage(d / "garbage.onnx"),
    }


def _garbage(path):
    path.write_bytes(b"\x08\x07garbage, not a model\xff" * 50)
    return path


class Load:
    """Callers of one model by name; every answer is checked against its version's file."""

    def __init__(self, url, repo, model, threads=3):
        self.url, self.repo, self.model = url, repo, model
        self.stop = threading.Event()
        self.errors, self.count = [], 0
        self.versions = defaultdict(int)
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

    def _run(self, index):
        rng = np.random.default_rng(index)
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self.stop.is_set():
                x = rng.standard_normal((1, LAYERS[0])).astype(np.float32)
                t = grpcclient.InferInput("input", [1, LAYERS[0]], "FP32")
                t.set_data_from_numpy(x)
                try:
                    result = client.infer(self.model, [t], client_timeout=TIMEOUT)
                    version = result.get_response().model_version
                    path = self.repo / self.model / version / "model.onnx"
                    np.testing.assert_allclose(result.as_numpy("output"),
                                               reference(path, {"input": x})[0], rtol=1e-5,
                                               atol=1e-6)
                except (InferenceServerException, AssertionError) as exc:
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    self.versions[version] += 1
                    self.count += 1

    def wait_seen(self, version, at_least=20):
        wait_for(lambda: self.versions[version] >= at_least or self.errors,
                 what=f"{at_least} answers from version {version}")
        assert not self.errors, self.errors[:5]


# ---- poll mode: the training job writes into the repository ------------------------------------

@pytest.fixture(scope="module")
def poll(tmp_path_factory):
    repo = tmp_path_factory.mktemp("poll_repo")
    models.make_version(repo, "rolling", 1, models.build_mlp, LAYERS, seed=1)
    models.write_config(repo / "rolling", "max_batch_size: 8\ndynamic_batching { }")
    with start_gateway(repo, "--control-mode", "poll", "--poll-interval", "0.5") as gw:
        gw.repo = repo
        yield gw
    assert gw.process.returncode == 0, gw.log()


def test_a_published_version_is_served_under_load_without_a_failed_request(poll, files,
                                                                           tmp_path):
    data = np.random.default_rng(0).standard_normal((64, LAYERS[0])).astype(np.float32)
    np.save(tmp_path / "train.npy", data)
    with Load(poll.url, poll.repo, "rolling") as load:
        load.wait_seen("1")
        code, out, err = gateway_cli("publish", "rolling", files["v2"], "--repository",
                                     poll.repo, "--metadata", "run_id=run-2",
                                     "--metadata", "accuracy=0.93",
                                     "--baseline", tmp_path / "train.npy")
        assert code == 0, err
        assert "published model rolling version 2" in out
        assert "a gateway in poll mode serves it within its poll interval" in out
        load.wait_seen("2")
    assert not load.errors, load.errors[:5]
    meta = json.loads((poll.repo / "rolling" / "2" / "metadata.json").read_text())
    assert meta["metadata"] == {"run_id": "run-2", "accuracy": "0.93"}
    assert meta["baseline"] == {"inputs": ["input"], "samples": 64}
    assert (poll.repo / "rolling" / "2" / "baseline.npz").is_file()
    with grpcclient.InferenceServerClient(poll.url) as client:
        wait_for(lambda: not client.is_model_ready("rolling", "1"),
                 what="version 1 to retire under the latest policy")
        assert client.get_model_metadata("rolling").versions == ["2"]


def test_corrupt_and_incompatible_files_are_refused_and_leave_nothing(poll, files):
    before = tree(poll.repo)
    code, _, err = gateway_cli("publish", "rolling", files["garbage"], "--repository", poll.repo)
    assert code == 1
    assert err.startswith("gateway publish: refused (INVALID_ARGUMENT): garbage.onnx is not a "
                          "valid ONNX model")
    code, _, err = gateway_cli("publish", "rolling", files["wide"], "--repository", poll.repo)
    assert code == 1
    assert ("the model's inputs/outputs differ from version 2's: input 'input' has shape "
            "[-1, 9] (was [-1, 8])") in err
    assert "--allow-signature-change" in err
    # Through the gateway the same refusals come back as INVALID_ARGUMENT.
    code, _, err = gateway_cli("publish", "rolling", files["wide"], "--url", poll.url)
    assert code == 1 and "refused (INVALID_ARGUMENT): the model's inputs/outputs differ" in err
    assert_no_path(err, poll.repo)
    assert tree(poll.repo) == before


def test_versions_lists_metadata(poll):
    code, out, err = gateway_cli("versions", "rolling", "--url", poll.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["VERSION", "STATE", "TRAFFIC", "CREATED", "SHA256", "BASELINE",
                                "METADATA"]
    row = next(line for line in lines if line.startswith("2 "))
    assert row.split()[1:3] == ["READY", "100%"] and "accuracy=0.93 run_id=run-2" in row
    sha = json.loads((poll.repo / "rolling" / "2" / "metadata.json").read_text())["sha256"]
    assert sha[:12] in row and " yes " in row
    assert any(line.startswith("1 ") and "NOT_LOADED" in line for line in lines)
    code, out, _ = gateway_cli("versions", "rolling", "--repository", poll.repo, "--json")
    assert code == 0
    listed = {v["version"]: v for v in json.loads(out)}
    assert listed["2"]["metadata"]["metadata"]["run_id"] == "run-2"
    assert listed["2"]["baseline"] is True and listed["1"]["baseline"] is False
    code, _, err = gateway_cli("versions", "nope", "--url", poll.url)
    assert code == 1 and "NOT_FOUND: unknown model 'nope'" in err


# ---- explicit mode: publishing through the admin API loads the version ---------------------------

@pytest.fixture(scope="module")
def explicit(tmp_path_factory):
    repo = tmp_path_factory.mktemp("explicit_repo")
    models.make_version(repo, "canary", 1, models.build_mlp, LAYERS, seed=1)
    models.write_config(repo / "canary", "max_batch_size: 8\ndynamic_batching { }\n"
                                         "version_policy { latest { num_versions: 2 } }")
    models.make_version(repo, "single", 1, models.build_mlp, LAYERS, seed=1)
    with start_gateway(repo, "--control-mode", "explicit", "--load-model", "*") as gw:
        gw.repo = repo
        yield gw
    assert gw.process.returncode == 0, gw.log()


def test_publish_through_the_gateway_loads_it_in_explicit_mode(explicit, files):
    code, out, err = gateway_cli("publish", "single", files["v2"], "--url", explicit.url,
                                 "--metadata", "run_id=abc")
    assert code == 0, err
    assert "published model single version 2" in out and "state: READY" in out
    with grpcclient.InferenceServerClient(explicit.url) as client:
        assert client.is_model_ready("single", "2")
        x = np.ones((1, LAYERS[0]), np.float32)
        t = grpcclient.InferInput("input", [1, LAYERS[0]], "FP32")
        t.set_data_from_numpy(x)
        result = client.infer("single", [t])
        assert result.get_response().model_version == "2"
        np.testing.assert_allclose(result.as_numpy("output"),
                                   reference(files["v2"], {"input": x})[0], rtol=1e-5)
    meta = json.loads((explicit.repo / "single" / "2" / "metadata.json").read_text())
    assert meta["source"] == "mlp-v2.onnx" and meta["metadata"] == {"run_id": "abc"}


def test_a_canary_starts_right_after_the_version_is_ready(explicit, files):
    before = tree(explicit.repo)
    code, _, err = gateway_cli("publish", "canary", files["v2"], "--url", explicit.url,
                               "--canary", "100")
    assert code == 1 and "the canary share must be above 0 and below 100 percent" in err
    assert tree(explicit.repo) == before
    result = publish("canary", files["v2"], url=explicit.url, canary=10, canary_interval=3600,
                     canary_options={"max_latency_ratio": 7, "min_requests": 5},
                     metadata={"run_id": "canary-run"},
                     baseline=np.zeros((10, LAYERS[0]), np.float32))
    assert (result.version, result.state) == (2, "READY")
    assert result.rollout is not None
    assert (result.rollout.state, result.rollout.percent) == ("running", 10.0)
    assert list(result.rollout.steps) == [10.0, 25.0, 50.0, 100.0]
    assert (result.rollout.to_version, result.rollout.from_version) == ("2", "1")
    assert (result.rollout.max_latency_ratio, result.rollout.min_requests) == (7.0, 5)
    assert result.rollout.interval_seconds == 3600
    code, out, _ = gateway_cli("traffic", "show", "canary", "--url", explicit.url)
    assert code == 0 and "effective:  1=90% 2=10%" in out
    before = tree(explicit.repo)
    code, _, err = gateway_cli("publish", "canary", files["v3"], "--url", explicit.url,
                               "--canary", "5")
    assert code == 1 and "already has a running rollout to version 2" in err
    assert tree(explicit.repo) == before
    code, out, _ = gateway_cli("rollout", "abort", "canary", "--url", explicit.url)
    assert code == 0 and "is aborted" in out
    meta = json.loads((explicit.repo / "canary" / "2" / "metadata.json").read_text())
    assert meta["metadata"] == {"run_id": "canary-run"}
    assert meta["baseline"] == {"inputs": ["input"], "samples": 10}


def test_a_canary_needs_a_version_policy_that_keeps_the_baseline(explicit, files):
    before = tree(explicit.repo)
    code, _, err = gateway_cli("publish", "single", files["v3"], "--url", explicit.url,
                               "--canary", "10")
    assert code == 1
    assert "FAILED_PRECONDITION" in err and "num_versions: 2" in err
    assert tree(explicit.repo) == before
    code, _, err = gateway_cli("publish", "single", files["v3"], "--repository", explicit.repo,
                               "--canary", "10")
    assert code == 2 and "--canary needs a running gateway" in err


def test_a_corrupt_upload_is_refused_by_the_gateway_and_leaves_nothing(explicit, files):
    """The CLI checks before sending; a raw client that does not is refused by the gateway."""
    before = tree(explicit.repo)
    data = files["garbage"].read_bytes()
    chunks = [apb.PublishChunk(header=apb.PublishHeader(model="single", size=len(data),
                                                        source="/home/me/garbage.onnx")),
              apb.PublishChunk(data=data[:100]), apb.PublishChunk(data=data[100:])]
    with grpc.insecure_channel(explicit.url) as channel:
        stub = apb_grpc.GatewayAdminStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.PublishVersion(iter(chunks), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("garbage.onnx is not a valid ONNX model")
        assert_no_path(info.value.details(), explicit.repo)
        for bad, message in [
            ([apb.PublishChunk(data=b"x")], "the first publish message must be the header"),
            ([], "nothing to publish"),
            ([chunks[0], chunks[1]], "the upload ended after 100 of"),
            ([apb.PublishChunk(header=apb.PublishHeader(model="../x"))], "invalid model name"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.PublishVersion(iter(bad), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in info.value.details()
    assert tree(explicit.repo) == before
    with pytest.raises(InvalidArgument, match="garbage.onnx is not a valid ONNX model"):
        publish("single", files["garbage"], url=explicit.url)


# ---- none mode ----------------------------------------------------------------------------------

def test_publish_through_the_gateway_loads_it_in_none_mode_too(tmp_path, files):
    models.make_version(tmp_path, "mlp", 1, models.build_mlp, LAYERS, seed=1)
    with start_gateway(tmp_path) as gw:
        code, out, err = gateway_cli("publish", "mlp", files["v2"], "--url", gw.url)
        assert code == 0 and "state: READY" in out, err
        code, out, err = gateway_cli("publish", "newcomer", files["iris"], "--url", gw.url)
        assert code == 0 and "published model newcomer version 1" in out, err
        with grpcclient.InferenceServerClient(gw.url) as client:
            assert client.get_model_metadata("mlp").versions == ["2"]
            assert client.is_model_ready("newcomer", "1")
    assert tree(tmp_path / "newcomer") == ["1", "1/metadata.json", "1/model.onnx"]
