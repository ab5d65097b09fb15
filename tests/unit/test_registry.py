"""The registry on disk: checks, version numbering, atomic writes, metadata, baselines."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench import models
from gateway import publish
from gateway.errors import InvalidArgument
from gateway.monitoring.stats import read_baseline
from gateway.registry import (
    PublishRefused,
    canary_steps,
    list_versions,
    publish_version,
    signature_problems,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {
        "iris": models.build_iris_classifier(d / "iris.onnx"),
        "mlp": models.build_mlp(d / "mlp.onnx", (4, 8, 3), seed=1),
        "mlp2": models.build_mlp(d / "mlp2.onnx", (4, 8, 3), seed=2),
        "wide": models.build_mlp(d / "wide.onnx", (6, 8, 3)),
        "garbage": _write(d / "garbage.onnx", b"not a model \x00\xff" * 40),
        "truncated": _write(d / "truncated.onnx",
                            models.build_mlp(d / "t.onnx").read_bytes()[:300]),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tree(root: Path) -> list[str]:
    """Every path under root (hidden ones included), relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_versions_are_numbered_after_the_newest(tmp_path, files):
    first = publish_version(tmp_path, "m", files["mlp"])
    assert first.version == 1 and first.path == tmp_path / "m" / "1"
    assert publish_version(tmp_path, "m", files["mlp2"]).version == 2
    models.make_version(tmp_path, "m", 7, models.build_mlp, (4, 8, 3))  # a gap, made by hand
    assert publish_version(tmp_path, "m", files["mlp"]).version == 8
    (tmp_path / "m" / "not-a-version").mkdir()
    assert publish_version(tmp_path, "m", files["mlp"]).version == 9
    assert [v["version"] for v in list_versions(tmp_path, "m")] == [1, 2, 7, 8, 9]


def test_metadata_records_the_file_and_the_caller(tmp_path, files):
    done = publish_version(tmp_path, "m", files["mlp"],
                           metadata={"run_id": "run-42", "accuracy": 0.97})
    meta = json.loads((done.path / "metadata.json").read_text())
    data = files["mlp"].read_bytes()
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["size"] == len(data)
    assert meta["version"] == 1 and meta["model"] == "m" and meta["file"] == "model.onnx"
    assert meta["source"] == "mlp.onnx"
    assert meta["metadata"] == {"run_id": "run-42", "accuracy": 0.97}
    assert abs(meta["created_unix"] - time.time()) < 600
    assert time.strptime(meta["created"], "%Y-%m-%dT%H:%M:%SZ")
    assert meta["signature"] == {
        "inputs": [{"name": "input", "datatype": "FP32", "dims": [-1, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "dims": [-1, 3]}]}
    assert meta["baseline"] is None
    assert (done.path / "model.onnx").read_bytes() == data
    umask = os.umask(0o022)
    os.umask(umask)
    for directory in (done.path, tmp_path / "m"):  # as mkdir makes them, not mkdtemp's 0700
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_model_filename_of_the_config_is_used(tmp_path, files):
    models.make_version(tmp_path, "m", 1, models.build_mlp, (4, 8, 3))
    os.rename(tmp_path / "m" / "1" / "model.onnx", tmp_path / "m" / "1" / "net.onnx")
    models.write_config(tmp_path / "m", 'default_model_filename: "net.onnx"')
    done = publish_version(tmp_path, "m", files["mlp2"])
    assert (done.path / "net.onnx").is_file() and not (done.path / "model.onnx").exists()


@pytest.mark.parametrize("name, fragment", [
    ("garbage", "garbage.onnx is not a valid ONNX model"),
    ("truncated", "truncated.onnx is not a valid ONNX model"),
])
def test_corrupt_files_are_refused_and_leave_nothing(tmp_path, files, name, fragment):
    publish_version(tmp_path, "m", files["mlp"])
    before = tree(tmp_path)
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "m", files[name])
    assert fragment in info.value.message
    assert str(tmp_path) not in info.value.message
    assert tree(tmp_path) == before
    with pytest.raises(PublishRefused):  # a new model: not even its directory appears
        publish_version(tmp_path, "fresh", files[name])
    assert tree(tmp_path) == before


def test_without_onnx_the_runtime_still_checks(tmp_path, files, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError("no onnx here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "m", files["garbage"])
    assert "ONNX Runtime cannot open garbage.onnx" in info.value.message
    assert tree(tmp_path) == []


def test_an_incompatible_signature_is_refused_unless_allowed(tmp_path, files):
    publish_version(tmp_path, "m", files["mlp"])
    before = tree(tmp_path)
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "m", files["wide"])
    assert info.value.message.startswith(
        "the model's inputs/outputs differ from version 1's: input 'input' has shape [-1, 6] "
        "(was [-1, 4]). Callers of the model would break; publish with "
        "--allow-signature-change")
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "m", files["iris"])
    assert "output 'output' is gone" in info.value.message
    assert tree(tmp_path) == before
    done = publish_version(tmp_path, "m", files["wide"], allow_signature_change=True)
    assert done.version == 2


def test_the_config_is_checked_too(tmp_path, files):
    models.make_version(tmp_path, "m", 1, models.build_mlp, (4, 8, 3))
    models.write_config(tmp_path / "m", """
        max_batch_size: 8
        input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "output" data_type: TYPE_FP32 dims: [ 3 ] } ]
    """)
    before = tree(tmp_path)
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "m", files["wide"])
    assert "does not fit model 'm''s config.pbtxt: input 'input' has dims [4]" in \
        info.value.message
    assert tree(tmp_path) == before


def test_a_version_without_metadata_is_compared_by_opening_it(tmp_path, files):
    models.make_version(tmp_path, "m", 3, models.build_mlp, (4, 8, 3))  # made by hand
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "m", files["wide"])
    assert "differ from version 3's" in info.value.message
    assert publish_version(tmp_path, "m", files["mlp2"]).version == 4


def test_signature_rules():
    old = {"inputs": [{"name": "x", "datatype": "FP32", "dims": [-1, 4]}],
           "outputs": [{"name": "y", "datatype": "FP32", "dims": [-1, 3]}]}
    same = json.loads(json.dumps(old))
    assert signature_problems(old, same) == []
    more_outputs = json.loads(json.dumps(old))
    more_outputs["outputs"].append({"name": "z", "datatype": "INT64", "dims": [-1]})
    assert signature_problems(old, more_outputs) == []
    dynamic = json.loads(json.dumps(old))
    dynamic["inputs"][0]["dims"] = [-1, -1]
    assert signature_problems(old, dynamic) == []
    retyped = json.loads(json.dumps(old))
    retyped["inputs"][0]["datatype"] = "FP64"
    retyped["inputs"].append({"name": "mask", "datatype": "BOOL", "dims": [-1]})
    assert signature_problems(old, retyped) == ["input 'mask' is new",
                                                "input 'x' is FP64 (was FP32)"]


def test_the_staged_version_is_complete_before_it_is_renamed_in(tmp_path, files, monkeypatch):
    publish_version(tmp_path, "m", files["mlp"])
    seen = {}
    real_rename = os.rename

    def spy(src, dst):
        seen["src"], seen["dst"] = Path(src), Path(dst)
        seen["files"] = sorted(p.name for p in Path(src).iterdir())
        seen["visible"] = Path(dst).exists()
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    publish_version(tmp_path, "m", files["mlp2"], baseline=np.ones((20, 4), np.float32))
    assert seen["src"].parent == tmp_path / "m" and seen["src"].name.startswith(".publish-")
    assert seen["dst"] == tmp_path / "m" / "2"
    assert seen["files"] == ["baseline.npz", "metadata.json", "model.onnx"]
    assert not seen["visible"]
    assert tree(tmp_path / "m") == ["1", "1/metadata.json", "1/model.onnx", "2",
                                    "2/baseline.npz", "2/metadata.json", "2/model.onnx"]


def test_a_failure_while_writing_leaves_nothing(tmp_path, files, monkeypatch):
    publish_version(tmp_path, "m", files["mlp"])
    before = tree(tmp_path)

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", broken)
    with pytest.raises(OSError):
        publish_version(tmp_path, "m", files["mlp2"])
    assert tree(tmp_path) == before


def test_a_new_model_appears_whole(tmp_path, files, monkeypatch):
    real_rename = os.rename
    renamed = []
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append((Path(a), Path(b))),
                                                    real_rename(a, b)))
    done = publish_version(tmp_path, "fresh", files["mlp"])
    assert done.version == 1
    (src, dst), = renamed
    assert src.parent == tmp_path and src.name.startswith(".publish-") and dst == tmp_path / "fresh"
    assert tree(tmp_path) == ["fresh", "fresh/1", "fresh/1/metadata.json", "fresh/1/model.onnx"]


def test_stale_staging_directories_are_cleaned(tmp_path, files):
    publish_version(tmp_path, "m", files["mlp"])
    stale = tmp_path / "m" / ".publish-crashed"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    recent = tmp_path / "m" / ".publish-running"
    recent.mkdir()
    publish_version(tmp_path, "m", files["mlp2"])
    assert not stale.exists() and recent.exists()


def test_concurrent_publishers_get_distinct_versions(tmp_path, files):
    publish_version(tmp_path, "m", files["mlp"])
    results, errors = [], []

    def worker():
        try:
            results.append(publish_version(tmp_path, "m", files["mlp2"]).version)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [2, 3, 4, 5]
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]


# ---- baselines ---------------------------------------------------------------------------------

def test_a_npy_baseline_is_the_first_inputs_data(tmp_path, files):
    data = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    np.save(tmp_path / "train.npy", data)
    (tmp_path / "repo").mkdir()
    done = publish_version(tmp_path / "repo", "iris", files["iris"],
                           baseline=tmp_path / "train.npy")
    baseline = read_baseline(done.path / "baseline.npz")
    assert list(baseline) == ["input"]
    assert baseline["input"].samples == 200
    per_feature = baseline["input"].features >= 0
    np.testing.assert_allclose(baseline["input"].mean[per_feature], data.mean(axis=0), rtol=1e-4,
                               atol=1e-5)
    assert done.metadata["baseline"] == {"inputs": ["input"], "samples": 200}


def test_a_npz_baseline_is_keyed_by_input_name(tmp_path, files):
    repo = tmp_path / "repo"
    repo.mkdir()
    models.make_version(tmp_path / "src", "", 1, models.build_add_sub)
    x = np.ones((30, 16), np.float32)
    np.savez(tmp_path / "train.npz", INPUT0=x, INPUT1=x * 2)
    done = publish_version(repo, "add", tmp_path / "src" / "1" / "model.onnx",
                           baseline=tmp_path / "train.npz")
    assert sorted(read_baseline(done.path / "baseline.npz")) == ["INPUT0", "INPUT1"]
    np.savez(tmp_path / "bad.npz", INPUT0=x, typo=x)
    before = tree(repo)
    with pytest.raises(PublishRefused) as info:
        publish_version(repo, "add", tmp_path / "src" / "1" / "model.onnx",
                        baseline=tmp_path / "bad.npz")
    assert info.value.message == ("baseline: 'typo' is not an input of the model (inputs: "
                                  "INPUT0, INPUT1)")
    assert tree(repo) == before


@pytest.mark.parametrize("data, fragment", [
    (np.ones((10, 5), np.float32), "samples of shape [5] do not fit the input's [4]"),
    (np.array(["a", "b"]), "numeric data needed"),
    (np.ones((0, 4), np.float32), "needs samples along the first dimension"),
])
def test_unusable_baselines_are_refused(tmp_path, files, data, fragment):
    np.save(tmp_path / "b.npy", data)
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "iris", files["iris"], baseline=tmp_path / "b.npy")
    assert fragment in info.value.message
    assert tree(tmp_path) == ["b.npy"]


def test_an_unreadable_baseline_file_is_refused(tmp_path, files):
    (tmp_path / "b.npy").write_bytes(b"nope")
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "iris", files["iris"], baseline=tmp_path / "b.npy")
    assert "baseline b.npy: not a readable .npy/.npz file" in info.value.message


def test_the_python_hook_accepts_arrays(tmp_path, files):
    result = publish("iris", files["iris"], repository=tmp_path, metadata={"run": "r1"},
                     baseline=np.ones((12, 4), np.float32))
    assert (result.version, result.state) == (1, "WRITTEN")
    assert result.metadata["baseline"] == {"inputs": ["input"], "samples": 12}
    with pytest.raises(InvalidArgument, match="either repository"):
        publish("iris", files["iris"])
    with pytest.raises(InvalidArgument, match="a canary needs a running gateway"):
        publish("iris", files["iris"], repository=tmp_path, canary=10)


def test_canary_steps():
    assert canary_steps(10) == (10.0, 25.0, 50.0, 100.0)
    assert canary_steps(5) == (5.0, 25.0, 50.0, 100.0)
    assert canary_steps(60) == (60.0, 100.0)
    for bad in (0, 100, -5, 150):
        with pytest.raises(InvalidArgument):
            canary_steps(bad)


def test_invalid_model_names_are_refused(tmp_path, files):
    # A trailing newline used to pass ("$" matches before it): full-match validation now.
    for name in ("../escape", ".hidden", "a/b", "", "newmodel\n", "m\nx", "-dash", "x" * 129):
        with pytest.raises(InvalidArgument):
            publish_version(tmp_path, name, files["mlp"])
    assert tree(tmp_path) == []


def _npz(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _zip(**members) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("data, fragment", [
    (b"garbage" * 20, "not a readable npz (zip) archive (BadZipFile)"),
    (b"PK\x03\x04" + b"\x00" * 60, "not a readable npz (zip) archive (BadZipFile)"),
    (_npz(x=np.arange(3))[:-30], "not a readable npz (zip) archive (BadZipFile)"),
    (_zip(**{"format.npy": b"hello"}), "baseline.npz is not usable: "),
    (_npz(format=np.array("abc")), "baseline.npz is not usable: "),
    (_npz(format=np.array([1, 2])), "baseline.npz is not usable: an array cannot be read"),
    (_npz(format=np.array(1)), "baseline.npz is not usable: missing array"),
    (_npz(format=np.array(1), inputs=np.array(["input"]), features_0=np.zeros(2)),
     "baseline.npz is not usable: missing array"),
])
def test_a_garbage_baseline_npz_is_refused_as_the_callers_bad_input(tmp_path, files, data,
                                                                       fragment):
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "iris", files["iris"], baseline_npz=data)
    assert info.value.code == "INVALID_ARGUMENT"
    assert fragment in info.value.message, info.value.message
    assert tree(tmp_path) == []


def test_a_baseline_npz_that_decompresses_past_the_limit_is_never_read(tmp_path, files,
                                                                        monkeypatch):
    import gateway.registry

    monkeypatch.setattr(gateway.registry, "MAX_BASELINE_BYTES", 4096)
    bomb = _zip(**{"format.npy": b"\x00" * 5000})  # a zip bomb, in small
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was called"))
    with pytest.raises(PublishRefused) as info:
        publish_version(tmp_path, "iris", files["iris"], baseline_npz=bomb)
    assert info.value.message == ("baseline.npz is not usable: its arrays hold 5000 bytes; the "
                                  "limit is 4096")
    assert tree(tmp_path) == []
