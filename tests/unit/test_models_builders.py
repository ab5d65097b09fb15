"""Model builders give valid ONNX that onnxruntime runs; the committed demo repository is fresh."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench import models

ROOT = Path(__file__).resolve().parents[2]

NUMPY_OF = {"BOOL": np.bool_, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


def _session(path: Path) -> ort.InferenceSession:
    onnx.checker.check_model(onnx.load(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature(values) -> list[tuple[str, str, list]]:
    return [(v.name, v.type, list(v.shape)) for v in values]


def test_mlp_runs_with_dynamic_batch_and_finite_nontrivial_outputs(tmp_path):
    sess = _session(models.build_mlp(tmp_path / "m.onnx"))
    assert _signature(sess.get_inputs()) == [("input", "tensor(float)", ["batch", 32])]
    assert _signature(sess.get_outputs()) == [("output", "tensor(float)", ["batch", 4])]
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 32)).astype(np.float32)
        (y,) = sess.run(None, {"input": x})
        assert y.shape == (batch, 4) and y.dtype == np.float32
        assert np.isfinite(y).all() and 0.05 < np.abs(y).mean() < 100


def test_mlp_custom_layers_and_names(tmp_path):
    sess = _session(
        models.build_mlp(tmp_path / "m.onnx", (8, 16, 3), seed=1, input_name="x", output_name="y")
    )
    (y,) = sess.run(None, {"x": np.ones((2, 8), np.float32)})
    assert y.shape == (2, 3)


def test_mlp_is_deterministic_and_seeded(tmp_path):
    a = models.build_mlp(tmp_path / "a.onnx").read_bytes()
    assert a == models.build_mlp(tmp_path / "b.onnx").read_bytes()
    assert a != models.build_mlp(tmp_path / "c.onnx", seed=1).read_bytes()


def test_iris_classifier_outputs_and_accuracy(tmp_path):
    from sklearn.datasets import load_iris

    sess = _session(models.build_iris_classifier(tmp_path / "iris.onnx"))
    assert _signature(sess.get_inputs()) == [("input", "tensor(float)", ["batch", 4])]
    assert _signature(sess.get_outputs()) == [
        ("label", "tensor(int64)", ["batch"]),
        ("probabilities", "tensor(float)", ["batch", 3]),
    ]
    x, y = load_iris(return_X_y=True)
    label, proba = sess.run(None, {"input": x.astype(np.float32)})
    assert label.shape == (150,) and label.dtype == np.int64
    assert proba.shape == (150, 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (label == y).mean() > 0.9


@pytest.mark.parametrize("datatype", sorted(models.DATATYPE_TO_ONNX))
def test_identity_round_trips_every_datatype(tmp_path, datatype):
    sess = _session(models.build_identity(tmp_path / "id.onnx", datatype))
    if datatype == "BYTES":  # ORT string tensors take and give str objects (see test below)
        x = np.array([["a", ""], ["x\x00z", "\u00e9"]], dtype=object)
    else:
        x = (np.arange(6).reshape(2, 3) % 2).astype(NUMPY_OF.get(datatype, datatype.lower()))
    (y,) = sess.run(["OUTPUT0"], {"INPUT0": x})
    assert y.dtype == x.dtype and y.shape == x.shape and (y == x).all()


def test_onnxruntime_string_tensors_hold_text_not_bytes(tmp_path):
    """Pins ORT behaviour the BYTES codec must handle: bytes objects are str()-ed, not passed
    through, so a runtime has to decode BYTES to str (UTF-8) before run() and encode outputs
    back."""
    sess = _session(models.build_identity(tmp_path / "id.onnx", "BYTES"))
    (y,) = sess.run(None, {"INPUT0": np.array([[b"ab"]], dtype=object)})
    assert y[0, 0] == "b'ab'"


def test_add_sub(tmp_path):
    sess = _session(models.build_add_sub(tmp_path / "as.onnx"))
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)
    out0, out1 = sess.run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)


def test_failing_model_fails_only_on_bad_values(tmp_path):
    sess = _session(models.build_failing_model(tmp_path / "f.onnx"))
    (y,) = sess.run(None, {"INPUT0": np.array([[0, 1.5, 2, 9.9]], np.float32)})
    np.testing.assert_array_equal(y, [[0, 1, 2, 9]])
    with pytest.raises(Exception, match="out of data bounds"):
        sess.run(None, {"INPUT0": np.array([[0, 1, models.FAIL_THRESHOLD, 2]], np.float32)})


def test_failing_model_always(tmp_path):
    sess = _session(models.build_failing_model(tmp_path / "f.onnx", always=True))
    for batch in (1, 2, 4):
        with pytest.raises(Exception, match="Reshape"):
            sess.run(None, {"INPUT0": np.zeros((batch, 4), np.float32)})


def test_sequence_output_model(tmp_path):
    sess = _session(models.build_sequence_output_model(tmp_path / "s.onnx"))
    assert _signature(sess.get_outputs()) == [
        ("OUTPUT0", "tensor(float)", ["batch", 3]),
        ("OUTPUT1", "seq(map(int64,tensor(float)))", []),
    ]
    x = np.array([[0.1, 0.2, 0.7]], np.float32)
    out0, out1 = sess.run(None, {"INPUT0": x})
    np.testing.assert_array_equal(out0, x)
    assert isinstance(out1, list) and sorted(out1[0]) == [0, 1, 2]


def test_make_version_and_write_config(tmp_path):
    path = models.make_version(tmp_path, "m", 3, models.build_add_sub)
    assert path == tmp_path / "m" / "3" / "model.onnx" and path.is_file()
    cfg = models.write_config(
        tmp_path / "m",
        """
        name: "m"
        max_batch_size: 8
    """,
    )
    assert cfg.read_text() == 'name: "m"\nmax_batch_size: 8\n'


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_repository_is_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "build_demo_models", ROOT / "scripts" / "build_demo_models.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.build_demo_repository(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [str(p) for p in fresh] == [
        "iris_classifier/1/model.onnx",
        "iris_classifier/config.pbtxt",
        "tiny_mlp/1/model.onnx",
        "tiny_mlp/config.pbtxt",
    ]
    stale = [str(p) for p in fresh if _sha256(tmp_path / p) != _sha256(script.DEMO_REPOSITORY / p)]
    assert not stale, f"{stale} differ from a fresh build: run python scripts/build_demo_models.py"
    for p in fresh:
        if p.suffix == ".onnx":
            _session(script.DEMO_REPOSITORY / p)
