"""Serving metrics for Prometheus: cheap counters on the request path, exported at scrape time.

The request path (the data plane's and the batchers' observers, both on the event loop) only
bumps plain integers in a per-version record found by one dict lookup: a counter, a bucket
picked with ``bisect`` over integer nanosecond bounds, a running sum. No locks, no label
formatting, no prometheus_client objects. At scrape time a custom collector (on the HTTP
server's thread) turns those records, and what it reads from the repository, router, data plane,
GPU sampler and drift engine, into metric families. Labels come only from the server's own model
and version names; a request for a model the repository does not know is counted under
``UNKNOWN_MODEL``, and one that reached no version under ``NO_VERSION``.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

UNKNOWN_MODEL = "(unknown)"  # not a valid model name, so it never collides with one
NO_VERSION = "(none)"  # the request reached no version (unknown model or version, loading ...)
# Seconds: 50 us to 30 s, roughly x2-x2.5 apart, for sub-millisecond to multi-second latencies.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_NS = [round(b * 1e9) for b in LATENCY_BUCKETS]
_LATENCY_LE = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
_BATCH_LE = [floatToGoString(b) for b in BATCH_BUCKETS] + ["+Inf"]


class VersionMetrics:
    """Counters of one model version (by label: survives reloads of the same version)."""

    __slots__ = ("batch", "batch_sum", "compute", "compute_sum", "errors", "latency",
                 "latency_sum", "ok", "queue", "queue_sum")

    def __init__(self):
        self.ok = 0
        self.errors: dict[str, int] = {}  # status code name -> count
        self.latency = [0] * (len(_LATENCY_NS) + 1)  # per bucket (not cumulative); last = +Inf
        self.latency_sum = 0  # ns
        self.queue = [0] * (len(_LATENCY_NS) + 1)
        self.queue_sum = 0
        self.compute = [0] * (len(_LATENCY_NS) + 1)
        self.compute_sum = 0
        self.batch = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0


_DETACHED = VersionMetrics()  # sink for late batches of a retired version: counted nowhere


class ServingMetrics:
    """The observers the data plane, batchers, repository and router call, and their counts."""

    def __init__(self, repository, drift=None):
        self.repository = repository
        self.drift = drift  # DriftEngine or None
        self.versions: dict[tuple[str, str], VersionMetrics] = {}
        self.unrouted: dict[tuple[str, str], int] = {}  # (model label, code) -> count
        self.load_failures: dict[tuple[str, str], int] = {}
        self.fallbacks: dict[str, int] = {}
        self.shadow: dict[tuple[str, str, str], int] = {}
        self._cache: dict = {}  # Batcher -> VersionMetrics; event loop only

    # ---- request path (event loop) -----------------------------------------------------------

    def observe_request(self, model: str, served, code: str, elapsed_ns: int) -> None:
        """request_finished (gateway/events.py): once per request."""
        if served is not None:
            vm = self._cache.get(served.batcher)
            if vm is None:
                vm = self._lookup(served.batcher)
            if code == "OK":
                vm.ok += 1
                vm.latency[bisect_left(_LATENCY_NS, elapsed_ns)] += 1
                vm.latency_sum += elapsed_ns
            else:
                vm.errors[code] = vm.errors.get(code, 0) + 1
            return
        key = (model if model in self.repository.models else UNKNOWN_MODEL, code)
        self.unrouted[key] = self.unrouted.get(key, 0) + 1

    def observe_batch(self, batcher, requests, feeds, size, start_ns, infer_ns, done_ns) -> None:
        """batch_finished (gateway/events.py): once per executed batch."""
        vm = self._cache.get(batcher)
        if vm is None:
            vm = self._lookup(batcher)
        queue = vm.queue
        waited_total = 0
        for request in requests:
            waited = start_ns - request.enqueued_ns
            queue[bisect_left(_LATENCY_NS, waited)] += 1
            waited_total += waited
        vm.queue_sum += waited_total
        vm.compute[bisect_left(_LATENCY_NS, infer_ns)] += 1
        vm.compute_sum += infer_ns
        vm.batch[bisect_left(BATCH_BUCKETS, size)] += 1
        vm.batch_sum += size
        if self.drift is not None:
            monitor = self.drift.monitors.get(batcher)
            if monitor is not None:
                monitor.offer(feeds, size)

    def _lookup(self, batcher) -> VersionMetrics:
        """First sight of a batcher: the record of its (model, version), if it is serving."""
        entry = self.repository.models.get(batcher.model)
        served = entry.serving.get(batcher.version) if entry is not None else None
        key = (batcher.model, batcher.version)
        vm = self.versions.get(key)
        if served is None:  # retired: finish its last batches without a series of its own
            return vm or _DETACHED
        if vm is None:
            vm = self.versions[key] = VersionMetrics()
        if served.batcher is batcher:
            self._cache[batcher] = vm
        return vm

    # ---- repository and router events (event loop) -------------------------------------------

    def model_changed(self, model: str) -> None:
        """Drop the records of versions that no longer serve, and stale cache entries."""
        entry = self.repository.models.get(model)
        serving = entry.serving if entry is not None else {}
        for key in [k for k in self.versions if k[0] == model and k[1] not in serving]:
            del self.versions[key]
        live = {id(v.batcher) for v in serving.values()}
        for batcher in [b for b in self._cache if b.model == model and id(b) not in live]:
            del self._cache[batcher]

    def load_failed(self, model: str, version: str, reason: str = "") -> None:
        key = (model, version or NO_VERSION)
        self.load_failures[key] = self.load_failures.get(key, 0) + 1

    def fallback(self, model: str, note: str = "") -> None:
        self.fallbacks[model] = self.fallbacks.get(model, 0) + 1

    def shadow_done(self, served, ok: bool, seconds: float) -> None:
        key = (served.model, served.version, "ok" if ok else "error")
        self.shadow[key] = self.shadow.get(key, 0) + 1


def _buckets(counts: list[int], le: list[str]) -> list[tuple[str, int]]:
    total, out = 0, []
    for bound, count in zip(le, counts):
        total += count
        out.append((bound, total))
    return out


class GatewayCollector:
    """Builds every gateway_* family at scrape time (prometheus_client custom collector)."""

    def __init__(self, metrics: ServingMetrics, repository, router, dataplane, gpu=None,
                 drift=None):
        self.metrics = metrics
        self.repository = repository
        self.router = router
        self.dataplane = dataplane
        self.gpu = gpu
        self.drift = drift

    def collect(self):
        yield from self._serving()
        yield from self._models()
        if self.repository.cache is not None:
            yield from self._response_cache(self.repository.cache)
        if self.gpu is not None:
            yield from self._gpu()
        if self.drift is not None:
            yield from self._drift()

    def _serving(self):
        m = self.metrics
        versions = sorted(m.versions.copy().items())
        requests = CounterMetricFamily("gateway_requests", "Requests by model, version and "
                                       "gRPC status code", labels=["model", "version", "code"])
        latency = HistogramMetricFamily(
            "gateway_request_duration_seconds", "End-to-end seconds of successful requests, "
            "from routing to response", labels=["model", "version"])
        queue = HistogramMetricFamily("gateway_queue_duration_seconds",
                                      "Seconds requests waited in the batcher's queue",
                                      labels=["model", "version"])
        compute = HistogramMetricFamily("gateway_compute_duration_seconds",
                                        "Seconds of model execution per batch",
                                        labels=["model", "version"])
        batch = HistogramMetricFamily("gateway_batch_size", "Samples per executed batch",
                                      labels=["model", "version"])
        for (model, version), vm in versions:
            labels = [model, version]
            requests.add_metric(labels + ["OK"], vm.ok)
            for code, count in sorted(vm.errors.copy().items()):
                requests.add_metric(labels + [code], count)
            latency.add_metric(labels, _buckets(list(vm.latency), _LATENCY_LE),
                               vm.latency_sum / 1e9)
            queue.add_metric(labels, _buckets(list(vm.queue), _LATENCY_LE), vm.queue_sum / 1e9)
            compute.add_metric(labels, _buckets(list(vm.compute), _LATENCY_LE),
                               vm.compute_sum / 1e9)
            batch.add_metric(labels, _buckets(list(vm.batch), _BATCH_LE), vm.batch_sum)
        for (model, code), count in sorted(m.unrouted.copy().items()):
            requests.add_metric([model, NO_VERSION, code], count)
        yield from (requests, latency, queue, compute, batch)

        inflight = GaugeMetricFamily("gateway_inflight_requests",
                                     "Requests being handled (all models)")
        inflight.add_metric([], self.dataplane.inflight)
        yield inflight
        failures = CounterMetricFamily("gateway_model_load_failures",
                                       "Failed loads of a model version",
                                       labels=["model", "version"])
        for (model, version), count in sorted(m.load_failures.copy().items()):
            failures.add_metric([model, version], count)
        yield failures
        fallbacks = CounterMetricFamily("gateway_traffic_fallbacks", "Times a traffic split "
                                        "could not be honoured in full (a version not serving)",
                                        labels=["model"])
        for model, count in sorted(m.fallbacks.copy().items()):
            fallbacks.add_metric([model], count)
        yield fallbacks
        shadow = CounterMetricFamily("gateway_shadow_requests", "Mirrored requests by result",
                                     labels=["model", "version", "result"])
        for key, count in sorted(m.shadow.copy().items()):
            shadow.add_metric(list(key), count)
        yield shadow
        dropped = CounterMetricFamily("gateway_shadow_dropped",
                                      "Mirrored requests dropped (too many in flight)")
        dropped.add_metric([], getattr(self.dataplane, "shadow_dropped", 0))
        yield dropped

    def _models(self):
        ready = GaugeMetricFamily("gateway_model_ready", "1 if the version serves, 0 if it "
                                  "failed to load or is loading", labels=["model", "version"])
        depth = GaugeMetricFamily("gateway_queue_depth", "Requests waiting in the batcher",
                                  labels=["model", "version"])
        weight = GaugeMetricFamily("gateway_traffic_weight_ratio", "Share of requests without "
                                   "an explicit version that each version gets (0..1)",
                                   labels=["model", "version"])
        for name, entry in sorted(self.repository.models.copy().items()):
            serving = entry.serving
            reasons = dict(entry.reasons)
            for version, served in sorted(serving.items(), key=lambda kv: int(kv[0])):
                broken = served.config.ensemble is not None and served.batcher.broken
                ready.add_metric([name, version], 0 if broken else 1)
                depth.add_metric([name, version], served.batcher.queue_depth)
            failed = sorted((v for v in reasons if v and v not in serving), key=int)
            for version in failed:
                ready.add_metric([name, version], 0)
            if not serving and not failed and reasons.get("") != "unloaded":
                ready.add_metric([name, NO_VERSION], 0)  # loading, or the model cannot load
            if serving:
                try:
                    shares, _ = self.router.effective(name)
                except Exception:
                    shares = {}
                for version, percent in sorted(shares.items(), key=lambda kv: int(kv[0])):
                    weight.add_metric([name, version], percent / 100.0)
        yield from (ready, depth, weight)

    def _response_cache(self, cache):
        """The response cache (--cache-size): hits and misses of each version that uses it,
        as ModelStatistics' cache_hit / cache_miss count them, and its size."""
        hits = CounterMetricFamily("gateway_response_cache_hits", "Requests answered from the "
                                   "response cache", labels=["model", "version"])
        misses = CounterMetricFamily("gateway_response_cache_misses", "Requests looked up in "
                                     "the response cache and not found there",
                                     labels=["model", "version"])
        for name, entry in sorted(self.repository.models.copy().items()):
            for version, served in sorted(entry.serving.items(), key=lambda kv: int(kv[0])):
                if served.batcher.cache is not None:
                    hits.add_metric([name, version], served.stats.cache_hit.count)
                    misses.add_metric([name, version], served.stats.cache_miss.count)
        used = GaugeMetricFamily("gateway_response_cache_bytes", "Bytes of outputs the "
                                 "response cache holds")
        used.add_metric([], cache.used)
        entries = GaugeMetricFamily("gateway_response_cache_entries", "Responses the "
                                    "response cache holds")
        entries.add_metric([], len(cache))
        evictions = CounterMetricFamily("gateway_response_cache_evictions", "Responses evicted "
                                        "from the response cache to make room")
        evictions.add_metric([], cache.evictions)
        yield from (hits, misses, used, entries, evictions)

    def _gpu(self):
        samples = self.gpu.samples
        if not samples:
            return
        families = {
            "utilization": GaugeMetricFamily("gateway_gpu_utilization_ratio", "GPU busy share "
                                             "over NVML's last sample period (0..1)", labels=["gpu"]),
            "memory_used": GaugeMetricFamily("gateway_gpu_memory_used_bytes",
                                             "GPU memory in use", labels=["gpu"]),
            "memory_total": GaugeMetricFamily("gateway_gpu_memory_total_bytes",
                                              "GPU memory in total", labels=["gpu"]),
            "power_watts": GaugeMetricFamily("gateway_gpu_power_watts", "GPU power draw",
                                             labels=["gpu"]),
            "temperature_celsius": GaugeMetricFamily("gateway_gpu_temperature_celsius",
                                                     "GPU core temperature", labels=["gpu"]),
        }
        info = GaugeMetricFamily("gateway_gpu_info", "GPU name and UUID (value 1)",
                                 labels=["gpu", "name", "uuid"])
        for sample in samples:
            gpu = str(sample.index)
            info.add_metric([gpu, sample.name, sample.uuid], 1)
            for attr, family in families.items():
                value = getattr(sample, attr)
                if value is not None:
                    family.add_metric([gpu], value)
        yield info
        yield from families.values()

    def _drift(self):
        engine = self.drift
        base = ["model", "version", "input"]
        drift = GaugeMetricFamily("gateway_input_drift", "Population stability index of the "
                                  "input over the window (max over its features)", labels=base)
        feature_drift = GaugeMetricFamily("gateway_input_feature_drift", "PSI per feature",
                                          labels=base + ["feature"])
        threshold = GaugeMetricFamily("gateway_input_drift_threshold",
                                      "Drift alert threshold (gateway.yaml)", labels=base)
        alert = GaugeMetricFamily("gateway_input_drift_alert", "1 while the input's drift "
                                  "alert is active", labels=base)
        baseline = GaugeMetricFamily("gateway_input_baseline_ready", "1 once the input has a "
                                     "baseline; source: file, served or pending",
                                     labels=base + ["source"])
        samples = CounterMetricFamily("gateway_input_samples", "Samples included in the "
                                      "input statistics", labels=base)
        nonfinite = CounterMetricFamily("gateway_input_nonfinite_values", "NaN and infinite "
                                        "values seen (left out of the moments)", labels=base)
        moments = {name: GaugeMetricFamily(f"gateway_input_{name}", help_text,
                                           labels=base + ["feature"])
                   for name, help_text in (("mean", "Mean of the finite values"),
                                           ("stddev", "Standard deviation of the finite values"),
                                           ("min", "Smallest finite value"),
                                           ("max", "Largest finite value"))}
        window_bins = GaugeMetricFamily("gateway_input_bin_ratio", "Share of the window's "
                                        "values in each baseline bin",
                                        labels=base + ["feature", "bin"])
        baseline_bins = GaugeMetricFamily("gateway_input_baseline_bin_ratio", "Share of the "
                                          "baseline's values in each bin",
                                          labels=base + ["feature", "bin"])
        skipped = CounterMetricFamily("gateway_drift_skipped_samples", "Samples left out of "
                                      "the statistics: sampled (high rate) or queue_full",
                                      labels=["model", "version", "reason"])
        for monitor in sorted(engine.monitors.copy().values(), key=lambda m: (m.model,
                                                                               m.version)):
            mv = [monitor.model, monitor.version]
            skipped.add_metric(mv + ["sampled"], monitor.sampled_out)
            skipped.add_metric(mv + ["queue_full"], monitor.dropped)
            for m in monitor.inputs:
                labels = mv + [m.name]
                score, scores = m.score, m.feature_scores
                if score is not None:
                    drift.add_metric(labels, score)
                if scores is not None and not m.pooled:
                    for feature, value in zip(m.labels, scores.tolist()):
                        feature_drift.add_metric(labels + [feature], value)
                threshold.add_metric(labels, m.alert.threshold)
                alert.add_metric(labels, 1 if m.alert.active else 0)
                baseline.add_metric(labels + [m.source], 0 if m.baseline is None else 1)
                samples.add_metric(labels, m.rows)
                stats = m.stats
                nonfinite.add_metric(labels, int(stats.nonfinite.sum()))
                if stats.count.any():
                    for name, values in (("mean", stats.mean), ("stddev", stats.std),
                                         ("min", stats.minimum), ("max", stats.maximum)):
                        family = moments[name]
                        for feature, count, value in zip(m.labels, stats.count.tolist(),
                                                         values.tolist()):
                            if count:
                                family.add_metric(labels + [feature], value)
                if monitor.settings.export_bins and m.baseline is not None:
                    window = m.window_proportions
                    for f, feature in enumerate(m.labels):
                        for b, share in enumerate(m.baseline.expected[f].tolist()):
                            baseline_bins.add_metric(labels + [feature, str(b)], share)
                        if window is not None:
                            for b, share in enumerate(window[f].tolist()):
                                window_bins.add_metric(labels + [feature, str(b)], share)
        yield from (drift, feature_drift, threshold, alert, baseline, samples, nonfinite)
        yield from moments.values()
        yield from (window_bins, baseline_bins, skipped)
        hooks = CounterMetricFamily("gateway_drift_hook_calls", "Drift hook calls by result",
                                    labels=["model", "result"])
        with engine.hooks._lock:
            calls = dict(engine.hooks.calls)
        for (model, result), count in sorted(calls.items()):
            hooks.add_metric([model, result], count)
        yield hooks
        suppressed = CounterMetricFamily("gateway_drift_hook_suppressed", "Drift alerts that "
                                         "fired within the hook's cooldown (hook not called)",
                                         labels=["model"])
        for model, count in sorted(engine.hook_suppressed.copy().items()):
            suppressed.add_metric([model], count)
        yield suppressed
        busy = CounterMetricFamily("gateway_drift_update_seconds", "Seconds the statistics "
                                   "thread spent updating input statistics and drift")
        busy.add_metric([], engine.busy_seconds)
        yield busy
