"""Three gateway processes sharing one real ``redis-server`` as their operator-state store, as the
replicas of a fleet do. Operators act through any replica (the `gateway` CLI and the admin
API); clients are tritonclient. The rollout judge is one replica at a time, under a lease that
these tests shorten to 2 s, and it judges on every replica's traffic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from support import ROOT, ClientThreads, start_gateway, wait_for

from bench import models
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc

MODEL = "canary"
LEASE = "2"
X = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)


def build_slow_mlp(path, rounds: int = 40):
    """The tiny MLP's signature ([batch,32] -> [batch,4]) with ~170M multiply-adds per row: one
    2048x2048 weight applied ``rounds`` times, so a request takes tens of milliseconds."""
    rng = np.random.default_rng(0)
    w_in = helper.make_tensor("w_in", TensorProto.FLOAT, [32, 2048],
                              rng.standard_normal(32 * 2048).astype(np.float32) * 0.1)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2048, 2048],
                           rng.standard_normal(2048 * 2048).astype(np.float32) * 0.02)
    w_out = helper.make_tensor("w_out", TensorProto.FLOAT, [2048, 4],
                               rng.standard_normal(2048 * 4).astype(np.float32) * 0.1)
    nodes = [helper.make_node("MatMul", ["input", "w_in"], ["h0"])]
    for i in range(rounds):
        nodes += [helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"])]
    nodes.append(helper.make_node("MatMul", [f"h{rounds}", "w_out"], ["output"]))
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 4])],
        [w_in, w, w_out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("fleet-redis")
    models.make_version(repo, MODEL, 1, models.build_mlp, seed=1)
    models.make_version(repo, MODEL, 2, models.build_mlp, seed=2)
    models.make_version(repo, MODEL, 3, build_slow_mlp)
    models.write_config(repo / MODEL, """
        max_batch_size: 16
        version_policy { all { } }
        dynamic_batching { }
    """)
    return repo


@pytest.fixture
def fleet(repository, redis_server):
    """Three replicas on one Redis; version 1 holds all traffic to begin with."""
    args = ["--state-url", redis_server.url, "--rollout-lease", LEASE]
    env = {"GATEWAY_STATE_POLL_INTERVAL": "0.2"}
    with ExitStack() as stack:
        gateways = [stack.enter_context(start_gateway(repository, *args, env=env))
                    for _ in range(3)]
        admin(gateways[0]).SetTraffic(apb.SetTrafficRequest(
            model=MODEL, split=[apb.VersionWeight(version="1", percent=100)]))
        yield gateways


def admin(gateway) -> apb_grpc.GatewayAdminStub:
    channel = grpc.insecure_channel(gateway.url)
    return apb_grpc.GatewayAdminStub(channel)


def status(gateway) -> apb.RolloutStatus:
    return admin(gateway).GetRollout(apb.RolloutRequest(model=MODEL), timeout=30)


def cli(gateway, *args):
    done = subprocess.run([sys.executable, "-m", "gateway", *args, "--url", gateway.url],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr


def start(gateway, to: str, interval="1", min_requests="10", steps="20,50,100"):
    code, out, err = cli(gateway, "rollout", "start", MODEL, "--to", to, "--from", "1",
                         "--steps", steps, "--interval", interval, "--min-requests",
                         min_requests, "--max-latency-ratio", "50")
    assert code == 0, err
    return out


class Load(ClientThreads):
    """One client thread per replica calling the model by name; counts outcomes by status."""

    def __init__(self, gateways, timeout_s: float = 30.0):
        self.gateways, self.timeout_s = gateways, timeout_s
        self.codes: dict[str, int] = {}
        self.versions: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__([(gw,) for gw in gateways])

    def _run(self, gateway):
        with grpcclient.InferenceServerClient(gateway.url) as client:
            while not self._stop.is_set():
                inp = grpcclient.InferInput("input", [1, 32], "FP32")
                inp.set_data_from_numpy(X)
                try:
                    result = client.infer(MODEL, [inp], client_timeout=self.timeout_s)
                    code, version = "OK", result.get_response().model_version
                except Exception as exc:
                    code = getattr(exc, "status", lambda: None)() or type(exc).__name__
                    version = None
                    time.sleep(0.005)
                with self._lock:
                    self.codes[code] = self.codes.get(code, 0) + 1
                    if version:
                        self.versions[version] = self.versions.get(version, 0) + 1


def split_of(gateway) -> dict[str, float]:
    got = admin(gateway).GetTraffic(apb.GetTrafficRequest(model=MODEL), timeout=30)
    return {w.version: w.percent for w in got.split}


def test_operators_act_through_any_replica_and_the_judge_sees_the_whole_fleet(fleet):
    first, second, third = fleet
    with Load(fleet):
        out = start(first, "2", interval="600")
        assert "canary share: 20%" in out
        for gw in fleet:  # one commit: every replica serves the step's split
            wait_for(lambda gw=gw: split_of(gw) == {"1": 80.0, "2": 20.0}, timeout=15,
                     what="the step's split everywhere")
        # The figures are every replica's, summed by whichever replica is asked.
        wait_for(lambda: status(third).canary.replicas == 3 and
                 status(third).canary.requests >= 10, timeout=30, what="fleet figures")
        code, out, _ = cli(second, "rollout", "status", MODEL)
        assert code == 0 and "(fleet: 3 replicas)" in out
        # A split change would fight the rollout: refused, naming it.
        code, _, err = cli(second, "traffic", "set", MODEL, "1=50", "2=50")
        assert code == 1
        assert ("FAILED_PRECONDITION: model 'canary' has a running rollout to version 2 "
                "(canary at 20%), which owns its split") in err
        # Pause through a replica that is not the judge: it sticks.
        assert status(first).owner != "" and cli(third, "rollout", "pause", MODEL)[0] == 0
        time.sleep(3)
        assert status(first).state == "paused"
        # Resume through another: that replica becomes the judge (a new epoch).
        code, out, _ = cli(second, "rollout", "resume", MODEL)
        assert code == 0
        resumed = status(first)
        assert (resumed.state, resumed.epoch) == ("running", 2)
        # Abort through the third: it sticks everywhere, and traffic goes back to version 1.
        assert cli(third, "rollout", "abort", MODEL)[0] == 0
        time.sleep(3)
        for gw in fleet:
            assert status(gw).state == "aborted"
            wait_for(lambda gw=gw: split_of(gw) == {"1": 100.0}, timeout=15,
                     what="all traffic back on version 1")
    code, out, _ = cli(first, "traffic", "history", MODEL)
    assert code == 0
    for action in ("rollout-start", "rollout-pause", "rollout-resume", "rollout-aborted"):
        assert action in out


def test_a_killed_judge_is_replaced_within_its_lease_and_the_rollout_goes_on(fleet):
    first, second, _ = fleet
    with Load(fleet) as load:
        start(first, "2", interval="2", min_requests="5", steps="20,40,60,100")
        wait_for(lambda: status(second).step >= 1, timeout=30, what="the first step")
        judge = status(second).owner
        pid = int(judge.split(":")[-2])  # identities are host:pid:nonce
        victim = next(gw for gw in fleet if gw.process.pid == pid)
        step = status(second).step
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
        survivors = [gw for gw in fleet if gw is not victim]
        wait_for(lambda: status(survivors[0]).owner != judge, timeout=15,
                 what="another replica to take over")
        taken = status(survivors[0])
        assert taken.step >= step and taken.epoch == 2
        wait_for(lambda: status(survivors[1]).state == "promoted", timeout=60,
                 what="promotion by the new judge")
        final = status(survivors[1])
    events = [e.event for e in final.history]
    assert events.count("adopt") == 1, events  # two survivors, one judge
    assert load.codes.get("OK", 0) > 0


def test_redis_down_keeps_serving_refuses_changes_and_loses_nothing(fleet, redis_server):
    first, second, _ = fleet
    with Load(fleet) as load:
        start(first, "2", interval="600")
        wait_for(lambda: split_of(second) == {"1": 80.0, "2": 20.0}, timeout=15,
                 what="the split")
        redis_server.kill()
        ok_before = load.codes.get("OK", 0)
        code, _, err = cli(second, "traffic", "set", MODEL, "1=100", "--force")
        assert code == 1 and "UNAVAILABLE: the operator state store redis://127.0.0.1:" in err
        assert "is unreachable" in err
        wait_for(lambda: "gateway_state_store_up 0.0" in metrics(second), timeout=15,
                 what="the store-down metric")
        wait_for(lambda: load.codes.get("OK", 0) > ok_before + 50, what="serving goes on")
        assert set(load.versions) <= {"1", "2"}
        assert split_of(second) == {"1": 80.0, "2": 20.0}  # the last state read
        code, out, _ = cli(second, "rollout", "status", MODEL)  # still answers, from it
        assert code == 0 and "is running" in out
        redis_server.start()  # same port and append-only file
        wait_for(lambda: "gateway_state_store_up 1.0" in metrics(second), timeout=30,
                 what="reconnection")
        after = status(second)
        assert (after.state, after.percent) == ("running", 20.0)
        assert cli(second, "rollout", "abort", MODEL)[0] == 0
    assert set(load.codes) == {"OK"}, load.codes


def test_a_canary_whose_requests_all_time_out_is_rolled_back(fleet):
    first = fleet[0]
    # Clients give up after 40 ms: version 1 answers in a few, version 3 takes far longer.
    with Load(fleet, timeout_s=0.04) as load:
        start(first, "3", interval="2", min_requests="5")
        wait_for(lambda: status(first).state == "rolled_back", timeout=60, what="rollback")
    final = status(first)
    # Before: timed-out calls were not failures and the canary was promoted.
    assert final.reason.startswith("canary error rate ") and \
        "is above 1.00%" in final.reason, final.reason
    assert "DEADLINE_EXCEEDED" in load.codes or "StatusCode.DEADLINE_EXCEEDED" in load.codes
    assert split_of(first) == {"1": 100.0}


def metrics(gateway) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics",
                                timeout=10) as r:
        return r.read().decode()
