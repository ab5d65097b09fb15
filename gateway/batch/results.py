"""A chunk's answers as an Arrow table: id, every requested output, serving version, error.

Columns, in this order: the row id (``row_id``, the row's number in the input file from 0, or
the input's ``--id-column`` as it was), one column per requested output, ``model_version`` (the
version that served the row) and ``error`` (null when the row was scored). An output of one
value per row is a plain column; a vector is a fixed-size list column, a matrix nested lists;
an output with a variable dimension is a list column. BYTES outputs are text (UTF-8, bytes
that are not shown escaped). A failed row has nulls in its outputs and version.
"""

from __future__ import annotations

from math import prod

import numpy as np
import pyarrow as pa

from gateway.batch.mapping import ARROW_TYPES
from gateway.tensors import DATATYPE_TO_DTYPE, TensorSpec

ROW_ID = "row_id"
VERSION = "model_version"
ERROR = "error"


def is_fixed(spec: TensorSpec) -> bool:
    return all(d >= 0 for d in spec.dims)


def element_type(spec: TensorSpec) -> pa.DataType:
    return pa.string() if spec.datatype == "BYTES" else ARROW_TYPES[spec.datatype]


def output_type(spec: TensorSpec) -> pa.DataType:
    t = element_type(spec)
    if is_fixed(spec):
        if prod(spec.dims) == 1:
            return t
        for size in reversed(spec.dims):
            t = pa.list_(t, size)
        return t
    for _ in spec.dims:
        t = pa.list_(t)
    return t


def empty_output(spec: TensorSpec, rows: int):
    """Where a chunk's answers for one output are put: an array, or a list per row."""
    if is_fixed(spec):
        dtype = DATATYPE_TO_DTYPE[spec.datatype]
        if spec.datatype == "BYTES":
            return np.full((rows, *spec.dims), b"", dtype=object)
        return np.zeros((rows, *spec.dims), dtype)
    return [None] * rows


def result_table(ids: pa.Array, id_name: str, outputs: list[TensorSpec], values: dict,
                 ok: np.ndarray, versions: np.ndarray, errors: np.ndarray) -> pa.Table:
    rows = len(ok)
    failed = ~ok
    columns = {id_name: ids}
    for spec in outputs:
        columns[spec.name] = _output_column(spec, values[spec.name], failed, rows)
    columns[VERSION] = pa.array(versions, pa.string())
    columns[ERROR] = pa.array(errors, pa.string())
    return pa.table(columns)


def _text(array: np.ndarray) -> np.ndarray:
    flat = [v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)
            for v in array.reshape(-1)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def _output_column(spec: TensorSpec, data, failed: np.ndarray, rows: int) -> pa.Array:
    if not is_fixed(spec):
        t = output_type(spec)
        cells = [None if failed[i] or data[i] is None else
                 (_text(data[i]) if spec.datatype == "BYTES" else data[i]).tolist()
                 for i in range(rows)]
        return pa.array(cells, t)
    if spec.datatype == "BYTES":
        data = _text(data)
    mask = pa.array(failed) if failed.any() else None
    t = element_type(spec)
    if prod(spec.dims) == 1:
        return pa.array(data.reshape(rows), t, mask=failed if mask is not None else None)
    flat = pa.array(data.reshape(-1), t)
    dims = list(spec.dims)
    for index, size in enumerate(reversed(dims)):
        outermost = index == len(dims) - 1
        flat = pa.FixedSizeListArray.from_arrays(flat, size, mask=mask if outermost else None)
    return flat
