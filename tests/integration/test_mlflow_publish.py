"""Publishing from an MLflow model registry (a local file-backed store): the ONNX file and the
run's metadata land in the repository, directly or through a running gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import ROOT, start_gateway

from bench import models

mlflow = pytest.importorskip(
    "mlflow", reason="MLflow is not installed (pip install 'model-serving-gateway[mlflow]')")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file-backed MLflow store with registered model 'iris' version 1: an ONNX model logged
    in MLflow's onnx flavor layout by a run with parameters, metrics and tags."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = (root / "mlruns").as_uri()
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run = client.create_run(client.create_experiment("iris-training"))
        run_id = run.info.run_id
        client.log_param(run_id, "C", "1.0")
        client.log_metric(run_id, "accuracy", 0.97)
        client.set_tag(run_id, "data", "iris-2026-11")
        artifact = root / "artifact"
        models.build_iris_classifier(artifact / "model.onnx")
        (artifact / "MLmodel").write_text(
            "artifact_path: model\nflavors:\n  onnx:\n    data: model.onnx\n"
            "    onnx_version: 1.16.0\n")
        client.log_artifacts(run_id, str(artifact), "model")
        client.set_terminated(run_id)
        client.create_registered_model("iris")
        client.create_model_version("iris", f"{run.info.artifact_uri}/model", run_id)
        yield {"env": env, "run_id": run_id, "onnx": artifact / "model.onnx"}
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def gateway_cli(store, *args):
    done = subprocess.run([sys.executable, "-m", "gateway", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=180, check=False,
                          env={**os.environ, **store["env"]})
    return done.returncode, done.stdout, done.stderr


def test_publish_from_mlflow_into_a_repository(store, tmp_path):
    code, out, err = gateway_cli(store, "publish", "iris", "--from-mlflow", "models:/iris/1",
                                 "--repository", tmp_path, "--metadata", "ticket=ML-7")
    assert code == 0, err
    assert "published model iris version 1" in out
    version = tmp_path / "iris" / "1"
    assert (version / "model.onnx").read_bytes() == store["onnx"].read_bytes()
    meta = json.loads((version / "metadata.json").read_text())
    info = meta["metadata"]["mlflow"]
    assert meta["metadata"]["ticket"] == "ML-7"
    assert (info["model_uri"], info["registered_model"], info["model_version"]) == \
        ("models:/iris/1", "iris", "1")
    assert info["run_id"] == store["run_id"]
    assert info["params"] == {"C": "1.0"} and info["metrics"] == {"accuracy": 0.97}
    assert info["tags"] == {"data": "iris-2026-11"}
    code, out, _ = gateway_cli(store, "versions", "iris", "--repository", tmp_path)
    assert code == 0 and f"mlflow=models:/iris/1 run {store['run_id']}" in out


def test_publish_from_mlflow_through_a_gateway(store, tmp_path):
    models.make_version(tmp_path, "iris", 1, models.build_iris_classifier)
    with start_gateway(tmp_path) as gw:
        code, out, err = gateway_cli(store, "publish", "iris", "--from-mlflow",
                                     "models:/iris/1", "--url", gw.url)
        assert code == 0, err
        assert "published model iris version 2" in out and "state: READY" in out
    meta = json.loads((tmp_path / "iris" / "2" / "metadata.json").read_text())
    assert meta["metadata"]["mlflow"]["run_id"] == store["run_id"]


def test_unknown_mlflow_models_are_refused(store, tmp_path):
    code, _, err = gateway_cli(store, "publish", "iris", "--from-mlflow", "models:/iris/9",
                               "--repository", tmp_path)
    assert code == 1 and "refused (NOT_FOUND): MLflow model models:/iris/9" in err
    code, _, err = gateway_cli(store, "publish", "iris", "--from-mlflow", "runs:/abc/model",
                               "--repository", tmp_path)
    assert code == 1 and "is not an MLflow model URI like models:/NAME/VERSION" in err
    assert list(tmp_path.iterdir()) == []
