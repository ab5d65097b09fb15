"""Triton's classification extension, without a server: the top classes as Triton writes them."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.classification import classify, read_labels
from gateway.errors import InvalidArgument, ModelLoadError
from gateway.tensors import Tensor


def test_top_classes_per_batch_entry_with_labels_highest_first():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    out = classify(Tensor("p", "FP32", scores), 2, ("cat", "dog"), batching=True)
    assert (out.name, out.datatype, out.data.shape) == ("p", "BYTES", (2, 2))
    assert out.data.tolist() == [[b"0.700000:1:dog", b"0.200000:2"],
                                 [b"0.500000:0:cat", b"0.250000:1:dog"]]


def test_count_is_clipped_integers_stay_integers_and_no_batch_dimension():
    out = classify(Tensor("c", "INT32", np.array([3, 9, 1], np.int32)), 10, (), batching=False)
    assert out.data.tolist() == [b"9:1", b"3:0", b"1:2"]


def test_text_outputs_cannot_be_classified():
    with pytest.raises(InvalidArgument, match="output 't' holds BYTES"):
        classify(Tensor("t", "BYTES", np.array([b"a"], object)), 1, (), batching=False)


def test_labels_are_read_from_the_model_directory_only(tmp_path):
    (tmp_path / "labels.txt").write_text("a\nb\n")
    assert read_labels(tmp_path, "labels.txt") == ("a", "b")
    with pytest.raises(ModelLoadError, match="label_filename 'missing.txt' cannot be read"):
        read_labels(tmp_path, "missing.txt")
    with pytest.raises(ModelLoadError, match="must name a file in the model directory"):
        read_labels(tmp_path, "../etc/passwd")
