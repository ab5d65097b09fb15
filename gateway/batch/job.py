"""A scoring job from input file to output file: read chunks, score them, checkpoint each,
assemble the output, account for every row.

The pipeline keeps at most ``ahead`` chunks in flight while the next one is read (in a thread:
pyarrow parses without the GIL), so memory holds a few chunks whatever the file's size. Each
finished chunk goes to the checkpoint; ``resume`` skips the chunks an earlier run finished and
produces the same output, row for row, as a run that was never interrupted. At the end the
rows read and the rows written are counted and must agree.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from gateway.batch.checkpoint import Checkpoint
from gateway.batch.engines import make_engine
from gateway.batch.engines.base import Engine, RetryPolicy, call_with_retries
from gateway.batch.errors import InferenceFailure, JobAborted, UsageError
from gateway.batch.mapping import bind_inputs, columns_read
from gateway.batch.progress import Progress
from gateway.batch.results import empty_output, result_table
from gateway.batch.scorer import ChunkScorer
from gateway.batch.sinks import assemble, output_format
from gateway.batch.sources import open_source

DEFAULT_CHUNK_ROWS = 65536


@dataclass
class ScoreReport:
    """What a finished job did; ``rows_in == rows_out`` always (the job fails otherwise)."""

    model: str
    engine: str
    source: Path
    output: Path
    format: str
    rows_in: int = 0
    rows_out: int = 0
    ok: int = 0
    failed: int = 0
    versions: Counter = field(default_factory=Counter)
    chunks: int = 0
    resumed_chunks: int = 0
    retries: int = 0
    seconds: float = 0.0  # the whole job
    load_seconds: float = 0.0  # of which connecting or loading the model
    examples: list = field(default_factory=list)  # (row id, error) of some failed rows

    @property
    def rows_per_second(self) -> float:
        """Rows scored by this run per second, from the model ready to the output written."""
        scored = self.rows_in * (1 - self.resumed_chunks / self.chunks) if self.chunks else 0
        seconds = self.seconds - self.load_seconds
        return scored / seconds if seconds > 0 else 0.0

    def lines(self) -> list[str]:
        lines = [(f"scored {self.source.name} with model '{self.model}' ({self.engine}) in "
                  f"{self.seconds:.1f} s (model ready after {self.load_seconds:.1f} s), "
                  f"{self.rows_per_second:,.0f} rows/s"),
                 (f"  rows in {self.rows_in} = rows out {self.rows_out}: {self.ok} scored, "
                  f"{self.failed} failed"),
                 "  versions: " + (", ".join(f"{v} ({n} rows)" for v, n in
                                             sorted(self.versions.items())) or "none")]
        if self.resumed_chunks:
            lines.append(f"  resumed: {self.resumed_chunks} of {self.chunks} chunks were "
                         "finished by an earlier run")
        if self.retries:
            lines.append(f"  {self.retries} requests were retried (UNAVAILABLE or "
                         "RESOURCE_EXHAUSTED)")
        for row, error in self.examples[:5]:
            lines.append(f"  failed: row {row}: {error}")
        if self.failed > len(self.examples[:5]):
            lines.append(f"  ... {self.failed - len(self.examples[:5])} more failed rows: see "
                         "the error column")
        lines.append(f"  output: {self.output} ({self.format})")
        return lines


async def score_file(model: str, source, output, *, url: str | None = None,
                     model_repository=None, model_version: str = "",
                     inputs: list[str] | None = None, outputs: list[str] | None = None,
                     id_column: str | None = None, input_format: str | None = None,
                     format: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                     batch_size: int | None = None, concurrency: int | None = None,
                     retry: RetryPolicy | None = None, timeout: float = 60.0,
                     token: str | None = None, tls=None, cpu_threads: int = 1,
                     resume: bool = False, fail_fast: bool = False,
                     progress: bool | None = None, work_dir=None, ahead: int = 2,
                     engine: Engine | None = None) -> ScoreReport:
    """Score ``source`` (a file) into ``output``; see ``gateway.batch.score``."""
    if chunk_rows < 1:
        raise UsageError("--chunk-rows must be at least 1")
    output = Path(output)
    reader = open_source(source, input_format)
    fmt = output_format(output, format)
    if engine is None:
        engine = make_engine(model, url=url, model_repository=model_repository,
                             model_version=model_version, timeout=timeout, token=token, tls=tls,
                             cpu_threads=cpu_threads)
    retry = retry or RetryPolicy()
    started = time.perf_counter()
    try:
        info = await call_with_retries(engine.start, retry)
        load_seconds = time.perf_counter() - started
    except InferenceFailure as exc:
        await engine.close()
        raise JobAborted(f"{engine.description}: {exc.code}: {exc.message}") from None
    except BaseException:
        await engine.close()
        raise
    try:
        if id_column is not None and id_column not in reader.schema.names:
            raise UsageError(f"--id-column {id_column!r} is not a column of {reader.path.name}")
        bindings = bind_inputs(info, reader.schema, inputs, id_column)
        columns = columns_read(bindings)
        reader.select(columns + ([id_column] if id_column and id_column not in columns else []),
                      text_columns=set(columns) if reader.format == "csv" else set())
        scorer = ChunkScorer(engine, info, bindings, outputs, batch_size=batch_size,
                             concurrency=concurrency or getattr(engine, "concurrency", 8),
                             retry=retry, id_column=id_column, fail_fast=fail_fast)
        stat = reader.path.stat()
        job = {"model": model, "model_version": model_version,
               "input": str(reader.path.resolve()), "input_size": stat.st_size,
               "input_mtime_ns": stat.st_mtime_ns, "inputs": sorted(inputs or []),
               "outputs": scorer.output_names, "id_column": id_column,
               "chunk_rows": chunk_rows, "format": fmt}
        directory = Path(work_dir) if work_dir else output.with_name(output.name + ".parts")
        checkpoint = Checkpoint.open(directory, job, resume)
        report = ScoreReport(model, engine.description, reader.path, output, fmt,
                             load_seconds=load_seconds)
        bar = Progress(reader.num_rows, progress)
        try:
            await _run(reader, scorer, checkpoint, report, bar, chunk_rows, ahead)
        except JobAborted as exc:
            raise JobAborted(f"{exc.message}\n{len(checkpoint.done)} finished chunks are kept in "
                             f"{directory}: rerun the same command with --resume to go on")
        finally:
            bar.close()
        report.retries = scorer.retries
        empty = result_table(pa.array([], reader.schema.field(id_column).type if id_column
                                      else pa.int64()),
                             scorer.id_name, scorer.outputs,
                             {s.name: empty_output(s, 0) for s in scorer.outputs},
                             np.zeros(0, bool), np.zeros(0, object), np.zeros(0, object))
        parts = [checkpoint.part_path(i) for i in range(report.chunks)]
        report.rows_out = await asyncio.to_thread(assemble, parts, output, fmt, empty)
        if report.rows_out != report.rows_in:
            raise JobAborted(f"accounting failed: {report.rows_in} rows read but "
                             f"{report.rows_out} written; the checkpoint {directory} is kept")
        checkpoint.remove()
        report.seconds = time.perf_counter() - started
        return report
    finally:
        await engine.close()


async def _run(reader, scorer: ChunkScorer, checkpoint: Checkpoint, report: ScoreReport,
               bar: Progress, chunk_rows: int, ahead: int) -> None:
    chunks = reader.chunks(chunk_rows)
    inflight: set[asyncio.Task] = set()

    def account(record: dict) -> None:
        report.ok += record["ok"]
        report.failed += record["failed"]
        report.versions.update(record["versions"])
        room = 5 - len(report.examples)
        if room > 0:
            report.examples += [tuple(e) for e in record["examples"][:room]]

    async def finish(chunk) -> None:
        table, stats = await scorer.score(chunk)
        record = {"start": chunk.start, **stats.as_dict()}
        await asyncio.to_thread(checkpoint.finish, chunk.index, table, record)
        account(record)
        bar.advance(chunk.rows)

    try:
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                break
            report.chunks += 1
            report.rows_in += chunk.rows
            if reader.num_rows is None and reader.bytes_read:
                bar.estimate_total(int(report.rows_in * reader.size / reader.bytes_read))
            done = checkpoint.done.get(chunk.index)
            if done is not None:
                if done["rows"] != chunk.rows or done["start"] != chunk.start:
                    raise JobAborted(f"--resume: chunk {chunk.index} had {done['rows']} rows "
                                     f"from row {done['start']}, now {chunk.rows} from "
                                     f"{chunk.start}: the input changed")
                report.resumed_chunks += 1
                account(done)
                bar.advance(chunk.rows)
                continue
            inflight.add(asyncio.create_task(finish(chunk)))
            while len(inflight) >= ahead:
                finished, inflight = await asyncio.wait(inflight,
                                                        return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()
        while inflight:
            finished, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()
    except BaseException:
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        raise
    finally:
        try:
            chunks.close()  # the reader's file
        except ValueError:
            pass  # still reading in its thread (cancelled): it closes when the thread ends
