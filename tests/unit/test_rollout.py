"""Canary analysis and the rollout state machine, on a fake clock and real traffic control."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_routing import FakeRepository

from gateway.errors import FailedPrecondition, InvalidArgument
from gateway.rollout import RolloutController, RolloutSpec, VersionWindows, Window, decide
from gateway.routing import Router
from gateway.state import StateStore
from gateway.traffic import TrafficControl

SPEC = RolloutSpec("m", "2", "1", steps=(10.0, 50.0, 100.0), interval_s=30, min_requests=20)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def feed(windows, version, n, errors=0, latency_s=0.01):
    served = SimpleNamespace(model="m", version=version)
    for i in range(n):
        windows.observe("m", served, "INTERNAL" if i < errors else "OK", int(latency_s * 1e9))


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    repo = FakeRepository(m=["1", "2"])
    traffic = TrafficControl(Router(repo), StateStore(tmp_path / "state"))
    windows = VersionWindows()
    controller = RolloutController(traffic, windows, clock)
    return SimpleNamespace(clock=clock, traffic=traffic, windows=windows, controller=controller,
                           repo=repo, dir=tmp_path / "state")


def test_decide_judges_errors_latency_and_evidence():
    spec = SPEC
    assert decide(spec, Window(5, 0, 0.01), Window(100, 0, 0.01))[0] == "wait"
    verdict, why = decide(spec, Window(100, 5, 0.01), Window(100, 0, 0.01))
    assert (verdict, why) == ("rollback", "canary error rate 5.00% is above 1.00% (5 of 100)")
    verdict, why = decide(spec, Window(100, 0, 0.030), Window(100, 0, 0.010))
    assert verdict == "rollback"
    assert why == "canary p99 latency 30.00 ms is 3.00x the baseline's 10.00 ms (limit 1.5x)"
    assert decide(spec, Window(100, 1, 0.012), Window(100, 0, 0.010))[0] == "advance"
    # Twice as slow, but by 0.3 ms: noise on a busy host, not a slow canary.
    assert decide(spec, Window(100, 0, 0.0006), Window(100, 0, 0.0003))[0] == "advance"


@pytest.mark.parametrize("changes, message", [
    ({"steps": (50.0, 10.0, 100.0)}, "steps must be increasing percentages in (0, 100]"),
    ({"steps": (10.0, 50.0)}, "the last step must be 100 (promotion)"),
    ({"interval_s": 0}, "interval must be positive and min_requests not negative"),
    ({"max_error_rate": 2}, "max_error_rate must be within [0, 1] and max_latency_ratio positive"),
    ({"from_version": "2"}, "the canary and the baseline are the same version"),
])
def test_bad_specs_are_refused(changes, message):
    from dataclasses import replace

    with pytest.raises(InvalidArgument) as info:
        replace(SPEC, **changes).validate()
    assert info.value.message == message


def test_a_healthy_canary_is_promoted_step_by_step(world):
    c = world.controller
    c.start(SPEC, "ops")
    assert world.traffic.policy("m").weights == {"1": 9000, "2": 1000}
    world.clock.now += 10
    c.tick()
    assert c.status("m").step == 0  # interval not over
    world.clock.now += 25
    feed(world.windows, "2", 5)
    c.tick()
    assert c.status("m").step == 0  # too few canary requests: the window is extended
    feed(world.windows, "2", 30)
    feed(world.windows, "1", 100)
    c.tick()
    assert c.status("m").step == 1
    assert world.traffic.policy("m").weights == {"1": 5000, "2": 5000}
    world.clock.now += 31
    feed(world.windows, "2", 30)
    c.tick()
    rollout = c.status("m")
    assert rollout.state == "promoted"
    assert world.traffic.policy("m").weights == {"1": 0, "2": 10000}
    assert [h["event"] for h in rollout.history] == ["start", "step", "promoted"]


def test_a_failing_canary_is_rolled_back_with_the_reason(world):
    c = world.controller
    c.start(SPEC, "ops")
    world.clock.now += 31
    feed(world.windows, "2", 40, errors=10)
    feed(world.windows, "1", 40)
    c.tick()
    rollout = c.status("m")
    assert rollout.state == "rolled_back"
    assert rollout.reason == "canary error rate 25.00% is above 1.00% (10 of 40)"
    assert world.traffic.policy("m").weights == {"1": 10000, "2": 0}


def test_a_slow_canary_is_rolled_back(world):
    c = world.controller
    c.start(SPEC, "ops")
    world.clock.now += 31
    feed(world.windows, "2", 40, latency_s=0.1)
    feed(world.windows, "1", 40, latency_s=0.01)
    c.tick()
    assert c.status("m").state == "rolled_back"
    assert "is 10.00x the baseline's" in c.status("m").reason


def test_caller_errors_do_not_count_against_the_canary(world):
    served = SimpleNamespace(model="m", version="2")
    world.controller.start(SPEC, "ops")
    for code in ("INVALID_ARGUMENT", "CANCELLED", "OK", "INTERNAL"):
        world.windows.observe("m", served, code, 1000)
    assert world.windows.window("m", "2") == Window(4, 1, pytest.approx(1e-6))


def test_pause_resume_abort_and_refusals(world):
    c = world.controller
    c.start(SPEC, "ops")
    with pytest.raises(FailedPrecondition) as info:
        c.start(SPEC, "ops")
    assert info.value.message == ("model 'm' already has a running rollout to version 2; "
                                  "abort it first")
    c.pause("m", "ops")
    world.clock.now += 100
    feed(world.windows, "2", 50)
    c.tick()
    assert c.status("m").step == 0  # paused: nothing moves
    with pytest.raises(FailedPrecondition) as info:
        c.pause("m", "ops")
    assert info.value.message == "cannot pause the rollout of model 'm': it is paused"
    c.resume("m", "ops")
    c.abort("m", "ops")
    assert c.status("m").state == "aborted"
    assert world.traffic.policy("m").weights == {"1": 10000, "2": 0}
    with pytest.raises(FailedPrecondition):
        c.abort("m", "ops")


def test_the_baseline_defaults_to_the_version_with_most_traffic(world):
    world.repo.set_serving("m", ["1", "2", "3"])
    world.traffic.set_split("m", {"1": 20, "2": 80}, "ops")
    rollout = world.controller.start(RolloutSpec("m", "3", ""), "ops")
    assert rollout.spec.from_version == "2"


def test_a_restarted_gateway_adopts_the_rollout_and_resumes(world):
    world.controller.start(SPEC, "ops")
    world.clock.now += 31
    feed(world.windows, "2", 30)
    world.controller.tick()
    assert world.controller.status("m").step == 1
    # A new process (another identity) over the same state directory.
    clock = world.clock
    traffic = TrafficControl(Router(FakeRepository(m=["1", "2"])), StateStore(world.dir))
    traffic.sync()
    successor = RolloutController(traffic, VersionWindows(), clock)
    successor.identity = "other-host:42"
    successor.tick()
    assert successor.status("m").owner != "other-host:42"  # the owner's lease is still fresh
    clock.now += RolloutController.LEASE_S + 1
    successor.tick()
    rollout = successor.status("m")
    assert (rollout.owner, rollout.step, rollout.history[-1]["event"]) == ("other-host:42", 1,
                                                                           "adopt")
    clock.now += 31
    feed(successor.windows, "2", 30)
    successor.tick()
    assert successor.status("m").state == "promoted"
    assert traffic.policy("m").weights == {"1": 0, "2": 10000}
