"""Automatic canary rollouts: step a new version's share up while comparing it with the
current one, then promote it or roll it back, by itself.

At each step the canary gets ``steps[i]`` percent of the model's traffic for ``interval``
seconds. The controller then compares the canary with the baseline over that window: error
rate (canary errors / canary requests) against ``max_error_rate``, and p99 latency against
``max_latency_ratio`` x the baseline's p99. Fewer than ``min_requests`` canary requests: the
window is extended (a quiet model is not evidence). Passing the last step promotes (100% to the
canary; the old version stays loaded for a quick rollback until the version policy retires
it); failing any check rolls back (0% canary) and records why.

``decide`` is the pure judgement; ``RolloutController`` applies it to traffic, persists the
rollout (so a restart resumes it) and audits every transition.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from gateway.errors import FailedPrecondition, InvalidArgument, NotFound
from gateway.traffic import TrafficControl

log = logging.getLogger(__name__)
SECTION = "rollouts"
ACTIVE = ("running", "paused")
SAMPLES = 4096  # latencies kept per version for p99 (the most recent)
LATENCY_SLACK_S = 0.002  # p99 differences below this are noise, whatever the ratio


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    model: str
    to_version: str
    from_version: str
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    interval_s: float = 60.0
    max_error_rate: float = 0.01
    max_latency_ratio: float = 1.5
    min_requests: int = 100
    # Ground-truth feedback (gateway/feedback.py), off at 0: the canary's accuracy must be at
    # least this times the baseline's (regression: its mean absolute error at most the
    # baseline's divided by it), once both versions have ``min_labels`` labelled predictions.
    min_accuracy_ratio: float = 0.0
    min_labels: int = 50

    def validate(self) -> None:
        self.validate_limits()
        if self.to_version == self.from_version:
            raise InvalidArgument("the canary and the baseline are the same version")

    def validate_limits(self) -> None:
        """Everything but the versions (a publish checks its canary before it has one)."""
        if not self.steps or any(not 0 < s <= 100 for s in self.steps) \
                or list(self.steps) != sorted(self.steps):
            raise InvalidArgument("steps must be increasing percentages in (0, 100]")
        if self.steps[-1] != 100:
            raise InvalidArgument("the last step must be 100 (promotion)")
        if self.interval_s <= 0 or self.min_requests < 0:
            raise InvalidArgument("interval must be positive and min_requests not negative")
        if not 0 <= self.max_error_rate <= 1 or self.max_latency_ratio <= 0:
            raise InvalidArgument("max_error_rate must be within [0, 1] and max_latency_ratio "
                                  "positive")
        if not self.min_accuracy_ratio >= 0 or self.min_labels < 0:
            raise InvalidArgument("min_accuracy_ratio and min_labels must not be negative")


@dataclass(slots=True)
class Rollout:
    spec: RolloutSpec
    state: str = "running"  # running, paused, promoted, rolled_back, aborted
    step: int = 0
    step_started: float = 0.0
    started: float = 0.0
    reason: str = ""
    history: list[dict] = field(default_factory=list)
    owner: str = ""  # the gateway process that judges it (others follow its splits)
    heartbeat: float = 0.0  # the owner's last sign of life; a stale one is taken over

    def to_json(self) -> dict:
        data = asdict(self)
        data["spec"]["steps"] = list(self.spec.steps)
        return data

    @classmethod
    def from_json(cls, data: dict) -> Rollout:
        spec = dict(data["spec"])
        spec["steps"] = tuple(spec["steps"])
        return cls(RolloutSpec(**spec), data["state"], data["step"], data["step_started"],
                   data["started"], data.get("reason", ""), list(data.get("history", [])),
                   data.get("owner", ""), float(data.get("heartbeat", 0.0)))

    @property
    def percent(self) -> float:
        """The canary's share of traffic now."""
        if self.state == "promoted":
            return 100.0
        if self.state in ("rolled_back", "aborted"):
            return 0.0
        return self.spec.steps[self.step]


@dataclass(frozen=True, slots=True)
class Window:
    """What one version did during the current step."""

    requests: int
    errors: int
    p99_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


Quality = tuple  # (kind, labelled, accuracy or mean absolute error) of one version


def decide(spec: RolloutSpec, canary: Window, baseline: Window,
           canary_quality: Quality | None = None,
           baseline_quality: Quality | None = None) -> tuple[str, str]:
    """("advance" | "rollback" | "wait", why) for one finished step."""
    if canary.requests < spec.min_requests:
        return "wait", (f"{canary.requests} canary requests so far; {spec.min_requests} needed "
                        "before judging")
    if canary.error_rate > spec.max_error_rate:
        return "rollback", (f"canary error rate {canary.error_rate:.2%} is above "
                            f"{spec.max_error_rate:.2%} ({canary.errors} of {canary.requests})")
    if baseline.requests and baseline.p99_s > 0:
        ratio = canary.p99_s / baseline.p99_s
        # Sub-millisecond p99s jitter by more than any ratio on a busy host: a canary is slow
        # only when it is also slower by a noticeable absolute margin.
        if ratio > spec.max_latency_ratio and canary.p99_s - baseline.p99_s > LATENCY_SLACK_S:
            return "rollback", (f"canary p99 latency {canary.p99_s * 1000:.2f} ms is "
                                f"{ratio:.2f}x the baseline's {baseline.p99_s * 1000:.2f} ms "
                                f"(limit {spec.max_latency_ratio:g}x)")
    if spec.min_accuracy_ratio > 0:
        verdict = _judge_quality(spec, canary_quality, baseline_quality)
        if verdict is not None:
            return verdict
    return "advance", (f"canary healthy: {canary.requests} requests, error rate "
                       f"{canary.error_rate:.2%}, p99 {canary.p99_s * 1000:.2f} ms vs baseline "
                       f"{baseline.p99_s * 1000:.2f} ms")


def _judge_quality(spec: RolloutSpec, canary: Quality | None,
                   baseline: Quality | None) -> tuple[str, str] | None:
    """The feedback check: None when the canary is good enough."""
    labelled = [q[1] if q else 0 for q in (canary, baseline)]
    if min(labelled) < max(spec.min_labels, 1):
        return "wait", (f"{labelled[0]} canary and {labelled[1]} baseline predictions "
                        f"labelled; {spec.min_labels} each needed to compare accuracy")
    kind, _, score = canary
    base = baseline[2]
    if kind == "regression":
        if score * spec.min_accuracy_ratio > base:
            return "rollback", (f"canary mean absolute error {score:.4g} is above the "
                                f"baseline's {base:.4g} / {spec.min_accuracy_ratio:g}")
    elif score < spec.min_accuracy_ratio * base:
        return "rollback", (f"canary accuracy {score:.2%} is below {spec.min_accuracy_ratio:g}x "
                            f"the baseline's {base:.2%} ({canary[1]} labelled)")
    return None


class VersionWindows:
    """Per-version request outcomes since each model's current step began (fed per request)."""

    def __init__(self):
        self._data: dict[tuple[str, str], list] = {}  # (model, version) -> [n, errors, deque]
        self.watched: set[str] = set()  # models under rollout; others cost one set lookup

    def observe(self, model: str, served, code: str, elapsed_ns: int) -> None:
        if served is None or served.model not in self.watched:
            return
        slot = self._data.get((served.model, served.version))
        if slot is None:
            slot = self._data[(served.model, served.version)] = [0, 0, deque(maxlen=SAMPLES)]
        slot[0] += 1
        if code != "OK":
            if code not in ("INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED", "DEADLINE_EXCEEDED",
                            "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED"):
                slot[1] += 1  # the version's fault, not the caller's
        else:
            slot[2].append(elapsed_ns / 1e9)

    def reset(self, model: str) -> None:
        for key in [k for k in self._data if k[0] == model]:
            del self._data[key]

    def window(self, model: str, version: str) -> Window:
        n, errors, samples = self._data.get((model, version), (0, 0, ()))
        p99 = float(np.percentile(np.fromiter(samples, float), 99)) if samples else 0.0
        return Window(n, errors, p99)


def _alive(owner: str) -> bool:
    """False only when the owner ran on this host and its process is gone (a restart)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class RolloutController:
    """Drives rollouts. With several replicas sharing state, one owns each rollout (judging
    its own traffic) and renews a heartbeat; if the owner disappears (crash, restart), another
    replica adopts the rollout after ``LEASE_S`` and resumes it from its current step."""

    LEASE_S = 15.0

    def __init__(self, traffic: TrafficControl, windows: VersionWindows, clock=time.time):
        self.traffic = traffic
        self.windows = windows
        self.clock = clock
        self.rollouts: dict[str, Rollout] = {}
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        # (model, version) -> Quality | None: labelled feedback, for min_accuracy_ratio
        self.quality = None

    # ---- operator actions -----------------------------------------------------------------

    def start(self, spec: RolloutSpec, who: str) -> Rollout:
        spec.validate()
        entry = self.traffic.router.repository.get(spec.model)
        current = self.rollouts.get(spec.model)
        if current is not None and current.state in ACTIVE:
            raise FailedPrecondition(f"model '{spec.model}' already has a {current.state} "
                                     f"rollout to version {current.spec.to_version}; "
                                     "abort it first")
        if not spec.from_version:
            spec = replace(spec, from_version=self._baseline_of(spec.model, spec.to_version))
            spec.validate()
        for version in (spec.to_version, spec.from_version):
            if version not in entry.serving:
                raise InvalidArgument(f"model '{spec.model}' version {version} is not serving")
        now = self.clock()
        rollout = Rollout(spec, "running", 0, now, now, owner=self.identity, heartbeat=now)
        self._set_split(rollout, who, "rollout-start")
        self._record(rollout, "start", f"{spec.steps[0]:g}% to version {spec.to_version}", who)
        return rollout

    def _baseline_of(self, model: str, canary: str) -> str:
        """The version a canary is compared with: the one with most traffic now, else the
        newest other serving version."""
        shares, _ = self.traffic.router.effective(model)
        others = {v: p for v, p in shares.items() if v != canary}
        if others:
            return max(others, key=lambda v: (others[v], int(v)))
        serving = [v for v in self.traffic.router.repository.get(model).serving if v != canary]
        if not serving:
            raise InvalidArgument(f"model '{model}' has no other serving version to compare "
                                  f"version {canary} with")
        return max(serving, key=int)

    def _get(self, model: str) -> Rollout:
        rollout = self.rollouts.get(model)
        if rollout is None:
            raise NotFound(f"model '{model}' has no rollout")
        return rollout

    def status(self, model: str) -> Rollout:
        return self._get(model)

    def pause(self, model: str, who: str) -> Rollout:
        rollout = self._require_state(model, "running", "pause")
        rollout.state = "paused"
        self._record(rollout, "pause", "paused by operator", who)
        return rollout

    def resume(self, model: str, who: str) -> Rollout:
        rollout = self._require_state(model, "paused", "resume")
        rollout.state = "running"
        rollout.step_started = self.clock()
        self.windows.reset(model)
        self._record(rollout, "resume", "resumed by operator", who)
        return rollout

    def abort(self, model: str, who: str) -> Rollout:
        rollout = self._get(model)
        if rollout.state not in ACTIVE:
            raise FailedPrecondition(f"the rollout of model '{model}' already ended "
                                     f"({rollout.state})")
        self._finish(rollout, "aborted", "aborted by operator; all traffic back to version "
                     f"{rollout.spec.from_version}", who, canary_percent=0.0)
        return rollout

    def _require_state(self, model: str, state: str, verb: str) -> Rollout:
        rollout = self._get(model)
        if rollout.state != state:
            raise FailedPrecondition(f"cannot {verb} the rollout of model '{model}': it is "
                                     f"{rollout.state}")
        return rollout

    # ---- the loop -------------------------------------------------------------------------

    def tick(self) -> None:
        """Judge every running rollout this process owns whose step interval has passed."""
        self.sync()
        now = self.clock()
        for rollout in list(self.rollouts.values()):
            if rollout.state != "running":
                continue
            if rollout.owner != self.identity:
                if now - rollout.heartbeat < self.LEASE_S and _alive(rollout.owner):
                    continue  # another live replica drives it
                rollout.owner = self.identity
                rollout.step_started = now
                rollout.heartbeat = now
                self._record(rollout, "adopt", f"resumed at {rollout.percent:g}% by "
                             f"{self.identity}", "controller")
                continue
            if now - rollout.heartbeat >= self.LEASE_S / 3:
                rollout.heartbeat = now
                self.traffic.store.update(SECTION, rollout.spec.model, rollout.to_json(),
                                          "controller", "heartbeat", audit=False)
            if now - rollout.step_started < rollout.spec.interval_s:
                continue
            spec = rollout.spec
            canary = self.windows.window(spec.model, spec.to_version)
            baseline = self.windows.window(spec.model, spec.from_version)
            qualities = ((self.quality(spec.model, spec.to_version),
                          self.quality(spec.model, spec.from_version))
                         if spec.min_accuracy_ratio > 0 and self.quality is not None else ())
            verdict, why = decide(spec, canary, baseline, *qualities)
            if verdict == "wait":
                continue
            if verdict == "rollback":
                self._finish(rollout, "rolled_back", why, "controller", canary_percent=0.0)
            elif rollout.step + 2 >= len(spec.steps):  # the next step is 100%: promotion
                rollout.step = len(spec.steps) - 1
                self._finish(rollout, "promoted", why, "controller", canary_percent=100.0)
            else:
                rollout.step += 1
                rollout.step_started = now
                self.windows.reset(spec.model)
                self._set_split(rollout, "controller", "rollout-step")
                self._record(rollout, "step", f"{why}; now {rollout.percent:g}%", "controller")

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:
                log.exception("rollout controller tick failed; retrying")

    # ---- effects --------------------------------------------------------------------------

    def _set_split(self, rollout: Rollout, who: str, action: str,
                   canary_percent: float | None = None) -> None:
        spec = rollout.spec
        percent = rollout.percent if canary_percent is None else canary_percent
        weights = {spec.to_version: percent, spec.from_version: 100.0 - percent}
        self.traffic.set_split(spec.model, weights, f"{who} ({action})")

    def _finish(self, rollout: Rollout, state: str, why: str, who: str,
                canary_percent: float) -> None:
        rollout.state = state
        rollout.reason = why
        try:
            self._set_split(rollout, who, f"rollout-{state}", canary_percent)
        except Exception as exc:  # e.g. the baseline unloaded: say so, still end the rollout
            log.error("model '%s': could not set the final split: %s", rollout.spec.model,
                      getattr(exc, "message", exc))
        self.windows.watched.discard(rollout.spec.model)
        self._record(rollout, state, why, who)
        log.warning("model '%s' rollout to version %s %s: %s", rollout.spec.model,
                    rollout.spec.to_version, state.replace("_", " "), why)

    def _record(self, rollout: Rollout, event: str, detail: str, who: str) -> None:
        rollout.history.append({"time": self.clock(), "event": event, "detail": detail,
                                "step": rollout.step, "percent": rollout.percent, "who": who})
        self.rollouts[rollout.spec.model] = rollout
        if rollout.state in ACTIVE:
            self.windows.watched.add(rollout.spec.model)
            if event in ("start", "resume"):
                self.windows.reset(rollout.spec.model)
        self.traffic.store.update(SECTION, rollout.spec.model, rollout.to_json(), who,
                                  f"rollout-{event}")

    def sync(self) -> None:
        """Take in rollouts changed by any process: a persisted rollout with more history than
        ours is newer (an operator paused or aborted it through another replica)."""
        for model, data in self.traffic.store.read().get(SECTION, {}).items():
            try:
                rollout = Rollout.from_json(data)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("persisted rollout of model '%s' ignored: %s", model, exc)
                continue
            mine = self.rollouts.get(model)
            if mine is not None and len(mine.history) >= len(rollout.history):
                continue
            self.rollouts[model] = rollout
            if rollout.state in ACTIVE:
                self.windows.watched.add(model)
            else:
                self.windows.watched.discard(model)

