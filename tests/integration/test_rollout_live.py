"""Automatic canary rollouts against a real gateway under real load, driven from the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from support import ROOT, ClientThreads, start_gateway, wait_for

from bench import models


def build_broken_mlp(path):
    """Same signature as the tiny MLP (input [batch,32] -> output [batch,4]), but it indexes a
    10-entry table with input * 1000: any input away from zero fails at run time."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10], np.arange(10, dtype=np.float32))
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1000.0])
    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 4], np.ones(128, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "scale"], ["scaled"]),
         helper.make_node("Floor", ["scaled"], ["floored"]),
         helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "index"], ["looked_up"]),
         helper.make_node("MatMul", ["looked_up", "w"], ["output"])], "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
        [table, scale, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def cli(url, *args):
    done = subprocess.run([sys.executable, "-m", "gateway", "rollout", *args, "--url", url],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr


class Load(ClientThreads):
    """Two client threads calling the model by name until stopped; counts outcomes."""

    def __init__(self, url, model="canary"):
        self.url, self.model = url, model
        self.ok = self.failed = 0
        super().__init__([(), ()])

    def _run(self):
        x = np.random.default_rng(0).standard_normal((1, 32), dtype=np.float32)
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self._stop.is_set():
                inp = grpcclient.InferInput("input", [1, 32], "FP32")
                inp.set_data_from_numpy(x)
                try:
                    client.infer(self.model, [inp], client_timeout=30)
                    self.ok += 1
                except Exception:
                    self.failed += 1


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    repo = tmp_path_factory.mktemp("rollout")
    models.make_version(repo, "canary", 1, models.build_mlp, seed=1)
    models.make_version(repo, "canary", 2, models.build_mlp, seed=2)
    models.make_version(repo, "canary", 3, models.build_mlp, (32, 2048, 2048, 2048, 4), seed=3)
    models.make_version(repo, "canary", 4, build_broken_mlp)
    models.write_config(repo / "canary", """
        max_batch_size: 16
        version_policy { all { } }
        dynamic_batching { }
    """)
    with start_gateway(repo) as gw:
        # Version 1 serves until rollouts say otherwise (the newest, 4, is the broken one).
        done = subprocess.run([sys.executable, "-m", "gateway", "traffic", "set", "canary",
                               "1=100", "--url", gw.url], capture_output=True, text=True,
                              cwd=ROOT, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        yield gw


def rollout_state(url):
    code, out, _ = cli(url, "status", "canary")
    assert code == 0
    return out


FAST = ["--steps", "25,50,100", "--interval", "1.5s", "--min-requests", "15"]


def test_a_good_version_is_promoted(gateway):
    with Load(gateway.url) as load:
        # A generous latency limit: the shared test machine's noise must not fail a good version.
        code, out, err = cli(gateway.url, "start", "canary", "--to", "2", "--from", "1", *FAST,
                             "--max-latency-ratio", "10")
        assert code == 0, err
        assert "rollout to version 2 (baseline 1) is running" in out
        assert "canary share: 25% (step 1 of 3: 25,50,100)" in out
        wait_for(lambda: "is promoted" in rollout_state(gateway.url), timeout=60,
                 what="promotion")
    assert load.failed == 0 and load.ok > 0
    status = rollout_state(gateway.url)
    assert "canary share: 100%" in status
    with grpcclient.InferenceServerClient(gateway.url) as client:
        x = np.zeros((1, 32), np.float32)
        inp = grpcclient.InferInput("input", [1, 32], "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("canary", [inp]).get_response().model_version == "2"
        assert client.is_model_ready("canary", "1")  # the old version stays for a quick rollback


def test_a_slow_version_is_rolled_back(gateway):
    with Load(gateway.url):
        code, _, err = cli(gateway.url, "start", "canary", "--to", "3", *FAST,
                           "--max-latency-ratio", "1.2")
        assert code == 0, err
        wait_for(lambda: "is rolled back" in rollout_state(gateway.url), timeout=90,
                 what="rollback")
    status = rollout_state(gateway.url)
    assert "(baseline 2)" in status  # the baseline defaulted to the promoted version
    assert "reason:   canary p99 latency" in status and "x the baseline's" in status
    assert "canary share: 0%" in status


def test_a_failing_version_is_rolled_back(gateway):
    with Load(gateway.url) as load:
        code, _, err = cli(gateway.url, "start", "canary", "--to", "4", "--from", "2", *FAST,
                           "--max-latency-ratio", "10")
        assert code == 0, err
        wait_for(lambda: "is rolled back" in rollout_state(gateway.url), timeout=60,
                 what="rollback")
        failed_during = load.failed
        ok_before = load.ok
        wait_for(lambda: load.ok > ok_before + 20, what="traffic after the rollback")
    assert "reason:   canary error rate" in rollout_state(gateway.url)
    assert load.failed == failed_during  # after the rollback nothing fails any more


def test_refusals_are_clear(gateway):
    code, _, err = cli(gateway.url, "start", "canary", "--to", "9")
    assert code == 1
    assert err.strip() == ("gateway rollout start: INVALID_ARGUMENT: model 'canary' version 9 "
                           "is not serving")
    code, _, err = cli(gateway.url, "start", "canary", "--to", "2", "--steps", "50,10")
    assert code == 1
    assert "INVALID_ARGUMENT: steps must be increasing percentages in (0, 100]" in err
    code, _, err = cli(gateway.url, "pause", "canary")
    assert code == 1
    assert "FAILED_PRECONDITION: the rollout of model 'canary' already ended" in err
    code, _, err = cli(gateway.url, "status", "nope")
    assert code == 1 and "NOT_FOUND" in err


def test_a_restart_in_the_middle_resumes(tmp_path):
    models.make_version(tmp_path, "canary", 1, models.build_mlp, seed=1)
    models.make_version(tmp_path, "canary", 2, models.build_mlp, seed=2)
    models.write_config(tmp_path / "canary", "max_batch_size: 8\nversion_policy { all { } }")
    with start_gateway(tmp_path) as gw:
        code, _, err = cli(gw.url, "start", "canary", "--to", "2", "--from", "1",
                           "--steps", "10,60,100", "--interval", "1h")
        assert code == 0, err
        assert cli(gw.url, "pause", "canary")[0] == 0
        assert cli(gw.url, "resume", "canary")[0] == 0
    with start_gateway(tmp_path) as gw:
        status = rollout_state(gw.url)
        assert "is running" in status and "canary share: 10%" in status
        wait_for(lambda: " adopt " in rollout_state(gw.url), timeout=20,
                 what="the restarted gateway to adopt the rollout")
        code, out, _ = cli(gw.url, "abort", "canary")
        assert code == 0 and "is aborted" in out
