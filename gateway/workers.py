"""Several gateway processes on one port (``gateway serve --workers N``).

Python serves a request on one core; more cores need more processes. The supervisor forks the
workers before any grpc object exists (grpc does not survive a fork), and each worker binds the
same port with SO_REUSEPORT, so the kernel spreads connections over them. Each worker loads its
own copy of the models and serves metrics on its own port (metrics port + worker index).
Traffic splits and rollouts stay consistent through the shared state file. SIGTERM/SIGINT to
the supervisor is passed on to every worker, which drain as one would alone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace

from gateway.config import Settings

log = logging.getLogger(__name__)


def run_workers(settings: Settings, count: int, run_one) -> int:
    """Fork ``count`` workers running ``run_one(settings)``; wait for all; worst exit code."""
    if "grpc" in sys.modules:
        raise RuntimeError("workers must be forked before grpc is imported")
    children: dict[int, int] = {}
    for index in range(count):
        metrics = settings.metrics_port
        if metrics > 0:
            metrics += index
        worker = replace(settings, reuse_port=True, metrics_port=metrics, worker_index=index)
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = run_one(worker)
            finally:
                os._exit(code)
        children[pid] = index

    def forward(signum, _frame):
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.error("worker %s exited with %s", index, code)
        worst = max(worst, abs(code))
    return worst
