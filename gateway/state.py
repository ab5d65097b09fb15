"""Persisted operator state: traffic policies (and later rollouts), plus an audit log.

The embedded store is a JSON file under the model repository, ``<repo>/.gateway/state.json``,
replaced atomically (write a temporary file, fsync, rename), so a reader never sees half a file.
Writers from several gateway processes serialise on an ``flock`` and re-read before they write,
so concurrent changes to different models are never lost. Every process watches the file and
applies what changed, which is how a fleet sharing one repository converges. Every change is
appended to ``audit.jsonl`` beside it: who, what, when, old and new value.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from gateway.errors import FailedPrecondition

STATE_DIR = ".gateway"  # under the model repository, unless --state-dir says otherwise


class StateStore:
    def __init__(self, directory: Path):
        self.dir = directory
        self.path = self.dir / "state.json"
        self.audit_path = self.dir / "audit.jsonl"
        self._lock_path = self.dir / "state.lock"

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}

    def signature(self):
        """Changes whenever the file is replaced; cheap enough to poll every second."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, section: str, key: str, value, who: str, action: str,
               audit: bool = True) -> tuple[object, dict]:
        """Set ``state[section][key] = value`` (None deletes) under the lock; audit it.

        Returns the old value and the whole new state.
        """
        try:
            return self._update(section, key, value, who, action, audit)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot persist the change: the state directory is not writable "
                f"({exc.strerror}); start the gateway with a writable --state-dir") from exc

    def _update(self, section, key, value, who, action, audit):
        with self._locked():
            state = self.read()
            entries = state.setdefault(section, {})
            old = entries.get(key)
            if value is None:
                entries.pop(key, None)
            else:
                entries[key] = value
            state["revision"] = int(state.get("revision", 0)) + 1
            self._write(state)
            if audit:
                self._audit({"time": time.time(), "who": who, "section": section, "model": key,
                             "action": action, "old": old, "new": value,
                             "revision": state["revision"]})
        return old, state

    def _write(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _audit(self, record: dict) -> None:
        with open(self.audit_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def history(self, model: str | None = None, limit: int = 100) -> list[dict]:
        try:
            lines = self.audit_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if model is None or record.get("model") == model:
                records.append(record)
        return records[-limit:]
