"""What an operator change costs, and how soon the other replicas serve it.

Two replicas' control planes (``gateway.control.ControlPlane``, each with its own store client
and its follower task, as in ``gateway serve``) share one store: the file store in a temporary
directory, or a ``redis-server`` this script starts on a free loopback port. Replica A makes
``--changes`` traffic changes one after another; for each we time A's commit (the operator's
wait) and the moment replica B has installed the new revision (propagation). Both replicas run
on one event loop, so B's follower competes with A's commits exactly as a busy replica would.

    python -m bench.state --backend file --changes 200
    python -m bench.state --backend redis --changes 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from gateway.control import ControlPlane, open_store
from gateway.repository import ModelEntry
from gateway.routing import Router


class _Repository:
    """The router's seam: one model with two serving versions."""

    def __init__(self):
        entry = ModelEntry("m")
        entry.serving = {v: SimpleNamespace(model="m", version=v) for v in ("1", "2")}
        entry.latest = entry.serving["2"]
        self.models = {"m": entry}

    def get(self, name):
        return self.models[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(directory), "--appendonly", "yes",
                             "--appendfsync", "everysec", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def measure(url: str, directory: Path, changes: int, poll: float) -> dict:
    planes = []
    for _ in range(2):
        store = open_store(url, directory)
        if hasattr(store, "poll_interval"):
            store.poll_interval = poll
        plane = ControlPlane(store, Router(_Repository()))
        await plane.start()
        planes.append(plane)
    a, b = planes
    seen = asyncio.Event()
    install = b.install

    def installed(snapshot):
        install(snapshot)
        seen.set()
    b.install = installed
    commit_s, visible_s = [], []
    try:
        for i in range(changes):
            weight = i % 99 + 1
            seen.clear()
            t0 = time.perf_counter()
            await a.traffic.set_split("m", {"1": weight, "2": 100 - weight}, "bench")
            t1 = time.perf_counter()
            target = a.snapshot.revision
            while b.snapshot.revision < target:
                await seen.wait()
                seen.clear()
            t2 = time.perf_counter()
            commit_s.append(t1 - t0)
            visible_s.append(t2 - t0)
    finally:
        for plane in planes:
            await plane.stop()

    def summary(values):
        ms = np.array(values) * 1000
        return {"median_ms": round(float(np.median(ms)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2)}

    return {"changes": changes, "commit": summary(commit_s),
            "visible_on_other_replica": summary(visible_s)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("file", "redis"), default="file")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--poll", type=float, default=0.2,
                        help="the file store's check interval (gateway serve's default, "
                             "GATEWAY_STATE_POLL_INTERVAL: 0.2 s); Redis notifies at once")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        directory = Path(tmp)
        redis = None
        url = ""
        if args.backend == "redis":
            if shutil.which("redis-server") is None:
                parser.error("redis-server is not installed")
            redis, url = _start_redis(directory)
        try:
            result = asyncio.run(measure(url, directory / "state", args.changes, args.poll))
        finally:
            if redis is not None:
                redis.kill()
                redis.wait()
    print(json.dumps({"backend": args.backend, "poll_s": args.poll, **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
