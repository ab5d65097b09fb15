"""deploy/: the Prometheus config and rules pass promtool (syntax and rule unit tests), and the
rules and the Grafana dashboard name only metrics the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_monitoring_metrics import FakeNVML, Setup  # sibling test module

from gateway.monitoring.gpu import GpuSampler

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (apt-get install prometheus)")


def promtool(*args: str) -> str:
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=PROMETHEUS,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config():
    assert "SUCCESS" in promtool("check", "rules", "gateway-rules.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_alerting_rules_fire_as_intended():
    """Error rate, p99 latency, drift, model down and gateway down on synthetic series."""
    assert "SUCCESS" in promtool("test", "rules", "gateway-rules.test.yml")


def exported_names(tmp_path) -> set[str]:
    """Every sample name a fully populated gateway exports (GPU from a fake NVML)."""
    gpu = GpuSampler(60.0, nvml=FakeNVML())
    gpu.start()
    s = Setup(tmp_path, gpu=gpu)
    s.metrics.observe_request("m", s.v1, "OK", 1000)
    s.metrics.load_failed("m", "3")
    s.metrics.fallback("m")
    s.metrics.shadow_done(s.v2, True, 0.1)
    s.drift.hooks.calls[("m", "ok")] = 1
    s.drift.hook_suppressed["m"] = 1
    # Every optional family on, as a dashboard panel may ask for it (per-bin series are opt-in).
    (tmp_path / "m" / "gateway.yaml").write_text("drift: {export_bins: true}")
    s.drift.request_sync("m")
    s.drift.tick(now=0.0)
    for t in (1.0, 2.0, 3.0):
        s.metrics.observe_batch(s.v1.batcher, [], {"x": np.random.rand(600, 2)}, 600, 0, 0, 0)
        s.drift.tick(now=t)
    gpu.stop()
    return {name for name, _ in s.scrape()}


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bgateway_[a-z_]+\b", text))


def test_rules_and_dashboard_use_only_exported_metrics(tmp_path):
    exported = exported_names(tmp_path)
    rules = (PROMETHEUS / "gateway-rules.yml").read_text()
    dashboard = DASHBOARD.read_text()
    for source, text in (("rules", rules), ("dashboard", dashboard)):
        unknown = referenced(text) - exported
        assert not unknown, f"{source} names metrics the gateway does not export: {unknown}"


def test_dashboard_is_grafana_json_with_the_panels_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("latency", "throughput", "batch", "queue", "gpu", "drift"):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"] and all(t["expr"] for t in p["targets"])
        assert p["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "version"} <= variables
    latency = next(p for p in panels if "end-to-end latency" in p["title"].lower())
    assert any("histogram_quantile(0.99" in t["expr"] and "by (model, version, le)" in t["expr"]
               for t in latency["targets"])
