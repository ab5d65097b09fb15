"""The embedded store for one host: ``state.json`` in the state directory.

A commit takes an exclusive ``flock`` on ``state.lock`` (with a time limit, so a stuck holder
surfaces as UNAVAILABLE instead of a hang), reads the file afresh, checks every expectation
against it, writes the next revision to a temporary file, fsyncs it and renames it over
``state.json``, then appends the audit records to ``audit.jsonl``. If the file cannot be read
or holds something else than gateway state, the commit is refused: it never writes over state
it could not read. All file I/O runs in worker threads, never on the event loop.

Processes on the same host see each other's commits by watching the file's signature, and read
it whole every few polls anyway (attribute caches on network filesystems can hide a change).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from gateway.control.store import (
    Change,
    Snapshot,
    Store,
    StoreUnavailable,
    apply_changes,
    check_changes,
    dump_sections,
    encode,
    parse_sections,
)

LOCK_TIMEOUT_S = 10.0
AUDIT_ROTATE_BYTES = 16 * 1024 * 1024  # audit.jsonl moves to audit.jsonl.1 past this
RESYNC_EVERY = 10  # polls between unconditional re-reads
IO_THREAD = ThreadPoolExecutor(1, thread_name_prefix="state-store")  # every file store's I/O


class FileStore(Store):
    def __init__(self, directory: Path, poll_interval: float = 1.0, clock=time.time):
        self.dir = Path(directory)
        self.path = self.dir / "state.json"
        self.audit_path = self.dir / "audit.jsonl"
        self.lock_path = self.dir / "state.lock"
        self.records_dir = self.dir / "records"
        self.url = f"file://{self.dir}"
        self.poll_interval = poll_interval
        self.clock = clock

    async def _io(self, fn, *args):
        """File I/O on the store's own thread: off the event loop, and off the default
        executor, whose threads load models (glibc gives each thread that allocates its own
        arena, and keeps freed memory in it: model loads spread over more threads hold more)."""
        return await asyncio.get_running_loop().run_in_executor(IO_THREAD, fn, *args)

    # ---- reading --------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        return await self._io(self._read)

    def _read(self) -> Snapshot:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return Snapshot()
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the operator state {self.path}: "
                                   f"{exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StoreUnavailable(f"the operator state {self.path} is not valid JSON "
                                   f"({exc.msg} at byte {exc.pos}; truncated or edited by "
                                   "hand?): fix or restore it") from None
        return parse_sections(data, str(self.path))

    def signature(self):
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    async def changes(self) -> AsyncIterator[None]:
        seen, polls = object(), 0
        while True:
            signature = await self._io(self.signature)
            if signature != seen or polls % RESYNC_EVERY == 0:
                seen = signature
                yield None
            polls += 1
            await asyncio.sleep(self.poll_interval)

    async def now(self) -> float:
        return self.clock()

    # ---- writing --------------------------------------------------------------------------

    async def commit(self, changes: list[Change], audit: list[dict]) -> int:
        return await self._io(self._commit, changes, audit)

    def _commit(self, changes: list[Change], audit: list[dict]) -> int:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a") as lock:
                self._lock(lock)
                try:
                    snapshot = self._read()
                    check_changes(snapshot, changes)
                    after = apply_changes(snapshot, changes)
                    self._write(after)
                    self._audit(audit, after.revision)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write the operator state in {self.dir}: "
                                   f"{exc.strerror or exc}; start the gateway with a writable "
                                   "--state-dir") from None
        return after.revision

    def _lock(self, lock) -> None:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"the operator state lock {self.lock_path} has been "
                                       f"held for {LOCK_TIMEOUT_S:g}s by another process")
            time.sleep(0.005)

    def _write(self, snapshot: Snapshot) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(encode(dump_sections(snapshot)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _audit(self, records: list[dict], revision: int) -> None:
        if not records:
            return
        try:
            if self.audit_path.stat().st_size > AUDIT_ROTATE_BYTES:
                os.replace(self.audit_path, self.audit_path.with_suffix(".jsonl.1"))
        except FileNotFoundError:
            pass
        with open(self.audit_path, "a") as f:
            f.writelines(encode({**record, "revision": revision}) + "\n" for record in records)
            f.flush()
            os.fsync(f.fileno())

    async def history(self, model: str | None, limit: int) -> list[dict]:
        return await self._io(self._history, model, limit)

    def _history(self, model: str | None, limit: int) -> list[dict]:
        try:
            lines = self.audit_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the audit log {self.audit_path}: "
                                   f"{exc.strerror or exc}") from None
        records = []
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-append
            if isinstance(record, dict) and (model is None or record.get("model") == model):
                records.append(record)
                if len(records) >= limit:
                    break
        return records[::-1]

    async def claim(self, key: str, holder: str, ttl_s: float) -> bool:
        """A file per claim, created exclusively under the state lock; an expired one (by
        the host clock this store runs on) is replaced."""
        def claim() -> bool:
            claims = self.dir / "claims"
            claims.mkdir(parents=True, exist_ok=True)
            path = claims / key.replace("/", "_")
            with open(self.lock_path, "a") as lock:
                self._lock(lock)
                try:
                    try:
                        held = json.loads(path.read_text())
                        if float(held["until"]) > self.clock():
                            return False
                    except (OSError, ValueError, KeyError, TypeError):
                        pass  # none, or unreadable: take it
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    tmp.write_text(encode({"holder": holder, "until": self.clock() + ttl_s}))
                    os.replace(tmp, path)
                    return True
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        try:
            return await self._io(claim)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write a claim in {self.dir}: "
                                   f"{exc.strerror or exc}") from None

    # ---- per-replica records: one small file per topic and replica ---------------------------

    def _topic_dir(self, topic: str) -> Path:
        return self.records_dir / quote(topic, safe="")

    async def put_record(self, topic: str, replica: str, record: dict) -> None:
        def write():
            directory = self._topic_dir(topic)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{quote(replica, safe='')}.json"
            tmp = directory / f".{path.name}.tmp{os.getpid()}"
            tmp.write_text(encode(record))
            os.replace(tmp, path)
        try:
            await self._io(write)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write replica records in {self.records_dir}: "
                                   f"{exc.strerror or exc}") from None

    async def records(self, topic: str) -> list[dict]:
        def read():
            found = []
            for path in self._topic_dir(topic).glob("*.json"):
                try:
                    found.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue  # replaced or removed while listed
            return found
        return await self._io(read)

    async def clear_records(self, topic: str, replica: str | None = None) -> None:
        def clear():
            directory = self._topic_dir(topic)
            if replica is not None:
                (directory / f"{quote(replica, safe='')}.json").unlink(missing_ok=True)
            else:
                shutil.rmtree(directory, ignore_errors=True)
        await self._io(clear)
