"""Several gateway processes on one port (``gateway serve --workers N``).

Python serves a request on one core; more cores need more processes. The supervisor forks the
workers before any grpc object exists (grpc does not survive a fork), and each worker binds the
same port with SO_REUSEPORT, so the kernel spreads connections over them. Each worker loads its
own copy of the models and serves metrics on its own port (metrics port + worker index).
Traffic splits and rollouts stay consistent through the shared state file. SIGTERM/SIGINT to
the supervisor is passed on to every worker, which drain as one would alone; so is SIGHUP, which
re-reads --auth-tokens (or is logged and ignored) and never stops a worker or the supervisor.

SO_REUSEPORT would as gladly let a second fleet (or anyone of the same user) join the port and
take a share of its connections: the supervisor first checks that nothing listens there yet, and
refuses to start if something does.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from dataclasses import replace

from gateway.config import Settings

log = logging.getLogger(__name__)


def run_workers(settings: Settings, count: int, run_one) -> int:
    """Fork ``count`` workers running ``run_one(settings)``; wait for all; worst exit code."""
    if "grpc" in sys.modules:
        raise RuntimeError("workers must be forked before grpc is imported")
    taken = listening_on(settings.host, settings.grpc_port)
    if taken:
        print(f"gateway serve: {taken} is already in use by another process; --workers shares "
              "a port only among its own workers: stop the other server or choose another "
              "--grpc-port", file=sys.stderr)
        return 1
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


def listening_on(host: str, port: int) -> str | None:
    """"HOST:PORT" if some socket already listens where ``host``:``port`` would bind, else None.

    A probe binds without SO_REUSEPORT (with SO_REUSEADDR, so connections of an earlier server
    in TIME_WAIT do not count): the kernel refuses it only if a socket listens there, whichever
    options that one set. Addresses that cannot be probed are left for the server to report."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except OSError:
        return None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                shown = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
                return f"{shown}:{port}"
    return None
