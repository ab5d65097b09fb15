"""Columns to model inputs: which columns feed which input, and their values as tensors.

Binding (once, against the file's schema and the model's metadata):
- ``--input NAME=COLUMNS``: the input takes those columns, comma-separated, each name or glob
  (``f*``, ``x[0-9]``) matched in file order. Several columns are stacked along the input's
  last dimension, one value each; one column may hold a list per row (a list, fixed-size list
  or nested list column, or JSON text such as ``"[1, 2]"``) that fills the input's dims.
- otherwise a column with the input's name; a model with one input and a file with one column
  (besides the id column) pairs them.
A column that cannot feed an input (a timestamp for an FP32 input, one value per row for an
input of 32) stops the job before anything runs, naming both.

Converting (per chunk): values are cast to the input's datatype in C++ (pyarrow); only a
column that fails is searched, by halves, for the values at fault, so a bad value fails its row
("column 'f3': cannot convert 'abc' to FP32") and never its chunk. A missing value (null) is
NaN for floating-point inputs, as pandas writes it, and an error for the others; a list of the
wrong length is an error. Rows of a variable-length input are grouped by length.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from math import prod

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gateway.batch.engines.base import ModelInfo, describe
from gateway.batch.errors import UsageError
from gateway.tensors import DATATYPE_TO_DTYPE, TensorSpec

ARROW_TYPES = {
    "BOOL": pa.bool_(), "UINT8": pa.uint8(), "UINT16": pa.uint16(), "UINT32": pa.uint32(),
    "UINT64": pa.uint64(), "INT8": pa.int8(), "INT16": pa.int16(), "INT32": pa.int32(),
    "INT64": pa.int64(), "FP16": pa.float16(), "FP32": pa.float32(), "FP64": pa.float64(),
    "BYTES": pa.binary(),
}
FLOATS = frozenset({"FP16", "FP32", "FP64"})
_SHOWN = 40  # characters of a bad value repeated in its row's error


@dataclass(frozen=True, slots=True)
class Binding:
    spec: TensorSpec
    columns: tuple[str, ...]
    stacked: bool  # several scalar columns, one per element of the input

    @property
    def variable(self) -> bool:
        return any(d < 0 for d in self.spec.dims)


def parse_input_option(text: str) -> tuple[str, list[str]]:
    """``NAME=COL[,COL...]`` as (name, column patterns)."""
    name, sep, columns = text.partition("=")
    patterns = [c.strip() for c in columns.split(",") if c.strip()]
    if not sep or not name.strip() or not patterns:
        raise UsageError(f"--input {text!r} is not NAME=COLUMN[,COLUMN...]")
    return name.strip(), patterns


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return "list"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "binary"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) \
            or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_null(t):
        return "null"
    return "other"


def _depth(t: pa.DataType) -> tuple[int, pa.DataType]:
    depth = 0
    while _kind(t) == "list":
        t = t.value_type
        depth += 1
    return depth, t


def _element_ok(spec: TensorSpec, t: pa.DataType) -> bool:
    kind = _kind(t)
    if spec.datatype == "BYTES":
        return kind in ("text", "binary", "number", "null")
    return kind in ("number", "text", "null")


def bind_inputs(info: ModelInfo, schema: pa.Schema, options: list[str] | None = None,
                id_column: str | None = None) -> list[Binding]:
    """Which columns feed each model input; a ``UsageError`` naming the input and column when
    the file cannot feed the model."""
    names = list(schema.names)
    explicit: dict[str, list[str]] = {}
    for text in options or ():
        name, patterns = parse_input_option(text)
        if info.input(name) is None:
            raise UsageError(f"--input {text!r}: model '{info.name}' has no input '{name}'; its "
                             f"inputs are {', '.join(s.name for s in info.inputs)}")
        if name in explicit:
            raise UsageError(f"--input gives input '{name}' twice")
        columns: list[str] = []
        for pattern in patterns:
            matched = ([pattern] if pattern in names
                       else [n for n in names if fnmatch.fnmatchcase(n, pattern)])
            if not matched:
                raise UsageError(f"--input {name}=...: no column matches {pattern!r}; the file "
                                 f"has {_listing(names)}")
            columns += [c for c in matched if c not in columns]
        explicit[name] = columns
    others = [n for n in names if n != id_column]
    bindings = []
    for spec in info.inputs:
        if spec.name in explicit:
            columns = explicit[spec.name]
        elif spec.name in names:
            columns = [spec.name]
        elif len(info.inputs) == 1 and len(others) == 1:
            columns = others
        else:
            raise UsageError(
                f"model input {describe(spec)} has no column of that name; map it with "
                f"--input {spec.name}=COLUMN[,COLUMN...] (the file has {_listing(names)})")
        bindings.append(_check(spec, columns, schema))
    return bindings


def _listing(names: list[str]) -> str:
    if not names:
        return "no columns"
    shown = ", ".join(names[:12])
    return f"columns {shown}" + (f" ... ({len(names)} in all)" if len(names) > 12 else "")


def _check(spec: TensorSpec, columns: list[str], schema: pa.Schema) -> Binding:
    dims = spec.dims
    variable = [d for d in dims if d < 0]
    if variable and (len(dims) != 1):
        raise UsageError(f"input {describe(spec)} has variable dims; batch scoring takes fixed "
                         "dims or a single variable dimension")
    count = None if variable else prod(dims)
    if len(columns) > 1:
        if count is None:
            raise UsageError(f"input {describe(spec)} has a variable length: give it one list "
                             f"column, not {len(columns)} columns")
        if len(columns) != count:
            raise UsageError(f"input {describe(spec)} takes {count} values per row but --input "
                             f"maps {len(columns)} columns to it ({_listing(columns)})")
        for c in columns:
            t = schema.field(c).type
            if _kind(t) == "list" or not _element_ok(spec, t):
                raise UsageError(f"column '{c}' is {t}; input {describe(spec)} takes one "
                                 f"{'text' if spec.datatype == 'BYTES' else 'number'} per "
                                 "column here")
        return Binding(spec, tuple(columns), True)
    column = columns[0]
    t = schema.field(column).type
    kind = _kind(t)
    if kind == "list":
        depth, element = _depth(t)
        if not _element_ok(spec, element):
            raise UsageError(f"column '{column}' is {t}; input {describe(spec)} takes "
                             f"{spec.datatype} values")
        if depth != 1 and depth != len(dims):
            raise UsageError(f"column '{column}' is {t}, lists nested {depth} deep; input "
                             f"{describe(spec)} takes a flat list or {len(dims)}-deep lists")
        return Binding(spec, (column,), False)
    if kind in ("text", "null"):
        return Binding(spec, (column,), False)  # values, or JSON lists, checked per row
    if not _element_ok(spec, t):
        raise UsageError(f"column '{column}' is {t}; input {describe(spec)} takes "
                         f"{spec.datatype} values")
    if count != 1:
        raise UsageError(
            f"column '{column}' holds one value per row; input {describe(spec)} takes "
            f"{'a list' if count is None else count} per row: map one column per value with "
            f"--input {spec.name}=COL1,COL2,... (globs allowed), or give a list column")
    return Binding(spec, (column,), False)


def columns_read(bindings: list[Binding]) -> list[str]:
    return list(dict.fromkeys(c for b in bindings for c in b.columns))


# ---- per chunk -------------------------------------------------------------------------------

@dataclass(slots=True)
class Tensors:
    """A chunk's inputs: groups of rows that share shapes, and the rows that cannot run."""

    groups: list[tuple[np.ndarray, dict[str, np.ndarray]]]  # (rows in the chunk, name -> array)
    errors: dict[int, str] = field(default_factory=dict)  # row in the chunk -> why


def to_tensors(table: pa.Table, rows: int, bindings: list[Binding],
               errors: dict[int, str] | None = None) -> Tensors:
    """The chunk's rows as model inputs; rows with an unusable value get their error."""
    errors = dict(errors or {})
    fixed: dict[str, np.ndarray] = {}
    variable: dict[str, tuple[np.ndarray, list]] = {}
    for binding in bindings:
        if binding.variable:
            lengths, per_row, bad = _variable_rows(table, rows, binding)
            variable[binding.spec.name] = (lengths, per_row)
        else:
            fixed[binding.spec.name], bad = _fixed_rows(table, rows, binding)
        for row, reason in bad.items():
            errors.setdefault(row, reason)
    good = np.ones(rows, dtype=bool)
    if errors:
        good[np.fromiter(errors, dtype=np.int64, count=len(errors))] = False
    if not variable:
        if good.all():
            return Tensors([(np.arange(rows), fixed)], errors)
        keep = np.flatnonzero(good)
        return Tensors([(keep, {k: v[keep] for k, v in fixed.items()})] if len(keep) else [],
                       errors)
    keys = np.stack([lengths for lengths, _ in variable.values()], axis=1)
    groups = []
    good_rows = np.flatnonzero(good)
    unique = np.unique(keys[good_rows], axis=0) if len(good_rows) else []
    for key in unique:
        members = good_rows[(keys[good_rows] == key).all(axis=1)]
        arrays = {k: v[members] for k, v in fixed.items()}
        for name, (_, per_row) in variable.items():
            arrays[name] = np.stack([per_row[r] for r in members])
        groups.append((members, arrays))
    return Tensors(groups, errors)


def _column(table: pa.Table, name: str, rows: int) -> pa.Array | None:
    if name not in table.column_names:
        return None
    column = table.column(name)
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array


def _missing(rows: int, column: str) -> dict[int, str]:
    return dict.fromkeys(range(rows), f"column '{column}' is missing")


def _fixed_rows(table: pa.Table, rows: int, b: Binding) -> tuple[np.ndarray, dict[int, str]]:
    spec = b.spec
    dtype = DATATYPE_TO_DTYPE[spec.datatype]
    out_shape = (rows, *spec.dims)
    if b.stacked:
        values, bad = [], {}
        for name in b.columns:
            array = _column(table, name, rows)
            if array is None:
                return np.zeros(out_shape, dtype), _missing(rows, name)
            column_values, column_bad = cast_values(array, spec.datatype, name)
            values.append(column_values)
            for row, reason in column_bad.items():
                bad.setdefault(row, reason)
        return np.stack(values, axis=1).reshape(out_shape), bad
    name = b.columns[0]
    array = _column(table, name, rows)
    if array is None:
        return np.zeros(out_shape, dtype), _missing(rows, name)
    kind = _kind(array.type)
    count = prod(spec.dims)
    if kind != "list" and (count != 1 or kind == "null"):
        if kind == "text" and count != 1:
            array, bad = _json_lists(array, name)
        elif kind == "null":
            values, bad = cast_values(array, spec.datatype, name)
            return values.reshape(out_shape), bad
        else:
            return np.zeros(out_shape, dtype), dict.fromkeys(
                range(rows), f"column '{name}' holds one value; input '{spec.name}' takes "
                             f"{count}")
    else:
        bad = {}
    if _kind(array.type) != "list":
        values, more = cast_values(array, spec.datatype, name)
        bad.update(more)
        return values.reshape(out_shape), bad
    return _list_rows(array, b, count, out_shape, bad)


def _list_rows(array: pa.Array, b: Binding, count: int, out_shape, bad: dict[int, str]):
    """Rows of a list column with ``count`` values each (flat, or nested as the dims)."""
    spec, name = b.spec, b.columns[0]
    rows = len(array)
    ok = np.ones(rows, dtype=bool)
    depth, _ = _depth(array.type)
    for row in bad:
        ok[row] = False
    nulls = array.is_null().to_numpy(zero_copy_only=False)
    for row in np.flatnonzero(nulls & ok):
        bad[int(row)] = f"column '{name}' has no value"
        ok[row] = False
    levels = [count] if depth == 1 else list(spec.dims)
    current, parents = array, np.arange(rows)
    for level, size in enumerate(levels):
        lengths = pc.list_value_length(current).fill_null(-1).to_numpy(zero_copy_only=False)
        for position in np.flatnonzero(lengths != size):
            row = int(parents[position])
            if ok[row]:
                got = int(lengths[position])
                bad[row] = (f"column '{name}' holds {'no list' if got < 0 else got} "
                            f"{'values' if depth == 1 else 'items'} where input "
                            f"'{spec.name}' takes {size}")
                ok[row] = False
        if level == len(levels) - 1:
            break
        parents = parents[pc.list_parent_indices(current).to_numpy()]
        current = pc.list_flatten(current)
    out = np.zeros(out_shape, DATATYPE_TO_DTYPE[spec.datatype])
    good = np.flatnonzero(ok)
    if not len(good):
        return out, bad
    chosen = array if len(good) == rows else array.take(pa.array(good))
    flat = pc.list_flatten(chosen, recursive=True)
    values, value_bad = cast_values(flat, spec.datatype, name)
    if value_bad:
        for position, reason in value_bad.items():
            row = int(good[position // count])
            if ok[row]:
                bad[row] = reason
                ok[row] = False
    out[good] = values.reshape((len(good), *spec.dims))
    return out, bad


def _variable_rows(table: pa.Table, rows: int, b: Binding):
    """(length per row, 1-D array per row, errors) for an input of one variable dimension."""
    spec, name = b.spec, b.columns[0]
    dtype = DATATYPE_TO_DTYPE[spec.datatype]
    lengths = np.full(rows, -1, dtype=np.int64)
    per_row: list = [np.zeros(0, dtype)] * rows
    array = _column(table, name, rows)
    if array is None:
        return lengths, per_row, _missing(rows, name)
    bad: dict[int, str] = {}
    if _kind(array.type) == "text":
        array, bad = _json_lists(array, name)
    if _kind(array.type) != "list":
        return lengths, per_row, dict.fromkeys(range(rows), f"column '{name}' holds no list")
    for row in np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False)):
        bad.setdefault(int(row), f"column '{name}' has no value")
    offsets_array = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    values, value_bad = cast_values(pc.list_flatten(array), spec.datatype, name)
    starts = np.concatenate([[0], np.cumsum(offsets_array)])
    parents = np.repeat(np.arange(rows), offsets_array)
    for position, reason in value_bad.items():
        bad.setdefault(int(parents[position]), reason)
    for row in range(rows):
        if row not in bad:
            lengths[row] = offsets_array[row]
            per_row[row] = values[starts[row]:starts[row + 1]]
    return lengths, per_row, bad


def _json_lists(array: pa.Array, name: str) -> tuple[pa.Array, dict[int, str]]:
    """Text holding JSON lists (a CSV cell "[1, 2]"), as a list column; unparsable rows bad."""
    values, bad = [], {}
    for row, text in enumerate(array.to_pylist()):
        value = None
        if text is not None:
            try:
                value = json.loads(text)
            except ValueError:
                bad[row] = f"column '{name}': {_show(text)} is not a list"
            else:
                if not isinstance(value, list):
                    bad[row] = f"column '{name}': {_show(text)} is not a list"
                    value = None
        values.append(value)
    try:
        return pa.array(values), bad
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        # Mixed element types: each row alone, as text elements the cast then judges.
        texts = [None if v is None else [x if isinstance(x, str) else json.dumps(x) for x in v]
                 for v in values]
        return pa.array(texts, pa.list_(pa.string())), bad


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "...'"


def cast_values(array: pa.Array, datatype: str, column: str) -> tuple[np.ndarray, dict]:
    """A flat column as a numpy array of the datatype, and {position: why} for values that
    cannot be converted (those hold zero). Floating point takes nulls as NaN and any number
    (precision may round, as numpy's casts do); integers and booleans must be exact."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    bad: dict[int, str] = {}
    if datatype == "BYTES":
        if _kind(array.type) == "number":
            array = pc.cast(array, pa.string())
        array = pc.cast(array, pa.binary()) if _kind(array.type) == "text" else array
        if array.null_count:
            for position in np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False)):
                bad[int(position)] = f"column '{column}' has no value"
            array = pc.fill_null(array, b"")
        return array.to_numpy(zero_copy_only=False).astype(object), bad
    target = ARROW_TYPES[datatype]
    floating = datatype in FLOATS
    if array.type != target:
        array = _cast_isolating(array, target, not floating, column, datatype, bad)
    if array.null_count:
        if floating:
            array = pc.fill_null(array, pa.scalar(float("nan"), target))
        else:
            nulls = array.is_null().to_numpy(zero_copy_only=False)
            for position in np.flatnonzero(nulls):
                bad.setdefault(int(position), f"column '{column}' has no value")
            array = pc.fill_null(array, pa.scalar(0, target) if datatype != "BOOL" else False)
    values = array.to_numpy(zero_copy_only=False)
    if values.dtype != DATATYPE_TO_DTYPE[datatype]:
        values = values.astype(DATATYPE_TO_DTYPE[datatype])
    return values, bad


def _cast_isolating(array: pa.Array, target: pa.DataType, safe: bool, column: str,
                    datatype: str, bad: dict, offset: int = 0) -> pa.Array:
    """Cast; if that fails, cast halves until the values at fault are found (they become null
    and are reported in ``bad``): O(bad values x log n) casts, one when all is well."""
    try:
        return pc.cast(array, target, safe=safe)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        if len(array) == 1:
            value = array[0].as_py()
            reason = str(exc).split("\n")[0]
            if "not in range" in reason or "truncated" in reason or "overflow" in reason:
                bad[offset] = f"column '{column}': {_show(value)} does not fit {datatype}"
            else:
                bad[offset] = f"column '{column}': cannot convert {_show(value)} to {datatype}"
            return pa.nulls(1, target)
    half = len(array) // 2
    left = _cast_isolating(array.slice(0, half), target, safe, column, datatype, bad, offset)
    right = _cast_isolating(array.slice(half), target, safe, column, datatype, bad,
                            offset + half)
    return pa.concat_arrays([left, right])
