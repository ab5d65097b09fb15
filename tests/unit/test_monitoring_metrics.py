"""Serving metrics and the GPU sampler without a server: observers in, Prometheus text out."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cache import ResponseCache
from gateway.monitoring.drift import DriftEngine
from gateway.monitoring.gpu import GpuSampler
from gateway.monitoring.metrics import (
    LATENCY_BUCKETS,
    NO_VERSION,
    UNKNOWN_MODEL,
    GatewayCollector,
    ServingMetrics,
)
from gateway.statistics import ModelStats
from gateway.tensors import TensorSpec


class FakeBatcher:
    def __init__(self, model, version, depth=0):
        self.model, self.version, self.queue_depth = model, version, depth
        self.cache = None


def served(model, version, depth=0):
    config = SimpleNamespace(max_batch_size=8, inputs=[TensorSpec("x", "FP32", (2,))],
                             ensemble=None)
    return SimpleNamespace(model=model, version=version, config=config,
                           batcher=FakeBatcher(model, version, depth))


class Setup:
    def __init__(self, tmp_path, gpu=None):
        self.v1, self.v2 = served("m", "1", depth=3), served("m", "2")
        self.repository = SimpleNamespace(root=tmp_path, cache=None, models={
            "m": SimpleNamespace(serving={"1": self.v1, "2": self.v2}, reasons={"3": "bad"},
                                 loading=False),
            "broken": SimpleNamespace(serving={}, reasons={"": "no versions"}, loading=False),
            "gone": SimpleNamespace(serving={}, reasons={"": "unloaded"}, loading=False),
        })
        (tmp_path / "m").mkdir(exist_ok=True)
        self.router = SimpleNamespace(effective=lambda model: ({"1": 90.0, "2": 10.0}, ""))
        self.dataplane = SimpleNamespace(inflight=5, shadow_dropped=2)
        self.drift = DriftEngine(self.repository, interval=1.0)
        self.metrics = ServingMetrics(self.repository, self.drift)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(self.metrics, self.repository, self.router,
                                                self.dataplane, gpu, self.drift))

    def scrape(self) -> dict:
        """{(sample name, frozenset(labels)): value}"""
        text = generate_latest(self.registry).decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, metric, **labels):
    return samples.get((metric, frozenset(labels.items())))


def names(samples):
    return {name for name, _ in samples}


def test_requests_and_latency_by_model_version_and_code(tmp_path):
    s = Setup(tmp_path)
    m = s.metrics
    for elapsed in (40_000, 300_000, 300_000, 2_000_000_000):
        m.observe_request("m", s.v1, "OK", elapsed)
    m.observe_request("m", s.v2, "INVALID_ARGUMENT", 10_000)
    m.observe_request("m", s.v2, "OK", 10_000)
    samples = s.scrape()
    assert value(samples, "gateway_requests_total", model="m", version="1", code="OK") == 4
    assert value(samples, "gateway_requests_total", model="m", version="2",
                 code="INVALID_ARGUMENT") == 1
    assert value(samples, "gateway_requests_total", model="m", version="2", code="OK") == 1
    latency = "gateway_request_duration_seconds"
    assert value(samples, latency + "_count", model="m", version="1") == 4
    assert value(samples, latency + "_sum", model="m", version="1") == pytest.approx(2.00064)
    assert value(samples, latency + "_bucket", model="m", version="1", le="5e-05") == 1
    assert value(samples, latency + "_bucket", model="m", version="1", le="0.0005") == 3
    assert value(samples, latency + "_bucket", model="m", version="1", le="2.5") == 4
    assert value(samples, latency + "_bucket", model="m", version="1", le="+Inf") == 4
    buckets = [le for (name, labels) in samples if name == latency + "_bucket"
               for k, le in labels if k == "le" and ("version", "1") in labels]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    # failures are counted, not timed
    assert value(samples, latency + "_count", model="m", version="2") == 1


def test_response_cache_series_only_for_versions_that_use_it(tmp_path):
    s = Setup(tmp_path)
    assert not [k for k in s.scrape() if k[0].startswith("gateway_response_cache")]  # no cache
    cache = ResponseCache(1 << 20)
    cache.put(b"k", [np.zeros(4, np.float32)])
    s.repository.cache = cache
    s.v1.batcher.cache = cache
    s.v1.stats = ModelStats()
    s.v1.stats.cache_hit.add(10, 3)
    s.v1.stats.cache_miss.add(10, 2)
    samples = s.scrape()
    assert value(samples, "gateway_response_cache_hits_total", model="m", version="1") == 3
    assert value(samples, "gateway_response_cache_misses_total", model="m", version="1") == 2
    assert not [k for k in samples if k[0] == "gateway_response_cache_hits_total"
                and ("version", "2") in k[1]]
    assert value(samples, "gateway_response_cache_entries") == 1
    assert value(samples, "gateway_response_cache_bytes") == cache.used > 0


def test_a_bucket_bound_is_inclusive(tmp_path):
    s = Setup(tmp_path)
    s.metrics.observe_request("m", s.v1, "OK", 1_000_000)  # exactly 1 ms
    samples = s.scrape()
    assert value(samples, "gateway_request_duration_seconds_bucket", model="m", version="1",
                 le="0.001") == 1
    assert value(samples, "gateway_request_duration_seconds_bucket", model="m", version="1",
                 le="0.0005") == 0


def test_labels_never_carry_raw_request_strings(tmp_path):
    s = Setup(tmp_path)
    s.metrics.observe_request("evil\"name{x}", None, "NOT_FOUND", 1000)
    s.metrics.observe_request("another-unknown", None, "NOT_FOUND", 1000)
    s.metrics.observe_request("m", None, "NOT_FOUND", 1000)  # known model, unknown version
    s.metrics.observe_request("broken", None, "UNAVAILABLE", 1000)
    samples = s.scrape()
    assert value(samples, "gateway_requests_total", model=UNKNOWN_MODEL, version=NO_VERSION,
                 code="NOT_FOUND") == 2
    assert value(samples, "gateway_requests_total", model="m", version=NO_VERSION,
                 code="NOT_FOUND") == 1
    assert value(samples, "gateway_requests_total", model="broken", version=NO_VERSION,
                 code="UNAVAILABLE") == 1
    every_label = {v for _, labels in samples for _, v in labels}
    assert not any("evil" in v or "another" in v for v in every_label)


def test_batch_metrics_queue_compute_and_size(tmp_path):
    s = Setup(tmp_path)
    requests = [SimpleNamespace(enqueued_ns=1_000), SimpleNamespace(enqueued_ns=1_000_000)]
    s.metrics.observe_batch(s.v1.batcher, requests, {"x": np.zeros((5, 2))}, 5,
                            1_001_000, 3_000_000, 5_000_000)
    samples = s.scrape()
    queue = "gateway_queue_duration_seconds"
    assert value(samples, queue + "_count", model="m", version="1") == 2
    assert value(samples, queue + "_sum", model="m", version="1") == pytest.approx(0.001001)
    assert value(samples, queue + "_bucket", model="m", version="1", le="5e-05") == 1
    assert value(samples, "gateway_compute_duration_seconds_sum", model="m",
                 version="1") == pytest.approx(0.003)
    assert value(samples, "gateway_batch_size_bucket", model="m", version="1", le="4.0") == 0
    assert value(samples, "gateway_batch_size_bucket", model="m", version="1", le="8.0") == 1
    assert value(samples, "gateway_batch_size_sum", model="m", version="1") == 5


def test_scrape_time_gauges(tmp_path):
    s = Setup(tmp_path)
    s.metrics.load_failed("m", "3", "bad")
    s.metrics.load_failed("broken", "", "no versions")
    s.metrics.fallback("m", "version 3 not serving")
    s.metrics.shadow_done(s.v2, True, 0.01)
    samples = s.scrape()
    assert value(samples, "gateway_queue_depth", model="m", version="1") == 3
    assert value(samples, "gateway_inflight_requests") == 5
    assert value(samples, "gateway_model_ready", model="m", version="1") == 1
    assert value(samples, "gateway_model_ready", model="m", version="3") == 0
    assert value(samples, "gateway_model_ready", model="broken", version=NO_VERSION) == 0
    assert not any(dict(labels).get("model") == "gone" for name, labels in samples
                   if name == "gateway_model_ready")  # unloaded on purpose: not "down"
    assert value(samples, "gateway_traffic_weight_ratio", model="m", version="2") == 0.1
    assert value(samples, "gateway_model_load_failures_total", model="m", version="3") == 1
    assert value(samples, "gateway_model_load_failures_total", model="broken",
                 version=NO_VERSION) == 1
    assert value(samples, "gateway_traffic_fallbacks_total", model="m") == 1
    assert value(samples, "gateway_shadow_requests_total", model="m", version="2",
                 result="ok") == 1
    assert value(samples, "gateway_shadow_dropped_total") == 2


def test_retired_versions_are_pruned_and_late_batches_not_exported(tmp_path):
    s = Setup(tmp_path)
    s.metrics.observe_request("m", s.v1, "OK", 1000)
    s.metrics.observe_request("m", s.v2, "OK", 1000)
    entry = s.repository.models["m"]
    entry.serving = {"2": s.v2}
    s.metrics.model_changed("m")
    s.metrics.observe_batch(s.v1.batcher, [], {}, 1, 0, 0, 0)  # the retired one finishing
    s.metrics.observe_request("m", s.v1, "OK", 1000)
    samples = s.scrape()
    assert value(samples, "gateway_requests_total", model="m", version="1", code="OK") is None
    assert value(samples, "gateway_requests_total", model="m", version="2", code="OK") == 1
    # a reload of the same version keeps counting in the same series
    reloaded = served("m", "2")
    entry.serving = {"2": reloaded}
    s.metrics.model_changed("m")
    s.metrics.observe_request("m", reloaded, "OK", 1000)
    assert value(s.scrape(), "gateway_requests_total", model="m", version="2", code="OK") == 2


def test_drift_series_once_monitored(tmp_path):
    s = Setup(tmp_path)
    (tmp_path / "m" / "gateway.yaml").write_text(
        "drift: {baseline_samples: 100, min_samples: 50, export_bins: true}")
    s.drift.request_sync("m")
    s.drift.tick(now=0.0)
    rng = np.random.default_rng(0)
    for t in (1.0, 2.0):
        s.metrics.observe_batch(s.v1.batcher, [], {"x": rng.standard_normal((200, 2))}, 200,
                                0, 0, 0)
        s.drift.tick(now=t)
    samples = s.scrape()
    labels = {"model": "m", "version": "1", "input": "x"}
    assert 0 <= value(samples, "gateway_input_drift", **labels) < 0.2
    assert value(samples, "gateway_input_feature_drift", feature="1", **labels) is not None
    assert value(samples, "gateway_input_drift_threshold", **labels) == 0.25
    assert value(samples, "gateway_input_drift_alert", **labels) == 0
    assert value(samples, "gateway_input_baseline_ready", source="served", **labels) == 1
    assert value(samples, "gateway_input_samples_total", **labels) == 400
    assert value(samples, "gateway_input_mean", feature="0", **labels) == pytest.approx(0, abs=0.2)
    assert value(samples, "gateway_input_stddev", feature="0", **labels) == pytest.approx(1,
                                                                                        abs=0.2)
    shares = [value(samples, "gateway_input_baseline_bin_ratio", feature="0", bin=str(b),
                    **labels) for b in range(10)]
    assert sum(shares) == pytest.approx(1.0)
    assert value(samples, "gateway_input_bin_ratio", feature="0", bin="9", **labels) is not None
    assert value(samples, "gateway_drift_skipped_samples_total", model="m", version="1",
                 reason="queue_full") == 0
    # version 2 received nothing: a monitor, but no score yet
    assert value(samples, "gateway_input_drift", model="m", version="2", input="x") is None
    assert value(samples, "gateway_input_baseline_ready", model="m", version="2", input="x",
                 source="pending") == 0


# ---- GPU --------------------------------------------------------------------------------------


class FakeNVML:
    NVML_TEMPERATURE_GPU = 0

    class NotSupported(Exception):
        pass

    def __init__(self, count=2):
        self.count = count
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU" if h == 0 else "Fake GPU"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}"

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=40 + h, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=1 << 30, total=80 << 30, free=79 << 30)

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NotSupported()
        return 250_500

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 60 + h


def test_gpu_series_from_nvml(tmp_path):
    nvml = FakeNVML()
    gpu = GpuSampler(60.0, nvml=nvml)
    assert gpu.start()
    s = Setup(tmp_path, gpu=gpu)
    samples = s.scrape()
    gpu.stop()
    assert nvml.shutdown
    assert value(samples, "gateway_gpu_utilization_ratio", gpu="0") == 0.4
    assert value(samples, "gateway_gpu_utilization_ratio", gpu="1") == 0.41
    assert value(samples, "gateway_gpu_memory_used_bytes", gpu="0") == 1 << 30
    assert value(samples, "gateway_gpu_memory_total_bytes", gpu="1") == 80 << 30
    assert value(samples, "gateway_gpu_power_watts", gpu="0") == 250.5
    assert value(samples, "gateway_gpu_power_watts", gpu="1") is None  # not supported
    assert value(samples, "gateway_gpu_temperature_celsius", gpu="1") == 61
    assert value(samples, "gateway_gpu_info", gpu="0", name="Fake GPU", uuid="GPU-0") == 1


class BrokenNVML(FakeNVML):
    def nvmlInit(self):
        raise OSError("NVML Shared Library Not Found")


@pytest.mark.parametrize("nvml", [BrokenNVML(), FakeNVML(count=0)])
def test_no_gpu_means_no_gpu_series_and_one_log_line(tmp_path, caplog, nvml):
    gpu = GpuSampler(0.01, nvml=nvml)
    with caplog.at_level(logging.INFO, logger="gateway.monitoring.gpu"):
        assert not gpu.start()
        samples = Setup(tmp_path, gpu=gpu).scrape()
        gpu.stop()
    assert not any(name.startswith("gateway_gpu") for name in names(samples))
    assert len(caplog.records) == 1 and "GPU metrics off" in caplog.records[0].getMessage()


def test_gpu_sampling_can_be_turned_off(caplog):
    with caplog.at_level(logging.INFO, logger="gateway.monitoring.gpu"):
        assert not GpuSampler(0, nvml=FakeNVML()).start()
    assert len(caplog.records) == 1
