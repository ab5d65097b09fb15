"""Predictions and feedback totals shared by every process of a fleet, so that a label sent to
any process joins the prediction that any other made, and every process reports the same
accuracy.

Two backends, following the operator-state store: with Redis, each prediction is a key with a
time to live (memory is bounded by the TTL and Redis's own ``maxmemory``) and the totals are a
hash of counters; with the file store (one host, ``--workers``), a SQLite database in the state
directory (WAL mode, so workers write concurrently) with the same TTL and a row cap. Taking a
prediction deletes it in the same step, so a label counts once even if sent twice or to two
processes at once. Every call runs off the event loop (Redis's asyncio client, or a thread).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

from gateway.control.filestore import IO_THREAD
from gateway.control.store import StoreUnavailable

DEFAULT_TTL_S = 7 * 24 * 3600.0  # a label later than this finds nothing
MAX_ROWS = 10_000_000  # the SQLite table's cap (oldest dropped first)
COUNT_LIMIT = 1_000_000  # counting kept predictions stops here (Redis counts by scanning)

Prediction = tuple[str, list]  # (version, values per row)
Totals = dict[str, tuple[int, int, float]]  # version -> (labelled, correct, abs error sum)


class SharedPredictions(ABC):
    @abstractmethod
    async def put(self, model: str, items: list[tuple[str, str, list]]) -> None:
        """Keep ``(request id, version, values)`` predictions (a newer one replaces)."""

    @abstractmethod
    async def take(self, model: str, ids: list[str]) -> dict[str, Prediction]:
        """The predictions of these ids that are kept, removed as they are returned."""

    @abstractmethod
    async def add(self, model: str, version: str, labelled: int, correct: int,
                  abs_error: float) -> None: ...

    @abstractmethod
    async def totals(self, model: str) -> Totals: ...

    @abstractmethod
    async def count(self, model: str, limit: int = COUNT_LIMIT) -> int:
        """Predictions of ``model`` waiting for a label (counting stops at ``limit``)."""

    async def close(self) -> None:
        return None


class RedisPredictions(SharedPredictions):
    def __init__(self, client, url: str, ttl_s: float = DEFAULT_TTL_S):
        self.client, self.url, self.ttl_ms = client, url, int(ttl_s * 1000)

    def _down(self, exc) -> StoreUnavailable:
        return StoreUnavailable(f"the feedback store {self.url} is unreachable "
                                f"({type(exc).__name__}: {exc})")

    @staticmethod
    def _key(model: str, request_id: str) -> str:
        return f"{{gateway}}:fb:{model}:{request_id}"

    async def put(self, model, items):
        from redis.exceptions import RedisError

        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for request_id, version, values in items:
                    pipe.set(self._key(model, request_id), json.dumps([version, values]),
                             px=self.ttl_ms)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None

    async def take(self, model, ids):
        from redis.exceptions import RedisError

        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for request_id in ids:
                    pipe.getdel(self._key(model, request_id))
                found = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None
        taken = {}
        for request_id, text in zip(ids, found):
            if text:
                version, values = json.loads(text)
                taken[request_id] = (version, values)
        return taken

    async def add(self, model, version, labelled, correct, abs_error):
        from redis.exceptions import RedisError

        key = f"{{gateway}}:fbt:{model}"
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                await (pipe.hincrby(key, f"{version}:n", labelled)
                       .hincrby(key, f"{version}:c", correct)
                       .hincrbyfloat(key, f"{version}:e", abs_error).execute())
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None

    async def totals(self, model):
        from redis.exceptions import RedisError

        try:
            fields = await self.client.hgetall(f"{{gateway}}:fbt:{model}")
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None
        parts: dict[str, dict[str, float]] = {}
        for name, value in fields.items():
            version, _, part = name.rpartition(":")
            parts.setdefault(version, {})[part] = float(value)
        return {v: (int(p.get("n", 0)), int(p.get("c", 0)), p.get("e", 0.0))
                for v, p in parts.items()}


    async def count(self, model, limit=COUNT_LIMIT):
        from redis.exceptions import RedisError

        found = 0
        try:
            async for _ in self.client.scan_iter(match=self._key(model, "*"), count=1000):
                found += 1
                if found >= limit:
                    break
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None
        return found


class SqlitePredictions(SharedPredictions):
    """One database file for the processes of one host (the file store's directory)."""

    def __init__(self, directory: Path, ttl_s: float = DEFAULT_TTL_S, max_rows: int = MAX_ROWS):
        self.path = Path(directory) / "feedback.sqlite"
        self.ttl_s, self.max_rows = ttl_s, max_rows
        self._local = threading.local()
        self._puts = 0

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")  # best effort: a host crash may lose the
            # newest predictions (their labels then count as unknown), never corrupt the file
            db.execute("CREATE TABLE IF NOT EXISTS predictions (model TEXT, id TEXT, "
                       "version TEXT, value TEXT, expires REAL, PRIMARY KEY (model, id))")
            db.execute("CREATE TABLE IF NOT EXISTS totals (model TEXT, version TEXT, "
                       "labelled INTEGER, correct INTEGER, abs_error REAL, "
                       "PRIMARY KEY (model, version))")
            self._local.db = db
        return db

    async def _run(self, work):
        try:
            return await asyncio.get_running_loop().run_in_executor(IO_THREAD, work)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the feedback database {self.path} failed: {exc}") from None

    async def put(self, model, items):
        now = time.time()

        def put():
            db = self._db()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?)",
                               [(model, i, v, json.dumps(values), now + self.ttl_s)
                                for i, v, values in items])
                self._puts += 1
                if self._puts % 100 == 1:  # now and then: expired rows, then the row cap
                    db.execute("DELETE FROM predictions WHERE expires < ?", (now,))
                    excess = db.execute("SELECT count(*) FROM predictions").fetchone()[0] \
                        - self.max_rows
                    if excess > 0:  # rowids grow with every insert: the oldest go first
                        db.execute("DELETE FROM predictions WHERE rowid IN (SELECT rowid FROM "
                                   "predictions ORDER BY rowid LIMIT ?)", (excess,))
        await self._run(put)

    async def take(self, model, ids):
        now = time.time()

        def take():
            db = self._db()
            found = {}
            with db:
                db.execute("BEGIN IMMEDIATE")
                for request_id in ids:
                    row = db.execute("DELETE FROM predictions WHERE model = ? AND id = ? "
                                     "RETURNING version, value, expires",
                                     (model, request_id)).fetchone()
                    if row is not None and row[2] >= now:
                        found[request_id] = (row[0], json.loads(row[1]))
            return found
        return await self._run(take)

    async def add(self, model, version, labelled, correct, abs_error):
        def add():
            self._db().execute(
                "INSERT INTO totals VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, version) DO "
                "UPDATE SET labelled = labelled + excluded.labelled, correct = correct + "
                "excluded.correct, abs_error = abs_error + excluded.abs_error",
                (model, version, labelled, correct, abs_error))
        await self._run(add)

    async def totals(self, model):
        def totals():
            rows = self._db().execute("SELECT version, labelled, correct, abs_error FROM "
                                      "totals WHERE model = ?", (model,)).fetchall()
            return {v: (n, c, e) for v, n, c, e in rows}
        return await self._run(totals)


    async def count(self, model, limit=COUNT_LIMIT):
        now = time.time()

        def count():
            return self._db().execute("SELECT count(*) FROM (SELECT 1 FROM predictions WHERE "
                                      "model = ? AND expires >= ? LIMIT ?)",
                                      (model, now, limit)).fetchone()[0]
        return await self._run(count)


def shared_predictions(store) -> SharedPredictions:
    """The prediction table that goes with an operator-state store."""
    from gateway.control.redisstore import RedisStore

    if isinstance(store, RedisStore):
        return RedisPredictions(store.client, store.url)
    return SqlitePredictions(store.dir)
