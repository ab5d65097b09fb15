"""Several worker processes on one port (--workers): all serve, all drain on SIGTERM."""

from __future__ import annotations

import socket

import numpy as np
import tritonclient.grpc as grpcclient
from support import start_gateway, wait_for

from bench import models


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
