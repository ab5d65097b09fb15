"""The operator-state store contract: revisioned entries, compare-and-set commits, an audit log.

State is a set of sections (``traffic``, ``rollouts``), each a map from a model name to a JSON
value. The store keeps one revision counter; every commit raises it by one, and every entry
remembers the revision that last wrote it (as etcd's ``mod_revision``). A commit is a list of
changes applied together or not at all, each conditioned on the revision the writer read
(``expect``): if any entry moved since, the commit raises :class:`Conflict` and the writer reads
again. That is what makes a stale replica's write fail instead of undoing someone else's.

Two backends implement it: ``FileStore`` (one host, ``state.json``) and ``RedisStore`` (a fleet).
``open_store`` picks one from ``--state-url``. A read that fails raises :class:`StoreUnavailable`;
it never means "empty". Every method is a coroutine and no backend blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import Unavailable

log = logging.getLogger(__name__)

CHECK = object()  # a Change value that writes nothing: it only asserts the entry's revision
COMMIT_PATIENCE_S = 15.0  # compare-and-set retries (with jittered backoff) for this long


class StoreUnavailable(Unavailable):
    """The store cannot be read or written now; serving goes on with the last state read."""


class Conflict(Exception):
    """An entry changed after it was read; read again and rebuild the change."""

    def __init__(self, section: str, key: str, expected: int, actual: int):
        super().__init__(f"{section}/{key}: expected revision {expected}, found {actual}")
        self.section, self.key = section, key


@dataclass(frozen=True, slots=True)
class Entry:
    value: Any
    revision: int  # the store revision that last wrote this entry


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole state at one revision (immutable: replaced, never edited)."""

    revision: int = 0
    sections: Mapping[str, Mapping[str, Entry]] = field(default_factory=dict)

    def get(self, section: str, key: str) -> Entry | None:
        return self.sections.get(section, {}).get(key)

    def value(self, section: str, key: str) -> Any:
        entry = self.get(section, key)
        return None if entry is None else entry.value

    def revision_of(self, section: str, key: str) -> int:
        """The entry's revision; 0 when it does not exist (so expect=0 means "create")."""
        entry = self.get(section, key)
        return 0 if entry is None else entry.revision

    def items(self, section: str) -> dict[str, Any]:
        return {key: entry.value for key, entry in self.sections.get(section, {}).items()}


@dataclass(frozen=True, slots=True)
class Change:
    """Set ``section/key`` to ``value`` (None deletes it; CHECK only asserts), provided its
    revision is still ``expect`` (None: whatever it is)."""

    section: str
    key: str
    value: Any
    expect: int | None


def check_changes(snapshot: Snapshot, changes: list[Change]) -> None:
    """Raise Conflict when an expectation does not hold against ``snapshot``."""
    for change in changes:
        actual = snapshot.revision_of(change.section, change.key)
        if change.expect is not None and change.expect != actual:
            raise Conflict(change.section, change.key, change.expect, actual)


def encode(value: Any) -> str:
    """JSON for the store: finite numbers only (NaN would be written as invalid JSON)."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


def parse_sections(data: Any, where: str) -> Snapshot:
    """A Snapshot from the stored document ``{"revision", "sections": {s: {k: {revision,
    value}}}}``; anything else raises StoreUnavailable naming ``where``."""
    if not isinstance(data, dict):
        raise StoreUnavailable(f"{where} does not hold gateway state (a JSON object); found "
                               f"{type(data).__name__}")
    if "sections" not in data:
        return _parse_legacy(data, where)
    revision, sections = data.get("revision"), data.get("sections")
    if not isinstance(revision, int) or not isinstance(sections, dict):
        raise StoreUnavailable(f"{where} does not hold gateway state: 'revision' must be an "
                               "integer and 'sections' an object")
    parsed: dict[str, dict[str, Entry]] = {}
    for name, entries in sections.items():
        if not isinstance(entries, dict):
            raise StoreUnavailable(f"{where}: section '{name}' is not an object")
        parsed[name] = {}
        for key, entry in entries.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int) \
                    or "value" not in entry:
                raise StoreUnavailable(f"{where}: entry '{name}/{key}' is not "
                                       "{revision, value}")
            parsed[name][key] = Entry(entry["value"], entry["revision"])
    return Snapshot(revision, parsed)


def _parse_legacy(data: dict, where: str) -> Snapshot:
    """The first format (``{"traffic": {...}, "rollouts": {...}, "revision": N}``), read so an
    upgrade keeps its splits; the next commit rewrites it in the current format."""
    revision = data.get("revision", 0)
    if not isinstance(revision, int):
        raise StoreUnavailable(f"{where}: 'revision' is not an integer")
    sections = {}
    for name, entries in data.items():
        if name == "revision":
            continue
        if not isinstance(entries, dict):
            raise StoreUnavailable(f"{where}: section '{name}' is not an object")
        sections[name] = {key: Entry(value, revision) for key, value in entries.items()}
    return Snapshot(revision, sections)


def dump_sections(snapshot: Snapshot) -> dict:
    return {"format": 2, "revision": snapshot.revision,
            "sections": {name: {key: {"revision": e.revision, "value": e.value}
                                for key, e in entries.items()}
                         for name, entries in snapshot.sections.items() if entries}}


def apply_changes(snapshot: Snapshot, changes: list[Change]) -> Snapshot:
    """The snapshot after a commit of ``changes`` (already checked) at the next revision."""
    revision = snapshot.revision + 1
    sections = {name: dict(entries) for name, entries in snapshot.sections.items()}
    for change in changes:
        if change.value is CHECK:
            continue
        entries = sections.setdefault(change.section, {})
        if change.value is None:
            entries.pop(change.key, None)
        else:
            entries[change.key] = Entry(change.value, revision)
    return Snapshot(revision, sections)


class Store(ABC):
    """What the control plane needs from a store; see the module docstring for the contract."""

    url: str  # for messages and logs (no password)

    @abstractmethod
    async def read(self) -> Snapshot:
        """The current state; StoreUnavailable when it cannot be read (never "empty")."""

    @abstractmethod
    async def commit(self, changes: list[Change], audit: list[dict]) -> int:
        """Apply every change or none (Conflict); append the audit records, each stamped with
        the new revision. Returns the new revision."""

    @abstractmethod
    async def history(self, model: str | None, limit: int) -> list[dict]:
        """The last ``limit`` audit records (of one model), oldest first."""

    @abstractmethod
    async def now(self) -> float:
        """Seconds on the store's clock: leases are measured on it, never on a replica's."""

    @abstractmethod
    def changes(self) -> AsyncIterator[None]:
        """Yields whenever the state may have changed (and once at every (re)connect); the
        follower then reads it whole, so no change is missed."""

    # Per-replica records under a topic: each replica's rollout figures ("figures/MODEL"), its
    # sign of life and what it has applied ("members"). Not revisioned: each replica writes
    # only its own record, and a newer one replaces it.
    @abstractmethod
    async def put_record(self, topic: str, replica: str, record: dict) -> None: ...

    @abstractmethod
    async def records(self, topic: str) -> list[dict]: ...

    @abstractmethod
    async def clear_records(self, topic: str, replica: str | None = None) -> None:
        """Remove every replica's record under ``topic`` (or only ``replica``'s)."""

    @abstractmethod
    async def claim(self, key: str, holder: str, ttl_s: float) -> bool:
        """True for the first caller to claim ``key`` until ``ttl_s`` seconds pass on the
        store's clock (then it may be claimed again): one action per fleet, e.g. one drift
        hook call for one drift episode, whichever replica saw it first."""

    async def close(self) -> None:
        return None


async def transact(store: Store, build: Callable[[Snapshot], Any]) -> tuple[Any, int]:
    """Read, build the changes, commit; again on Conflict. ``build(snapshot)`` returns
    ``(changes, audit, result)`` or None for "nothing to do"; it may raise a GatewayError to
    refuse. Returns ``(result, revision)`` (revision 0 when nothing was written)."""
    loop = asyncio.get_running_loop()
    deadline, backoff, attempts = loop.time() + COMMIT_PATIENCE_S, 0.001, 0
    while True:
        snapshot = await store.read()
        plan = build(snapshot)
        if plan is None:
            return None, 0
        changes, audit, result = plan
        try:
            return result, await store.commit(changes, audit)
        except Conflict as exc:
            attempts += 1
            log.debug("state commit conflict (%s); reading again", exc)
        if loop.time() > deadline:
            raise StoreUnavailable(f"the operator state changed {attempts} times while this "
                                   "change was applied; retry")
        await asyncio.sleep(random.uniform(0, backoff))
        backoff = min(backoff * 2, 0.05)


def open_store(url: str, default_dir: Path, password: str | None = None) -> Store:
    """The store ``--state-url`` names: empty or ``file://DIR`` for the embedded file store,
    ``redis://`` or ``rediss://`` for Redis."""
    if not url or url.startswith("file:"):
        from gateway.control.filestore import FileStore

        path = Path(url[len("file://"):] if url.startswith("file://") else
                    url[len("file:"):]) if url else default_dir
        return FileStore(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from gateway.control.redisstore import RedisStore

        return RedisStore(url, password)
    raise ValueError(f"--state-url {url!r}: use file://DIR, redis://HOST:PORT/DB or "
                     "rediss://HOST:PORT/DB")
