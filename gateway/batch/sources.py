"""Input files read in chunks of a fixed number of rows, in a streaming way (pyarrow).

Memory holds a chunk or two, never the file: Parquet row groups are decoded batch by batch, CSV
and JSON Lines are parsed block by block, ``.npy`` is memory-mapped and ``.npz`` members are read
row by row from the archive. Chunk boundaries depend only on the file and ``chunk_rows``, so a
resumed job cuts the file exactly where the interrupted one did.

Each chunk is an Arrow table (one record batch) plus the rows that could not be parsed with why
(a JSON line that is not an object): such rows still count and come out with their error.
A value of the wrong type is not a reader's concern: ``mapping`` finds it and names it.

Formats, from the file's suffix or ``format``: ``parquet`` (.parquet, .pq), ``csv`` (.csv,
.tsv, also gzip/bz2-compressed), ``jsonl`` (.jsonl, .ndjson, .json), ``npy``, ``npz``. An
``.npy`` file is one column named ``array`` (a structured array: one column per field); an
``.npz`` file has one column per member, named by its key.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from gateway.batch.errors import UsageError

FORMATS = ("parquet", "csv", "jsonl", "npy", "npz")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
             ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".npy": "npy",
             ".npz": "npz"}
NPY_COLUMN = "array"


@dataclass(slots=True)
class Chunk:
    index: int  # 0, 1, 2 ... in file order
    start: int  # file row number of the first row
    table: pa.Table  # the selected columns present in this chunk (JSON Lines may lack some)
    rows: int  # rows in the chunk (a table with no columns cannot tell)
    errors: dict[int, str] = field(default_factory=dict)  # row within the chunk -> why unread


def detect_format(path: Path, format: str | None = None) -> str:
    if format:
        if format not in FORMATS:
            raise UsageError(f"input format {format!r} is not one of {', '.join(FORMATS)}")
        return format
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".bz2", ".zst", ".lz4"):
        suffixes.pop()
    kind = _SUFFIXES.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise UsageError(f"cannot tell the format of {path.name}: name it .parquet, .csv, "
                         ".jsonl, .npy or .npz, or give --input-format")
    return kind


def open_source(path, format: str | None = None) -> Source:
    """A reader of ``path``; its ``schema`` is known at once, its rows are read by ``chunks``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"input {path} is not a file")
    kind = detect_format(path, format)
    return {"parquet": ParquetSource, "csv": CsvSource, "jsonl": JsonlSource,
            "npy": NpySource, "npz": NpzSource}[kind](path)


class Source:
    """Base of the readers: ``schema`` (columns as far as known before reading), ``num_rows``
    (None when only reading tells: CSV, JSON Lines), ``chunks``."""

    format = ""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.schema: pa.Schema = pa.schema([])
        self.num_rows: int | None = None
        self.columns: list[str] | None = None  # what to read (None: all)
        self.text_columns: set[str] = set()  # read as text, converted later (CSV)
        self.bytes_read = 0  # progress through the file, where the reader can tell

    def select(self, columns: list[str], text_columns: set[str] = frozenset()) -> None:
        """Read only ``columns``; ``text_columns`` as strings where the format guesses types
        (CSV), so that one bad value fails its row, not the whole file."""
        self.columns = list(dict.fromkeys(columns))
        self.text_columns = set(text_columns)

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        raise NotImplementedError

    def _numbered(self, tables: Iterator[tuple[pa.Table, dict]]) -> Iterator[Chunk]:
        start = 0
        for index, item in enumerate(tables):
            table, errors = item[0], item[1]
            rows = item[2] if len(item) > 2 else table.num_rows
            yield Chunk(index, start, table, rows, errors)
            start += rows


def rechunk(batches, chunk_rows: int) -> Iterator[pa.Table]:
    """Record batches of any sizes as tables of exactly ``chunk_rows`` rows (the last fewer)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(chunk_rows - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            batch = batch.slice(take)
            count += take
            if count == chunk_rows:
                yield pa.Table.from_batches(pending).combine_chunks()
                pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending).combine_chunks()


class ParquetSource(Source):
    format = "parquet"

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            # A buffered stream: pages are read as they are decoded. Without it the reader keeps
            # every row group's column chunks it has read (memory grows with the file).
            self._file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"input {path} is not a readable Parquet file: {exc}") from None
        self.schema = self._file.schema_arrow
        self.num_rows = self._file.metadata.num_rows

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        batches = self._file.iter_batches(batch_size=min(chunk_rows, 65536),
                                          columns=self.columns, use_threads=False)
        return self._numbered((t, {}) for t in rechunk(batches, chunk_rows))


class CsvSource(Source):
    format = "csv"

    def __init__(self, path: Path):
        super().__init__(path)
        self._parse = pacsv.ParseOptions(delimiter="\t" if ".tsv" in path.suffixes else ",")
        try:
            # The header and the first block's types; a malformed row is reported when the
            # chunks reach it, with where.
            probe = pacsv.ParseOptions(delimiter=self._parse.delimiter,
                                       invalid_row_handler=lambda row: "skip")
            reader = pacsv.open_csv(path, parse_options=probe)
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"input {path} is not a readable CSV file: {exc}") from None
        self.schema = reader.schema
        reader.close()

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        convert = pacsv.ConvertOptions(
            include_columns=self.columns, strings_can_be_null=True,
            column_types={c: pa.string() for c in self.text_columns})
        def tables():
            with open(self.path, "rb") as raw:
                compression = _compression(self.path)
                stream = pa.CompressedInputStream(raw, compression) if compression else raw
                try:
                    reader = pacsv.open_csv(
                        stream, read_options=pacsv.ReadOptions(block_size=1 << 22,
                                                               use_threads=False),
                        parse_options=self._parse, convert_options=convert)
                except pa.ArrowInvalid as exc:
                    raise UsageError(f"{self.path.name}: the file stops parsing after row 0: "
                                     f"{exc}") from None
                try:
                    for table in rechunk(_reading(reader, self.path), chunk_rows):
                        self.bytes_read = raw.tell()
                        yield table, {}
                finally:
                    reader.close()
        return self._numbered(tables())


def _compression(path: Path) -> str | None:
    return {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}.get(
        path.suffix.lower())


def _reading(reader, path: Path):
    """The reader's batches; a file that stops parsing (a row with too many fields) names
    where, and the job stops: such a file has no well-defined rows after that point."""
    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            raise UsageError(f"{path.name}: the file stops parsing after row {rows}: "
                             f"{exc}") from None
        rows += batch.num_rows
        yield batch


class JsonlSource(Source):
    """JSON Lines, one object per line; blank lines are skipped and do not count as rows.

    Each chunk's lines are parsed by Arrow in one go; if that fails (a line that is not JSON, a
    value whose type differs from the rest of its column), the chunk is parsed line by line:
    unparsable lines become rows with an error, and a column of mixed types is read as text,
    so that ``mapping`` names the values it cannot use."""

    format = "jsonl"

    def __init__(self, path: Path):
        super().__init__(path)
        first = []
        with self._open() as f:
            for line in f:
                if line.strip():
                    first.append(line)
                if len(first) >= 100:
                    break
        table, _ = _parse_lines(first, None)
        self.schema = table.schema

    def _open(self):
        compression = _compression(self.path)
        if compression:
            return pa.CompressedInputStream(pa.OSFile(str(self.path)), compression)
        return open(self.path, "rb")

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        def tables():
            with self._open() as f:
                lines = []
                for line in f:
                    if not line.strip():
                        continue
                    lines.append(line)
                    if len(lines) == chunk_rows:
                        self.bytes_read = f.tell()
                        yield (*_parse_lines(lines, self.columns), len(lines))
                        lines = []
                if lines:
                    self.bytes_read = self.size
                    yield (*_parse_lines(lines, self.columns), len(lines))
        return self._numbered(tables())


def _parse_lines(lines: list[bytes], columns: list[str] | None) -> tuple[pa.Table, dict]:
    block = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    try:
        table = pajson.read_json(io.BytesIO(block),
                                 read_options=pajson.ReadOptions(use_threads=False))
        if table.num_rows == len(lines):
            return _columns(table, columns), {}
    except pa.ArrowInvalid:
        pass
    return _parse_each(lines, columns)


def _columns(table: pa.Table, columns: list[str] | None) -> pa.Table:
    if columns is None:
        return table
    present = [c for c in columns if c in table.column_names]
    return table.select(present)


def _parse_each(lines: list[bytes], columns: list[str] | None) -> tuple[pa.Table, dict]:
    """The slow path: one line at a time, so one bad line fails one row."""
    rows: list[dict] = []
    errors: dict[int, str] = {}
    for i, line in enumerate(lines):
        try:
            value = json.loads(line)
        except ValueError as exc:
            value, errors[i] = None, f"the line is not valid JSON ({exc})"
        if value is not None and not isinstance(value, dict):
            value, errors[i] = None, "the line is not a JSON object"
        rows.append(value or {})
    names = columns if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    arrays, kept = [], []
    for name in names:
        values = [r.get(name) for r in rows]
        if all(v is None for v in values) and columns is not None:
            continue
        try:
            array = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # Mixed types: keep each value's JSON text; mapping converts what it can.
            array = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v)
                              for v in values], pa.string())
        arrays.append(array)
        kept.append(name)
    return pa.table(arrays, names=kept), errors


def numpy_to_arrow(array: np.ndarray) -> pa.Array:
    """Rows of an n-dimensional array as an Arrow column: scalars, or nested fixed-size lists."""
    if array.dtype.kind in ("U", "S"):
        return pa.array(array.reshape(len(array), -1)[:, 0] if array.ndim > 1 else array)
    if array.dtype.kind == "O":
        raise UsageError("object arrays cannot be read safely; save numbers or strings")
    flat = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def _table(named: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({name: numpy_to_arrow(a) for name, a in named.items()})


class NpySource(Source):
    format = "npy"

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            self._array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UsageError(f"input {path} is not a readable .npy file: {exc}") from None
        if self._array.ndim == 0:
            raise UsageError(f"input {path} holds a single value, not rows")
        self.num_rows = len(self._array)
        self.schema = _table(self._named(self._array[:0])).schema

    @staticmethod
    def _named(rows: np.ndarray) -> dict[str, np.ndarray]:
        if rows.dtype.names:
            return {name: rows[name] for name in rows.dtype.names}
        return {NPY_COLUMN: rows}

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        def tables():
            for start in range(0, self.num_rows, chunk_rows):
                rows = np.array(self._array[start:start + chunk_rows])  # read from the map
                named = self._named(rows)
                if self.columns is not None:
                    named = {k: v for k, v in named.items() if k in self.columns}
                self.bytes_read = int(self.size * min(1.0, (start + len(rows)) / self.num_rows))
                yield _table(named), {}
        return self._numbered(tables())


class NpzSource(Source):
    """Members are read row by row from the archive (stored or deflated), never whole."""

    format = "npz"

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.endswith(".npy")]
                headers = {}
                for name in members:
                    with archive.open(name) as f:
                        headers[name[:-4]] = _npy_header(f, name)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UsageError(f"input {path} is not a readable .npz file: {exc}") from None
        if not headers:
            raise UsageError(f"input {path} holds no arrays")
        lengths = {key: shape[0] for key, (shape, _) in headers.items()}
        if len(set(lengths.values())) != 1:
            raise UsageError(f"the arrays in {path.name} have different numbers of rows: "
                             + ", ".join(f"{k} {n}" for k, n in lengths.items()))
        self._headers = headers
        self.num_rows = next(iter(lengths.values()))
        self.schema = _table({k: np.zeros((0, *shape[1:]), dtype)
                              for k, (shape, dtype) in headers.items()}).schema

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        keys = [k for k in self._headers if self.columns is None or k in self.columns]

        def tables():
            with zipfile.ZipFile(self.path) as archive:
                files = {k: archive.open(k + ".npy") for k in keys}
                try:
                    for f, k in zip(files.values(), keys):
                        _npy_header(f, k)
                    for start in range(0, self.num_rows, chunk_rows):
                        count = min(chunk_rows, self.num_rows - start)
                        named = {}
                        for k, f in files.items():
                            shape, dtype = self._headers[k]
                            per_row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                            data = f.read(per_row * count)
                            named[k] = np.frombuffer(data, dtype).reshape(count, *shape[1:])
                        self.bytes_read = int(self.size * (start + count) / self.num_rows)
                        yield _table(named), {}
                finally:
                    for f in files.values():
                        f.close()
        return self._numbered(tables())


def _npy_header(f, name: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran and len(shape) > 1:
        raise UsageError(f"member {name} is stored in Fortran order; save it in C order "
                         "(np.ascontiguousarray) to read it row by row")
    if not shape:
        raise UsageError(f"member {name} holds a single value, not rows")
    if dtype.hasobject:
        raise UsageError(f"member {name} holds Python objects, which cannot be read safely")
    return tuple(shape), dtype
