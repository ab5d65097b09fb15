"""Unit tests of gateway.batch.sources: every format read in exact chunks, streaming."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gateway.batch.errors import UsageError
from gateway.batch.sources import detect_format, open_source, rechunk


def _rows(source, chunk_rows, column):
    chunks = list(source.chunks(chunk_rows))
    values = [v for c in chunks for v in c.table.column(column).to_pylist()]
    return chunks, values


def test_rechunk_cuts_exact_chunks_across_batches():
    batches = [pa.record_batch({"x": list(range(a, b))}) for a, b in ((0, 3), (3, 10), (10, 11))]
    tables = list(rechunk(batches, 4))
    assert [t.num_rows for t in tables] == [4, 4, 3]
    assert [v for t in tables for v in t.column("x").to_pylist()] == list(range(11))


def test_parquet_chunks_ignore_row_groups_and_number_rows(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"x": np.arange(1000), "y": np.arange(1000) * 2.0}), path,
                   row_group_size=333)
    source = open_source(path)
    assert (source.format, source.num_rows, source.schema.names) == ("parquet", 1000, ["x", "y"])
    source.select(["x"])
    chunks, values = _rows(source, 300, "x")
    assert [(c.index, c.start, c.rows) for c in chunks] == [
        (0, 0, 300), (1, 300, 300), (2, 600, 300), (3, 900, 100)]
    assert values == list(range(1000))
    assert chunks[0].table.column_names == ["x"]


def test_csv_reads_selected_columns_as_text_so_bad_values_stay_rows(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("id,a,b\n" + "".join(f"{i},{i * 0.5},{'x' if i == 7 else i}\n"
                                         for i in range(20)))
    source = open_source(path)
    assert source.num_rows is None and source.schema.names == ["id", "a", "b"]
    source.select(["a", "b", "id"], text_columns={"a", "b"})
    chunks, values = _rows(source, 8, "b")
    assert [c.rows for c in chunks] == [8, 8, 4]
    assert chunks[0].table.schema.field("b").type == pa.string()
    assert chunks[0].table.schema.field("id").type == pa.int64()  # not a text column
    assert values[7] == "x" and values[8] == "8"
    assert source.bytes_read == path.stat().st_size


def test_gzip_csv_and_tsv(tmp_path):
    path = tmp_path / "x.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("a\n1\n2\n3\n")
    assert detect_format(path) == "csv"
    assert _rows(open_source(path), 2, "a")[1] == [1, 2, 3]
    tsv = tmp_path / "x.tsv"
    tsv.write_text("a\tb\n1\t2\n")
    assert open_source(tsv).schema.names == ["a", "b"]


def test_csv_that_stops_parsing_names_the_row(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n3,4,5\n")
    source = open_source(path)
    with pytest.raises(UsageError, match=r"stops parsing after row 0: .*Expected 2 columns"):
        list(source.chunks(10))


def test_jsonl_fast_path_skips_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"x": [i, i + 1], "id": i}) + "\n\n" for i in range(10)))
    source = open_source(path)
    assert source.schema.names == ["x", "id"]
    source.select(["x"])
    chunks, values = _rows(source, 4, "x")
    assert [c.rows for c in chunks] == [4, 4, 2]
    assert values[9] == [9, 10] and not any(c.errors for c in chunks)


def test_jsonl_bad_lines_and_mixed_types_become_row_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = ['{"a": 1.5, "b": [1, 2]}', "not json", '{"a": "x", "b": [3, 4]}', "[1, 2]",
             '{"b": [5, 6]}']
    path.write_text("\n".join(lines) + "\n")
    source = open_source(path, "jsonl")
    source.select(["a", "b"])
    [chunk] = source.chunks(100)
    assert chunk.rows == 5
    assert set(chunk.errors) == {1, 3}
    assert "not valid JSON" in chunk.errors[1] and "not a JSON object" in chunk.errors[3]
    # a column of mixed types is kept as text, for the mapping to judge value by value
    assert chunk.table.column("a").to_pylist() == ["1.5", None, "x", None, None]
    assert chunk.table.column("b").to_pylist() == [[1, 2], None, [3, 4], None, [5, 6]]


def test_npy_is_memory_mapped_and_chunked(tmp_path):
    path = tmp_path / "x.npy"
    data = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.save(path, data)
    source = open_source(path)
    assert source.num_rows == 10 and source.schema.names == ["array"]
    assert source.schema.field("array").type == pa.list_(pa.float32(), 3)
    chunks, values = _rows(source, 4, "array")
    assert [c.rows for c in chunks] == [4, 4, 2]
    assert np.array(values, np.float32).tolist() == data.tolist()


def test_structured_npy_has_a_column_per_field(tmp_path):
    path = tmp_path / "x.npy"
    data = np.zeros(5, dtype=[("a", "<f4"), ("b", "<i8", (2,))])
    data["a"] = np.arange(5)
    np.save(path, data)
    source = open_source(path)
    assert source.schema.names == ["a", "b"]
    assert _rows(source, 2, "a")[1] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_members_are_read_row_by_row(tmp_path, compressed):
    path = tmp_path / "x.npz"
    save = np.savez_compressed if compressed else np.savez
    save(path, x=np.arange(20, dtype=np.float64).reshape(10, 2), n=np.arange(10))
    source = open_source(path)
    assert source.num_rows == 10 and sorted(source.schema.names) == ["n", "x"]
    source.select(["x"])
    chunks, values = _rows(source, 3, "x")
    assert [c.rows for c in chunks] == [3, 3, 3, 1]
    assert values[-1] == [18.0, 19.0] and chunks[0].table.column_names == ["x"]


def test_npz_members_of_different_lengths_are_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros(3), y=np.zeros(4))
    with pytest.raises(UsageError, match="different numbers of rows: x 3, y 4"):
        open_source(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(UsageError, match="cannot tell the format of x.txt"):
        open_source(tmp_path / "x.txt")
    with pytest.raises(UsageError, match="is not a file"):
        open_source(tmp_path / "missing.parquet")
