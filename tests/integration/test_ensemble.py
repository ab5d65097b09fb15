"""Ensembles (Triton's platform "ensemble") served to tritonclient.

Real ONNX models built with onnx.helper: ``scale`` (Y = X * k; version 1 doubles, version 2
triples), ``shift`` (Z = Y + 1) and ``join`` (S = A + B). The ensembles chain them (``chain``:
scale -> shift), fan out and join (``diamond``: scale and shift of the same input, then join),
and refuse what does not fit with the reason in the repository index.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections import Counter

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from support import (
    ROOT,
    TIMEOUT,
    index_rows,
    model_stats,
    raises,
    replace_atomically,
    start_gateway,
    wait_for,
)
from tritonclient.utils import InferenceServerException

from bench import models

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def fp32(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4])


def build_scale(path, factor: float):
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [factor])
    graph = helper.make_graph([helper.make_node("Mul", ["X", "k"], ["Y"])], "scale",
                              [fp32("X")], [fp32("Y")], [k])
    return models._save(graph, path)


def build_shift(path):
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["Y", "one"], ["Z"])], "shift",
                              [fp32("Y")], [fp32("Z")], [one])
    return models._save(graph, path)


def build_join(path):
    graph = helper.make_graph([helper.make_node("Add", ["A", "B"], ["S"])], "join",
                              [fp32("A"), fp32("B")], [fp32("S")])
    return models._save(graph, path)


def tensor(name, dims="[ 4 ]", datatype="TYPE_FP32"):
    return f'{{ name: "{name}" data_type: {datatype} dims: {dims} }}'


def step(model, inputs, outputs, version=-1):
    ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'step [ {{ model_name: "{model}" model_version: {version} {ins} {outs} }} ]'


def ensemble(repo, name, inputs, outputs, steps, max_batch_size=8, version_dir=True):
    (repo / name).mkdir(parents=True)
    if version_dir:
        (repo / name / "1").mkdir()
    models.write_config(repo / name, f"""
        platform: "ensemble"
        max_batch_size: {max_batch_size}
        input [ {", ".join(inputs)} ]
        output [ {", ".join(outputs)} ]
        ensemble_scheduling {{ {" ".join(steps)} }}
    """)


def build_repository(repo):
    for version, factor in ((1, 2.0), (2, 3.0)):
        build_scale(repo / "scale" / str(version) / "model.onnx", factor)
    models.write_config(repo / "scale", "max_batch_size: 8\ndynamic_batching { }\n"
                                        "version_policy { all { } }\n")
    build_shift(repo / "shift" / "1" / "model.onnx")
    models.write_config(repo / "shift", "max_batch_size: 8\ndynamic_batching { }\noutput [ {"
                                        ' name: "Z" data_type: TYPE_FP32 dims: [ 4 ]'
                                        ' label_filename: "labels.txt" } ]\n')
    (repo / "shift" / "labels.txt").write_text("zero\none\ntwo\nthree\n")
    build_join(repo / "join" / "1" / "model.onnx")
    models.write_config(repo / "join", "max_batch_size: 8\n")
    ensemble(repo, "chain", [tensor("RAW")], [tensor("OUT")], [
        step("scale", {"X": "RAW"}, {"Y": "scaled"}),
        step("shift", {"Y": "scaled"}, {"Z": "OUT"}),
    ])
    # Steps listed out of order on purpose: the plan orders them by what they read.
    ensemble(repo, "diamond", [tensor("RAW")], [tensor("SUM"), tensor("DOUBLED")], [
        step("join", {"A": "doubled", "B": "shifted"}, {"S": "SUM"}),
        step("scale", {"X": "RAW"}, {"Y": "doubled"}, version=1),
        step("shift", {"Y": "RAW"}, {"Z": "shifted"}),
        step("shift", {"Y": "doubled"}, {"Z": "DOUBLED"}),
    ], version_dir=False)
    # An ensemble of an ensemble, pinned to scale's version 1 at the outer step.
    ensemble(repo, "nested", [tensor("RAW")], [tensor("OUT")], [
        step("chain", {"RAW": "RAW"}, {"OUT": "once"}),
        step("scale", {"X": "once"}, {"Y": "OUT"}, version=1),
    ])
    # A non-batching ensemble over a batching model whose name holds commas (as Triton's QA
    # generators name theirs): [4] goes to the model as [1, 4] and comes back as [4].
    build_shift(repo / "shift_4,1" / "1" / "model.onnx")
    models.write_config(repo / "shift_4,1", "max_batch_size: 8\n")
    ensemble(repo, "flat", [tensor("RAW")], [tensor("OUT")], [
        step("shift_4,1", {"Y": "RAW"}, {"Z": "OUT"})], max_batch_size=0)
    # Two versions of one ensemble (the same pipeline): a split on the ensemble itself.
    ensemble(repo, "twin", [tensor("RAW")], [tensor("OUT")], [
        step("shift", {"Y": "RAW"}, {"Z": "OUT"})])
    (repo / "twin" / "2").mkdir()
    with open(repo / "twin" / "config.pbtxt", "a") as config:
        config.write("version_policy { all { } }\n")
    # Refused at load, each with its reason:
    ensemble(repo, "loop_a", [tensor("RAW")], [tensor("OUT")], [
        step("loop_b", {"RAW": "RAW"}, {"OUT": "OUT"})])
    ensemble(repo, "loop_b", [tensor("RAW")], [tensor("OUT")], [
        step("loop_a", {"RAW": "RAW"}, {"OUT": "OUT"})])
    ensemble(repo, "no_such_version", [tensor("RAW")], [tensor("OUT")], [
        step("shift", {"Y": "RAW"}, {"Z": "OUT"}, version=7)])
    ensemble(repo, "dangling", [tensor("RAW")], [tensor("OUT")], [
        step("shift", {"Y": "nowhere"}, {"Z": "OUT"}),
    ])
    ensemble(repo, "wrong_type", [tensor("RAW", datatype="TYPE_INT32")], [tensor("OUT")], [
        step("shift", {"Y": "RAW"}, {"Z": "OUT"}),
    ])
    ensemble(repo, "too_big", [tensor("RAW")], [tensor("OUT")], [
        step("shift", {"Y": "RAW"}, {"Z": "OUT"}),
    ], max_batch_size=64)
    ensemble(repo, "missing", [tensor("RAW")], [tensor("OUT")], [
        step("absent", {"Y": "RAW"}, {"Z": "OUT"}),
    ])
    # A composing model with no batching of its own, fed a whole batch by a non-batching
    # ensemble: a step whose request its model refuses.
    build_shift(repo / "shift_two" / "1" / "model.onnx")
    models.write_config(repo / "shift_two", "max_batch_size: 2\n")
    ensemble(repo, "narrow", [tensor("RAW", "[ -1, 4 ]")], [tensor("OUT", "[ -1, 4 ]")], [
        step("shift_two", {"Y": "RAW"}, {"Z": "OUT"}),
    ], max_batch_size=0)
    return repo


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    repo = build_repository(tmp_path_factory.mktemp("ensembles"))
    with start_gateway(repo, "--state-dir", str(repo / ".gateway")) as gw:
        yield gw


@pytest.fixture
def client(gateway):
    with grpcclient.InferenceServerClient(gateway.url) as c:
        yield c


def infer(client, model, x=X, outputs=None, **kwargs):
    inp = grpcclient.InferInput("RAW", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    wanted = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, [inp], outputs=wanted, client_timeout=TIMEOUT, **kwargs)


def traffic(url, *args):
    done = subprocess.run([sys.executable, "-m", "gateway", "traffic", *args, "--url", url],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_chain_runs_each_step_and_answers_as_the_ensemble(client):
    result = infer(client, "chain")
    np.testing.assert_allclose(result.as_numpy("OUT"), X * 3.0 + 1.0)  # newest scale: x3
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("chain", "1")
    assert [o.name for o in response.outputs] == ["OUT"]


def test_an_ensemble_may_be_a_step_of_another(client):
    result = infer(client, "nested")
    np.testing.assert_allclose(result.as_numpy("OUT"), (X * 3.0 + 1.0) * 2.0)


def test_steps_that_do_not_depend_on_each_other_run_as_a_diamond(client):
    result = infer(client, "diamond")
    np.testing.assert_allclose(result.as_numpy("SUM"), X * 2.0 + (X + 1.0))
    np.testing.assert_allclose(result.as_numpy("DOUBLED"), X * 2.0 + 1.0)
    only = infer(client, "diamond", outputs=["DOUBLED"])
    assert [o.name for o in only.get_response().outputs] == ["DOUBLED"]


def test_statistics_per_ensemble_and_per_composing_model(client):
    before = {m: model_stats(client, m, v).inference_stats.success.count
              for m, v in (("chain", "1"), ("shift", "1"))}
    for _ in range(3):
        infer(client, "chain")
    chain = model_stats(client, "chain", "1")
    assert chain.inference_stats.success.count == before["chain"] + 3
    assert chain.inference_count >= 6 and chain.execution_count >= 3  # 2 rows per request
    assert (model_stats(client, "shift", "1").inference_stats.success.count
            == before["shift"] + 3)


def test_metadata_and_config_say_ensemble(client):
    meta = client.get_model_metadata("chain")
    assert meta.platform == "ensemble"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("RAW", "FP32", [-1, 4])]
    config = client.get_model_config("chain").config
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["scale", "shift"]
    assert client.is_model_ready("chain") and client.is_model_ready("diamond")


def test_a_split_on_a_composing_model_applies_inside_the_ensemble(gateway, client):
    assert "1=50% 2=50%" in traffic(gateway.url, "set", "scale", "1=50", "2=50")
    try:
        async def run(keys):
            async with aioclient.InferenceServerClient(gateway.url) as aio:
                async def one(key):
                    inp = aioclient.InferInput("RAW", [1, 4], "FP32")
                    inp.set_data_from_numpy(X[:1])
                    result = await aio.infer("chain", [inp], headers={"x-routing-key": key}
                                             if key else None, client_timeout=TIMEOUT)
                    return float(result.as_numpy("OUT")[0, 1])  # x=1: 2+1 or 3+1
                return await asyncio.gather(*(one(k) for k in keys))

        seen = Counter(asyncio.run(run([None] * 200)))
        assert set(seen) == {3.0, 4.0} and min(seen.values()) > 50, seen
        # A sticky key reaches one composing version, every time.
        keys = [f"user-{i}" for i in range(40)]
        first = asyncio.run(run(keys))
        assert asyncio.run(run(keys)) == first
    finally:
        traffic(gateway.url, "clear", "scale")


def test_a_split_on_the_ensemble_itself_picks_its_version(gateway):
    assert "1=25% 2=75%" in traffic(gateway.url, "set", "twin", "1=25", "2=75")
    try:
        async def run():
            async with aioclient.InferenceServerClient(gateway.url) as aio:
                async def one():
                    inp = aioclient.InferInput("RAW", [1, 4], "FP32")
                    inp.set_data_from_numpy(X[:1])
                    result = await aio.infer("twin", [inp], client_timeout=TIMEOUT)
                    np.testing.assert_allclose(result.as_numpy("OUT"), X[:1] + 1.0)
                    return result.get_response().model_version
                return await asyncio.gather(*(one() for _ in range(400)))

        served = Counter(asyncio.run(run()))
        assert set(served) == {"1", "2"} and 200 < served["2"] < 380, served
    finally:
        traffic(gateway.url, "clear", "twin")


def test_a_shadow_version_of_an_ensemble_runs_its_steps_off_the_response_path(gateway, client):
    traffic(gateway.url, "set", "twin", "1=100")
    out = traffic(gateway.url, "shadow", "twin", "--to", "2", "--percent", "100")
    assert "version 2 gets a copy of 100% of requests" in out
    try:
        before = model_stats(client, "twin", "2").inference_stats.success.count
        for _ in range(20):
            result = infer(client, "twin")
            assert result.get_response().model_version == "1"
            np.testing.assert_allclose(result.as_numpy("OUT"), X + 1.0)
        wait_for(lambda: model_stats(client, "twin", "2").inference_stats.success.count
                 >= before + 20, what="the shadow ensemble to answer every copy")
    finally:
        traffic(gateway.url, "unshadow", "twin")
        traffic(gateway.url, "clear", "twin")


def test_a_step_that_fails_is_named_with_its_ensemble(client):
    with raises("INVALID_ARGUMENT", "in ensemble 'narrow', step 1 (model 'shift_two'):",
                "must be 1 to 2"):
        infer(client, "narrow", np.zeros((4, 4), np.float32))
    ok = infer(client, "narrow", np.zeros((2, 4), np.float32))
    np.testing.assert_allclose(ok.as_numpy("OUT"), np.ones((2, 4)))


def test_bad_input_is_refused_by_the_ensemble_itself(client):
    with raises("INVALID_ARGUMENT", "input 'RAW' has shape [2, 5]"):
        infer(client, "chain", np.zeros((2, 5), np.float32))


def test_ensembles_that_do_not_fit_are_unavailable_with_the_reason(client):
    rows = index_rows(client)
    reasons = {name: rows[(name, "")] for name in ("dangling", "wrong_type", "too_big", "missing",
                                                   "loop_a", "loop_b", "no_such_version")}
    assert reasons["dangling"][0] == "UNAVAILABLE"
    assert "reads ensemble tensor nowhere" in reasons["dangling"][1]
    assert ("in ensemble wrong_type, ensemble tensor RAW: inconsistent data type: INT32 is "
            "inferred from model wrong_type while FP32 is inferred from model shift"
            in reasons["wrong_type"][1])
    assert ("ensemble too_big allows maximum batch size 64, but it contains model shift which "
            "only allows maximum batch size to be 8" in reasons["too_big"][1])
    assert "ensemble missing contains models that are not available: absent" in \
        reasons["missing"][1]
    assert "circular dependency between ensembles: loop_a -> loop_b -> loop_a" in \
        reasons["loop_a"][1]
    assert "circular dependency between ensembles: loop_b -> loop_a -> loop_b" in \
        reasons["loop_b"][1]
    assert ("ensemble no_such_version contains models that are not available: shift version 7"
            in reasons["no_such_version"][1])
    with raises("UNAVAILABLE", "not available"):
        infer(client, "dangling")
    assert rows[("chain", "1")][0] == "READY"


def test_rest_clients_reach_ensembles_too(gateway):
    with httpclient.InferenceServerClient(gateway.http_url) as http:
        inp = httpclient.InferInput("RAW", [2, 4], "FP32")
        inp.set_data_from_numpy(X)
        result = http.infer("chain", [inp], model_version="1")
        np.testing.assert_allclose(result.as_numpy("OUT"), X * 3.0 + 1.0)


def test_explicit_mode_loads_what_an_ensemble_needs_and_stops_it_without(tmp_path):
    repo = build_repository(tmp_path)
    with (start_gateway(repo, "--control-mode", "explicit") as gw,
          grpcclient.InferenceServerClient(gw.url) as client):
        assert not client.is_model_ready("scale")
        client.load_model("chain")  # loads scale and shift first
        assert client.is_model_ready("scale") and client.is_model_ready("shift")
        np.testing.assert_allclose(infer(client, "chain").as_numpy("OUT"), X * 3.0 + 1.0)
        client.unload_model("shift")
        assert not client.is_model_ready("chain")
        with raises("UNAVAILABLE", "in ensemble 'chain', ensemble chain contains models that "
                                   "are not available: shift"):
            infer(client, "chain")
        assert index_rows(client)[("chain", "1")][0] == "UNAVAILABLE"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics",
                                         timeout=TIMEOUT).read().decode()
        assert 'gateway_model_ready{model="chain",version="1"} 0.0' in metrics
        with grpc.insecure_channel(gw.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="chain")).status
                     == health_pb2.HealthCheckResponse.NOT_SERVING, what="chain NOT_SERVING")
        client.load_model("shift")
        wait_for(lambda: client.is_model_ready("chain"), what="chain ready again")
        with grpc.insecure_channel(gw.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="chain")).status
                     == health_pb2.HealthCheckResponse.SERVING, what="chain SERVING again")
        np.testing.assert_allclose(infer(client, "chain").as_numpy("OUT"), X * 3.0 + 1.0)


@pytest.mark.parametrize("engine", ["in-process", "gateway"])
def test_gateway_score_runs_an_ensemble_in_process_and_remotely(engine, gateway, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = build_repository(tmp_path / "repo")
    rows = np.random.default_rng(3).standard_normal((500, 4)).astype(np.float32)
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"RAW": pa.FixedSizeListArray.from_arrays(
        pa.array(rows.reshape(-1)), 4)}), source)
    where = ["--model-repository", str(repo)] if engine == "in-process" else ["--url",
                                                                             gateway.url]
    out = tmp_path / "scores.parquet"
    done = subprocess.run([sys.executable, "-m", "gateway", "score", "chain", str(source), "-o",
                           str(out), "--chunk-rows", "64", *where], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert (done.returncode, "500 scored, 0 failed" in done.stdout) == (0, True), \
        done.stdout + done.stderr
    scores = np.array(pq.read_table(out).column("OUT").to_pylist(), np.float32)
    np.testing.assert_allclose(scores, rows * 3.0 + 1.0, rtol=1e-6)


def test_a_non_batching_ensemble_hands_a_batching_model_a_batch_of_one(client):
    x = np.arange(4, dtype=np.float32)
    result = infer(client, "flat", x)
    assert result.as_numpy("OUT").shape == (4,)
    np.testing.assert_allclose(result.as_numpy("OUT"), x + 1.0)
    assert model_stats(client, "shift_4,1", "1").inference_count >= 1


def test_ensemble_outputs_inherit_the_class_labels_of_the_model_output_behind_them(client):
    x = np.array([[0.0, 5.0, 1.0, 2.0]], np.float32)
    inp = grpcclient.InferInput("RAW", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("chain", [inp], outputs=[
        grpcclient.InferRequestedOutput("OUT", class_count=2)], client_timeout=TIMEOUT)
    top = [v.decode() for v in result.as_numpy("OUT").reshape(-1)]
    assert top == ["16.000000:1:one", "7.000000:3:three"]  # 3x + 1, labels from shift


def test_no_request_fails_while_composing_models_reload_and_splits_change(tmp_path):
    """Under steady load on an ensemble: a composing model gets a new version (poll mode loads
    it, then retires the old), another's split moves, then clears. Every answer is OK and
    comes from a version that was serving."""
    repo = build_repository(tmp_path)
    with start_gateway(repo, "--control-mode", "poll", "--poll-interval", "0.2",
                       "--state-dir", str(tmp_path / ".gateway")) as gw:
        outcomes: Counter = Counter()
        answers: Counter = Counter()

        async def load(stop: asyncio.Event):
            async with aioclient.InferenceServerClient(gw.url) as aio:
                async def caller(k):
                    while not stop.is_set():
                        inp = aioclient.InferInput("RAW", [1, 4], "FP32")
                        inp.set_data_from_numpy(X[:1])
                        try:
                            result = await aio.infer("chain", [inp], client_timeout=TIMEOUT,
                                                     headers={"x-routing-key": f"k{k}"})
                            outcomes["OK"] += 1
                            answers[float(result.as_numpy("OUT")[0, 1])] += 1
                        except InferenceServerException as exc:  # every failure is counted
                            outcomes[f"{exc.status()}: {exc.message()}"] += 1
                await asyncio.gather(*(caller(k) for k in range(16)))

        async def operate():
            stop = asyncio.Event()
            task = asyncio.ensure_future(load(stop))
            await asyncio.sleep(1.0)
            # shift version 2 appears (x + 1 as before): loaded, then version 1 retires
            replace_atomically(repo / "shift" / "2", build_shift)
            await asyncio.sleep(1.5)
            await asyncio.to_thread(traffic, gw.url, "set", "scale", "1=30", "2=70")
            await asyncio.sleep(1.0)
            await asyncio.to_thread(traffic, gw.url, "clear", "scale")
            await asyncio.sleep(1.0)
            stop.set()
            await task

        asyncio.run(operate())
        assert set(outcomes) == {"OK"}, outcomes
        assert outcomes["OK"] > 100
        assert set(answers) <= {3.0, 4.0} and answers[3.0] > 0, answers  # x=1: 2+1 or 3+1
        with grpcclient.InferenceServerClient(gw.url) as client:
            rows = index_rows(client)
            assert rows[("shift", "2")][0] == "READY" and ("shift", "1") not in rows
            assert model_stats(client, "shift", "2").inference_stats.success.count > 0
