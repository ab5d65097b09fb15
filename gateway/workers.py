"""Several gateway processes on one port (``gateway serve --workers N``).

Python serves a request on one core; more cores need more processes. The supervisor forks the
workers before any grpc object exists (grpc does not survive a fork), and each worker binds the
same port with SO_REUSEPORT, so the kernel spreads connections over them. Each worker loads its
own copy of the models; one metrics endpoint (gateway/monitoring/fleet.py, its own process)
serves every worker's figures added up. Traffic splits and rollouts stay consistent through
the state store. A worker that crashes is forked again after a backoff. SIGTERM/SIGINT to the
supervisor is passed on to every worker, which drain as one would alone, and the supervisor
exits when they have; SIGHUP is passed on too: it re-reads --auth-tokens (or is logged and
ignored) and never stops a worker or the supervisor.

SO_REUSEPORT would as gladly let a second fleet (or anyone of the same user) join the port and
take a share of its connections: the supervisor first checks that nothing listens there yet, and
refuses to start if something does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from gateway.config import Settings

log = logging.getLogger(__name__)


RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # delay before the n-th restart in a row
STABLE_S = 60.0  # a worker that ran this long before crashing starts a new series of restarts
GIVE_UP_AFTER = 5  # crashes in a row, each within STABLE_S of its start: stop the fleet


def run_workers(settings: Settings, count: int, run_one) -> int:
    """Fork ``count`` workers running ``run_one(settings)`` and supervise them until they
    exit; the worst exit code. A worker that crashes is forked again (with backoff); one that
    keeps crashing right after its start stops the fleet, saying why."""
    if "grpc" in sys.modules:
        raise RuntimeError("workers must be forked before grpc is imported")
    taken = listening_on(settings.host, settings.grpc_port)
    if taken:
        print(f"gateway serve: {taken} is already in use by another process; --workers shares "
              "a port only among its own workers: stop the other server or choose another "
              "--grpc-port", file=sys.stderr)
        return 1
    rundir = Path(tempfile.mkdtemp(prefix="gateway-workers-"))
    try:
        return _Supervisor(settings, count, run_one, rundir).run()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


class _Supervisor:
    # Signals wait (blocked) until each side has its handlers: a SIGHUP or SIGTERM during a
    # fork neither kills a process with the default action nor runs the wrong handler.
    FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, settings: Settings, count: int, run_one, rundir: Path):
        self.settings, self.count, self.run_one, self.rundir = settings, count, run_one, rundir
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (index, started monotonic)
        self.aggregator = 0
        self.stopping = False
        self.restarts = 0
        self.crashes: dict[int, int] = {}  # index -> crashes in a row

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.FORWARDED)
        try:
            public_port = self._start_aggregator()
            if public_port is None:
                return 1
            self.worker_settings = replace(
                self.settings, reuse_port=True, metrics_port=public_port,
                metrics_rundir=self.rundir if public_port >= 0 else None)
            for index in range(self.count):
                self._fork_worker(index)
            for signum in self.FORWARDED:
                signal.signal(signum, self._forward)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.FORWARDED)
        return self._supervise()

    def _child(self, target) -> int:
        """Fork; the child resets signals and runs ``target()`` (its exit code)."""
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() handles it
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.FORWARDED)
            code = target()
        finally:
            os._exit(code)

    def _start_aggregator(self) -> int | None:
        """The one metrics endpoint, in its own process; its bound port (-1: metrics off),
        or None when it could not bind (the reason is printed)."""
        s = self.settings
        if s.metrics_port < 0:
            return -1
        read_end, write_end = os.pipe()

        def aggregate() -> int:
            os.close(read_end)
            from gateway.monitoring.fleet import serve_fleet_metrics

            try:
                _, port = serve_fleet_metrics(s.host, s.metrics_port, self.rundir, self.count)
            except RuntimeError as exc:
                os.write(write_end, f"error {exc}\n".encode())
                return 1
            os.write(write_end, f"{port}\n".encode())
            os.close(write_end)
            while True:  # serves from its thread until the supervisor's SIGTERM
                time.sleep(3600)

        self.aggregator = self._child(aggregate)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            answer = pipe.readline().strip()
        if not answer.isdigit():
            print(f"gateway serve: {answer.removeprefix('error ') or 'metrics endpoint failed'}",
                  file=sys.stderr)
            os.waitpid(self.aggregator, 0)
            self.aggregator = 0
            return None
        return int(answer)

    def _fork_worker(self, index: int) -> None:
        worker = replace(self.worker_settings, worker_index=index)
        pid = self._child(lambda: self.run_one(worker))
        self.workers[pid] = (index, time.monotonic())

    def _forward(self, signum, _frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _supervise(self) -> int:
        worst = 0
        while self.workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid == self.aggregator:
                log.error("the metrics endpoint stopped (%s)", os.waitstatus_to_exitcode(status))
                self.aggregator = 0
                continue
            if pid not in self.workers:
                continue
            index, started = self.workers.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code != 0:
                    log.error("worker %d exited with %s while stopping", index, code)
                worst = max(worst, abs(code))
                continue
            crashes = 1 if time.monotonic() - started > STABLE_S else \
                self.crashes.get(index, 0) + 1
            self.crashes[index] = crashes
            if crashes > GIVE_UP_AFTER:
                log.error("worker %d exited with %s %d times in a row right after starting; "
                          "stopping every worker", index, code, GIVE_UP_AFTER)
                worst = max(worst, abs(code) or 1)
                self._forward(signal.SIGTERM, None)
                continue
            delay = RESTART_BACKOFF_S[min(crashes, len(RESTART_BACKOFF_S)) - 1]
            log.error("worker %d exited with %s; starting it again in %gs", index, code, delay)
            time.sleep(delay)  # a SIGTERM meanwhile sets stopping: then it stays down
            if self.stopping:
                continue
            self.restarts += 1
            (self.rundir / "supervisor.json").write_text(json.dumps({"restarts":
                                                                     self.restarts}))
            signal.pthread_sigmask(signal.SIG_BLOCK, self.FORWARDED)
            try:
                self._fork_worker(index)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, self.FORWARDED)
        if self.aggregator:
            try:
                os.kill(self.aggregator, signal.SIGTERM)
                os.waitpid(self.aggregator, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
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
