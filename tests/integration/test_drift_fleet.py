"""Drift in a fleet, end to end: one drift episode calls the model's hook once, whether the
processes that see it are the workers of one ``--workers 2`` gateway or two replicas sharing one
real Redis; the baseline learned from served samples is persisted beside the version, so a
restart reads it instead of learning again from (drifted) traffic.

Clients are tritonclient; each request opens a new connection so that the kernel spreads them
over the workers of one port (SO_REUSEPORT). Nothing here depends on timing: every step waits
for the state it needs (log lines, files, metrics) and then asserts counts.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from support import ClientThreads, free_port, start_gateway, wait_for

from bench import models

MODEL = "tab"
FEATURES = 8
ROWS = 8  # rows per request
SERVED = "baseline.served.npz"
FIRED = f"drift: model '{MODEL}' version 1 input 'input': PSI"
SUPPRESSED = f"drift hook of model '{MODEL}' not called here: another gateway process calls it"
CALLED = f"drift hook of model '{MODEL}' called"


def build_repository(repo: Path, calls: Path) -> Path:
    """Model ``tab`` version 1 without baseline.npz: its baseline comes from served samples.
    The hook appends one line per call to ``calls`` (one file for the whole fleet)."""
    models.make_version(repo, MODEL, 1, models.build_mlp, (FEATURES, 16, 2), seed=1)
    models.write_config(repo / MODEL, """
        max_batch_size: 64
        dynamic_batching { }
    """)
    script = f"import sys; open({str(calls)!r}, 'a').write(sys.stdin.read() + '\\n')"
    (repo / MODEL / "gateway.yaml").write_text(f"""
drift:
  window: 3s
  min_samples: 50
  threshold: 0.25
  for: 0
  baseline_samples: 100
  max_rows_per_second: 1000000
  hook:
    command: [{json.dumps(sys.executable)}, "-c", {json.dumps(script)}]
    cooldown: 1h
""")
    return repo


class Sender(ClientThreads):
    """Keeps requests flowing to each of ``urls`` (a new connection every few requests),
    drawn from the standard normal distribution plus ``shift``."""

    def __init__(self, urls):
        self.urls = urls
        self.shift = 0.0
        self.sent = 0
        super().__init__([(url, i) for i, url in enumerate(urls) for _ in range(2)])

    def _run(self, url, seed):
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            with grpcclient.InferenceServerClient(url) as client:
                for _ in range(4):
                    x = (rng.standard_normal((ROWS, FEATURES)) + self.shift).astype(np.float32)
                    inp = grpcclient.InferInput("input", [ROWS, FEATURES], "FP32")
                    inp.set_data_from_numpy(x)
                    client.infer(MODEL, [inp], client_timeout=60)
                    self.sent += 1


def metric(gateway, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def logs(gateways) -> str:
    return "\n".join(gw.log() for gw in gateways)


def one_episode(gateways, urls, calls: Path, processes: int) -> None:
    """In distribution until every process has its baseline, then shifted until every process
    has seen the alert fire and all but one were told another process calls the hook."""
    with Sender(urls) as sender:
        wait_for(lambda: logs(gateways).count(f"baseline learned from served samples is in {SERVED}")
                 + logs(gateways).count("learned from served samples by another process")
                 >= processes, timeout=120, what="every process's served baseline")
        sender.shift = 3.0
        wait_for(lambda: logs(gateways).count(FIRED) >= processes, timeout=120,
                 what="the drift alert in every process")
        wait_for(lambda: logs(gateways).count(SUPPRESSED) >= processes - 1, timeout=60,
                 what="the other processes' claims answered")
        wait_for(lambda: calls.exists() and logs(gateways).count(CALLED) >= 1, timeout=60,
                 what="the hook call")
    text = logs(gateways)
    assert text.count(CALLED) == 1, text
    assert text.count(SUPPRESSED) == processes - 1, text
    lines = calls.read_text().splitlines()
    assert len(lines) == 1, lines
    payload = json.loads(lines[0])
    assert payload["model"] == MODEL and payload["inputs"][0]["baseline"] == "served"


def test_two_workers_call_the_hook_once_and_a_restart_keeps_their_baseline(tmp_path):
    calls = tmp_path / "hook-calls.jsonl"
    repo = build_repository(tmp_path / "repo", calls)
    served = repo / MODEL / "1" / SERVED
    port = free_port()
    args = ("--grpc-port", str(port), "--workers", "2", "--drift-interval", "0.2")
    with start_gateway(repo, *args) as gw:
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        one_episode([gw], [gw.url], calls, processes=2)
        assert metric(gw, "gateway_drift_hook_calls_total", model=MODEL, result="ok") == 1
        wait_for(lambda: metric(gw, "gateway_drift_hook_suppressed_total", model=MODEL) >= 1,
                 what="the loser's claim counted as suppressed")
        # One worker wrote the file; the other took it rather than writing its own.
        assert gw.log().count(f"baseline learned from served samples is in {SERVED}") == 1
        assert gw.stop() == 0
    written = served.read_bytes()

    # Restart (traffic has drifted): both workers read the persisted baseline, learn nothing.
    with start_gateway(repo, *args) as gw:
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        origin = f"baseline from {SERVED} (learned from served samples)"
        wait_for(lambda: gw.log().count(origin) == 2, what="both workers' monitors")
        assert metric(gw, "gateway_input_baseline_ready", model=MODEL, source="served") == 1
        assert metric(gw, "gateway_input_baseline_ready", source="pending") == 0
        with Sender([gw.url]) as sender:
            sender.shift = 3.0
            wait_for(lambda: gw.log().count(FIRED) >= 1, timeout=120,
                     what="drift against the persisted baseline")
        assert "learned from served samples is in" not in gw.log()
        assert "by another process" not in gw.log()
    assert served.read_bytes() == written


def test_two_replicas_on_one_redis_call_the_hook_once(tmp_path, redis_server):
    calls = tmp_path / "hook-calls.jsonl"
    first = build_repository(tmp_path / "a", calls)
    second = tmp_path / "b"
    shutil.copytree(first, second)  # replicas on two hosts: each has its own repository
    args = ("--state-url", redis_server.url, "--drift-interval", "0.2")
    with ExitStack() as stack:
        gateways = [stack.enter_context(start_gateway(repo, *args)) for repo in (first, second)]
        one_episode(gateways, [gw.url for gw in gateways], calls, processes=2)
        assert sum(metric(gw, "gateway_drift_hook_calls_total", model=MODEL, result="ok")
                   for gw in gateways) == 1
        wait_for(lambda: sum(metric(gw, "gateway_drift_hook_suppressed_total", model=MODEL)
                             for gw in gateways) >= 1, what="the loser's claim counted")
    for repo in (first, second):  # each replica persisted its own, beside its version
        assert (repo / MODEL / "1" / SERVED).is_file()
