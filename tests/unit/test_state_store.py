"""The operator-state store contract, run against both backends: the embedded file store and a
real ``redis-server``. Whatever backs a deployment, a commit is all-or-nothing and conditional
on the revision read, a failed read never reads as "empty", and every change is audited."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.control.filestore import FileStore
from gateway.control.redisstore import RedisStore, redacted
from gateway.control.store import (
    CHECK,
    Change,
    Conflict,
    StoreUnavailable,
    open_store,
    transact,
)


@pytest.fixture(params=["file", "redis"])
async def make_store(request, tmp_path):
    """A factory: each call opens another client on the same backing store (another replica)."""
    opened = []
    if request.param == "file":
        def make():
            store = FileStore(tmp_path / "state", poll_interval=0.05)
            opened.append(store)
            return store
    else:
        server = request.getfixturevalue("redis_server")

        def make():
            store = RedisStore(server.url)
            opened.append(store)
            return store
    make.kind = request.param
    yield make
    for store in opened:
        await store.close()


async def test_an_empty_store_reads_as_revision_zero(make_store):
    snapshot = await make_store().read()
    assert (snapshot.revision, snapshot.items("traffic")) == (0, {})


async def test_commits_are_revisioned_and_read_back_by_another_client(make_store):
    writer, reader = make_store(), make_store()
    revision = await writer.commit([Change("traffic", "m", {"weights": {"1": 100.0}}, 0)], [])
    assert revision == 1
    snapshot = await reader.read()
    assert snapshot.revision == 1
    assert snapshot.value("traffic", "m") == {"weights": {"1": 100.0}}
    assert snapshot.revision_of("traffic", "m") == 1
    await writer.commit([Change("rollouts", "x", {"state": "running"}, None)], [])
    snapshot = await reader.read()
    assert (snapshot.revision, snapshot.revision_of("traffic", "m"),
            snapshot.revision_of("rollouts", "x")) == (2, 1, 2)


async def test_a_stale_expectation_conflicts_and_writes_nothing(make_store):
    store = make_store()
    await store.commit([Change("traffic", "m", {"v": 1}, 0)], [])
    with pytest.raises(Conflict):  # "create" when it exists
        await store.commit([Change("traffic", "m", {"v": 2}, 0)], [])
    with pytest.raises(Conflict):  # all or nothing: the first change is not applied either
        await store.commit([Change("traffic", "other", {"v": 3}, 0),
                            Change("rollouts", "m", CHECK, 7)], [{"model": "other"}])
    snapshot = await store.read()
    assert snapshot.revision == 1
    assert snapshot.value("traffic", "m") == {"v": 1}
    assert snapshot.get("traffic", "other") is None
    assert await store.history(None, 10) == []


async def test_delete_and_check_only_changes(make_store):
    store = make_store()
    await store.commit([Change("traffic", "m", {"v": 1}, 0)], [])
    await store.commit([Change("traffic", "m", None, 1), Change("rollouts", "m", CHECK, 0)], [])
    snapshot = await store.read()
    assert snapshot.revision == 2 and snapshot.get("traffic", "m") is None


async def test_audit_records_carry_the_revision_and_filter_by_model(make_store):
    store = make_store()
    for i, model in enumerate(["a", "b", "a"]):
        await store.commit([Change("traffic", model, {"i": i}, None)],
                           [{"model": model, "who": "ops", "action": "set", "old": None,
                             "new": {"i": i}}])
    records = await store.history("a", 10)
    assert [(r["revision"], r["new"]) for r in records] == [(1, {"i": 0}), (3, {"i": 2})]
    assert [r["model"] for r in await store.history(None, 2)] == ["b", "a"]


async def test_concurrent_writers_lose_nothing(make_store):
    """Two clients (two replicas), 100 read-modify-write increments each, interleaved."""
    first, second = make_store(), make_store()

    def increment(snapshot):
        count = (snapshot.value("traffic", "counter") or {"n": 0})["n"]
        return ([Change("traffic", "counter", {"n": count + 1},
                        snapshot.revision_of("traffic", "counter"))],
                [{"model": "counter", "action": "set"}], count + 1)

    await asyncio.gather(*(transact(store, increment)
                           for _ in range(100) for store in (first, second)))
    snapshot = await first.read()
    assert snapshot.value("traffic", "counter") == {"n": 200}
    assert snapshot.revision == 200
    assert len(await first.history("counter", 1000)) == 200


async def test_change_notifications_reach_another_client(make_store):
    watcher, writer = make_store(), make_store()
    changes = watcher.changes()
    await asyncio.wait_for(anext(changes), 5)  # the first yield: read everything
    await writer.commit([Change("traffic", "m", {"v": 1}, None)], [])
    await asyncio.wait_for(anext(changes), 15)
    assert (await watcher.read()).value("traffic", "m") == {"v": 1}
    await changes.aclose()


async def test_per_replica_records_by_topic(make_store):
    store = make_store()
    await store.put_record("figures/m", "host:1", {"window": "w", "replica": "host:1"})
    await store.put_record("figures/m", "host:2", {"window": "w", "replica": "host:2"})
    await store.put_record("figures/m", "host:1", {"window": "w2", "replica": "host:1"})
    await store.put_record("figures/other", "host:1", {"window": "z"})
    await store.put_record("members", "h/x:1", {"replica": "h/x:1"})
    found = sorted((f["replica"], f["window"]) for f in await store.records("figures/m"))
    assert found == [("host:1", "w2"), ("host:2", "w")]
    await store.clear_records("figures/m", "host:2")
    assert [f["replica"] for f in await store.records("figures/m")] == ["host:1"]
    await store.clear_records("figures/m")
    assert await store.records("figures/m") == []
    assert len(await store.records("figures/other")) == 1
    assert [r["replica"] for r in await store.records("members")] == ["h/x:1"]


async def test_the_store_clock_moves(make_store):
    store = make_store()
    first = await store.now()
    await asyncio.sleep(0.02)
    assert await store.now() > first


async def test_non_finite_values_are_refused_before_they_are_stored(make_store):
    store = make_store()
    with pytest.raises(ValueError):
        await store.commit([Change("rollouts", "m", {"interval": float("nan")}, None)], [])
    assert (await store.read()).revision == 0


# ---- file store: damaged files --------------------------------------------------------------

@pytest.mark.parametrize("content, fragment", [
    (b'{"format": 2, "revision": 3, "sections": {"traffic": {"m": {"rev', "is not valid JSON"),
    (b"null", "does not hold gateway state (a JSON object); found NoneType"),
    (b"[1, 2]", "does not hold gateway state (a JSON object); found list"),
    (b'{"format": 2, "revision": "x", "sections": {}}', "'revision' must be an integer"),
    (b'{"format": 2, "revision": 1, "sections": {"traffic": {"m": 5}}}',
     "entry 'traffic/m' is not {revision, value}"),
])
async def test_a_damaged_state_file_is_an_error_naming_it_and_is_never_overwritten(
        tmp_path, content, fragment):
    store = FileStore(tmp_path)
    store.path.write_bytes(content)
    with pytest.raises(StoreUnavailable) as info:
        await store.read()
    assert fragment in info.value.message and str(store.path) in info.value.message
    assert info.value.code == "UNAVAILABLE"
    with pytest.raises(StoreUnavailable):
        await store.commit([Change("traffic", "n", {"v": 1}, None)], [])
    assert store.path.read_bytes() == content  # the evidence stays for the operator


async def test_an_unreadable_state_file_is_an_error_not_empty(tmp_path):
    store = FileStore(tmp_path)
    store.path.mkdir()  # reading a directory fails with EISDIR, as EIO or ESTALE would
    with pytest.raises(StoreUnavailable, match="cannot read the operator state"):
        await store.read()


async def test_the_first_format_is_read_and_rewritten(tmp_path):
    store = FileStore(tmp_path)
    store.path.write_text(json.dumps({"revision": 4, "traffic": {"m": {"weights": {"1": 100}}},
                                      "rollouts": {}}))
    snapshot = await store.read()
    assert snapshot.revision == 4 and snapshot.revision_of("traffic", "m") == 4
    await store.commit([Change("traffic", "n", {"weights": {"2": 100}}, 0)], [])
    data = json.loads(store.path.read_text())
    assert data["format"] == 2 and data["revision"] == 5
    assert data["sections"]["traffic"]["m"] == {"revision": 4, "value": {"weights": {"1": 100}}}


async def test_an_unwritable_directory_refuses_the_commit(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = FileStore(blocker / "state")
    with pytest.raises(StoreUnavailable, match="cannot write the operator state"):
        await store.commit([Change("traffic", "m", {"v": 1}, None)], [])


# ---- redis: outages -------------------------------------------------------------------------

async def test_a_dead_redis_is_unavailable_and_a_restart_keeps_the_state(redis_server):
    store = RedisStore(redis_server.url)
    try:
        await store.commit([Change("traffic", "m", {"v": 1}, None)], [{"model": "m"}])
        redis_server.kill()
        with pytest.raises(StoreUnavailable) as info:
            await store.read()
        assert "is unreachable" in info.value.message and redis_server.url in info.value.message
        with pytest.raises(StoreUnavailable):
            await store.commit([Change("traffic", "m", {"v": 2}, None)], [])
        redis_server.start()  # same port, same append-only file
        snapshot = await store.read()
        assert (snapshot.revision, snapshot.value("traffic", "m")) == (1, {"v": 1})
        assert len(await store.history("m", 10)) == 1
    finally:
        await store.close()


def test_open_store_picks_the_backend_and_hides_passwords(tmp_path):
    assert isinstance(open_store("", tmp_path), FileStore)
    assert open_store(f"file://{tmp_path}/x", tmp_path).dir == tmp_path / "x"
    store = open_store("redis://:secret@127.0.0.1:1/0", tmp_path)
    assert isinstance(store, RedisStore) and "secret" not in store.url
    assert redacted("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    with pytest.raises(ValueError, match="use file://DIR, redis://HOST:PORT/DB"):
        open_store("http://x", tmp_path)


async def test_a_store_that_comes_back_empty_is_restored_from_a_replica(redis_server):
    """A Redis restarted without its data must not drop every split: a replica puts back the
    state it served, and the others follow it."""
    import redis.asyncio as redis_client
    from test_routing import FakeRepository

    from gateway.control import ControlPlane
    from gateway.routing import Router

    planes = [ControlPlane(RedisStore(redis_server.url), Router(FakeRepository(m=["1", "2"])))
              for _ in range(2)]
    try:
        await planes[0].traffic.set_split("m", {"1": 95, "2": 5}, "ops")
        await planes[1].refresh()
        raw = redis_client.Redis.from_url(redis_server.url)
        await raw.flushall()
        await raw.aclose()
        await asyncio.gather(*(plane.refresh() for plane in planes))
        for plane in planes:
            assert plane.traffic.policy("m").weights == {"1": 9500, "2": 500}
        snapshot = await planes[0].store.read()
        assert snapshot.value("traffic", "m") == {"weights": {"1": 95.0, "2": 5.0},
                                                 "shadow": None}
        assert [r["action"] for r in await planes[0].store.history(None, 10)] == ["restore"]
    finally:
        for plane in planes:
            await plane.store.close()


async def test_a_claim_goes_to_one_caller_until_it_expires(make_store):
    first, second = make_store(), make_store()
    results = await asyncio.gather(*(store.claim("drift-hook/m/1", f"r{i}", 0.5)
                                     for i, store in enumerate([first, second] * 5)))
    assert results.count(True) == 1
    assert await second.claim("drift-hook/m/2", "r", 0.5)  # another key
    if make_store.kind == "file":
        for store in (first, second):
            store.clock = lambda: 10**10  # the file store's clock: the host's
    else:
        await asyncio.sleep(0.6)
    assert await second.claim("drift-hook/m/1", "r", 0.5)  # expired: claimable again
