"""Rollouts on a fake clock over the real file store: the state machine, one judge under a
lease with a fencing token, fleet-wide figures, and operator changes that agree with rollouts.
Several ``ControlPlane`` objects over one store directory are several replicas."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
from test_routing import FakeRepository

from gateway.control import ControlPlane, RolloutSpec
from gateway.control.filestore import FileStore
from gateway.control.rollouts import LEASE_S
from gateway.errors import FailedPrecondition, InvalidArgument
from gateway.routing import Router

SPEC = RolloutSpec("m", "2", "1", steps=(10.0, 50.0, 100.0), interval_s=30, min_requests=20)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def feed(plane, version, n, errors=0, latency_s=0.01, code="INTERNAL"):
    served = SimpleNamespace(model="m", version=version)
    for i in range(n):
        plane.counter.observe("m", served, code if i < errors else "OK", int(latency_s * 1e9))


class World:
    def __init__(self, directory, clock, versions=("1", "2")):
        self.dir, self.clock, self.versions = directory, clock, list(versions)
        self.replicas: list[ControlPlane] = []

    def replica(self) -> ControlPlane:
        repo = FakeRepository(m=self.versions)
        plane = ControlPlane(FileStore(self.dir, clock=self.clock), Router(repo))
        plane.repo = repo
        self.replicas.append(plane)
        return plane


@pytest.fixture
def world(tmp_path):
    return World(tmp_path / "state", Clock())


@pytest.fixture
async def one(world):
    plane = world.replica()
    await plane.refresh()
    return plane


async def tick(*planes):
    """Each replica's loop once: read, publish its figures, judge."""
    for plane in planes:
        await plane.refresh()
        await plane.rollouts.publish()
        await plane.rollouts.tick()


def split(plane):
    return plane.traffic.policy("m").weights


async def test_a_healthy_canary_is_promoted_step_by_step_and_leaves_a_clean_policy(world, one):
    c = one.rollouts
    await c.start(SPEC, "ops")
    assert split(one) == {"1": 9000, "2": 1000}
    world.clock.now += 10
    await tick(one)
    assert c.status("m").step == 0  # interval not over
    world.clock.now += 25
    feed(one, "2", 5)
    await tick(one)
    assert c.status("m").step == 0  # too few canary requests: the window is extended
    feed(one, "2", 30)
    feed(one, "1", 100)
    await tick(one)
    assert c.status("m").step == 1
    assert split(one) == {"1": 5000, "2": 5000}
    world.clock.now += 31
    await tick(one)
    assert c.status("m").step == 1  # a new step starts with no evidence
    feed(one, "2", 30)
    await tick(one)
    rollout = c.status("m")
    assert rollout.state == "promoted"
    assert "m" not in one.router.policies  # version 2 is the newest: no policy left behind
    assert [h["event"] for h in rollout.history] == ["start", "step", "promoted"]


async def test_promoting_an_older_version_keeps_it_alone(world):
    world.versions = ["1", "2", "3"]
    plane = world.replica()
    await plane.refresh()
    await plane.rollouts.start(replace(SPEC, steps=(100.0,)), "ops")
    world.clock.now += 31
    feed(plane, "2", 30)
    await tick(plane)
    assert plane.rollouts.status("m").state == "promoted"
    assert split(plane) == {"2": 10000}


async def test_a_failing_canary_is_rolled_back_with_the_reason(world, one):
    await one.rollouts.start(SPEC, "ops")
    world.clock.now += 31
    feed(one, "2", 40, errors=10)
    feed(one, "1", 40)
    await tick(one)
    rollout = one.rollouts.status("m")
    assert rollout.state == "rolled_back"
    assert rollout.reason.startswith("canary error rate 25.00% is above 1.00% (10 of 40 failed, "
                                     "timed out or were shed)")
    assert split(one) == {"1": 10000}


@pytest.mark.parametrize("code", ["DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED",
                                  "UNAVAILABLE", "INTERNAL"])
async def test_timeouts_and_overload_fail_the_canary(world, one, code):
    await one.rollouts.start(SPEC, "ops")
    world.clock.now += 31
    feed(one, "2", 40, errors=40, code=code, latency_s=5.0)
    feed(one, "1", 40)
    await tick(one)
    assert one.rollouts.status("m").state == "rolled_back"


async def test_callers_mistakes_are_not_evidence(world, one):
    await one.rollouts.start(SPEC, "ops")
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED"):
        feed(one, "2", 50, errors=50, code=code)
    feed(one, "2", 3)
    canary, _ = await one.rollouts.figures(one.rollouts.status("m"))
    assert (canary.requests, canary.errors, canary.replicas) == (3, 0, 1)


async def test_a_slow_canary_is_rolled_back(world, one):
    await one.rollouts.start(SPEC, "ops")
    world.clock.now += 31
    feed(one, "2", 40, latency_s=0.1)
    feed(one, "1", 40, latency_s=0.01)
    await tick(one)
    assert one.rollouts.status("m").state == "rolled_back"
    assert "x the baseline's" in one.rollouts.status("m").reason


async def test_pause_resume_abort_and_refusals(world, one):
    c = one.rollouts
    await c.start(SPEC, "ops")
    with pytest.raises(FailedPrecondition) as info:
        await c.start(SPEC, "ops")
    assert info.value.message == ("model 'm' already has a running rollout to version 2; "
                                  "abort it first")
    await c.pause("m", "ops")
    world.clock.now += 100
    feed(one, "2", 50)
    await tick(one)
    assert c.status("m").step == 0  # paused: nothing moves
    with pytest.raises(FailedPrecondition) as info:
        await c.pause("m", "ops")
    assert info.value.message == "cannot pause the rollout of model 'm': it is paused"
    await c.resume("m", "ops")
    await c.abort("m", "ops")
    assert c.status("m").state == "aborted"
    assert split(one) == {"1": 10000}
    with pytest.raises(FailedPrecondition) as info:
        await c.abort("m", "ops")
    assert info.value.message == "the rollout of model 'm' already ended (aborted)"


async def test_the_baseline_defaults_to_the_version_with_most_traffic(world):
    world.versions = ["1", "2", "3"]
    plane = world.replica()
    await plane.refresh()
    await plane.traffic.set_split("m", {"1": 20, "2": 80}, "ops")
    rollout = await plane.rollouts.start(RolloutSpec("m", "3", ""), "ops")
    assert rollout.spec.from_version == "2"


@pytest.mark.parametrize("changes, message", [
    ({"steps": (50.0, 10.0, 100.0)}, "steps must be increasing percentages in (0, 100]"),
    ({"steps": (10.0, 10.0, 100.0)}, "steps must be increasing percentages in (0, 100]"),
    ({"steps": (10.0, 50.0)}, "the last step must be 100 (promotion)"),
    ({"interval_s": 0}, "interval must be above 0 and at most 604800 seconds (7 days)"),
    ({"interval_s": math.nan}, "rollout parameters must be finite numbers (no NaN or infinity)"),
    ({"interval_s": math.inf}, "rollout parameters must be finite numbers (no NaN or infinity)"),
    ({"max_latency_ratio": math.nan},
     "rollout parameters must be finite numbers (no NaN or infinity)"),
    ({"max_error_rate": 2}, "max_error_rate must be within [0, 1]"),
    ({"max_latency_ratio": 0}, "max_latency_ratio must be above 0"),
    ({"min_requests": -1}, "min_requests must be 0 (no minimum) or more"),
    ({"from_version": "2"}, "the canary and the baseline are the same version"),
])
def test_bad_specs_are_refused(changes, message):
    with pytest.raises(InvalidArgument) as info:
        replace(SPEC, **changes).validate()
    assert info.value.message == message


async def test_min_requests_zero_judges_on_time_alone(world, one):
    await one.rollouts.start(replace(SPEC, min_requests=0), "ops")
    world.clock.now += 31
    await tick(one)
    assert one.rollouts.status("m").step == 1


# ---- operator changes and rollouts --------------------------------------------------------

async def test_a_traffic_change_during_a_rollout_is_refused_unless_forced(world, one):
    await one.rollouts.start(SPEC, "ops")
    with pytest.raises(FailedPrecondition) as info:
        await one.traffic.set_split("m", {"1": 50, "2": 50}, "bob")
    assert info.value.message.startswith("model 'm' has a running rollout to version 2 (canary "
                                         "at 10%), which owns its split")
    with pytest.raises(FailedPrecondition):
        await one.traffic.clear("m", "bob")
    assert split(one) == {"1": 9000, "2": 1000}
    await one.traffic.set_shadow("m", "2", 5, "bob")  # shadows are not the rollout's
    await one.traffic.set_split("m", {"1": 50, "2": 50}, "bob", force=True)
    rollout = one.rollouts.status("m")
    assert (rollout.state, rollout.reason) == ("aborted", "aborted by a forced traffic set")
    assert split(one) == {"1": 5000, "2": 5000}
    assert one.traffic.policy("m").shadow is not None
    history = await one.history("m", 10)
    assert [r["action"] for r in history][-2:] == ["rollout-aborted", "set"]
    assert history[-1]["revision"] == history[-2]["revision"]  # one commit


async def test_every_change_is_audited_with_who_and_a_summary(world, one):
    await one.traffic.set_split("m", {"1": 90, "2": 10}, "alice")
    await one.traffic.clear("m", "carol")
    history = await one.history("m", 10)
    assert [(r["who"], r["action"], r["summary"]) for r in history] == [
        ("alice", "set", "none (the newest version serves) -> 1=90% 2=10%"),
        ("carol", "clear", "1=90% 2=10% -> none (the newest version serves)")]


# ---- several replicas -----------------------------------------------------------------------

async def test_an_abort_through_another_replica_sticks(world):
    owner, other = world.replica(), world.replica()
    await owner.refresh()
    await owner.rollouts.start(SPEC, "ops")
    await other.refresh()
    await other.rollouts.abort("m", "ops")
    # The owner has not read the abort yet: its next judgement is fenced off.
    world.clock.now += 31
    feed(owner, "2", 30)
    await owner.rollouts.tick()
    await tick(owner, other)
    for plane in (owner, other):
        assert plane.rollouts.status("m").state == "aborted"
        assert split(plane) == {"1": 10000}


async def test_a_pause_through_another_replica_sticks(world):
    owner, other = world.replica(), world.replica()
    await owner.refresh()
    await owner.rollouts.start(SPEC, "ops")
    await other.refresh()
    await other.rollouts.pause("m", "ops")
    world.clock.now += 31
    feed(owner, "2", 30)
    await owner.rollouts.tick()  # stale view: thinks it runs
    await tick(owner)
    assert owner.rollouts.status("m").state == "paused"
    assert owner.rollouts.status("m").step == 0


async def test_a_dead_owner_is_replaced_after_its_lease_and_the_step_continues(world):
    owner, successor = world.replica(), world.replica()
    await owner.refresh()
    await owner.rollouts.start(SPEC, "ops")
    world.clock.now += 31
    feed(owner, "2", 30)
    await tick(owner)
    assert owner.rollouts.status("m").step == 1
    # The owner dies. Until its lease runs out, nobody else judges.
    world.clock.now += LEASE_S / 2
    await tick(successor)
    assert successor.rollouts.status("m").owner == owner.identity
    world.clock.now += LEASE_S
    await tick(successor)
    rollout = successor.rollouts.status("m")
    assert (rollout.owner, rollout.step, rollout.epoch, rollout.history[-1]["event"]) == (
        successor.identity, 1, 2, "adopt")
    # A stale owner coming back cannot step it: its epoch is fenced off.
    world.clock.now += 31
    feed(owner, "2", 30)
    await owner.rollouts._judge(owner.rollouts.status("m"), world.clock.now)
    await successor.refresh()
    rollout = successor.rollouts.status("m")
    assert (rollout.step, rollout.owner, rollout.state) == (1, successor.identity, "running")
    # The judge's figures are the fleet's: the old owner's requests in this window count.
    await tick(successor)
    assert successor.rollouts.status("m").state == "promoted"


async def test_two_replicas_adopting_at_once_end_with_one_owner(world):
    owner, a, b = world.replica(), world.replica(), world.replica()
    await owner.refresh()
    await owner.rollouts.start(SPEC, "ops")
    for plane in (a, b):
        await plane.refresh()
    world.clock.now += LEASE_S + 1
    seen = a.rollouts.status("m")
    await a.rollouts._adopt(seen, world.clock.now)  # both decided from the same state
    await b.rollouts._adopt(seen, world.clock.now)
    await tick(a, b)
    rollout = b.rollouts.status("m")
    assert (rollout.owner, rollout.epoch) == (a.identity, 2)
    assert [h["event"] for h in rollout.history].count("adopt") == 1


async def test_the_judge_counts_every_replicas_requests(world):
    owner, other, third = world.replica(), world.replica(), world.replica()
    await owner.refresh()
    await owner.rollouts.start(SPEC, "ops")
    await tick(other, third)
    feed(owner, "2", 5)
    feed(other, "2", 10)
    feed(third, "2", 6, errors=6, code="DEADLINE_EXCEEDED")
    await tick(other, third)
    canary, _ = await owner.rollouts.figures(owner.rollouts.status("m"))
    assert (canary.requests, canary.errors, canary.replicas) == (21, 6, 3)
    world.clock.now += 31
    await tick(owner)
    assert owner.rollouts.status("m").state == "rolled_back"
    assert "from 3 replica(s)" in owner.rollouts.status("m").reason


async def test_resume_through_another_replica_makes_it_the_judge(world):
    owner, other = world.replica(), world.replica()
    await owner.refresh()
    await owner.rollouts.start(SPEC, "ops")
    await owner.rollouts.pause("m", "ops")
    await other.refresh()
    rollout = await other.rollouts.resume("m", "ops")
    assert (rollout.owner, rollout.epoch, rollout.state) == (other.identity, 2, "running")
    assert rollout.lease_until == world.clock.now + LEASE_S


async def test_a_graceful_stop_hands_the_lease_back(world):
    owner, other = world.replica(), world.replica()
    await owner.refresh()
    await owner.rollouts.start(SPEC, "ops")
    await owner.stop()
    await tick(other)
    assert other.rollouts.status("m").owner == other.identity


async def test_a_stored_rollout_of_the_first_format_still_loads():
    from gateway.control.rollouts import Rollout

    data = Rollout(SPEC).to_json()
    for key in ("epoch", "lease_until", "window"):
        del data[key]
    data["heartbeat"] = 5.0
    for key in ("min_accuracy_ratio", "min_labels"):
        del data["spec"][key]
    rollout = Rollout.from_json(data)
    assert (rollout.spec, rollout.epoch, rollout.lease_until) == (SPEC, 0, 5.0 + LEASE_S)
