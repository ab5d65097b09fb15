"""Drift monitoring without a server: gateway.yaml settings, alerts, hooks (command and HTTP),
and the statistics thread driven tick by tick with a fake clock."""

from __future__ import annotations

import http.server
import json
import logging
import sys
import threading
import typing
from types import SimpleNamespace

import numpy as np
import pytest

from gateway.monitoring import settings as ms
from gateway.monitoring.alerts import AlertState, HookRunner
from gateway.monitoring.drift import DriftEngine
from gateway.monitoring.stats import write_baseline
from gateway.tensors import TensorSpec

# ---- gateway.yaml -----------------------------------------------------------------------------


def test_settings_defaults_without_a_file(tmp_path):
    s = ms.load(tmp_path)
    assert s.enabled and s.threshold == 0.25 and s.window == 300 and not s.hook.configured


def test_settings_parse_every_key(tmp_path):
    (tmp_path / "gateway.yaml").write_text("""
drift:
  window: 2m
  min_samples: 50
  threshold: 0.3
  for: 500ms
  baseline_samples: 400
  bins: 8
  max_features: 16
  max_rows_per_second: 100
  export_bins: true
  inputs:
    a: {features: [0, 2], threshold: 0.5}
    b: {features: tensor}
    c: {enabled: false}
  hook:
    command: python3 retrain.py --why drift
    timeout: 10
    cooldown: 1h
""")
    s = ms.load(tmp_path)
    assert (s.window, s.min_samples, s.threshold, s.for_seconds) == (120, 50, 0.3, 0.5)
    assert (s.baseline_samples, s.bins, s.max_features, s.max_rows_per_second) == (400, 8, 16, 100)
    assert s.export_bins
    assert not ms.DriftSettings().export_bins  # off unless asked for: cardinality
    assert s.for_input("a") == ms.InputSettings(True, (0, 2), 0.5)
    assert s.for_input("b").features == "tensor"
    assert not s.for_input("c").enabled
    assert s.for_input("other") == ms.InputSettings()
    assert s.hook.command == ("python3", "retrain.py", "--why", "drift")
    assert (s.hook.timeout, s.hook.cooldown) == (10, 3600)


@pytest.mark.parametrize("text, message", [
    ("drift: {threshold: -1}", "threshold"),
    ("drift: {window: soon}", "duration"),
    ("drift: {bins: 1}", "bins"),
    ("drift: {min_samples: 2.5}", "whole"),
    ("drift: {enabled: 'yes'}", "true or false"),
    ("drift: {inputs: {x: {features: [1, 1]}}}", "twice"),
    ("drift: {inputs: {x: {features: [-1]}}}", "features"),
    ("drift: {hook: {url: 'ftp://x'}}", "http"),
    ("drift: {hook: {url: 'http://x', command: 'y'}}", "either"),
])
def test_bad_settings_are_refused_with_the_key(text, message):
    import yaml

    with pytest.raises(ms.SettingsError, match=message):
        ms.parse(yaml.safe_load(text))


def test_an_unusable_file_logs_and_falls_back_to_defaults(tmp_path, caplog):
    (tmp_path / "gateway.yaml").write_text("drift: {threshold: [\n")
    with caplog.at_level(logging.ERROR):
        assert ms.load(tmp_path) == ms.DriftSettings()
    assert "not valid YAML" in caplog.text
    (tmp_path / "gateway.yaml").write_text("drift: {threshold: high, colour: blue}")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ms.load(tmp_path) == ms.DriftSettings()
    assert "drift.threshold must be a number" in caplog.text
    assert "unknown key drift.colour" in caplog.text


# ---- alerts -----------------------------------------------------------------------------------


def test_alert_fires_after_the_hold_time_and_clears():
    alert = AlertState(threshold=0.25, for_seconds=10)
    assert alert.update(0.1, 0) is None
    assert alert.update(0.5, 1) is None  # above since 1
    assert alert.update(0.5, 10) is None
    assert alert.update(0.5, 11) == "fired" and alert.active
    assert alert.update(0.9, 30) is None  # stays active, fires once
    assert alert.update(0.2, 31) == "cleared" and not alert.active
    assert alert.update(0.5, 32) is None  # the hold starts again
    assert alert.update(None, 50) is None and alert.above_since is None


def test_alert_with_no_hold_fires_at_once():
    alert = AlertState(0.25, 0)
    assert alert.update(0.3, 5) == "fired"
    assert alert.update(None, 6) == "cleared"  # too few samples: not drifting any more


# ---- hooks ------------------------------------------------------------------------------------


def test_command_hook_gets_the_payload_on_stdin(tmp_path):
    out = tmp_path / "calls.jsonl"
    script = ("import json, os, sys; d = json.load(sys.stdin); "
              f"open({str(out)!r}, 'a').write(json.dumps([d, os.getcwd(), "
              "os.environ['GATEWAY_MODEL']]) + '\\n')")
    runner = HookRunner()
    hook = ms.HookSettings(command=(sys.executable, "-c", script))
    payload = {"event": "drift", "model": "m", "version": "2", "inputs": []}
    assert runner.submit(hook, "m", tmp_path, payload).result(30)
    runner.close()
    data, cwd, model = json.loads(out.read_text())
    assert data == payload and cwd == str(tmp_path) and model == "m"
    assert runner.calls == {("m", "ok"): 1}


def test_failing_and_missing_commands_are_counted_not_raised(tmp_path, caplog):
    runner = HookRunner()
    bad = ms.HookSettings(command=(sys.executable, "-c", "import sys; sys.exit('no trainer')"))
    missing = ms.HookSettings(command=(str(tmp_path / "nope"),))
    slow = ms.HookSettings(command=(sys.executable, "-c", "import time; time.sleep(30)"),
                           timeout=0.2)
    payload = {"event": "drift", "model": "m", "version": "1"}
    with caplog.at_level(logging.ERROR):
        for hook in (bad, missing, slow):
            assert not runner.submit(hook, "m", tmp_path, payload).result(30)
    runner.close()
    assert runner.calls == {("m", "error"): 3}
    assert "no trainer" in caplog.text and "timed out" in caplog.text


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: typing.ClassVar[list] = []
    status = 200

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        type(self).bodies.append((self.headers["Content-Type"], self.rfile.read(length)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_hook_posts_json():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/drift"
    runner = HookRunner()
    try:
        assert runner.submit(ms.HookSettings(url=url), "m", None,
                             {"event": "drift", "model": "m", "version": "1"}).result(30)
        _Receiver.status = 500
        assert not runner.submit(ms.HookSettings(url=url), "m", None,
                                 {"event": "drift", "model": "m", "version": "1"}).result(30)
    finally:
        _Receiver.status = 200
        server.shutdown()
        runner.close()
    content_type, body = _Receiver.bodies[0]
    assert content_type == "application/json" and json.loads(body)["version"] == "1"
    assert runner.calls == {("m", "ok"): 1, ("m", "error"): 1}


# ---- the statistics thread, tick by tick ----------------------------------------------------


class FakeBatcher:
    def __init__(self, model, version):
        self.model, self.version = model, version


def fake_repository(root, model="m", versions=("1",), inputs=None, max_batch_size=8):
    inputs = inputs or [TensorSpec("x", "FP32", (3,))]
    config = SimpleNamespace(max_batch_size=max_batch_size, inputs=inputs)
    serving = {v: SimpleNamespace(model=model, version=v, config=config,
                                  batcher=FakeBatcher(model, v)) for v in versions}
    for v in versions:
        (root / model / v).mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(root=root, models={model: SimpleNamespace(serving=serving)})


def write_settings(root, text, model="m"):
    (root / model / "gateway.yaml").write_text(text)


def engine_for(repo, model="m", **kwargs):
    """A fresh engine on ``repo`` (also another worker's, or the same after a restart)."""
    engine = DriftEngine(repo, interval=1.0, **kwargs)
    engine.request_sync(model)
    engine.tick(now=0.0)
    return engine


def monitor_of(engine, repo, version="1", model="m"):
    return engine.monitors[repo.models[model].serving[version].batcher]


def feed(monitor, rng, rows, shift=0.0, batch=10):
    for _ in range(rows // batch):
        monitor.offer({"x": (rng.standard_normal((batch, 3)) + shift).astype(np.float32)}, batch)


def test_served_samples_become_the_baseline_then_drift_is_scored(tmp_path):
    repo = fake_repository(tmp_path)
    write_settings(tmp_path, "drift: {baseline_samples: 500, min_samples: 200, window: 5}")
    engine = engine_for(repo)
    monitor = monitor_of(engine, repo)
    x = monitor.inputs[0]
    assert x.source == "pending" and x.labels == ["0", "1", "2"]
    rng = np.random.default_rng(0)
    feed(monitor, rng, 600)
    engine.tick(now=1.0)
    assert x.source == "served" and x.baseline.samples == 600 and x.score is None
    for t in range(2, 8):
        feed(monitor, rng, 400)
        engine.tick(now=float(t))
    assert x.score is not None and x.score < 0.1
    assert x.rows == 600 + 6 * 400
    assert x.stats.mean == pytest.approx([0, 0, 0], abs=0.1)
    for t in range(8, 14):
        feed(monitor, rng, 400, shift=1.5)
        engine.tick(now=float(t))
    assert x.score > 1.0  # the window (5 s) holds only shifted data now
    assert (x.feature_scores > 1.0).all()


def test_a_baseline_file_is_used_and_its_features_selected(tmp_path):
    repo = fake_repository(tmp_path, inputs=[TensorSpec("x", "FP32", (3,)),
                                             TensorSpec("img", "UINT8", (4, 4)),
                                             TensorSpec("text", "BYTES", (1,))])
    rng = np.random.default_rng(1)
    write_baseline(tmp_path / "m" / "1" / "baseline.npz",
                   {"x": rng.standard_normal((2000, 3)),
                    "img": rng.integers(0, 255, (200, 4, 4), dtype=np.uint8)})
    write_settings(tmp_path, "drift: {min_samples: 100, max_features: 8, "
                             "inputs: {x: {features: [2, 0]}}}")
    engine = engine_for(repo)
    monitor = monitor_of(engine, repo)
    by_name = {m.name: m for m in monitor.inputs}
    assert set(by_name) == {"x", "img"}  # BYTES is not monitored
    assert by_name["x"].source == "file" and by_name["x"].labels == ["2", "0"]
    assert by_name["img"].pooled and by_name["img"].source == "file"  # 16 values > max 8
    for _ in range(20):
        monitor.offer({"x": rng.standard_normal((10, 3)),
                       "img": rng.integers(0, 255, (10, 4, 4), dtype=np.uint8)}, 10)
    engine.tick(now=1.0)
    assert by_name["x"].score < 0.1 and by_name["img"].score < 0.1
    assert by_name["img"].rows == 200


def test_nan_and_inf_are_counted_and_never_break_the_statistics(tmp_path):
    repo = fake_repository(tmp_path)
    write_settings(tmp_path, "drift: {baseline_samples: 100, min_samples: 10}")
    engine = engine_for(repo)
    monitor = monitor_of(engine, repo)
    x = monitor.inputs[0]
    data = np.random.default_rng(2).standard_normal((200, 3))
    data[::10, 0] = np.nan
    data[5, 1] = np.inf
    data[6, 2] = -np.inf
    monitor.offer({"x": data}, 200)
    engine.tick(now=1.0)
    monitor.offer({"x": data}, 200)
    engine.tick(now=2.0)
    assert x.stats.nonfinite.tolist() == [40, 2, 2]
    assert np.isfinite(x.stats.mean).all() and np.isfinite(x.stats.std).all()
    assert x.score is not None and np.isfinite(x.score)
    monitor.offer({"x": np.full((20, 3), np.nan)}, 20)
    engine.tick(now=3.0)
    assert np.isfinite(x.stats.mean).all()


def test_mismatched_sizes_are_skipped(tmp_path):
    repo = fake_repository(tmp_path, inputs=[TensorSpec("x", "FP32", (-1,))])
    write_settings(tmp_path, "drift: {baseline_samples: 10, inputs: {x: {features: [0, 1]}}}")
    engine = engine_for(repo)
    monitor = monitor_of(engine, repo)
    assert monitor.inputs[0].pooled  # variable width: explicit features cannot be checked
    repo2 = fake_repository(tmp_path / "b")
    write_settings(tmp_path / "b", "drift: {baseline_samples: 10}")
    engine2 = engine_for(repo2)
    monitor2 = monitor_of(engine2, repo2)
    monitor2.offer({"x": np.zeros((4, 5))}, 4)
    monitor2.offer({"x": np.zeros((4, 3))}, 4)
    engine2.tick(now=1.0)
    assert monitor2.inputs[0].mismatched == 4 and monitor2.inputs[0].rows == 4


def test_high_rates_are_sampled_and_a_full_queue_drops(tmp_path):
    repo = fake_repository(tmp_path)
    write_settings(tmp_path, "drift: {max_rows_per_second: 100}")
    engine = engine_for(repo)
    monitor = monitor_of(engine, repo)
    assert monitor.max_pending == 400
    for _ in range(500):
        monitor.offer({"x": np.zeros((1, 3))}, 1)
    assert (monitor.accepted, monitor.dropped) == (400, 100)
    engine.tick(now=1.0)  # 500 rows/s offered against 100 allowed
    assert monitor.keep == pytest.approx(0.2)
    for _ in range(1000):
        monitor.offer({"x": np.zeros((1, 3))}, 1)
    assert 100 < monitor.sampled_out < 1000 - 100
    assert monitor.sampled_out + monitor.accepted - 400 == 1000


def test_drift_alert_calls_the_hook_once_per_cooldown(tmp_path):
    out = tmp_path / "hook.jsonl"
    repo = fake_repository(tmp_path, versions=("1", "2"))
    script = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')"
    write_settings(tmp_path, f"""
drift:
  baseline_samples: 200
  min_samples: 100
  window: 3
  for: 2
  hook:
    command: [{json.dumps(sys.executable)}, "-c", {json.dumps(script)}]
    cooldown: 100
""")
    engine = engine_for(repo)
    monitors = [monitor_of(engine, repo, v) for v in ("1", "2")]
    rng = np.random.default_rng(3)
    now = 0.0

    def run(seconds, shift):
        nonlocal now
        for _ in range(seconds):
            now += 1
            for monitor in monitors:
                feed(monitor, rng, 300, shift)
            engine.tick(now=now)

    run(5, 0.0)
    assert all(not m.alerting() for m in monitors)
    run(3, 3.0)  # shifted: above the threshold from the first shifted tick
    run(2, 3.0)  # held for 2 s: the alert fires in both versions
    assert all(m.alerting() for m in monitors)
    run(30, 3.0)  # persists, within the cooldown
    engine.hooks.submit(ms.HookSettings(), "flush", tmp_path, {}).result(30)
    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(calls) == 1  # one call for the model, not one per version or per tick
    assert calls[0]["event"] == "drift" and calls[0]["model"] == "m"
    assert calls[0]["inputs"][0]["input"] == "x" and calls[0]["inputs"][0]["score"] > 0.25
    assert calls[0]["inputs"][0]["baseline"] == "served"
    assert engine.hooks.calls[("m", "ok")] == 1
    assert engine.hook_suppressed["m"] == 1  # the second version's alert fell in the cooldown
    run(70, 3.0)  # past the cooldown, still drifting: called again, once
    engine.hooks.submit(ms.HookSettings(), "flush", tmp_path, {}).result(30)
    assert len(out.read_text().splitlines()) == 2
    run(5, 0.0)  # back to normal: alerts clear
    assert all(not m.alerting() for m in monitors)
    engine.hooks.close()


def test_monitors_follow_the_serving_set_and_file_changes(tmp_path):
    repo = fake_repository(tmp_path, versions=("1", "2"))
    engine = engine_for(repo)
    first = dict(engine.monitors)
    assert len(first) == 2
    # version 1 retires
    serving = repo.models["m"].serving
    repo.models["m"].serving = {"2": serving["2"]}
    engine.request_sync("m")
    engine.tick(now=1.0)
    assert list(engine.monitors) == [serving["2"].batcher]
    assert engine.monitors[serving["2"].batcher] is first[serving["2"].batcher]
    # gateway.yaml edited in place: picked up at the next file check, monitors rebuilt
    write_settings(tmp_path, "drift: {threshold: 0.5}")
    engine.tick(now=100.0)
    monitor = engine.monitors[serving["2"].batcher]
    assert monitor is not first[serving["2"].batcher]
    assert monitor.inputs[0].alert.threshold == 0.5
    # drift disabled for the model: no monitors
    write_settings(tmp_path, "drift: {enabled: false}")
    engine.request_sync("m")
    engine.tick(now=101.0)
    assert engine.monitors == {}
    # and enabled again by an edit alone
    write_settings(tmp_path, "drift: {enabled: true, threshold: 0.7}")
    engine.tick(now=200.0)
    assert engine.monitors[serving["2"].batcher].inputs[0].alert.threshold == 0.7


def test_an_unusable_baseline_file_falls_back_to_served_samples(tmp_path, caplog):
    repo = fake_repository(tmp_path)
    (tmp_path / "m" / "1" / "baseline.npz").write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR):
        engine = engine_for(repo)
    assert monitor_of(engine, repo).inputs[0].source == "pending"
    assert "baseline.npz is unusable" in caplog.text
