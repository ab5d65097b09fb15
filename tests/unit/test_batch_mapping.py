"""Unit tests of gateway.batch.mapping: columns bound to inputs, values checked per row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from gateway.batch.engines.base import ModelInfo
from gateway.batch.errors import UsageError
from gateway.batch.mapping import bind_inputs, cast_values, to_tensors
from gateway.tensors import TensorSpec


def info(*inputs: TensorSpec) -> ModelInfo:
    return ModelInfo("m", "1", 64, inputs, (TensorSpec("y", "FP32", (1,)),))


X32 = TensorSpec("x", "FP32", (32,))
X4 = TensorSpec("x", "FP32", (4,))


def test_binds_by_name_then_the_only_column():
    schema = pa.schema([("x", pa.list_(pa.float32(), 32)), ("id", pa.int64())])
    [b] = bind_inputs(info(X32), schema)
    assert (b.columns, b.stacked) == (("x",), False)
    schema = pa.schema([("features", pa.list_(pa.float64())), ("id", pa.int64())])
    [b] = bind_inputs(info(X32), schema, id_column="id")
    assert b.columns == ("features",)


def test_input_option_stacks_globs_in_file_order():
    schema = pa.schema([(f"f{i}", pa.float64()) for i in (2, 0, 1, 3)] + [("id", pa.int64())])
    [b] = bind_inputs(info(X4), schema, ["x=f*"])
    assert (b.columns, b.stacked) == (("f2", "f0", "f1", "f3"), True)
    [b] = bind_inputs(info(X4), schema, ["x=f0,f1,f2,f3"])
    assert b.columns == ("f0", "f1", "f2", "f3")


@pytest.mark.parametrize("schema, options, message", [
    (pa.schema([("a", pa.float32()), ("b", pa.float32())]), None,
     ("model input 'x' (FP32 [4]) has no column of that name; map it with --input "
     "x=COLUMN[,COLUMN...] (the file has columns a, b)")),
    (pa.schema([("a", pa.float32())]), ["y=a"], "model 'm' has no input 'y'; its inputs are x"),
    (pa.schema([("a", pa.float32())]), ["x=b*"], "no column matches 'b*'; the file has columns a"),
    (pa.schema([("a", pa.float32())]), ["x"], "--input 'x' is not NAME=COLUMN"),
    (pa.schema([("a", pa.float32()), ("b", pa.float32())]), ["x=a,b"],
     "input 'x' (FP32 [4]) takes 4 values per row but --input maps 2 columns to it"),
    (pa.schema([("a", pa.float32())]), None,
     "column 'a' holds one value per row; input 'x' (FP32 [4]) takes 4 per row"),
    (pa.schema([("a", pa.timestamp("ns"))]), None,
     "column 'a' is timestamp[ns]; input 'x' (FP32 [4]) takes FP32 values"),
    (pa.schema([("a", pa.list_(pa.list_(pa.list_(pa.float32()))))]), None,
     "lists nested 3 deep; input 'x' (FP32 [4]) takes a flat list or 1-deep lists"),
])
def test_binding_errors_name_input_and_column(schema, options, message):
    with pytest.raises(UsageError) as caught:
        bind_inputs(info(X4), schema, options)
    assert message in caught.value.message


def _tensors(table, spec, options=None):
    bindings = bind_inputs(info(spec), table.schema, options)
    return to_tensors(table, table.num_rows, bindings)


def test_list_column_becomes_a_tensor_without_errors():
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), 4)})
    result = _tensors(table, X4)
    [(rows, arrays)] = result.groups
    assert rows.tolist() == [0, 1, 2] and not result.errors
    assert arrays["x"].dtype == np.float32 and arrays["x"].tolist() == data.tolist()


def test_bad_values_fail_their_rows_only_and_name_the_column():
    table = pa.table({"a": ["1", "2", "abc", "4", None], "b": [1.0, 2.0, 3.0, 4.0, 5.0],
                      "c": [1, 2, 3, 4, 5], "d": [0, 0, 0, 0, 0]})
    result = _tensors(table, X4, ["x=a,b,c,d"])
    assert result.errors == {2: "column 'a': cannot convert 'abc' to FP32"}
    [(rows, arrays)] = result.groups
    assert rows.tolist() == [0, 1, 3, 4]
    assert arrays["x"][:, 0].tolist()[:3] == [1.0, 2.0, 4.0]
    assert np.isnan(arrays["x"][3, 0])  # a missing float is NaN, as pandas writes it


def test_integer_inputs_refuse_nulls_fractions_and_overflow():
    spec = TensorSpec("x", "INT8", (1,))
    table = pa.table({"x": pa.array([1.0, None, 2.5, 300.0, 4.0])})
    result = _tensors(table, spec)
    assert result.errors == {1: "column 'x' has no value",
                             2: "column 'x': 2.5 does not fit INT8",
                             3: "column 'x': 300.0 does not fit INT8"}
    assert result.groups[0][1]["x"].ravel().tolist() == [1, 4]


def test_list_of_the_wrong_length_fails_its_row():
    table = pa.table({"x": [[1, 2, 3, 4], [1, 2], None, [1, 2, 3, 4]]})
    result = _tensors(table, X4)
    assert result.errors == {1: "column 'x' holds 2 values where input 'x' takes 4",
                             2: "column 'x' has no value"}
    assert result.groups[0][0].tolist() == [0, 3]


def test_nested_lists_fill_a_matrix_input():
    spec = TensorSpec("x", "FP64", (2, 2))
    table = pa.table({"x": [[[1, 2], [3, 4]], [[5], [6, 7]], [[8, 9], [10, 11]]]})
    result = _tensors(table, spec)
    assert result.errors == {1: "column 'x' holds 1 items where input 'x' takes 2"}
    assert result.groups[0][1]["x"].tolist() == [[[1, 2], [3, 4]], [[8, 9], [10, 11]]]


def test_json_text_lists_from_csv():
    table = pa.table({"x": ["[1, 2, 3, 4]", "[1, 2]", "oops", '[1, "a", 3, 4]']})
    result = _tensors(table, X4)
    assert result.errors == {1: "column 'x' holds 2 values where input 'x' takes 4",
                             2: "column 'x': 'oops' is not a list",
                             3: "column 'x': cannot convert 'a' to FP32"}


def test_variable_length_rows_are_grouped_by_length():
    spec = TensorSpec("x", "INT64", (-1,))
    table = pa.table({"x": [[1, 2], [3], [4, 5], None, [6]]})
    result = _tensors(table, spec)
    assert result.errors == {3: "column 'x' has no value"}
    groups = {tuple(rows): arrays["x"].tolist() for rows, arrays in result.groups}
    assert groups == {(1, 4): [[3], [6]], (0, 2): [[1, 2], [4, 5]]}


def test_missing_column_in_a_chunk_fails_every_row():
    bindings = bind_inputs(info(X4), pa.schema([("x", pa.list_(pa.float32()))]))
    result = to_tensors(pa.table({"other": [1, 2]}), 2, bindings)
    assert result.errors == {0: "column 'x' is missing", 1: "column 'x' is missing"}
    assert result.groups == []


def test_reader_errors_are_kept():
    table = pa.table({"x": [[1, 2, 3, 4], None]})
    bindings = bind_inputs(info(X4), table.schema)
    result = to_tensors(table, 2, bindings, {1: "the line is not valid JSON"})
    assert result.errors == {1: "the line is not valid JSON"}


def test_bytes_inputs_take_text_and_numbers():
    values, bad = cast_values(pa.array(["a", None, "c"]), "BYTES", "s")
    assert values.tolist() == [b"a", b"", b"c"] and bad == {1: "column 's' has no value"}
    values, bad = cast_values(pa.array([1, 2]), "BYTES", "s")
    assert values.tolist() == [b"1", b"2"] and not bad


def test_a_column_of_garbage_is_found_value_by_value():
    values, bad = cast_values(pa.array(["x"] * 100 + ["1"]), "FP32", "a")
    assert len(bad) == 100 and values[-1] == 1.0
