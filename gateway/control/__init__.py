"""The control plane: operator state (traffic splits, rollouts, audit) in a store shared by every
replica, the canary analysis, and the rollout judge.

``store`` is the contract (revisioned entries, compare-and-set commits); ``filestore`` and
``redisstore`` implement it; ``analysis`` is the pure canary judgement; ``figures`` counts this
replica's evidence; ``traffic`` and ``rollouts`` are the operator actions; ``plane`` keeps the
replica's view current and assembles the rest.
"""

from gateway.control.analysis import RolloutSpec, Window, decide, rollout_spec
from gateway.control.plane import ControlPlane
from gateway.control.rollouts import Rollout, RolloutController
from gateway.control.store import StoreUnavailable, open_store
from gateway.control.traffic import TrafficControl

__all__ = ["ControlPlane", "Rollout", "RolloutController", "RolloutSpec", "StoreUnavailable",
           "TrafficControl", "Window", "decide", "open_store", "rollout_spec"]
