"""Rollouts judged by ground-truth feedback too (min_accuracy_ratio): the pure decision and the
controller asking a quality callable."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_rollout import SPEC, feed, one, tick, world  # noqa: F401  (fixtures)

from gateway.control import Rollout, Window, decide
from gateway.errors import InvalidArgument

HEALTHY = (Window(100, 0, 0.01), Window(100, 0, 0.01))
ACCURACY = replace(SPEC, min_accuracy_ratio=0.95, min_labels=20)


def test_feedback_is_off_by_default():
    assert decide(SPEC, *HEALTHY)[0] == "advance"
    assert decide(SPEC, *HEALTHY, ("classification", 100, 0.1),
                  ("classification", 100, 0.9))[0] == "advance"


def test_too_few_labels_wait():
    assert decide(ACCURACY, *HEALTHY) == (
        "wait", ("0 canary and 0 baseline predictions labelled; 20 each needed to compare "
                "accuracy"))
    assert decide(ACCURACY, *HEALTHY, ("classification", 50, 0.9),
                  ("classification", 19, 0.9))[0] == "wait"


def test_classification_accuracy_ratio():
    verdict, why = decide(ACCURACY, *HEALTHY, ("classification", 40, 0.80),
                          ("classification", 60, 0.90))
    assert (verdict, why) == ("rollback", ("canary accuracy 80.00% is below 0.95x the "
                                          "baseline's 90.00% (40 labelled)"))
    assert decide(ACCURACY, *HEALTHY, ("classification", 40, 0.86),
                  ("classification", 60, 0.90))[0] == "advance"


def test_regression_mean_absolute_error():
    verdict, why = decide(ACCURACY, *HEALTHY, ("regression", 40, 1.2), ("regression", 60, 1.0))
    assert verdict == "rollback"
    assert why == "canary mean absolute error 1.2 is above the baseline's 1 / 0.95"
    assert decide(ACCURACY, *HEALTHY, ("regression", 40, 1.05),
                  ("regression", 60, 1.0))[0] == "advance"


def test_errors_and_latency_still_come_first():
    verdict, why = decide(ACCURACY, Window(100, 9, 0.01), Window(100, 0, 0.01))
    assert verdict == "rollback" and why.startswith("canary error rate")


def test_bad_values_are_refused():
    with pytest.raises(InvalidArgument, match="must not be negative"):
        replace(SPEC, min_accuracy_ratio=-1).validate()


async def test_the_controller_asks_for_each_versions_feedback(world, one):  # noqa: F811
    scores = {"2": ("classification", 30, 0.5), "1": ("classification", 30, 0.9)}
    asked = []

    def quality(model, version):
        asked.append((model, version))
        return scores.get(version)

    c = one.rollouts
    c.quality = quality
    await c.start(ACCURACY, "ops")
    world.clock.now += 31
    feed(one, "2", 30)
    feed(one, "1", 30)
    await tick(one)
    rollout: Rollout = c.status("m")
    assert asked == [("m", "2"), ("m", "1")]
    assert rollout.state == "rolled_back"
    assert rollout.reason.startswith("canary accuracy 50.00% is below 0.95x")
    assert one.traffic.policy("m").weights == {"1": 10000}


def test_persisted_rollouts_without_the_new_fields_still_load():
    data = Rollout(SPEC).to_json()
    for key in ("min_accuracy_ratio", "min_labels"):
        del data["spec"][key]
    assert Rollout.from_json(data).spec == SPEC
