"""Traffic policy logic: weights, sticky slots, minimal movement, fallback, persistence."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from gateway.control import ControlPlane
from gateway.control.filestore import FileStore
from gateway.errors import InvalidArgument, NotFound, Unavailable
from gateway.repository import ModelEntry
from gateway.routing import SLOTS, Router, Shadow, TrafficPolicy, key_slot, normalise_weights


class FakeRepository:
    """The seam the router reads: models with their serving versions."""

    def __init__(self, **models: list[str]):
        self.models = {}
        for name, versions in models.items():
            self.set_serving(name, versions)

    def set_serving(self, name: str, versions: list[str]) -> None:
        entry = self.models.setdefault(name, ModelEntry(name))
        entry.serving = {v: SimpleNamespace(model=name, version=v) for v in versions}
        entry.latest = entry.serving[max(versions, key=int)] if versions else None

    def get(self, name):
        if name not in self.models:
            raise NotFound(f"unknown model '{name}'")
        return self.models[name]

    def version(self, name, version):
        entry = self.get(name)
        if not version:
            return entry.latest
        if version not in entry.serving:
            raise NotFound(f"unknown version {version!r} of model '{name}'")
        return entry.serving[version]


def test_weights_as_percents_or_fractions_become_slots():
    assert normalise_weights({"1": 90, "2": 10}) == {"1": 9000, "2": 1000}
    assert normalise_weights({"2": 0.25, "1": 0.75}) == {"1": 7500, "2": 2500}
    thirds = normalise_weights({"1": 100 / 3, "2": 100 / 3, "3": 100 / 3})
    assert sum(thirds.values()) == SLOTS


@pytest.mark.parametrize("weights, message", [
    ({}, "a split needs at least one VERSION=WEIGHT"),
    ({"1": 90, "2": 20}, "weights must sum to 100 (or to 1 as fractions); they sum to 110"),
    ({"1": 110, "2": -10}, "weight of version 2 must not be negative"),
    ({"1": float("nan")}, "weight of version 1 must not be negative"),
    ({"x": 100}, "version 'x' is not a positive integer"),
    ({"0": 100}, "version '0' is not a positive integer"),
])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(InvalidArgument) as info:
        normalise_weights(weights)
    assert info.value.message == message
    assert info.value.code == "INVALID_ARGUMENT"


def test_key_slot_is_stable_and_spread():
    assert key_slot("user-42") == key_slot("user-42")
    slots = [key_slot(f"user-{i}") for i in range(20000)]
    assert all(0 <= s < SLOTS for s in slots)
    quarters = Counter(s * 4 // SLOTS for s in slots)
    assert all(4500 < quarters[q] < 5500 for q in range(4))


def test_no_policy_means_the_newest_version_serves():
    router = Router(FakeRepository(m=["1", "2"]))
    assert router.route("m", "", None).version == "2"
    assert router.route("m", "", "key").version == "2"


def test_explicit_version_wins_over_the_split():
    repo = FakeRepository(m=["1", "2"])
    router = Router(repo)
    router.apply("m", TrafficPolicy(normalise_weights({"1": 100, "2": 0})))
    assert router.route("m", "2", "key").version == "2"
    assert {router.route("m", "", f"k{i}").version for i in range(200)} == {"1"}


def test_sticky_keys_land_on_one_version_and_move_minimally():
    repo = FakeRepository(m=["1", "2"])
    router = Router(repo)
    router.apply("m", TrafficPolicy(normalise_weights({"1": 90, "2": 10})))
    keys = [f"user-{i}" for i in range(5000)]
    before = {k: router.route("m", "", k).version for k in keys}
    assert before == {k: router.route("m", "", k).version for k in keys}
    router.apply("m", TrafficPolicy(normalise_weights({"1": 80, "2": 20})))
    after = {k: router.route("m", "", k).version for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    # Only keys from version 1 move, and only about the 10% that changed hands.
    assert all(before[k] == "1" and after[k] == "2" for k in moved)
    assert 350 < len(moved) < 650


def test_random_split_follows_the_weights():
    repo = FakeRepository(m=["1", "2", "3"])
    router = Router(repo)
    router.apply("m", TrafficPolicy(normalise_weights({"1": 50, "2": 30, "3": 20})))
    counts = Counter(router.route("m", "", None).version for _ in range(20000))
    # 5 standard deviations of a binomial at n=20000: generous, never flaky.
    for version, share in (("1", 0.5), ("2", 0.3), ("3", 0.2)):
        sd = (20000 * share * (1 - share)) ** 0.5
        assert abs(counts[version] - 20000 * share) < 5 * sd


def test_an_unloaded_version_gives_its_share_to_the_rest():
    repo = FakeRepository(m=["1", "2", "3"])
    router = Router(repo)
    notes = []
    router.events.subscribe(fallback=lambda model, note: notes.append((model, note)))
    router.apply("m", TrafficPolicy(normalise_weights({"1": 50, "2": 25, "3": 25})))
    repo.set_serving("m", ["1", "3"])
    assert {router.route("m", "", f"k{i}").version for i in range(500)} == {"1", "3"}
    shares, note = router.effective("m")
    assert shares == pytest.approx({"1": 200 / 3, "3": 100 / 3}, abs=0.01)  # 1/10000 slots
    assert note == "version(s) 2 not serving; their share goes to 1, 3"
    assert notes == [("m", note)]
    repo.set_serving("m", ["4"])
    assert router.route("m", "", "k").version == "4"
    assert router.effective("m")[0] == {"4": 100.0}


def test_check_refuses_versions_that_are_not_serving():
    repo = FakeRepository(m=["1", "2"])
    router = Router(repo)
    with pytest.raises(InvalidArgument) as info:
        router.check("m", TrafficPolicy(normalise_weights({"1": 50, "3": 50})))
    assert info.value.message == "model 'm' version 3 is not serving; serving versions: 1, 2"
    with pytest.raises(InvalidArgument) as info:
        router.check("m", TrafficPolicy({}, Shadow("2", 0)))
    assert info.value.message == "shadow percent must be above 0 and at most 100"


def plane(directory, repo=None) -> ControlPlane:
    return ControlPlane(FileStore(directory, poll_interval=0.05),
                        Router(repo or FakeRepository(m=["1", "2"])))


async def test_traffic_control_persists_audits_and_keeps_the_old_split_on_refusal(tmp_path):
    control = plane(tmp_path / "state")
    traffic = control.traffic
    await traffic.set_split("m", {"1": 90, "2": 10}, who="alice")
    with pytest.raises(InvalidArgument):
        await traffic.set_split("m", {"1": 90, "7": 10}, who="alice")
    assert traffic.policy("m").weights == {"1": 9000, "2": 1000}
    await traffic.set_shadow("m", "2", 5, who="bob")
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["sections"]["traffic"]["m"]["value"] == {
        "weights": {"1": 90.0, "2": 10.0}, "shadow": {"version": "2", "percent": 5.0}}
    history = await control.history("m", 100)
    assert [(r["who"], r["action"]) for r in history] == [("alice", "set"), ("bob", "shadow")]
    assert history[1]["old"] == {"weights": {"1": 90.0, "2": 10.0}, "shadow": None}
    await traffic.clear("m", who="carol")
    assert "m" not in control.router.policies
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert "m" not in state["sections"].get("traffic", {})


async def test_a_second_process_converges_through_the_store(tmp_path):
    first, second = plane(tmp_path / "state"), plane(tmp_path / "state")
    await second.refresh()
    await first.traffic.set_split("m", {"1": 30, "2": 70}, who="ops")
    await second.refresh()
    assert second.traffic.policy("m") == first.traffic.policy("m")
    await first.traffic.clear("m", who="ops")
    await second.refresh()
    assert "m" not in second.router.policies


async def test_a_follower_converges_without_being_asked(tmp_path):
    import asyncio

    first, second = plane(tmp_path / "state"), plane(tmp_path / "state")
    follower = asyncio.create_task(second.follow())
    try:
        await first.traffic.set_split("m", {"1": 30, "2": 70}, who="ops")
        for _ in range(200):
            if "m" in second.router.policies:
                break
            await asyncio.sleep(0.02)
        assert second.traffic.policy("m") == first.traffic.policy("m")
    finally:
        follower.cancel()


async def test_an_unwritable_state_directory_refuses_the_change(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    control = plane(blocker / "state")
    with pytest.raises(Unavailable) as info:
        await control.traffic.set_split("m", {"1": 50, "2": 50}, who="ops")
    assert "the operator state" in info.value.message and "Not a directory" in info.value.message
    assert "m" not in control.router.policies


async def test_a_damaged_state_file_keeps_the_last_good_splits(tmp_path):
    control = plane(tmp_path / "state")
    await control.traffic.set_split("m", {"1": 95, "2": 5}, who="ops")
    path = tmp_path / "state" / "state.json"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(Unavailable):
        await control.refresh()
    assert control.traffic.policy("m").weights == {"1": 9500, "2": 500}
    assert control.store_up is False
    with pytest.raises(Unavailable):  # a change cannot overwrite what it could not read
        await control.traffic.set_split("n", {"1": 100}, who="ops")
    path.write_bytes(b"null")
    with pytest.raises(Unavailable):
        await control.refresh()
    assert control.traffic.policy("m").weights == {"1": 9500, "2": 500}
    path.write_bytes(good)
    await control.refresh()
    assert control.store_up is True
