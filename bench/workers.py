"""The client processes, seen from the parent: spawn once per run, hand out step orders, listen.

Spawned (not forked) because the parent holds grpc channels of its own (metadata, statistics),
and grpc's state does not survive a fork. Each process lives for the whole run, so every step
after the first starts at once.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait

from bench import loadgen
from bench.plan import ClientOrder


class BenchError(RuntimeError):
    """The run cannot go on (a client could not connect, a process died)."""


class ClientPool:
    def __init__(self, processes: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for i in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=loadgen.main, args=(child,), daemon=True,
                               name=f"bench-client-{i}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._pools: set[str] = set()

    @property
    def size(self) -> int:
        return len(self.conns)

    def send_pool(self, key: str, requests: list[bytes]) -> None:
        """Ship a request pool to every process once; steps then refer to it by key."""
        if key not in self._pools:
            for conn in self.conns:
                conn.send(("pool", key, requests))
            self._pools.add(key)

    def start(self, orders: list[ClientOrder], connect_timeout: float = 30.0) -> float:
        """Send the orders (one per process, in order), wait until all are connected, then start
        them together a moment from now. Returns the start time (``time.monotonic``)."""
        for conn, order in zip(self.conns, orders):
            conn.send(("step", order))
        waiting = set(range(len(orders)))
        deadline = time.monotonic() + connect_timeout
        while waiting:
            for i, msg in self.receive(range(len(orders)), deadline - time.monotonic()):
                if msg[0] == "ready":
                    waiting.discard(i)
                elif msg[0] == "error":
                    self._abort(len(orders), finished={i})
                    raise BenchError(msg[1])
            if time.monotonic() > deadline:
                self._abort(len(orders), finished=set())
                raise BenchError("client processes did not connect in time")
        t_start = time.monotonic() + 0.05
        for conn in self.conns[:len(orders)]:
            conn.send(("go", t_start))
        return t_start

    def receive(self, indexes, timeout: float):
        """Messages that arrive from the given processes within ``timeout`` seconds."""
        conns = {self.conns[i]: i for i in indexes}
        for conn in wait(list(conns), max(0.0, timeout)):
            try:
                yield conns[conn], conn.recv()
            except (EOFError, OSError):
                proc = self.procs[conns[conn]]
                proc.join(1)
                raise BenchError(f"client process {conns[conn]} died (exit code "
                                 f"{proc.exitcode})") from None

    def stop(self, count: int) -> None:
        for conn in self.conns[:count]:
            conn.send(("stop",))

    def _abort(self, count: int, finished: set[int]) -> None:
        """Stop a step that failed to start; drain its messages so the next step starts clean.

        A process that is connected waits for 'go': it gets go then stop, and ends at once.
        """
        for conn in self.conns[:count]:
            conn.send(("go", time.monotonic()))
        self.stop(count)
        pending = set(range(count)) - finished
        deadline = time.monotonic() + loadgen.DRAIN_S + 5
        while pending and time.monotonic() < deadline:
            for i, msg in self.receive(list(pending), 0.5):
                if msg[0] in ("done", "error"):
                    pending.discard(i)

    def close(self) -> None:
        """End every process; one caught mid-step (an interrupted run) stops its step first."""
        for conn in self.conns:
            try:
                conn.send(("go", time.monotonic()))
                conn.send(("stop",))
                conn.send(("exit",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
