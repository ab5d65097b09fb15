"""examples/retrain_loop end to end against a real gateway: a training run publishes a canary
through the admin API, and the whole loop (shifted traffic -> drift alert -> hook retrains and
publishes a canary -> labels show the new version is better) runs by itself."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from support import ROOT, free_port, start_gateway, wait_for

EXAMPLE = ROOT / "examples" / "retrain_loop"


def run(script, *args, timeout=180):
    done = subprocess.run([sys.executable, str(EXAMPLE / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def gateway_cli(*args):
    done = subprocess.run([sys.executable, "-m", "gateway", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def loop(tmp_path):
    """A repository made by the example's setup script, served in poll mode on a known port
    (the drift hook in gateway.yaml publishes back to it)."""
    port = free_port()
    url = f"127.0.0.1:{port}"
    out = run("setup_repository.py", tmp_path / "repo", "--url", url, "--window", "30s",
              "--min-samples", "60", "--for", "1s", "--canary-interval", "3600")
    assert "repository ready" in out
    with start_gateway(tmp_path / "repo", "--grpc-port", str(port), "--control-mode", "poll",
                       "--poll-interval", "1") as gw:
        assert gw.url == url
        yield gw
    assert gw.process.returncode == 0, gw.log()


def test_a_training_run_publishes_a_canary(loop):
    out = run("train.py", "--url", loop.url, "--shift", "1.5", "--seed", "3", "--canary", "10",
              "--canary-interval", "3600")
    assert re.search(r"run \w+: holdout accuracy 0\.\d+; published iris version 2 \(READY\)", out)
    assert "canary: 10% of traffic to version 2 (baseline 1)" in out
    code, status, _ = gateway_cli("rollout", "status", "iris", "--url", loop.url)
    assert code == 0 and "rollout to version 2 (baseline 1) is running" in status
    code, versions, _ = gateway_cli("versions", "iris", "--url", loop.url)
    assert code == 0
    row = next(line for line in versions.splitlines() if line.startswith("2 "))
    assert "READY" in row and "10%" in row and "shift=1.5" in row and "reason=manual" in row


def test_drift_retrains_publishes_a_canary_and_feedback_shows_it_is_better(loop):
    # Today's traffic has moved: the drift monitor compares it with version 1's baseline.
    out = run("traffic.py", "--url", loop.url, "--shift", "1.5", "--requests", "150")
    assert "150 labels joined" in out
    wait_for(lambda: "rollout to version 2" in gateway_cli("rollout", "status", "iris",
                                                           "--url", loop.url)[1],
             timeout=120, interval=0.5, what="the drift hook to publish a canary")
    wait_for(lambda: "drift hook of model 'iris' called (command exited with 0)" in loop.log(),
             what="the hook to finish")
    code, versions, _ = gateway_cli("versions", "iris", "--url", loop.url)
    assert "reason=drift alert on version 1" in versions
    # More traffic: 10% reaches the canary; labels show the retrained model fits the new data.
    run("traffic.py", "--url", loop.url, "--shift", "1.5", "--requests", "400", "--seed", "8")
    code, out, _ = gateway_cli("feedback", "iris", "--url", loop.url)
    assert code == 0
    scores = {m[0]: float(m[2]) for m in re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)%$", out,
                                                    re.MULTILINE)}
    assert set(scores) == {"1", "2"}, out
    assert scores["2"] > scores["1"], out
