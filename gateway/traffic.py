"""Operator actions on traffic: validate, apply, persist, audit; and follow other replicas.

The router answers requests; this module changes what it answers with. A refused change leaves
the old policy in place. Changes are written to the state store first and then applied, and every
process applies changes it finds in the store (its own included), so all replicas converge.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.errors import InvalidArgument
from gateway.routing import Router, Shadow, TrafficPolicy, normalise_weights
from gateway.state import StateStore

log = logging.getLogger(__name__)
SECTION = "traffic"


class TrafficControl:
    def __init__(self, router: Router, store: StateStore):
        self.router = router
        self.store = store
        self._seen = None

    def policy(self, model: str) -> TrafficPolicy:
        return self.router.policies.get(model) or TrafficPolicy()

    def set_split(self, model: str, weights: dict[str, float], who: str) -> TrafficPolicy:
        policy = TrafficPolicy(normalise_weights(weights), self.policy(model).shadow)
        return self._commit(model, policy, who, "set")

    def set_shadow(self, model: str, version: str, percent: float, who: str) -> TrafficPolicy:
        if not version.isdigit():
            raise InvalidArgument(f"shadow version {version!r} is not a positive integer")
        policy = TrafficPolicy(self.policy(model).weights, Shadow(version, float(percent)))
        return self._commit(model, policy, who, "shadow")

    def clear_shadow(self, model: str, who: str) -> TrafficPolicy:
        return self._commit(model, TrafficPolicy(self.policy(model).weights, None), who,
                            "clear-shadow")

    def clear(self, model: str, who: str) -> TrafficPolicy:
        self.router.repository.get(model)
        return self._commit(model, TrafficPolicy(), who, "clear")

    def _commit(self, model: str, policy: TrafficPolicy, who: str, action: str) -> TrafficPolicy:
        self.router.check(model, policy)
        empty = not policy.weights and policy.shadow is None
        self.store.update(SECTION, model, None if empty else policy.to_json(), who, action)
        self.router.apply(model, policy)
        log.info("traffic %s for model '%s' by %s: %s", action, model, who, policy.to_json())
        return policy

    def sync(self) -> None:
        """Apply the persisted policies (at start, and whenever the state file changes)."""
        self._seen = self.store.signature()
        persisted = self.store.read().get(SECTION, {})
        for model in set(self.router.policies) - set(persisted):
            self.router.apply(model, None)
        for model, data in persisted.items():
            try:
                policy = TrafficPolicy.from_json(data)
            except (InvalidArgument, KeyError, TypeError, ValueError) as exc:
                log.error("persisted traffic policy of model '%s' ignored: %s", model, exc)
                continue
            if self.router.policies.get(model) != policy:
                self.router.apply(model, policy)

    async def watch(self, interval: float = 1.0) -> None:
        """Follow changes made by other processes sharing the repository."""
        while True:
            await asyncio.sleep(interval)
            try:
                if self.store.signature() != self._seen:
                    self.sync()
            except Exception:
                log.exception("reading the traffic state failed; retrying")
