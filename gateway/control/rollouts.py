"""Automatic canary rollouts: step a new version's share up while comparing it with the current
one, then promote it or roll it back, by itself, with one judge for the whole fleet.

At each step the canary gets ``steps[i]`` percent of the model's traffic for ``interval``
seconds; the judge then adds up every replica's figures for that window and asks
``analysis.decide``. Passing the last step promotes (the promoted version alone serves; the
policy is removed when it is the newest version); failing rolls back (the baseline alone).

Ownership. A running rollout has one owner (the judge) holding a lease that expires on the
store's clock, and an epoch (fencing token) raised whenever ownership changes hands. Every
write is a compare-and-set on the revision the writer read, and every write the owner makes is
rebuilt from the current state and dropped unless that state still names it owner at the same
epoch, so a stale owner can never undo a pause, an abort, or another judge's step. When a lease
runs out (the owner died or lost the store), the first replica to commit the adoption becomes
the judge and continues from the stored step and window. Steps and their splits are one commit:
a step is reported only once its split is stored, and every replica serves it on its next read.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field, replace

from gateway.control import approvals
from gateway.control.analysis import RolloutSpec, Window, decide, merge
from gateway.control.store import Change, Snapshot, StoreUnavailable
from gateway.control.traffic import SECTION as TRAFFIC
from gateway.control.traffic import audit_record, policy_change, policy_of
from gateway.errors import FailedPrecondition, InvalidArgument, NotFound
from gateway.routing import TrafficPolicy, normalise_weights

log = logging.getLogger(__name__)
ACTIVE = ("running", "paused")
HISTORY = 200  # events kept per rollout
LEASE_S = 15.0


@dataclass(slots=True)
class Rollout:
    spec: RolloutSpec
    state: str = "running"  # running, paused, promoted, rolled_back, aborted
    step: int = 0
    step_started: float = 0.0  # store clock
    started: float = 0.0
    reason: str = ""
    history: list[dict] = field(default_factory=list)
    owner: str = ""  # the replica that judges it
    epoch: int = 0  # fencing token: raised whenever the owner changes
    lease_until: float = 0.0  # store clock; past it, another replica may adopt
    window: str = ""  # names the figures of the current step

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def percent(self) -> float:
        """The canary's share of traffic now."""
        if self.state == "promoted":
            return 100.0
        if self.state in ("rolled_back", "aborted"):
            return 0.0
        return self.spec.steps[self.step]

    def to_json(self) -> dict:
        data = asdict(self)
        data["spec"]["steps"] = list(self.spec.steps)
        return data

    @classmethod
    def from_json(cls, data: dict) -> Rollout:
        spec = dict(data["spec"])
        spec["steps"] = tuple(spec["steps"])
        rollout = cls(RolloutSpec(**spec), data["state"], int(data["step"]),
                      float(data["step_started"]), float(data["started"]),
                      str(data.get("reason", "")), list(data.get("history", [])),
                      str(data.get("owner", "")), int(data.get("epoch", 0)),
                      float(data.get("lease_until", data.get("heartbeat", 0.0) + LEASE_S)),
                      str(data.get("window", "")))
        if not 0 <= rollout.step < len(rollout.spec.steps):
            raise ValueError(f"step {rollout.step} is outside the rollout's steps")
        return rollout

    def event(self, now: float, event: str, detail: str, who: str) -> None:
        self.history.append({"time": now, "event": event, "detail": detail, "step": self.step,
                             "percent": self.percent, "who": who})
        del self.history[:-HISTORY]


def _window(rollout: Rollout) -> str:
    return f"{rollout.epoch}.{rollout.step}.{secrets.token_hex(4)}"


class RolloutController:
    SECTION = "rollouts"

    def __init__(self, plane, lease_s: float = LEASE_S):
        self.plane = plane  # gateway.control.plane.ControlPlane
        self.store = plane.store
        self.identity = plane.identity
        self.lease_s = lease_s
        self.quality = None  # (model, version) -> Quality | None, for min_accuracy_ratio
        self._parsed: tuple[int, dict[str, Rollout]] = (-1, {})

    # ---- reading ----------------------------------------------------------------------------

    def parse(self, snapshot: Snapshot, model: str) -> Rollout | None:
        data = snapshot.value(self.SECTION, model)
        if data is None:
            return None
        try:
            return Rollout.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error("stored rollout of model '%s' cannot be read: %s", model, exc)
            return None

    @property
    def rollouts(self) -> dict[str, Rollout]:
        """Every stored rollout as of the plane's last read (parsed once per revision)."""
        snapshot = self.plane.snapshot
        if self._parsed[0] != snapshot.revision:
            parsed = {}
            for model in snapshot.items(self.SECTION):
                rollout = self.parse(snapshot, model)
                if rollout is not None:
                    parsed[model] = rollout
            self._parsed = (snapshot.revision, parsed)
        return self._parsed[1]

    def status(self, model: str) -> Rollout:
        rollout = self.rollouts.get(model)
        if rollout is None:
            raise NotFound(f"model '{model}' has no rollout")
        return rollout

    def active(self, model: str) -> Rollout | None:
        rollout = self.rollouts.get(model)
        return rollout if rollout is not None and rollout.active else None

    async def figures(self, rollout: Rollout) -> tuple[Window, Window]:
        """The fleet's canary and baseline figures for the rollout's current window."""
        if not rollout.active:
            return Window(0, 0, 0.0), Window(0, 0, 0.0)
        await self.publish(rollout.spec.model)
        records = await self.store.records(f"figures/{rollout.spec.model}")
        return (merge(records, rollout.window, rollout.spec.to_version),
                merge(records, rollout.window, rollout.spec.from_version))

    # ---- operator actions -------------------------------------------------------------------

    async def start(self, spec: RolloutSpec, who: str) -> Rollout:
        spec.validate_limits()
        router = self.plane.router
        entry = router.repository.get(spec.model)
        if not spec.from_version:
            spec = replace(spec, from_version=self._baseline_of(spec.model, spec.to_version))
        spec.validate()
        for version in (spec.to_version, spec.from_version):
            if version not in entry.serving:
                raise InvalidArgument(f"model '{spec.model}' version {version} is not serving")
        now = await self.store.now()

        def build(snapshot: Snapshot):
            current = self.parse(snapshot, spec.model)
            if current is not None and current.active:
                raise FailedPrecondition(f"model '{spec.model}' already has a {current.state} "
                                         f"rollout to version {current.spec.to_version}; abort "
                                         "it first")
            approvals.check_canary(snapshot, self.plane.router, spec.model, spec.to_version)
            rollout = Rollout(spec, "running", 0, now, now, owner=self.identity,
                              epoch=(current.epoch + 1) if current else 1,
                              lease_until=now + self.lease_s)
            rollout.window = _window(rollout)
            rollout.event(now, "start", f"{spec.steps[0]:g}% to version {spec.to_version}",
                          who)
            return self._commit_plan(snapshot, rollout, who, "rollout-start")

        return await approvals.commit_gated(self.plane, build, who)

    def _baseline_of(self, model: str, canary: str) -> str:
        """The version a canary is compared with: the one with most traffic now, else the
        newest other serving version."""
        router = self.plane.router
        shares, _ = router.effective(model)
        others = {v: p for v, p in shares.items() if v != canary}
        if others:
            return max(others, key=lambda v: (others[v], int(v)))
        serving = [v for v in router.repository.get(model).serving if v != canary]
        if not serving:
            raise InvalidArgument(f"model '{model}' has no other serving version to compare "
                                  f"version {canary} with")
        return max(serving, key=int)

    async def pause(self, model: str, who: str) -> Rollout:
        def pause(rollout, now):
            rollout.state = "paused"
            rollout.event(now, "pause", "paused by operator", who)
        return await self._operate(model, who, "pause", ("running",), pause)

    async def resume(self, model: str, who: str) -> Rollout:
        def resume(rollout, now):
            rollout.state = "running"
            rollout.owner, rollout.epoch = self.identity, rollout.epoch + 1
            rollout.lease_until = now + self.lease_s
            rollout.step_started = now
            rollout.window = _window(rollout)  # the step's evidence starts again
            rollout.event(now, "resume", "resumed by operator", who)
        return await self._operate(model, who, "resume", ("paused",), resume)

    async def abort(self, model: str, who: str) -> Rollout:
        return await self._operate(model, who, "abort", ACTIVE, None)

    async def _operate(self, model, who, verb, states, mutate) -> Rollout:
        now = await self.store.now()

        def build(snapshot: Snapshot):
            rollout = self.parse(snapshot, model)
            if rollout is None:
                raise NotFound(f"model '{model}' has no rollout")
            if rollout.state not in states:
                if not rollout.active:
                    raise FailedPrecondition(f"the rollout of model '{model}' already ended "
                                             f"({rollout.state})")
                raise FailedPrecondition(f"cannot {verb} the rollout of model '{model}': it is "
                                         f"{rollout.state}")
            if mutate is None:  # abort
                change, record, ended = self.end_change(
                    snapshot, rollout, "aborted", "aborted by operator; all traffic back to "
                    f"version {rollout.spec.from_version}", who, now)
                split, split_record = self._split(snapshot, ended, who, "rollout-aborted")
                return [change, split], [record, split_record], ended
            mutate(rollout, now)
            return self._commit_plan(snapshot, rollout, who, f"rollout-{verb}")

        rollout = await self.plane.commit(build)
        if not rollout.active:
            await self._clear_figures(model)
        return rollout

    def end_change(self, snapshot: Snapshot, rollout: Rollout, state: str, why: str, who: str,
                   now: float | None = None) -> tuple[Change, dict, Rollout]:
        """The change that ends ``rollout`` (as read in ``snapshot``), its audit record and
        the ended rollout; callers add the final split."""
        model = rollout.spec.model
        ended = self._copy(rollout)
        ended.state, ended.reason = state, why
        ended.event(now if now is not None else time.time(), state, why, who)
        return (Change(self.SECTION, model, ended.to_json(),
                       snapshot.revision_of(self.SECTION, model)),
                audit_record(who, self.SECTION, model, f"rollout-{state}",
                             {"state": rollout.state, "percent": rollout.percent},
                             {"state": state, "percent": ended.percent}, why), ended)

    @staticmethod
    def _copy(rollout: Rollout) -> Rollout:
        return Rollout.from_json(rollout.to_json())

    # ---- the judge --------------------------------------------------------------------------

    async def tick(self) -> None:
        """Renew leases, adopt orphans, and judge the steps whose interval has passed."""
        rollouts = [r for r in self.rollouts.values() if r.state == "running"]
        if not rollouts:
            return
        now = await self.store.now()
        for rollout in rollouts:
            try:
                if rollout.owner == self.identity:
                    if now - rollout.step_started >= rollout.spec.interval_s:
                        await self._judge(rollout, now)
                    elif rollout.lease_until - now < self.lease_s * 2 / 3:
                        await self._owned(rollout, now, None)
                elif now >= rollout.lease_until:
                    await self._adopt(rollout, now)
            except StoreUnavailable:
                raise
            except Exception:
                log.exception("rollout of model '%s': tick failed; retrying",
                              rollout.spec.model)

    async def _adopt(self, seen: Rollout, now: float) -> None:
        model = seen.spec.model

        def build(snapshot: Snapshot):
            rollout = self.parse(snapshot, model)
            if rollout is None or rollout.state != "running" or rollout.lease_until > now \
                    or rollout.epoch != seen.epoch:
                return None  # renewed, ended, or adopted by someone else first
            previous = rollout.owner
            rollout.owner, rollout.epoch = self.identity, rollout.epoch + 1
            rollout.lease_until = now + self.lease_s
            rollout.event(now, "adopt", f"judged by {self.identity} from step "
                          f"{rollout.step + 1} at {rollout.percent:g}% (the lease of "
                          f"{previous or 'nobody'} ran out)", "controller")
            return ([Change(self.SECTION, model, rollout.to_json(),
                            snapshot.revision_of(self.SECTION, model))],
                    [audit_record("controller", self.SECTION, model, "rollout-adopt",
                                  {"owner": previous}, {"owner": self.identity},
                                  f"judge {previous or 'nobody'} -> {self.identity}")], rollout)

        rollout = await self.plane.commit(build)
        if rollout is not None:
            log.warning("model '%s': took over its rollout at step %d (%g%%)", model,
                        rollout.step + 1, rollout.percent)

    async def _owned(self, seen: Rollout, now: float, apply) -> Rollout | None:
        """Commit ``apply(rollout, snapshot) -> plan`` (None: renew the lease only), but only
        while the store still names this replica owner at the epoch we judged under."""
        model = seen.spec.model

        def build(snapshot: Snapshot):
            rollout = self.parse(snapshot, model)
            if rollout is None or rollout.state != "running" or rollout.owner != \
                    self.identity or rollout.epoch != seen.epoch or \
                    rollout.window != seen.window:
                return None  # fenced: paused, aborted, adopted or stepped meanwhile
            rollout.lease_until = now + self.lease_s
            if apply is None:
                return ([Change(self.SECTION, model, rollout.to_json(),
                                snapshot.revision_of(self.SECTION, model))], [], rollout)
            return apply(rollout, snapshot)

        return await self.plane.commit(build)

    async def _judge(self, seen: Rollout, now: float) -> None:
        spec = seen.spec
        canary, baseline = await self.figures(seen)
        qualities = ((self.quality(spec.model, spec.to_version),
                      self.quality(spec.model, spec.from_version))
                     if spec.min_accuracy_ratio > 0 and self.quality is not None else ())
        verdict, why = decide(spec, canary, baseline, *qualities)
        if verdict == "wait":
            if seen.lease_until - now < self.lease_s * 2 / 3:
                await self._owned(seen, now, None)
            return
        figures = (f" [fleet: canary {canary.requests} requests from {canary.replicas} "
                   f"replica(s), baseline {baseline.requests}]")

        def apply(rollout: Rollout, snapshot: Snapshot):
            if verdict != "rollback":  # the approval gate: no more traffic to an unapproved
                try:                   # canary (gateway.yaml changed mid-rollout): pause
                    approvals.check_canary(snapshot, self.plane.router, spec.model,
                                           spec.to_version, "the next step")
                except approvals.ApprovalRequired as exc:
                    rollout.state, rollout.reason = "paused", exc.message
                    rollout.event(now, "gate", exc.message, "controller")
                    return self._commit_plan(snapshot, rollout, "controller", "rollout-gate")
            if verdict == "rollback" or rollout.step + 2 >= len(spec.steps):
                state = "rolled_back" if verdict == "rollback" else "promoted"
                if state == "promoted":  # the next step is 100%: promotion
                    rollout.step = len(spec.steps) - 1
                change, record, ended = self.end_change(snapshot, rollout, state,
                                                        why + figures, "controller", now)
                split, split_record = self._split(snapshot, ended, "controller",
                                                  f"rollout-{state}")
                return [change, split], [record, split_record], ended
            rollout.step += 1
            rollout.step_started = now
            rollout.window = _window(rollout)
            rollout.event(now, "step", f"{why}{figures}; now {rollout.percent:g}%",
                          "controller")
            return self._commit_plan(snapshot, rollout, "controller", "rollout-step")

        rollout = await self._owned(seen, now, apply)
        if rollout is None:
            return
        if not rollout.active:
            await self._clear_figures(spec.model)
        log.warning("model '%s' rollout to version %s: %s (%s)", spec.model, spec.to_version,
                    rollout.state if not rollout.active else f"step {rollout.step + 1}",
                    why)

    # ---- commits ----------------------------------------------------------------------------

    def _commit_plan(self, snapshot: Snapshot, rollout: Rollout, who: str, action: str):
        """The rollout entry and its split, in one commit."""
        model = rollout.spec.model
        old = self.parse(snapshot, model)
        change = Change(self.SECTION, model, rollout.to_json(),
                        snapshot.revision_of(self.SECTION, model))
        last = rollout.history[-1]
        record = audit_record(who, self.SECTION, model, action,
                              {"state": old.state, "percent": old.percent} if old else None,
                              {"state": rollout.state, "percent": rollout.percent},
                              last["detail"])
        split, split_record = self._split(snapshot, rollout, who, action)
        return [change, split], [record, split_record], rollout

    def _split(self, snapshot: Snapshot, rollout: Rollout, who: str, action: str):
        """The traffic policy the rollout's state implies, keeping any shadow."""
        spec = rollout.spec
        current = policy_of(snapshot.value(TRAFFIC, spec.model))
        percent = rollout.percent
        if rollout.state == "promoted":
            entry = self.plane.router.repository.models.get(spec.model)
            newest = entry is not None and entry.latest is not None and \
                entry.latest.version == spec.to_version
            weights = {} if newest else normalise_weights({spec.to_version: 100.0})
        elif percent <= 0:
            weights = normalise_weights({spec.from_version: 100.0})
        else:
            weights = normalise_weights({spec.to_version: percent,
                                         spec.from_version: 100.0 - percent})
        return policy_change(snapshot, spec.model, TrafficPolicy(weights, current.shadow), who,
                             action)

    # ---- figures ----------------------------------------------------------------------------

    async def publish(self, model: str | None = None) -> None:
        """Send this replica's counts (of one model, or of every model counted since the last
        publish) to the store."""
        counter = self.plane.counter
        models = [model] if model is not None else list(counter.changed)
        now = await self.store.now()
        for name in models:
            counter.changed.discard(name)
            if name in counter.windows:
                await self.store.put_record(f"figures/{name}", self.identity,
                                            counter.export(name, self.identity, now))

    async def _clear_figures(self, model: str) -> None:
        try:
            await self.store.clear_records(f"figures/{model}")
        except StoreUnavailable as exc:
            log.warning("model '%s': old rollout figures stay in the store: %s", model,
                        exc.message)

    async def run(self, interval: float = 1.0) -> None:
        """The loop: publish this replica's figures, then judge; a store outage is reported
        by the plane and retried here."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.publish()
                await self.tick()
            except StoreUnavailable as exc:
                log.debug("rollout tick: %s", exc.message)
            except Exception:
                log.exception("rollout controller tick failed; retrying")

    async def release(self) -> None:
        """On shutdown: hand the lease back so another replica judges at once."""
        for rollout in list(self.rollouts.values()):
            if rollout.state == "running" and rollout.owner == self.identity:
                now = await self.store.now()

                def release(r: Rollout, snapshot: Snapshot, now=now):
                    r.lease_until = now
                    return ([Change(self.SECTION, r.spec.model, r.to_json(),
                                    snapshot.revision_of(self.SECTION, r.spec.model))], [], r)
                await self._owned(rollout, now, release)
