"""Ground-truth feedback against a real gateway: requests with ids, labels through the CLI and
the admin API, accuracy and mean absolute error per version in the API and on /metrics."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_iris
from support import ROOT, TIMEOUT, reference, start_gateway

from bench import models
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc


def gateway_cli(*args):
    done = subprocess.run([sys.executable, "-m", "gateway", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    repo = tmp_path_factory.mktemp("feedback_repo")
    for version in (1, 2):
        models.make_version(repo, "iris", version, models.build_iris_classifier)
    models.write_config(repo / "iris", "version_policy { all { } }")
    (repo / "iris" / "gateway.yaml").write_text("feedback: {}\n")
    models.make_version(repo, "price", 1, models.build_mlp, (4, 8, 1), seed=3)
    (repo / "price" / "gateway.yaml").write_text("feedback:\n  kind: regression\n")
    models.make_version(repo, "plain", 1, models.build_iris_classifier)  # feedback off
    with start_gateway(repo) as gw, grpc.insecure_channel(gw.url) as channel:
        gw.repo = repo
        gw.admin = apb_grpc.GatewayAdminStub(channel)
        assert gateway_cli("traffic", "set", "iris", "1=50", "2=50", "--url", gw.url)[0] == 0
        yield gw
    assert gw.process.returncode == 0, gw.log()


def infer(client, model, x, request_id=""):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], request_id=request_id, client_timeout=TIMEOUT)


def metric(url_port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{url_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(name)}


def test_classification_accuracy_per_version(gateway, tmp_path):
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    served, predicted = {}, {}
    with grpcclient.InferenceServerClient(gateway.url) as client:
        for i in range(len(x)):
            result = infer(client, "iris", x[i:i + 1], f"iris-{i}")
            served[f"iris-{i}"] = result.get_response().model_version
            predicted[f"iris-{i}"] = int(result.as_numpy("label")[0])
        infer(client, "iris", x[:1])  # no id: nothing kept
    assert set(served.values()) == {"1", "2"}
    # One label through --id, the rest from a CSV file (with a header and an unknown id).
    code, out, err = gateway_cli("feedback", "iris", "--id", "iris-0", "--label", str(y[0]),
                                 "--url", gateway.url)
    assert code == 0, err
    assert out.startswith("1 labels joined, 0 unknown request ids, 0 refused")
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"iris-{i},{y[i]}\n" for i in range(1, len(x)))
                      + "never-sent,1\n")
    code, out, err = gateway_cli("feedback", "iris", "--file", labels, "--url", gateway.url)
    assert code == 0, err
    assert out.startswith(f"{len(x) - 1} labels joined, 1 unknown request ids, 0 refused")
    assert "unknown: never-sent" in out

    status = gateway.admin.GetFeedback(apb.GetFeedbackRequest(model="iris"), timeout=TIMEOUT)
    assert (status.kind, status.output, status.kept, status.unmatched) == \
        ("classification", "label", 0, 1)
    expected = {}
    for version in ("1", "2"):
        ids = [i for i, v in served.items() if v == version]
        right = sum(predicted[i] == y[int(i.split("-")[1])] for i in ids)
        expected[version] = (len(ids), right)
    assert {v.version: (v.labelled, v.correct) for v in status.versions} == expected
    for v in status.versions:
        assert v.accuracy == pytest.approx(v.correct / v.labelled)
        assert v.accuracy > 0.9  # a logistic regression on its own training data
    code, out, _ = gateway_cli("feedback", "iris", "--url", gateway.url)
    assert code == 0
    assert "model iris: classification on output 'label'" in out
    assert f"{expected['1'][0]:>9}  {expected['1'][1] / expected['1'][0]:>9.2%}" in out
    values = metric(gateway.metrics_port, "gateway_feedback_accuracy_ratio")
    for v in status.versions:
        key = f'gateway_feedback_accuracy_ratio{{model="iris",version="{v.version}"}}'
        assert values[key] == pytest.approx(v.accuracy)
    counts = metric(gateway.metrics_port, "gateway_feedback_labelled_total")
    assert counts['gateway_feedback_labelled_total{model="iris",version="1"}'] == expected["1"][0]


def test_regression_mean_absolute_error_and_batched_requests(gateway):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with grpcclient.InferenceServerClient(gateway.url) as client:
        output = infer(client, "price", x, "batch-1").as_numpy("output")
    np.testing.assert_allclose(output, reference(gateway.repo / "price" / "1" / "model.onnx",
                                                 {"input": x})[0], rtol=1e-5)
    truth = output[:, 0] + np.array([1.0, -2.0, 0.5], np.float32)
    code, out, err = gateway_cli("feedback", "price", "--id", "batch-1", "--label", "1",
                                 "--url", gateway.url)
    assert code == 0, err
    assert "1 refused" in out and "had 3 row(s); 1 label(s) given" in out
    args = [a for t in truth for a in ("--label", repr(float(t)))]
    code, out, err = gateway_cli("feedback", "price", "--id", "batch-1", *args,
                                 "--url", gateway.url)
    assert code == 0, err
    assert "model price: regression on output 'output'" in out
    status = gateway.admin.GetFeedback(apb.GetFeedbackRequest(model="price"), timeout=TIMEOUT)
    (row,) = status.versions
    assert row.labelled == 3 and row.mean_absolute_error == pytest.approx(3.5 / 3, rel=1e-5)
    values = metric(gateway.metrics_port, "gateway_feedback_mean_absolute_error")
    assert values['gateway_feedback_mean_absolute_error{model="price",version="1"}'] == \
        pytest.approx(3.5 / 3, rel=1e-5)


def test_models_without_feedback_say_how_to_turn_it_on(gateway):
    code, _, err = gateway_cli("feedback", "plain", "--id", "x", "--label", "1",
                               "--url", gateway.url)
    assert code == 1
    assert "NOT_FOUND: model 'plain' does not keep predictions for feedback: add 'feedback: {}'" \
        in err
    code, _, err = gateway_cli("feedback", "nope", "--url", gateway.url)
    assert code == 1 and "NOT_FOUND: unknown model 'nope'" in err
    code, _, err = gateway_cli("feedback", "iris", "--label", "1", "--url", gateway.url)
    assert code == 2 and "--label needs --id" in err


def test_rollouts_can_require_feedback_accuracy(gateway):
    """Runs after the classification test: both iris versions have labelled predictions."""
    code, out, err = gateway_cli("rollout", "start", "iris", "--to", "2", "--from", "1",
                                 "--interval", "1h", "--min-accuracy-ratio", "0.95",
                                 "--min-labels", "10", "--url", gateway.url)
    assert code == 0, err
    assert "accuracy >= 0.95x baseline (after 10 labels each)" in out
    assert "canary    " in out and "baseline  " in out
    lines = [line for line in out.splitlines() if "labelled predictions, accuracy" in line]
    assert len(lines) == 2, out
    code, out, _ = gateway_cli("rollout", "abort", "iris", "--url", gateway.url)
    assert code == 0 and "is aborted" in out
    code, _, err = gateway_cli("rollout", "start", "plain", "--to", "1", "--min-accuracy-ratio",
                               "0.9", "--url", gateway.url)
    assert code == 1
    assert "FAILED_PRECONDITION: --min-accuracy-ratio needs ground-truth feedback" in err
