"""One ``/metrics`` for all the workers of ``gateway serve --workers N``.

Each worker serves its own metrics on a loopback port it writes into the supervisor's run
directory (``metrics-<index>.port``). This process (forked by the supervisor before any worker,
so it holds no grpc state and the supervisor keeps no threads) answers the public metrics port:
at each scrape it reads every worker's metrics and adds them up, so dashboards and alerts see
one gateway whatever the number of workers.

Counters, histograms and summaries are summed. Gauges are combined by what they mean: amounts
(in-flight requests, queue depth, memory) are summed; states every worker shares (a split's
weight, a GPU's utilisation, the store's revision) take the maximum, or the minimum where one
worker lagging is what matters (a version ready everywhere, the store reachable everywhere).
``gateway_workers`` says how many workers answered this scrape.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT_S = 5.0

SUM, MAX, MIN = "sum", "max", "min"
# Gauges not listed take MAX: a value every worker computes alike reads the same as one worker.
GAUGE_MODES = {
    "gateway_inflight_requests": SUM,
    "gateway_queue_depth": SUM,
    "gateway_response_cache_bytes": SUM,  # one cache per process
    "gateway_response_cache_entries": SUM,
    "gateway_model_ready": MIN,
    "gateway_state_store_up": MIN,
    "gateway_state_revision": MIN,
    "gateway_input_baseline_ready": MIN,
    "process_resident_memory_bytes": SUM,
    "process_virtual_memory_bytes": SUM,
    "process_open_fds": SUM,
    "process_start_time_seconds": MIN,
}
# Families every worker reports for the whole fleet (read from the shared store): any one of
# them is the figure, adding them up would count it once per worker.
FLEET_WIDE = {"gateway_feedback_labelled", "gateway_feedback_accuracy_ratio",
              "gateway_feedback_mean_absolute_error", "gateway_feedback_predictions_kept"}
_COMBINE = {SUM: sum, MAX: max, MIN: min}


def port_file(rundir: Path, index: int) -> Path:
    return Path(rundir) / f"metrics-{index}.port"


def announce(rundir: Path, index: int, port: int) -> None:
    """A worker says where its metrics are (atomically: the aggregator never reads half)."""
    path = port_file(rundir, index)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


def merge(texts: list[str]) -> list[Metric]:
    """The families of several workers' OpenMetrics texts, combined as the module says.
    (OpenMetrics, not the classic format: its parser keeps a counter's ``_total`` sample in
    the counter's family.)"""
    families: dict[str, Metric] = {}
    values: dict[tuple, list[float]] = {}
    order: dict[str, list[tuple]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = families.get(family.name)
            if known is None:
                known = families[family.name] = Metric(family.name, family.documentation,
                                                       family.type, family.unit)
                order[family.name] = []
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = []
                    order[family.name].append(key)
                values[key].append(sample.value)
    merged = []
    for name, family in families.items():
        if name in FLEET_WIDE:
            mode = max
        elif family.type == "gauge":
            mode = _COMBINE[GAUGE_MODES.get(name, MAX)]
        else:
            mode = sum
        for key in order[name]:
            _, sample_name, labels = key
            family.add_sample(sample_name, dict(labels), mode(values[key]))
        merged.append(family)
    return merged


class FleetCollector:
    """A prometheus_client collector that scrapes and merges the workers at collect time."""

    def __init__(self, rundir: Path, workers: int):
        self.rundir = Path(rundir)
        self.workers = workers

    def _scrape(self, index: int) -> str | None:
        try:
            port = int(port_file(self.rundir, index).read_text())
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"})
            with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as response:
                return response.read().decode("utf-8")
        except (OSError, ValueError) as exc:
            log.debug("worker %d metrics unavailable: %s", index, exc)
            return None

    def collect(self):
        texts = [t for t in (self._scrape(i) for i in range(self.workers)) if t is not None]
        yield from merge(texts)
        answered = GaugeMetricFamily("gateway_workers", "Worker processes whose metrics are "
                                     "in this scrape, of those configured",
                                     labels=["state"])
        answered.add_metric(["answering"], len(texts))
        answered.add_metric(["configured"], self.workers)
        yield answered
        restarts = GaugeMetricFamily("gateway_worker_restarts", "Workers restarted by the "
                                     "supervisor after they crashed")
        try:
            count = json.loads((self.rundir / "supervisor.json").read_text())["restarts"]
        except (OSError, ValueError, KeyError):
            count = 0
        restarts.add_metric([], count)
        yield restarts


def serve_fleet_metrics(host: str, port: int, rundir: Path, workers: int):
    """Start the aggregated endpoint; returns (server, bound port). RuntimeError when the port
    cannot be bound (the message names it)."""
    from prometheus_client import CollectorRegistry

    from gateway.monitoring.http import start_metrics_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(rundir, workers))
    server = start_metrics_server(host, port, registry)
    return server, server.server_address[1]
