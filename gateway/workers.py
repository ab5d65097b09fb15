"""Several gateway processes on one port (``gateway serve --workers N``).

Python serves a request on one core; more cores need more processes. The supervisor forks the
workers before any grpc object exists (grpc does not survive a fork), and each worker binds the
same port with SO_REUSEPORT, so the kernel spreads connections over them. Each worker loads its
own copy of the models and serves metrics on its own port (metrics port + worker index).
Traffic splits and rollouts stay consistent through the shared state file. SIGTERM/SIGINT to
the supervisor is passed on to every worker, which drain as one would alone; so is SIGHUP, which
re-reads --auth-tokens (or is logged and ignored) and never stops a worker or the supervisor.
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

    def forward(signum, _frame):
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # Signals wait (blocked) until each side has its handlers: a SIGHUP or SIGTERM during the
    # forks neither kills a process with the default action nor runs the wrong handler.
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    try:
        for index in range(count):
            metrics = settings.metrics_port
            if metrics > 0:
                metrics += index
            worker = replace(settings, reuse_port=True, metrics_port=metrics, worker_index=index)
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() handles it
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
                    code = run_one(worker)
                finally:
                    os._exit(code)
            children[pid] = index
        for signum in forwarded:
            signal.signal(signum, forward)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
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
