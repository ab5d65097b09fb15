"""Triton's classification extension: an output asked for with ``classification: K`` is
answered as its K highest values per batch entry, as BYTES strings ``"value:index"`` or
``"value:index:label"`` (labels from the output's ``label_filename`` in the model directory),
highest first; values are written as C's ``%f`` (integers as ``%d``), as Triton writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.errors import InvalidArgument, ModelLoadError
from gateway.tensors import Tensor


def read_labels(model_dir: Path, filename: str) -> tuple[str, ...]:
    """One label per line of ``<model_dir>/<filename>``; a missing file fails the load."""
    path = Path(model_dir) / filename
    if Path(filename).is_absolute() or ".." in Path(filename).parts:
        raise ModelLoadError(f"label_filename '{filename}' must name a file in the model "
                             "directory")
    try:
        return tuple(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"label_filename '{filename}' cannot be read: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None


def classify(tensor: Tensor, count: int, labels: tuple[str, ...], batching: bool) -> Tensor:
    """The top ``count`` classes of each batch entry of ``tensor`` (all of it without
    batching) as a BYTES tensor of shape [batch, k] (or [k])."""
    if tensor.datatype == "BYTES":
        raise InvalidArgument(f"output '{tensor.name}' holds BYTES: classification needs "
                              "numeric scores")
    data = tensor.data
    rows = data.reshape(data.shape[0] if batching and data.ndim else 1, -1)
    k = min(count, rows.shape[1])
    integer = np.issubdtype(rows.dtype, np.integer) or rows.dtype == np.bool_
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, indexes in enumerate(order):
        for j, index in enumerate(indexes):
            value = rows[r, index]
            text = f"{int(value)}:{index}" if integer else f"{float(value):f}:{index}"
            if index < len(labels):
                text += f":{labels[index]}"
            out[r, j] = text.encode("utf-8")
    return Tensor(tensor.name, "BYTES", out if batching else out.reshape(k))
