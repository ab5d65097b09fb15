"""The fleet store: operator state in Redis, shared by every replica.

Layout (one hash tag, so a Redis Cluster keeps every key on one slot):

- ``{gateway}:state``     hash ``section/key`` -> JSON value
- ``{gateway}:revs``      hash ``section/key`` -> the revision that last wrote it
- ``{gateway}:revision``  the store revision (INCR)
- ``{gateway}:audit``     the audit log, a stream capped at ``AUDIT_MAXLEN`` records
- ``{gateway}:records:T`` hash replica -> that replica's record under topic T (rollout
  figures of a model, membership)
- channel ``{gateway}:changes``  the new revision after every commit

A commit is one Lua script: it checks every expected revision, bumps the counter, writes the
entries and their revisions, appends the audit records and publishes the revision, atomically.
Followers subscribe to the channel and read everything on every (re)connect, so a change made
while a replica was cut off is picked up when it comes back. The store's clock (``TIME``) is
the one leases are measured on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.control.store import (
    CHECK,
    Change,
    Conflict,
    Entry,
    Snapshot,
    Store,
    StoreUnavailable,
    encode,
)

log = logging.getLogger(__name__)
PREFIX = "{gateway}"
AUDIT_MAXLEN = 100_000
RECORDS_TTL_S = 24 * 3600  # a topic nobody writes any more goes away
RESYNC_S = 10.0  # a full re-read this often even without notifications
TIMEOUT_S = 3.0  # per command: a dead store fails operator changes fast, never hangs them

_COMMIT = """
local state, revs, counter, audit = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local n = tonumber(ARGV[1])
for c = 0, n - 1 do
  local f, expect = ARGV[2 + c * 4], ARGV[3 + c * 4]
  if expect ~= '' then
    local cur = tonumber(redis.call('HGET', revs, f) or '0')
    if cur ~= tonumber(expect) then return {0, f, cur} end
  end
end
local rev = redis.call('INCR', counter)
for c = 0, n - 1 do
  local f, op, v = ARGV[2 + c * 4], ARGV[4 + c * 4], ARGV[5 + c * 4]
  if op == 's' then
    redis.call('HSET', state, f, v)
    redis.call('HSET', revs, f, rev)
  elseif op == 'd' then
    redis.call('HDEL', state, f)
    redis.call('HDEL', revs, f)
  end
end
local i = 2 + n * 4
local m = tonumber(ARGV[i])
for a = 1, m do
  redis.call('XADD', audit, 'MAXLEN', '~', ARGV[i + m + 1], '*', 'record', ARGV[i + a],
             'revision', rev)
end
redis.call('PUBLISH', ARGV[i + m + 2], rev)
return {1, '', rev}
"""


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}" if user else
                                     f":***@{netloc}"))


class RedisStore(Store):
    def __init__(self, url: str, password: str | None = None):
        self.url = redacted(url)
        password = password or os.environ.get("GATEWAY_STATE_PASSWORD") or None
        extra = {} if urlsplit(url).password or not password else {"password": password}
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S,
                                           socket_connect_timeout=TIMEOUT_S,
                                           decode_responses=True, **extra)
        # Notifications wait indefinitely between messages: their own connection settings.
        self.listener = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S,
                                             health_check_interval=5, decode_responses=True,
                                             **extra)
        self.keys = [f"{PREFIX}:state", f"{PREFIX}:revs", f"{PREFIX}:revision",
                     f"{PREFIX}:audit"]
        self.channel = f"{PREFIX}:changes"
        self._commit = self.client.register_script(_COMMIT)

    def _down(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"the operator state store {self.url} is unreachable "
                                f"({type(exc).__name__}: {exc}); serving continues with the "
                                "last state read, operator changes wait until it is back")

    async def read(self) -> Snapshot:
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                revision, values, revisions = await (
                    pipe.get(self.keys[2]).hgetall(self.keys[0]).hgetall(self.keys[1])
                    .execute())
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None
        sections: dict[str, dict[str, Entry]] = {}
        for name, text in values.items():
            section, _, key = name.partition("/")
            try:
                value = json.loads(text)
            except ValueError:
                raise StoreUnavailable(f"{self.url}: entry '{name}' is not JSON") from None
            sections.setdefault(section, {})[key] = Entry(value, int(revisions.get(name, 0)))
        return Snapshot(int(revision or 0), sections)

    async def commit(self, changes: list[Change], audit: list[dict]) -> int:
        args: list = [len(changes)]
        for change in changes:
            op, value = (("c", "") if change.value is CHECK else ("d", "")
                         if change.value is None else ("s", encode(change.value)))
            args += [f"{change.section}/{change.key}",
                     "" if change.expect is None else change.expect, op, value]
        args += [len(audit), *(encode(r) for r in audit), AUDIT_MAXLEN, self.channel]
        try:
            ok, name, revision = await self._commit(keys=self.keys, args=args)
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None
        if not ok:
            section, _, key = name.partition("/")
            expected = next(c.expect for c in changes if f"{c.section}/{c.key}" == name)
            raise Conflict(section, key, expected, int(revision))
        return int(revision)

    async def history(self, model: str | None, limit: int) -> list[dict]:
        records: list[dict] = []
        last = "+"
        try:
            while len(records) < limit:
                batch = await self.client.xrevrange(self.keys[3], max=last, min="-",
                                                    count=1000)
                if not batch:
                    break
                for stream_id, fields in batch:
                    try:
                        record = json.loads(fields.get("record", "{}"))
                    except ValueError:
                        continue
                    record["revision"] = int(fields.get("revision", 0))
                    if model is None or record.get("model") == model:
                        records.append(record)
                        if len(records) >= limit:
                            break
                last = "(" + batch[-1][0]
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None
        return records[::-1]

    async def now(self) -> float:
        try:
            seconds, micros = await self.client.time()
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None
        return seconds + micros / 1e6

    async def changes(self) -> AsyncIterator[None]:
        backoff = 0.2
        while True:
            pubsub = self.listener.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                backoff = 0.2
                yield None  # (re)connected: the follower reads everything
                while True:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=RESYNC_S)
                    yield None  # a commit, or RESYNC_S of quiet: read again either way
            except (RedisError, OSError) as exc:
                log.debug("state store notifications lost: %s", exc)
                yield None  # the read fails too, and the follower reports the store down
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass

    async def put_record(self, topic: str, replica: str, record: dict) -> None:
        key = f"{PREFIX}:records:{topic}"
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.hset(key, replica, encode(record)).expire(key, RECORDS_TTL_S) \
                    .execute()
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None

    async def records(self, topic: str) -> list[dict]:
        try:
            values = await self.client.hgetall(f"{PREFIX}:records:{topic}")
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None
        found = []
        for text in values.values():
            try:
                found.append(json.loads(text))
            except ValueError:
                continue
        return found

    async def clear_records(self, topic: str, replica: str | None = None) -> None:
        key = f"{PREFIX}:records:{topic}"
        try:
            if replica is None:
                await self.client.delete(key)
            else:
                await self.client.hdel(key, replica)
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None

    async def claim(self, key: str, holder: str, ttl_s: float) -> bool:
        try:
            return bool(await self.client.set(f"{PREFIX}:claim:{key}", holder, nx=True,
                                              px=max(1, int(ttl_s * 1000))))
        except (RedisError, OSError) as exc:
            raise self._down(exc) from None

    async def close(self) -> None:
        for client in (self.client, self.listener):
            try:
                await client.aclose()
            except (RedisError, OSError):
                pass
