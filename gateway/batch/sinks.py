"""The output file, assembled from a job's part files in chunk order once all are finished.

Parquet keeps every column's type (vectors as fixed-size lists). CSV has no lists: list columns
are written as JSON text (``"[0.1, 0.2]"``). JSON Lines writes one object per row. The output is
written to a temporary name and renamed into place when complete, so a reader never sees half
a file, and an earlier output stays whole until the new one replaces it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gateway.batch.checkpoint import write_atomically
from gateway.batch.errors import UsageError

OUTPUT_FORMATS = ("parquet", "csv", "jsonl")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
             ".ndjson": "jsonl", ".json": "jsonl"}


def output_format(path: Path, format: str | None = None) -> str:
    """``format``, else the one the suffix names, else Parquet."""
    if format:
        if format not in OUTPUT_FORMATS:
            raise UsageError(f"output format {format!r} is not one of "
                             f"{', '.join(OUTPUT_FORMATS)}")
        return format
    return _SUFFIXES.get(Path(path).suffix.lower(), "parquet")


def common_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for every part. Parts differ only where the input's types did (an id column
    read as integers in one chunk, text in another): such a column is written as text."""
    first = schemas[0]
    fields = []
    for i, f in enumerate(first):
        types = {s.field(i).type for s in schemas} - {pa.null()}
        if len(types) <= 1:
            fields.append(f.with_type(types.pop() if types else f.type))
        else:
            fields.append(f.with_type(pa.string()))
    return pa.schema(fields)


def assemble(parts: list[Path], output: Path, format: str, empty: pa.Table) -> int:
    """Write the parts, in order, as ``output``; the rows written."""
    schemas = [pq.read_schema(p) for p in parts] or [empty.schema]
    schema = common_schema(schemas)
    written = 0

    def tables():
        nonlocal written
        if not parts:
            yield empty.cast(schema)
        for part in parts:
            table = pq.read_table(part)
            if table.schema != schema:
                table = table.cast(schema)
            written += table.num_rows
            yield table

    def write(path: Path) -> None:
        if format == "parquet":
            with pq.ParquetWriter(path, schema) as writer:
                for table in tables():
                    writer.write_table(table)
        elif format == "csv":
            writer = None
            with open(path, "wb") as f:
                for table in tables():
                    table = _flat(table)
                    if writer is None:
                        writer = pacsv.CSVWriter(f, table.schema)
                    writer.write_table(table)
                if writer is not None:
                    writer.close()
        else:
            with open(path, "w", encoding="utf-8") as f:
                for table in tables():
                    for batch in table.to_batches(max_chunksize=8192):
                        f.writelines(json.dumps(row, ensure_ascii=False) + "\n"
                                     for row in batch.to_pylist())

    write_atomically(Path(output), write)
    return written


def _flat(table: pa.Table) -> pa.Table:
    """List columns as JSON text and half floats as floats, which CSV can hold."""
    columns = []
    for column in table.columns:
        t = column.type
        if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            column = pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()],
                              pa.string())
        elif pa.types.is_float16(t):
            column = column.cast(pa.float32())
        columns.append(column)
    return pa.table(columns, names=table.column_names)
