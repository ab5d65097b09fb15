"""Model control across processes: an explicit load or unload through any worker reaches every
worker before it is acknowledged (`--workers 2`), and a version published through one replica
comes up on the others (two replicas on one real Redis, without polling the repository)."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack

import tritonclient.grpc as grpcclient
from support import ROOT, free_port, start_gateway, wait_for

from bench import models


def ready_everywhere(url: str, model: str, connections: int = 12) -> set[bool]:
    """What fresh connections (spread over the workers by the kernel) answer."""
    seen = set()
    for _ in range(connections):
        with grpcclient.InferenceServerClient(url) as client:
            seen.add(client.is_model_ready(model))
    return seen


def test_an_explicit_load_through_one_worker_reaches_both(tmp_path):
    models.make_version(tmp_path, "first", 1, models.build_mlp)
    models.make_version(tmp_path, "second", 1, models.build_mlp, seed=2)
    port = free_port()
    with start_gateway(tmp_path, "--grpc-port", str(port), "--workers", "2",
                       "--control-mode", "explicit", "--load-model", "first") as gw:
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        assert ready_everywhere(gw.url, "second") == {False}
        with grpcclient.InferenceServerClient(gw.url) as client:
            client.load_model("second")  # returns once every worker has it
        assert ready_everywhere(gw.url, "second") == {True}
        with grpcclient.InferenceServerClient(gw.url) as client:
            client.unload_model("first")
        assert ready_everywhere(gw.url, "first") == {False}
        assert gw.stop() == 0


def test_a_version_published_through_one_replica_serves_on_the_other(tmp_path, redis_server):
    repo = tmp_path / "repo"
    models.make_version(repo, "mlp", 1, models.build_mlp)
    models.write_config(repo / "mlp", "max_batch_size: 8\nversion_policy { all { } }")
    new_file = models.build_mlp(tmp_path / "v2.onnx", seed=5)
    with ExitStack() as stack:
        first, second = (stack.enter_context(start_gateway(repo, "--state-url", redis_server.url))
                         for _ in range(2))
        done = subprocess.run([sys.executable, "-m", "gateway", "publish", "mlp", str(new_file),
                               "--url", first.url], capture_output=True, text=True, cwd=ROOT,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert "loaded by" not in done.stdout  # every process had it before the answer
        with grpcclient.InferenceServerClient(second.url) as client:
            assert client.is_model_ready("mlp", "2")
