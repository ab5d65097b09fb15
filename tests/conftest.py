"""Shared test fixtures: a real gateway process on ephemeral ports, and real model repositories."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READY_LINE = re.compile(r"gateway ready: grpc (\S+):(\d+) metrics (-?\d+)(?: http (-?\d+))?")


@dataclass
class RunningGateway:
    process: subprocess.Popen
    port: int
    metrics_port: int
    output: deque = field(default_factory=lambda: deque(maxlen=2000))
    http_port: int = -1  # -1: HTTP off (or a gateway that does not print it)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """host:port of the HTTP/REST endpoint (tritonclient.http's url: no scheme)."""
        return f"127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return "\n".join(self.output)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the exit code of a drained shutdown."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@contextmanager
def start_gateway(repository: Path | None = None, *args: str, env: dict | None = None,
                  timeout: float = 90.0):
    """Run ``gateway serve`` on ephemeral ports; yield once it reports ready; stop it after."""
    cmd = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
           "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0", *args]
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, **(env or {})})
    gateway = None
    lines: deque = deque(maxlen=2000)
    ready = threading.Event()
    found: dict = {}

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip())
            m = READY_LINE.search(line)
            if m and not ready.is_set():
                found["port"], found["metrics"] = int(m.group(2)), int(m.group(3))
                found["http"] = int(m.group(4)) if m.group(4) is not None else -1
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not become ready:\n" + "\n".join(lines))
        if "port" not in found:
            raise RuntimeError("gateway exited before ready:\n" + "\n".join(lines))
        gateway = RunningGateway(proc, found["port"], found["metrics"], lines,
                                 http_port=found["http"])
        yield gateway
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def demo_gateway():
    """The gateway serving its bundled demo repository, shared by read-only tests."""
    with start_gateway() as gw:
        yield gw


# ---- a real Redis -----------------------------------------------------------------------------

@dataclass
class RedisServer:
    """A ``redis-server`` on a loopback port, with its own directory (append-only file on, as a
    fleet's store must keep its data across a restart)."""

    directory: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if not self.port:
            self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: the store disappears as a crashed or partitioned Redis would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path):
    import shutil

    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.kill()
