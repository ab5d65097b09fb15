"""Peers started on this machine for a comparison run: the bare floor, MLServer and a gateway.

``--compare`` takes a URL (Triton, an older gateway, anything speaking KServe V2 gRPC, or REST
with ``--protocol http``) or one of these names; a named peer starts before the run and stops
after it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager


def start(cmd: list[str], pattern: str, timeout: float = 120, env: dict | None = None,
          cwd=None) -> tuple[subprocess.Popen, int]:
    """Run ``cmd``; return it and the port from the first output line matching ``pattern``.

    Its output is drained from then on (a full pipe would stall a chatty server).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    tail: deque[str] = deque(maxlen=40)
    found: dict = {}
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip())
            m = re.search(pattern, line)
            if m and not ready.is_set():
                found["port"] = int(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if "port" not in found:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(cmd[:3])} did not start:\n" + "\n".join(tail))
    return proc, found["port"]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def floor(protocol: str = "grpc"):
    """The bare floor (``bench.floor``: grpc.aio, or aiohttp for ``http``) on a free port; yields
    its URL."""
    proc, port = start([sys.executable, "-m", "bench.floor", "--protocol", protocol],
                       rf"floor ready: {protocol} \S+:(\d+)")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def gateway(repository=None, extra=(), protocol: str = "grpc"):
    """``gateway serve`` (this checkout's) on a free port, metrics off; yields the URL of its
    gRPC port, or of its HTTP port for ``http`` (HTTP is off otherwise)."""
    http = "0" if protocol == "http" else "-1"
    cmd = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
           "--metrics-port", "-1", "--http-port", http, "--log-level", "WARNING", *extra]
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    pattern = r"gateway ready: grpc \S+:\d+ .*http (\d+)" if protocol == "http" else \
        r"gateway ready: grpc \S+:(\d+)"
    proc, port = start(cmd, pattern)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def mlserver(model_file, name: str, protocol: str = "grpc", **options):
    """MLServer serving ``model_file`` as ``name`` (see ``bench.mlserver_peer``); yields the URL
    of its gRPC or its REST port."""
    from bench import mlserver_peer

    with mlserver_peer.serve(model_file, name, **options) as urls:
        yield urls[protocol]


@contextmanager
def resolve(spec: str, model_file=None, model: str = "", log=print, repository=None,
            gateway_args=(), protocol: str = "grpc"):
    """A --url/--compare value -> (label, URL): 'floor', 'gateway', 'mlserver' (needs the model
    file) or a URL (label None: the report names it after its ServerMetadata). A server started
    here is reached over ``protocol``."""
    over = "" if protocol == "grpc" else f" ({protocol})"
    if spec == "gateway":
        with gateway(repository, gateway_args, protocol) as url:
            log(f"gateway on {url}{over}")
            yield "gateway", url
    elif spec == "floor":
        with floor(protocol) as url:
            log(f"floor server on {url}{over}")
            yield "floor", url
    elif spec == "mlserver":
        if model_file is None:
            raise SystemExit("--compare mlserver needs --model-file (the ONNX file it serves)")
        started = time.monotonic()
        with mlserver(model_file, model, protocol) as url:
            log(f"MLServer on {url}{over} (started in {time.monotonic() - started:.0f} s)")
            yield "mlserver", url
    else:
        yield None, spec
