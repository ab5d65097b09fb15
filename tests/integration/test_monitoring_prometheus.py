"""Monitoring end to end: a real Prometheus (Debian package) scrapes a real gateway every second
and the tests ask Prometheus's HTTP API, as an operator's dashboard and alerts would.

One gateway serves model ``tab`` (8 features) in two versions: version 1 has a training
``baseline.npz``, version 2 takes its baseline from the first served samples. A sender thread
keeps traffic flowing, first from the training distribution, then shifted; the drift score must
stay low, then rise, and the model's drift hook must be called once within its cooldown.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from support import ROOT, TIMEOUT, start_gateway, wait_for, write_garbage
from tritonclient.utils import InferenceServerException

from bench import models
from gateway.monitoring import write_baseline

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus not installed (apt-get install prometheus)")
FEATURES = 8
ROWS = 16  # rows per request
UNKNOWN = "no_such_model_7f3a"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def build_repository(repo: Path) -> Path:
    for version in (1, 2):
        models.make_version(repo, "tab", version, models.build_mlp, (FEATURES, 16, 2),
                            seed=version)
    models.write_config(repo / "tab", """
        max_batch_size: 64
        dynamic_batching { }
        version_policy { all { } }
    """)
    training = np.random.default_rng(0).standard_normal((20_000, FEATURES)).astype(np.float32)
    write_baseline(repo / "tab" / "1" / "baseline.npz", {"input": training})
    hook = repo / "tab" / "hook.py"
    hook.write_text("import sys\nopen('hook-calls.jsonl', 'a').write(sys.stdin.read() + '\\n')\n")
    (repo / "tab" / "gateway.yaml").write_text(f"""
drift:
  window: 4s
  min_samples: 300
  threshold: 0.25
  for: 1s
  baseline_samples: 1500
  max_rows_per_second: 1000000
  export_bins: true        # the dashboard's bins panel needs them (off by default)
  hook:
    command: [{json.dumps(sys.executable)}, hook.py]
    cooldown: 1h
""")
    write_garbage(repo, "broken", 1)
    return repo


class Prometheus:
    def __init__(self, tmp: Path, metrics_port: int):
        self.port = _free_port()
        config = tmp / "prometheus.yml"
        config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {ROOT / 'deploy' / 'prometheus' / 'gateway-rules.yml'}
scrape_configs:
  - job_name: gateway
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
        self.log = tmp / "prometheus.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params):
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with _OPENER.open(url, timeout=10) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("prometheus exited:\n" + self.log.read_text())
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[tuple[dict, float]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, result
        return result[0][1] if result else None

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sender(threading.Thread):
    """Keeps requests flowing to both versions: normal data, or shifted when told."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.shift = 0.0
        self.sent = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.rng = np.random.default_rng(1)

    def run(self):
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while not self.stop.is_set():
                for version in ("1", "2"):
                    x = (self.rng.standard_normal((ROWS, FEATURES)) + self.shift).astype(
                        np.float32)
                    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    try:
                        client.infer("tab", [inp], model_version=version, client_timeout=TIMEOUT)
                        self.sent += 1
                    except InferenceServerException as exc:
                        self.errors.append(str(exc))
        finally:
            client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitoring")
    repo = build_repository(tmp / "repo")
    with start_gateway(repo, "--drift-interval", "0.25") as gateway:
        prometheus = Prometheus(tmp, gateway.metrics_port)
        sender = Sender(gateway.url)
        try:
            wait_for(prometheus.ready, what="prometheus ready")
            wait_for(lambda: prometheus.value('up{job="gateway"}') == 1,
                     what="prometheus scraping the gateway")
            sender.start()
            yield gateway, prometheus, sender, repo
        finally:
            sender.stop.set()
            sender.join(TIMEOUT)
            prometheus.stop()
    assert gateway.process.returncode == 0, gateway.log()
    assert not sender.errors, sender.errors[:3]


def test_counters_and_histograms_carry_the_servers_own_labels(stack):
    gateway, prom, _, _ = stack
    client = grpcclient.InferenceServerClient(gateway.url)
    bad = grpcclient.InferInput("input", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client.infer("tab", [bad], model_version="1")
        with pytest.raises(InferenceServerException):
            client.infer(UNKNOWN, [bad])
    client.close()
    wait_for(lambda: (prom.value('gateway_requests_total{model="tab",version="1",'
                                 'code="INVALID_ARGUMENT"}') or 0) >= 3,
             what="INVALID_ARGUMENT counted")
    wait_for(lambda: (prom.value('gateway_requests_total{model="(unknown)",version="(none)",'
                                 'code="NOT_FOUND"}') or 0) >= 3, what="NOT_FOUND counted")
    ok = prom.query('gateway_requests_total{model="tab",code="OK"}')
    assert {m["version"] for m, v in ok if v > 0} == {"1", "2"}
    for m, _ in ok:
        assert set(m) == {"__name__", "job", "instance", "model", "version", "code"}
    # no label anywhere holds the name the unknown request asked for
    models_seen = {m.get("model") for m, _ in prom.query('{__name__=~"gateway_.+"}')}
    assert UNKNOWN not in models_seen
    assert models_seen - {None} <= {"tab", "broken", "(unknown)"}
    for histogram in ("gateway_request_duration_seconds", "gateway_queue_duration_seconds",
                      "gateway_compute_duration_seconds", "gateway_batch_size"):
        buckets = prom.query(f'{histogram}_bucket{{model="tab",version="1"}}')
        assert len(buckets) >= 10 and all("le" in m for m, _ in buckets), histogram
        assert prom.value(f'{histogram}_count{{model="tab",version="1"}}') > 0, histogram
    assert prom.value('gateway_batch_size_sum{model="tab",version="2"}') >= ROWS
    assert prom.value('gateway_model_ready{model="tab",version="2"}') == 1
    assert prom.value('gateway_model_ready{model="broken",version="1"}') == 0
    assert prom.value('gateway_model_load_failures_total{model="broken",version="1"}') >= 1
    assert prom.value('gateway_queue_depth{model="tab",version="1"}') is not None
    assert prom.value('gateway_inflight_requests') is not None
    assert prom.value('gateway_traffic_weight_ratio{model="tab",version="2"}') == 1
    assert prom.value('process_resident_memory_bytes{job="gateway"}') > 1e6
    assert prom.value('process_cpu_seconds_total{job="gateway"}') > 0
    # no GPU here: no GPU series and one log line saying so
    assert not prom.query('{__name__=~"gateway_gpu_.+"}')
    assert gateway.log().count("GPU metrics off") == 1


def test_latency_percentiles_come_from_the_histogram(stack):
    _, prom, _, _ = stack

    def quantile(q):
        return prom.value(f'histogram_quantile({q}, sum by (le) '
                          f'(rate(gateway_request_duration_seconds_bucket{{model="tab"}}[10s])))')

    p99 = wait_for(lambda: quantile(0.99), what="a p99 latency")
    p50 = quantile(0.5)
    assert math.isfinite(p99) and 0 < p50 <= p99 <= 30
    per_version = prom.query('histogram_quantile(0.99, sum by (version, le) '
                             '(rate(gateway_request_duration_seconds_bucket{model="tab"}[10s])))')
    assert {m["version"] for m, v in per_version if math.isfinite(v)} == {"1", "2"}


def test_drift_stays_low_in_distribution_and_rises_for_shifted_data(stack):
    gateway, prom, sender, repo = stack
    scores = 'gateway_input_drift{model="tab",input="input"}'

    def both_scored():
        result = prom.query(scores)
        return len(result) == 2 and result

    wait_for(both_scored, what="drift scores of both versions")
    assert prom.value('gateway_input_baseline_ready{model="tab",version="1",'
                      'source="file"}') == 1
    assert prom.value('gateway_input_baseline_ready{model="tab",version="2",'
                      'source="served"}') == 1
    # let the 4 s window fill with served data, then look at 5 s of scores
    time.sleep(6)
    low = prom.query(f"max_over_time({scores}[5s])")
    assert len(low) == 2
    for labels, value in low:
        assert value < 0.15, (labels, value)
    assert prom.value('max(gateway_input_drift_alert{model="tab"})') == 0
    assert prom.value('sum(gateway_input_samples_total{model="tab"})') > 1500

    sender.shift = 2.0  # every feature moves by two standard deviations
    high = wait_for(lambda: (r := prom.query(f"{scores} > 1")) and len(r) == 2 and r,
                    what="drift scores above 1 for both versions")
    assert {m["version"] for m, _ in high} == {"1", "2"}
    wait_for(lambda: prom.value('min(gateway_input_drift_alert{model="tab"})') == 1,
             what="drift alerts of both versions")
    # one hook call for the model: the second version's alert fell within the cooldown
    wait_for(lambda: (prom.value('gateway_drift_hook_suppressed_total{model="tab"}') or 0) >= 1,
             what="the second alert suppressed by the cooldown")
    wait_for(lambda: prom.value('gateway_drift_hook_calls_total{model="tab",result="ok"}') == 1,
             what="the hook call counted")
    calls = (repo / "tab" / "hook-calls.jsonl").read_text().splitlines()
    assert len(calls) == 1
    payload = json.loads(calls[0])
    assert payload["event"] == "drift" and payload["model"] == "tab"
    assert payload["version"] in ("1", "2")
    assert payload["inputs"][0]["input"] == "input"
    assert payload["inputs"][0]["score"] > payload["inputs"][0]["threshold"] == 0.25
    assert "drift: model 'tab' version" in gateway.log()
    # the alert rule in deploy/prometheus sees the gateway's alert state (pending: its for: 1m)
    alerts = wait_for(lambda: [a for a in prom.get("/api/v1/alerts")["data"]["alerts"]
                               if a["labels"]["alertname"] == "GatewayInputDrift"],
                      what="GatewayInputDrift pending")
    assert {a["labels"]["version"] for a in alerts} <= {"1", "2"}


def test_rules_and_dashboard_queries_work_in_prometheus(stack):
    _, prom, _, _ = stack
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {g["name"] for g in groups} == {"gateway-recording", "gateway-alerts"}
    assert all(r["health"] != "err" for r in rules), [r for r in rules if r["health"] == "err"]
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "gateway-dashboard.json").read_text())
    with_data = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", "15s")
                    .replace('"$input_feature"', '"0"').replace("$job", ".*")
                    .replace("$model", ".*").replace("$version", ".*"))
            if prom.query(expr):
                with_data.add(panel["title"])
    for title in ("Throughput (requests/s)", "End-to-end latency per version (p50 / p90 / p99)",
                  "Mean batch size", "Queue depth and in-flight requests",
                  "Drift score (PSI) per input", "Window vs baseline bins (input $input_feature)"):
        assert title in with_data, title


def test_one_scrape_of_a_workers_fleet_holds_every_workers_requests(tmp_path):
    """`--workers 2`: Prometheus scrapes one endpoint and sees the requests of both workers
    added up (before, each worker had its own port and the scrape config saw one)."""
    models.make_version(tmp_path / "repo", "mlp", 1, models.build_mlp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with start_gateway(tmp_path / "repo", "--grpc-port", str(port), "--workers", "2") as gw:
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        prom = Prometheus(tmp_path, gw.metrics_port)
        try:
            wait_for(prom.ready, what="prometheus ready")
            x = np.ones((1, 32), np.float32)
            sent = 60
            for _ in range(sent):  # a connection each: the kernel spreads them over both
                with grpcclient.InferenceServerClient(gw.url) as client:
                    inp = grpcclient.InferInput("input", [1, 32], "FP32")
                    inp.set_data_from_numpy(x)
                    client.infer("mlp", [inp])
            expr = 'sum(gateway_requests_total{model="mlp",code="OK"})'
            wait_for(lambda: prom.value(expr) == sent, timeout=30,
                     what=f"{sent} requests in one scrape")
            assert prom.value('gateway_workers{state="answering"}') == 2
            assert len(prom.query('up{job="gateway"}')) == 1  # one target for the host
        finally:
            prom.stop()
