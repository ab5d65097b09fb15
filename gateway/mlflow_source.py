"""Take a model version from an MLflow model registry: its ONNX file and its run's metadata.

``models:/NAME/VERSION`` (or ``models:/NAME@ALIAS``) is resolved with MLflow's own client, so
every store MLflow reaches works (a local ``file:`` store, a database, a tracking server);
the store comes from ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` as usual. The model's
artifacts are downloaded, the ONNX file is the one its ``MLmodel`` names in the ``onnx``
flavor (else the only ``*.onnx`` file), and the registered version, its run's parameters,
metrics and tags go into the new version's metadata.json under ``mlflow``.

Needs ``pip install 'model-serving-gateway[mlflow]'`` (mlflow-skinny is enough).
"""

from __future__ import annotations

import re
from pathlib import Path

from gateway.errors import FailedPrecondition, InvalidArgument, NotFound, echo

# Used with fullmatch ("$" would let a trailing newline through); no control characters.
URI = re.compile(r"models:/(?P<name>[^/@\x00-\x1f\x7f]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))",
                 re.ASCII)


def fetch(uri: str, workdir: Path) -> tuple[Path, dict]:
    """Download the model behind ``uri`` into ``workdir``: (onnx file, metadata)."""
    match = URI.fullmatch(uri.strip())
    if match is None:
        raise InvalidArgument(f"'{echo(uri)}' is not an MLflow model URI like models:/NAME/VERSION "
                              "or models:/NAME@ALIAS")
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FailedPrecondition("publishing from MLflow needs MLflow: pip install "
                                 "'model-serving-gateway[mlflow]'") from None
    name = match["name"]
    try:
        client = MlflowClient()
        if match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"])
        else:
            version = client.get_model_version(name, match["version"])
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version.version}", dst_path=str(workdir / "mlflow")))
        run = client.get_run(version.run_id) if version.run_id else None
    except MlflowException as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NotFound(f"MLflow model {uri}: {message}") from None
    model_file = _onnx_file(local, uri)
    metadata = {"model_uri": uri, "registered_model": name, "model_version": str(version.version),
                "source": version.source, "run_id": version.run_id or ""}
    if version.description:
        metadata["description"] = version.description
    if version.tags:
        metadata["version_tags"] = dict(version.tags)
    if run is not None:
        metadata.update({
            "experiment_id": run.info.experiment_id,
            "run_name": run.info.run_name or "",
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        })
    return model_file, {"mlflow": metadata}


def _onnx_file(local: Path, uri: str) -> Path:
    if local.is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        import yaml

        try:
            flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
        except yaml.YAMLError:
            flavors = {}
        data = (flavors.get("onnx") or {}).get("data")
        if isinstance(data, str) and (local / data).is_file():
            return local / data
    candidates = sorted(local.rglob("*.onnx"))
    if len(candidates) == 1:
        return candidates[0]
    raise InvalidArgument(f"MLflow model {uri} has {'no' if not candidates else 'several'} "
                          "ONNX files and its MLmodel names no onnx flavor file; log it with "
                          "mlflow.onnx.log_model")
