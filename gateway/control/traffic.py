"""Operator changes to traffic policies: validate, commit to the store, audit; apply what the
store holds.

The router answers requests; this module changes what it answers with. A change is built from
the state as the store holds it now and committed with compare-and-set, so two operators (or an
operator and a rollout) never overwrite each other: the later one is rebuilt on the newer state.
The router only ever takes policies from the store (``apply``), so every replica serves the
same split once it has read the same revision.

A model under a running or paused rollout belongs to the rollout: a split change is refused
(FAILED_PRECONDITION naming the rollout) unless forced, which aborts the rollout in the same
commit and says so. Shadows are independent of rollouts and always allowed. A model under the
approval gate (``approvals``) refuses splits that give a new, unapproved version traffic, and
without a split serves its newest approved version.
"""

from __future__ import annotations

import logging
import time

from gateway.control import approvals
from gateway.control.store import CHECK, Change, Snapshot
from gateway.errors import FailedPrecondition, InvalidArgument, echo
from gateway.routing import Router, Shadow, TrafficPolicy, normalise_weights

log = logging.getLogger(__name__)
SECTION = "traffic"


def describe(value) -> str:
    """A stored policy in words, for the audit trail: "1=90% 2=10%, shadow 3 at 5%"."""
    if not value:
        return "none (the newest version serves)"
    weights = value.get("weights") or {}
    text = " ".join(f"{v}={p:g}%" for v, p in sorted(weights.items(), key=lambda kv: int(kv[0])))
    shadow = value.get("shadow")
    if shadow:
        text = (text + ", " if text else "") + (f"shadow {shadow['version']} at "
                                                f"{shadow['percent']:g}%")
    return text or "none"


def audit_record(who: str, section: str, model: str, action: str, old, new,
                 summary: str) -> dict:
    return {"time": time.time(), "who": who, "section": section, "model": model,
            "action": action, "old": old, "new": new, "summary": summary}


def policy_of(value) -> TrafficPolicy:
    try:
        return TrafficPolicy.from_json(value) if value else TrafficPolicy()
    except (InvalidArgument, KeyError, TypeError, ValueError):
        return TrafficPolicy()


def stored(policy: TrafficPolicy):
    """What the store holds for a policy (None: no policy)."""
    return None if not policy.weights and policy.shadow is None else policy.to_json()


def policy_change(snapshot: Snapshot, model: str, policy: TrafficPolicy, who: str,
                  action: str) -> tuple[Change, dict]:
    """The change (conditioned on the revision read) and audit record that install
    ``policy`` for ``model``."""
    old = snapshot.value(SECTION, model)
    new = stored(policy)
    return (Change(SECTION, model, new, snapshot.revision_of(SECTION, model)),
            audit_record(who, SECTION, model, action, old, new,
                         f"{describe(old)} -> {describe(new)}"))


class TrafficControl:
    def __init__(self, plane):
        self.plane = plane  # gateway.control.plane.ControlPlane
        self.router: Router = plane.router

    def policy(self, model: str) -> TrafficPolicy:
        return self.router.policies.get(model) or TrafficPolicy()

    async def set_split(self, model: str, weights: dict[str, float], who: str,
                        force: bool = False) -> TrafficPolicy:
        slots = normalise_weights(weights)
        return await self._change(model, who, "set", lambda p: TrafficPolicy(slots, p.shadow),
                                  guard=True, force=force)

    async def clear(self, model: str, who: str, force: bool = False) -> TrafficPolicy:
        self.router.repository.get(model)
        return await self._change(model, who, "clear", lambda p: TrafficPolicy(), guard=True,
                                  force=force)

    async def set_shadow(self, model: str, version: str, percent: float,
                         who: str) -> TrafficPolicy:
        if not version.isdigit():
            raise InvalidArgument(f"shadow version '{echo(version)}' is not a positive integer")
        shadow = Shadow(version, float(percent))
        return await self._change(model, who, "shadow",
                                  lambda p: TrafficPolicy(p.weights, shadow))

    async def clear_shadow(self, model: str, who: str) -> TrafficPolicy:
        return await self._change(model, who, "clear-shadow",
                                  lambda p: TrafficPolicy(p.weights, None))

    async def _change(self, model, who, action, make, guard=False, force=False):
        rollouts = self.plane.rollouts

        def build(snapshot: Snapshot):
            policy = make(policy_of(snapshot.value(SECTION, model)))
            self.router.check(model, policy)
            if guard:
                approvals.check_split(snapshot, self.router, model, policy.weights)
            changes, audit = [], []
            rollout = rollouts.parse(snapshot, model)
            if guard and rollout is not None and rollout.active:
                if not force:
                    raise FailedPrecondition(
                        f"model '{model}' has a {rollout.state} rollout to version "
                        f"{rollout.spec.to_version} (canary at {rollout.percent:g}%), which owns "
                        f"its split: abort it first (gateway rollout abort {model}) or force "
                        "the change (--force aborts the rollout)")
                change, record, _ = rollouts.end_change(snapshot, rollout, "aborted",
                                                     f"aborted by a forced traffic {action}",
                                                     who)
                changes.append(change)
                audit.append(record)
            else:  # commit only if no rollout started meanwhile
                changes.append(Change(rollouts.SECTION, model, CHECK,
                                      snapshot.revision_of(rollouts.SECTION, model)))
            change, record = policy_change(snapshot, model, policy, who, action)
            return [*changes, change], [*audit, record], policy

        policy = await approvals.commit_gated(self.plane, build, who)
        log.info("traffic %s for model '%s' by %s: %s", action, model, who,
                 describe(stored(policy)))
        return policy

    def apply(self, snapshot: Snapshot) -> None:
        """Serve the store's policies. An entry that does not parse keeps the policy the
        router had (and says so) rather than dropping the model's split."""
        persisted = snapshot.items(SECTION)
        for model in set(self.router.policies) | set(self.router.repository.models) | \
                set(persisted):
            data = persisted.get(model)
            try:
                policy = TrafficPolicy.from_json(data) if data is not None else None
            except (InvalidArgument, KeyError, TypeError, ValueError, AttributeError) as exc:
                log.error("stored traffic policy of model '%s' ignored (the last one read "
                          "stays): %s", model, exc)
                continue
            self._serve(snapshot, model, policy)

    def _serve(self, snapshot: Snapshot, model: str, policy: TrafficPolicy | None) -> None:
        policy = approvals.hold(snapshot, self.router, model, policy)
        if self.router.policies.get(model) != policy:
            self.router.apply(model, policy)

    def model_changed(self, model: str) -> None:
        """A model's serving versions changed: re-apply its policy (the approval gate's hold
        depends on which versions serve), before any request can route to a new version."""
        snapshot = self.plane.snapshot
        try:
            data = snapshot.value(SECTION, model)
            self._serve(snapshot, model, TrafficPolicy.from_json(data) if data else None)
        except Exception:
            log.exception("model '%s': traffic policy not re-applied", model)
