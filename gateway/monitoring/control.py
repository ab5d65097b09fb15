"""Metrics of the control plane: whether the operator-state store answers, and which revision
this replica serves (replicas on different revisions have not converged yet)."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily


class ControlCollector:
    def __init__(self, control):
        self.control = control  # gateway.control.ControlPlane

    def collect(self):
        up = GaugeMetricFamily("gateway_state_store_up", "1 if the operator state store "
                               "answered the last read, 0 if this replica serves the last "
                               "state it read (operator changes are refused)")
        up.add_metric([], 1 if self.control.store_up else 0)
        revision = GaugeMetricFamily("gateway_state_revision", "Operator state revision this "
                                     "replica serves")
        revision.add_metric([], self.control.snapshot.revision)
        yield up
        yield revision
