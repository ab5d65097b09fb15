"""Unit tests of gateway.batch.checkpoint: what survives a kill at any point, what is redone."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gateway.batch.checkpoint import LOG, MANIFEST, Checkpoint
from gateway.batch.errors import UsageError
from gateway.batch.sinks import assemble, common_schema, output_format

JOB = {"model": "m", "input": "/data/x.parquet", "chunk_rows": 10}


def _part(start, rows):
    return pa.table({"row_id": list(range(start, start + rows)), "error": [None] * rows},
                    schema=pa.schema([("row_id", pa.int64()), ("error", pa.string())]))


def _record(start, rows):
    return {"start": start, "rows": rows, "ok": rows, "failed": 0, "versions": {"1": rows},
            "examples": []}


def test_finished_chunks_survive_and_others_are_redone(tmp_path):
    directory = tmp_path / "out.parquet.parts"
    checkpoint = Checkpoint.open(directory, JOB, resume=False)
    checkpoint.finish(0, _part(0, 10), _record(0, 10))
    checkpoint.finish(2, _part(20, 10), _record(20, 10))
    # killed after chunk 1's part was renamed into place but before its log line
    pq.write_table(_part(10, 10), checkpoint.part_path(1))
    # ... and while chunk 3's part was still a temporary file
    (directory / "part-000003.parquet.tmp").write_bytes(b"PAR1 half")
    again = Checkpoint.open(directory, JOB, resume=True)
    assert sorted(again.done) == [0, 2]
    assert not (directory / "part-000003.parquet.tmp").exists()
    assert again.done[2]["rows"] == 10 and again.done[2]["start"] == 20


def test_torn_last_line_is_cut_before_appending(tmp_path):
    directory = tmp_path / "parts"
    checkpoint = Checkpoint.open(directory, JOB, resume=False)
    checkpoint.finish(0, _part(0, 10), _record(0, 10))
    with open(directory / LOG, "ab") as f:
        f.write(b'{"chunk": 1, "rows": 1')  # killed mid-write
    again = Checkpoint.open(directory, JOB, resume=True)
    assert sorted(again.done) == [0]
    again.finish(1, _part(10, 10), _record(10, 10))
    lines = (directory / LOG).read_text().splitlines()
    assert [json.loads(line)["chunk"] for line in lines] == [0, 1]
    assert sorted(Checkpoint.open(directory, JOB, resume=True).done) == [0, 1]


def test_a_logged_chunk_whose_part_is_gone_or_short_is_redone(tmp_path):
    directory = tmp_path / "parts"
    checkpoint = Checkpoint.open(directory, JOB, resume=False)
    checkpoint.finish(0, _part(0, 10), _record(0, 10))
    checkpoint.finish(1, _part(10, 10), _record(10, 10))
    checkpoint.part_path(0).unlink()
    pq.write_table(_part(10, 3), checkpoint.part_path(1))
    assert Checkpoint.open(directory, JOB, resume=True).done == {}


def test_existing_checkpoint_needs_resume_and_the_same_job(tmp_path):
    directory = tmp_path / "parts"
    Checkpoint.open(directory, JOB, resume=False)
    with pytest.raises(UsageError) as caught:
        Checkpoint.open(directory, JOB, resume=False)
    assert "holds the checkpoint of an unfinished run: add --resume" in caught.value.message
    with pytest.raises(UsageError) as caught:
        Checkpoint.open(directory, {**JOB, "chunk_rows": 20}, resume=True)
    assert "belongs to a different job (chunk_rows: was 10, now 20)" in caught.value.message


def test_killed_before_the_manifest_starts_afresh(tmp_path):
    directory = tmp_path / "parts"
    directory.mkdir()
    (directory / (MANIFEST + ".tmp")).write_text("{")
    assert Checkpoint.open(directory, JOB, resume=True).done == {}
    assert json.loads((directory / MANIFEST).read_text())["job"] == JOB


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_assemble_writes_parts_in_order(tmp_path, fmt):
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"p{i}.parquet")
        pq.write_table(_part(i * 10, 10), parts[-1])
    out = tmp_path / f"out.{fmt}"
    assert assemble(parts, out, fmt, _part(0, 0)) == 30
    if fmt == "parquet":
        assert pq.read_table(out).column("row_id").to_pylist() == list(range(30))
    elif fmt == "csv":
        assert out.read_text().splitlines()[:2] == ['"row_id","error"', "0,"]
    else:
        assert json.loads(out.read_text().splitlines()[29]) == {"row_id": 29, "error": None}
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_input_gives_an_empty_file_with_the_columns(tmp_path):
    out = tmp_path / "out.parquet"
    assert assemble([], out, "parquet", _part(0, 0)) == 0
    assert pq.read_table(out).schema.names == ["row_id", "error"]


def test_id_columns_read_with_different_types_are_written_as_text():
    schema = common_schema([pa.schema([("id", pa.int64())]), pa.schema([("id", pa.string())]),
                            pa.schema([("id", pa.null())])])
    assert schema.field("id").type == pa.string()
    assert common_schema([pa.schema([("id", pa.null())]),
                          pa.schema([("id", pa.int64())])]).field("id").type == pa.int64()


def test_output_format_from_suffix():
    assert [output_format(p) for p in ("a.csv", "a.JSONL", "a.parquet", "a.out")] == [
        "csv", "jsonl", "parquet", "parquet"]


class _Terminal:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_bar_only_on_a_terminal():
    from gateway.batch.progress import Progress

    for tty in (True, False):
        stream = _Terminal(tty)
        bar = Progress(1000, stream=stream)
        bar.advance(500)
        bar.close()
        assert ("500/1.00k" in stream.text and "rows/s" in stream.text) is tty, stream.text
        assert bool(stream.text) is tty
