"""Several worker processes on one port (--workers): all serve, all drain on SIGTERM."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
from support import free_port, start_gateway, wait_for

from bench import models


def test_two_workers_share_the_port_and_drain(tmp_path):
    models.make_version(tmp_path, "mlp", 1, models.build_mlp)
    port = free_port()
    with start_gateway(tmp_path, "--grpc-port", str(port), "--workers", "2") as gw:
        assert gw.port == port
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        x = np.ones((1, 32), np.float32)
        for _ in range(20):  # new connections: the kernel spreads them over the workers
            with grpcclient.InferenceServerClient(gw.url) as client:
                inp = grpcclient.InferInput("input", [1, 32], "FP32")
                inp.set_data_from_numpy(x)
                assert client.infer("mlp", [inp]).as_numpy("output").shape == (1, 4)
        assert gw.stop() == 0
    assert gw.log().count("stopped") == 2


def test_a_second_fleet_refuses_a_port_another_fleet_serves(tmp_path):
    """SO_REUSEPORT would let a second --workers fleet join the port silently (and take some
    of its connections to another repository): it must refuse to start, saying why."""
    import subprocess
    import sys

    from support import ROOT

    models.make_version(tmp_path, "mlp", 1, models.build_mlp)
    port = free_port()
    with start_gateway(tmp_path, "--grpc-port", str(port), "--workers", "2") as gw:
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        second = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--grpc-port",
             str(port), "--metrics-port", "0", "--workers", "2", "--model-repository",
             str(tmp_path)], check=False, cwd=ROOT, capture_output=True, text=True,
            timeout=120)
        assert second.returncode == 1, second.stderr
        assert (f"gateway serve: 127.0.0.1:{port} is already in use by another process; "
                "--workers shares a port only among its own workers") in second.stderr
        assert "Traceback" not in second.stderr and "gateway ready" not in second.stdout
        # The first fleet still serves every connection.
        for _ in range(10):
            with grpcclient.InferenceServerClient(gw.url) as client:
                assert client.is_model_ready("mlp")
        assert gw.stop() == 0


def _metrics(gw) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _requests_ok(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "gateway_requests"
               for s in f.samples if s.labels.get("code") == "OK"
               and s.labels.get("model") == "mlp")


def _worker_pids(gw) -> list[int]:
    import re

    return sorted({int(p) for p in re.findall(r"worker \d+ pid (\d+)", gw.log())})


def test_one_scrape_sums_the_workers_and_a_killed_worker_comes_back(tmp_path):
    import os
    import signal
    import threading
    import time

    models.make_version(tmp_path, "mlp", 1, models.build_mlp)
    port = free_port()
    with start_gateway(tmp_path, "--grpc-port", str(port), "--workers", "2") as gw:
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        wait_for(lambda: 'gateway_workers{state="answering"} 2.0' in _metrics(gw),
                 what="both workers in the scrape")
        x = np.ones((1, 32), np.float32)
        sent = 40
        for _ in range(sent):  # new connections: the kernel spreads them over the workers
            with grpcclient.InferenceServerClient(gw.url) as client:
                inp = grpcclient.InferInput("input", [1, 32], "FP32")
                inp.set_data_from_numpy(x)
                client.infer("mlp", [inp])
        assert _requests_ok(_metrics(gw)) == sent  # one scrape, both workers, summed
        pids = _worker_pids(gw)
        assert len(pids) == 2, gw.log()
        # Ten persistent connections, spread over the two workers, send on through the kill.
        failures = [0] * 10
        stop = threading.Event()

        def send(k):  # its own TCP connection (gRPC would otherwise share one subchannel)
            with grpcclient.InferenceServerClient(
                    gw.url, channel_args=[("grpc.use_local_subchannel_pool", 1)]) as client:
                while not stop.is_set():
                    inp = grpcclient.InferInput("input", [1, 32], "FP32")
                    inp.set_data_from_numpy(x)
                    try:
                        client.infer("mlp", [inp], client_timeout=30)
                    except Exception:
                        failures[k] += 1
                        time.sleep(0.05)

        senders = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(10)]
        for t in senders:
            t.start()
        time.sleep(1)
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: len(_worker_pids(gw)) == 3 and gw.log().count("gateway ready") == 3,
                 timeout=60, what="the replacement worker")
        time.sleep(1)
        stop.set()
        for t in senders:
            t.join(60)
        assert "worker 0 exited with -9; starting it again" in gw.log()
        wait_for(lambda: "gateway_worker_restarts 1.0" in _metrics(gw), what="the restart")
        # Connections on the surviving worker never failed; those on the killed one failed
        # until gRPC reconnected them (to the survivor or the replacement).
        assert failures.count(0) >= 1, failures
        assert max(failures) <= 5, failures
        assert gw.stop() == 0
