"""A job's checkpoint: finished chunks as part files, and a log of which are finished.

``<output>.parts/`` holds ``manifest.json`` (what the job is: model, input file, options; a
``--resume`` of a different job is refused), ``part-NNNNNN.parquet`` (the answers of chunk N,
written to a temporary name, synced and renamed, so a part exists whole or not at all) and
``chunks.log`` (one JSON line per finished chunk, appended and synced after its part is in
place). A chunk counts as finished only when both are there, so a process killed at any
instruction loses at most the chunks it was working on: a part without its line is redone
(and replaced), a torn last line is cut off, leftover temporary files are removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gateway.batch.errors import UsageError

MANIFEST = "manifest.json"
LOG = "chunks.log"
VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, write) -> None:
    """``write(temporary path)``, then sync it and rename it over ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


class Checkpoint:
    def __init__(self, directory: Path, job: dict):
        self.directory = Path(directory)
        self.job = job
        self.done: dict[int, dict] = {}  # chunk index -> its log record

    @classmethod
    def open(cls, directory: Path, job: dict, resume: bool) -> Checkpoint:
        """The checkpoint of this job: new, or (``resume``) the one an earlier run left."""
        checkpoint = cls(directory, job)
        manifest = checkpoint.directory / MANIFEST
        if checkpoint.directory.exists():
            if not resume:
                raise UsageError(
                    f"{checkpoint.directory} holds the checkpoint of an unfinished run: add "
                    "--resume to continue it, or delete the directory to start over")
            if manifest.is_file():
                checkpoint._load(manifest)
                return checkpoint
            shutil.rmtree(checkpoint.directory)  # killed before its manifest was in place
        checkpoint.directory.mkdir(parents=True)
        write_atomically(manifest, lambda p: p.write_text(json.dumps(
            {"checkpoint": VERSION, "job": job}, indent=1, sort_keys=True)))
        return checkpoint

    def _load(self, manifest: Path) -> None:
        try:
            recorded = json.loads(manifest.read_text())["job"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{manifest} is unreadable ({exc}); delete "
                             f"{self.directory} to start over") from None
        if recorded != self.job:
            changed = sorted(k for k in set(recorded) | set(self.job)
                             if recorded.get(k) != self.job.get(k))
            details = "; ".join(f"{k}: was {recorded.get(k)!r}, now {self.job.get(k)!r}"
                                for k in changed)
            raise UsageError(f"--resume: {self.directory} belongs to a different job ({details});"
                             " rerun it as it was, or delete the directory to start over")
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        log = self.directory / LOG
        if not log.exists():
            return
        data = log.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) != len(data):  # a torn last line: cut it off before appending more
            with open(log, "r+b") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
        for line in complete.splitlines():
            try:
                record = json.loads(line)
                index = int(record["chunk"])
            except (ValueError, KeyError, TypeError):
                continue
            part = self.part_path(index)
            try:
                if pq.ParquetFile(part).metadata.num_rows != record["rows"]:
                    continue
            except (OSError, pa.ArrowException):
                continue
            self.done[index] = record

    def part_path(self, index: int) -> Path:
        return self.directory / f"part-{index:06d}.parquet"

    def finish(self, index: int, table: pa.Table, record: dict) -> None:
        """Make chunk ``index`` finished: its part in place, then its log line (blocking)."""
        write_atomically(self.part_path(index), lambda p: pq.write_table(table, p))
        record = {"chunk": index, **record}
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.directory / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done[index] = record

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
