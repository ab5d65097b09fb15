"""Monitoring: Prometheus metrics, GPU sampling, input statistics and drift, drift hooks.

:class:`Monitoring` wires them to the server's seams and serves ``/metrics`` (that path only:
monitoring/http.py) from its own registry (plus the client library's process collector).
``--metrics-port -1`` turns all of it off; then none of the observers are installed and the
request path pays nothing.
"""

from __future__ import annotations

import logging

from gateway.monitoring.drift import DriftEngine, fleet_claim
from gateway.monitoring.gpu import GpuSampler
from gateway.monitoring.metrics import GatewayCollector, ServingMetrics
from gateway.monitoring.stats import read_baseline, write_baseline

__all__ = ["Monitoring", "read_baseline", "write_baseline"]
log = logging.getLogger(__name__)


class Monitoring:
    def __init__(self, repository, router, dataplane, gpu_sample_interval: float = 5.0,
                 drift_interval: float = 1.0, fleet=None):
        """``fleet``: (state store, this process's identity, the server's event loop), so a
        drift hook is called once per fleet (see drift.fleet_claim); None: once per process."""
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.repository = repository
        self.router = router
        self.dataplane = dataplane
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.gpu = GpuSampler(gpu_sample_interval)
        claim = fleet_claim(*fleet) if fleet is not None else None
        self.drift = DriftEngine(repository, drift_interval, claim=claim)
        self.metrics = ServingMetrics(repository, self.drift)
        self.registry.register(GatewayCollector(self.metrics, repository, router, dataplane,
                                                self.gpu, self.drift))
        self._http = None

    def attach(self) -> None:
        """Subscribe to the core's events (gateway/events.py)."""
        m = self.metrics
        self.repository.events.subscribe(
            request_finished=m.observe_request, batch_finished=m.observe_batch,
            model_changed=self._model_changed, load_failed=m.load_failed,
            fallback=m.fallback, shadow_done=m.shadow_done)

    def _model_changed(self, model: str) -> None:
        self.metrics.model_changed(model)
        self.drift.request_sync(model)

    def start(self, host: str, port: int) -> int:
        """Attach, start the samplers and the HTTP endpoint; return the bound port."""
        from gateway.monitoring.http import start_metrics_server

        self._http = start_metrics_server(host, port, self.registry)  # first: it may fail
        self.attach()
        self.gpu.start()
        self.drift.start()
        return self._http.server_port

    def stop(self) -> None:
        self.drift.stop()
        self.gpu.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
