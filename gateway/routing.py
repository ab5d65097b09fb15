"""Traffic policies: which serving version answers a request that names none.

Precedence: an explicit ``model_version`` is honoured as is; otherwise, with a split set, a
sticky routing key hashes to a fixed point of a 10,000-slot ring and the split assigns each
version a contiguous range of slots in version order, so one key lands on one version while the
split is unchanged, and moving 10% -> 20% moves only the keys in the 10% that changed hands;
without a key the point is random. Without a split the newest ready version serves.

Weights may name versions that have since unloaded: the remaining versions share their slots
in proportion (and ``fallback`` says so). A policy is immutable; changing one swaps it whole.
"""

from __future__ import annotations

import hashlib
import logging
import random
from bisect import bisect_right
from dataclasses import dataclass, field

from gateway.errors import InvalidArgument, Unavailable, echo
from gateway.events import Events
from gateway.repository import ModelEntry, Repository, ServingVersion

log = logging.getLogger(__name__)
SLOTS = 10_000


def key_slot(key: str) -> int:
    """A stable slot for a routing key, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SLOTS


def normalise_weights(weights: dict[str, float]) -> dict[str, int]:
    """Weights as slots out of 10,000: integers summing to 100, or fractions summing to 1."""
    if not weights:
        raise InvalidArgument("a split needs at least one VERSION=WEIGHT")
    for version, weight in weights.items():
        if not version.isdigit() or int(version) <= 0:
            raise InvalidArgument(f"version '{echo(version)}' is not a positive integer")
        if not weight >= 0:  # also refuses NaN
            raise InvalidArgument(f"weight of version {echo(version)} must not be negative")
    total = sum(weights.values())
    if abs(total - 100) < 1e-6:
        scale = SLOTS / 100
    elif abs(total - 1) < 1e-9:
        scale = SLOTS
    else:
        raise InvalidArgument(f"weights must sum to 100 (or to 1 as fractions); they sum to "
                              f"{total:g}")
    slots = {v: round(w * scale) for v, w in weights.items()}
    drift = SLOTS - sum(slots.values())  # rounding: give the remainder to the largest weight
    if drift:
        slots[max(slots, key=lambda v: slots[v])] += drift
    return {v: s for v, s in sorted(slots.items(), key=lambda kv: int(kv[0]))}


@dataclass(frozen=True, slots=True)
class Shadow:
    version: str
    percent: float


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """A model's split (version -> slots out of 10,000) and optional shadow."""

    weights: dict[str, int] = field(default_factory=dict)
    shadow: Shadow | None = None

    def to_json(self) -> dict:
        return {"weights": {v: s / (SLOTS / 100) for v, s in self.weights.items()},
                "shadow": ({"version": self.shadow.version, "percent": self.shadow.percent}
                           if self.shadow else None)}

    @classmethod
    def from_json(cls, data: dict) -> TrafficPolicy:
        weights = normalise_weights(data.get("weights") or {}) if data.get("weights") else {}
        shadow = data.get("shadow")
        return cls(weights, Shadow(str(shadow["version"]), float(shadow["percent"]))
                   if shadow else None)


class _Table:
    """A policy resolved against the versions serving now: cumulative slot bounds."""

    __slots__ = ("bounds", "fallback", "serving", "versions")

    def __init__(self, policy: TrafficPolicy, serving: dict[str, ServingVersion]):
        self.serving = serving
        live = {v: s for v, s in policy.weights.items() if v in serving and s > 0}
        missing = [v for v, s in policy.weights.items() if s > 0 and v not in serving]
        self.fallback = ""
        if missing:
            self.fallback = (f"version(s) {', '.join(missing)} not serving; "
                             + ("their share goes to " + ", ".join(live) if live
                                else "the newest version serves"))
        total = sum(live.values())
        self.bounds: list[int] = []
        self.versions: list[ServingVersion] = []
        acc = 0
        for version, slots in live.items():  # version order: stable ranges for sticky keys
            acc += slots
            self.bounds.append(acc * SLOTS // total)
            self.versions.append(serving[version])

    def pick(self, slot: int) -> ServingVersion | None:
        if not self.versions:
            return None
        return self.versions[bisect_right(self.bounds, slot)]


class Router:
    """Resolves the version for each request from the model's traffic policy."""

    def __init__(self, repository: Repository):
        self.repository = repository
        self.policies: dict[str, TrafficPolicy] = {}
        self._tables: dict[str, _Table] = {}
        # the seam the fallback event goes to: the repository's (a fake may have none)
        self.events = getattr(repository, "events", None) or Events()

    def route(self, model: str, version: str, routing_key: str | None) -> ServingVersion:
        if version or model not in self.policies:
            return self.repository.version(model, version)
        entry = self.repository.get(model)
        table = self._tables.get(model)
        if table is None or table.serving is not entry.serving:
            table = self._rebuild(model, entry)
        slot = key_slot(routing_key) if routing_key else int(random.random() * SLOTS)
        served = table.pick(slot)
        return served if served is not None else self.repository.version(model, "")

    def _rebuild(self, model: str, entry: ModelEntry) -> _Table:
        table = _Table(self.policies[model], entry.serving)
        self._tables[model] = table
        if table.fallback:
            log.warning("model '%s' traffic: %s", model, table.fallback)
            self.events.emit("fallback", model, table.fallback)
        return table

    def effective(self, model: str) -> tuple[dict[str, float], str]:
        """Shares (percent) that requests without an explicit version get now, and any note."""
        entry = self.repository.get(model)
        policy = self.policies.get(model)
        if policy is None:
            return ({entry.latest.version: 100.0} if entry.latest else {}), ""
        table = _Table(policy, entry.serving)
        shares, low = {}, 0
        for bound, served in zip(table.bounds, table.versions):
            shares[served.version] = (bound - low) / (SLOTS / 100)
            low = bound
        if not shares and entry.latest:
            shares = {entry.latest.version: 100.0}
        return shares, table.fallback

    def check(self, model: str, policy: TrafficPolicy) -> None:
        """Refuse a policy naming versions that are not serving now."""
        entry = self.repository.get(model)
        named = [v for v, s in policy.weights.items() if s > 0]
        if policy.shadow:
            named.append(policy.shadow.version)
        for version in named:
            if version not in entry.serving:
                state = entry.reasons.get(version)
                raise InvalidArgument(
                    f"model '{model}' version {echo(version)} is not serving"
                    + (f" ({state})" if state else "")
                    + f"; serving versions: {', '.join(sorted(entry.serving, key=int)) or 'none'}")
        if policy.shadow and not 0 < policy.shadow.percent <= 100:
            raise InvalidArgument("shadow percent must be above 0 and at most 100")

    def apply(self, model: str, policy: TrafficPolicy | None) -> None:
        """Install (or, with None, remove) a model's policy; validation is the caller's."""
        if policy is None or (not policy.weights and policy.shadow is None):
            self.policies.pop(model, None)
        else:
            self.policies[model] = policy
        self._tables.pop(model, None)

    def shadow_target(self, model: str) -> ServingVersion | None:
        """The shadow version for this request, if the dice say so."""
        policy = self.policies.get(model)
        if policy is None or policy.shadow is None:
            return None
        if random.random() * 100 >= policy.shadow.percent:
            return None
        entry = self.repository.models.get(model)
        return entry.serving.get(policy.shadow.version) if entry else None

    def require_serving(self, model: str) -> None:
        if self.repository.get(model).latest is None:
            raise Unavailable(f"model '{model}' has no serving version")
