"""A client process: replays pre-serialised ModelInfer requests over a generic unary call
(``--protocol http``: REST requests, ``bench.loadgen_http``).

Several of these run side by side (see ``bench.workers``) because a Python client spends about as
much CPU per request as a Python server; each has its own event loop and HTTP/2 connection.
Requests are bytes built once by the parent, responses stay bytes: the only per-response work is
reading ``model_version`` (a few bytes at the front of the message).

Closed loop: ``concurrency`` users, each sends, waits, sends again; latency is from send.
Open loop: a pacer thread sleeps to each scheduled send time (nanosleep, not the event loop's
millisecond timers) and hands the send to the loop; latency is from the *scheduled* time, so a
server that falls behind cannot slow the arrivals and hide its own delay (coordinated omission).
How late sends left the client is reported apart as the send lag.

Completions fall into fixed windows by completion time; each closed window goes to the parent.
"""

from __future__ import annotations

import array
import asyncio
import os
import signal
import sys
import threading
import time
from collections import deque

import grpc
import numpy as np  # here, not in the pacer thread: a first import there delays the first sends

from bench.plan import INFER_METHOD, ROUTING_KEY_HEADER, ClientOrder

CLOCK = time.monotonic  # CLOCK_MONOTONIC: one clock shared by every process on the machine
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                   ("grpc.enable_retries", 0)]
DRAIN_S = 5.0  # at most this long for in-flight requests after a step ends


def response_version(buf: bytes) -> bytes:
    """``model_version`` (field 2) of a serialised ModelInferResponse, without parsing the rest.

    Walks the top-level fields, skipping payloads by their length; a response has a handful of
    fields, so this costs a few byte reads whatever the tensor sizes.
    """
    i, n = 0, len(buf)
    while i < n:
        tag, i = _varint(buf, i)
        wire = tag & 7
        if wire == 2:
            size, i = _varint(buf, i)
            if tag >> 3 == 2:
                return buf[i:i + size]
            i += size
        elif wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:  # not a message we know how to walk: let protobuf decide
            from gateway.protocol.pb import grpc_service_pb2 as pb

            return pb.ModelInferResponse.FromString(buf).model_version.encode()
    return b""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


class Windows:
    """This process's completions, bucketed by completion time; each closed window is emitted.

    Window -1 is the warm-up and is dropped. The step ends by itself after ``last`` windows (time
    bound) or ``quota`` measured completions (count bound); ``done`` is set then.
    """

    __slots__ = (
        "boundary",
        "counted",
        "cpu",
        "done",
        "emit",
        "errors",
        "index",
        "lags",
        "last",
        "latencies",
        "quota",
        "sent",
        "start",
        "versions",
        "window",
    )

    def __init__(self, t_measure: float, window: float, emit, done: asyncio.Event,
                 last: int | None = None, quota: int | None = None):
        self.index, self.boundary, self.start, self.window = -1, t_measure, t_measure, window
        self.last, self.quota, self.counted = last, quota, 0
        self.emit, self.done = emit, done
        self._reset()
        self.cpu = time.process_time()

    def _reset(self) -> None:
        self.latencies, self.lags = array.array("d"), array.array("d")
        self.errors, self.versions, self.sent = {}, {}, 0

    def roll(self, now: float) -> None:
        """Close every window whose end has passed (an idle server still gets its windows)."""
        while now >= self.boundary and not self.done.is_set():
            self._close(self.boundary)
            self.index += 1
            self.start, self.boundary = self.boundary, self.boundary + self.window
            if self.last is not None and self.index >= self.last:
                self.done.set()

    def _close(self, end: float) -> None:
        cpu = time.process_time()
        if self.index >= 0:
            self.emit(("window", self.index, self.start, end, self.latencies.tobytes(),
                       self.lags.tobytes(), self.errors, self.versions, self.sent, cpu - self.cpu))
        self.cpu = cpu
        self._reset()

    def ok(self, latency: float, now: float, response: bytes) -> None:
        if now >= self.boundary:
            self.roll(now)
        if self.index >= 0 and not self.done.is_set():
            self.latencies.append(latency)
            version = response_version(response)
            self.versions[version] = self.versions.get(version, 0) + 1
            if self.quota is not None:
                self._count(now)

    def fail(self, code: str, now: float) -> None:
        if now >= self.boundary:
            self.roll(now)
        if self.index >= 0 and not self.done.is_set():
            self.errors[code] = self.errors.get(code, 0) + 1
            if self.quota is not None:
                self._count(now)

    def _count(self, now: float) -> None:
        self.counted += 1
        if self.counted >= self.quota:
            self._close(now)  # a partial last window that ends now
            self.done.set()


class Step:
    """One step of load from this process: connect, wait for go, run, drain, report."""

    def __init__(self, conn, order: ClientOrder, requests: list[bytes], backlog: deque):
        self.conn, self.order, self.requests, self.backlog = conn, order, requests, backlog
        auth = (("authorization", f"Bearer {order.token}"),) if order.token else ()
        self.metadata = [(*auth, (ROUTING_KEY_HEADER, key)) for key in order.routing_keys] \
            or [auth or None]
        self.tasks: set[asyncio.Task] = set()
        self.pending: deque[float] = deque()
        self.counter = order.offset  # open loop: position in the request pool and key list
        self.stopping = False

    async def connect(self) -> bool:
        """Open the connection and set ``self.call``; False (and an error sent) if it fails."""
        order = self.order
        if order.tls is not None:
            channel = grpc.aio.secure_channel(order.url, order.tls.credentials(),
                                              options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(order.url, options=CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(channel.channel_ready(), 10)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError):  # noqa: UP041 - not one before 3.11
            self.conn.send(("error", f"cannot connect to {order.url}"))
            await channel.close()
            return False
        self.channel = channel
        self.call = channel.unary_unary(INFER_METHOD, request_serializer=None,
                                        response_deserializer=None)
        return True

    async def disconnect(self) -> None:
        await self.channel.close()

    def make_windows(self, *args) -> Windows:
        return Windows(*args)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        order = self.order
        if not await self.connect():
            return
        self.go = loop.create_future()
        self.done = asyncio.Event()
        loop.add_reader(self.conn.fileno(), self._on_message)
        # The loop made the pipe non-blocking; windows are sent whole from the loop, so block.
        os.set_blocking(self.conn.fileno(), True)
        self.conn.send(("ready",))
        t_start = await self.go
        window, last = order.window_s, None
        if order.duration_s:
            last = max(1, round(order.duration_s / window))
        self.windows = self.make_windows(t_start + order.warmup_s, window, self.conn.send,
                                         self.done, last, order.quota)
        cpu0, wall0 = time.process_time(), CLOCK()
        await asyncio.sleep(max(0.0, t_start - CLOCK()))
        ticker = loop.create_task(self._tick())
        users: list[asyncio.Task] = []
        pacer = None
        if order.concurrency:
            users = [loop.create_task(self._user(order.offset + u, order.concurrency))
                     for u in range(order.concurrency)]
        elif order.rate:
            switch = sys.getswitchinterval()
            sys.setswitchinterval(0.0005)  # let the pacer thread take the GIL promptly
            pacer = threading.Thread(target=self._pace, args=(loop, t_start), daemon=True)
            pacer.start()
        await self.done.wait()
        self.stopping = True
        ticker.cancel()
        in_flight = [*users, *self.tasks]
        cancelled = 0
        if in_flight:
            _, late = await asyncio.wait(in_flight, timeout=min(DRAIN_S, order.timeout_s))
            for task in late:
                task.cancel()
            cancelled = len(late)
        loop.remove_reader(self.conn.fileno())
        os.set_blocking(self.conn.fileno(), True)
        await self.disconnect()
        if pacer is not None:
            pacer.join(1.0)
            sys.setswitchinterval(switch)
        self.conn.send(("done", {"cpu_s": time.process_time() - cpu0, "wall_s": CLOCK() - wall0,
                                 "cancelled": cancelled, "unsent": len(self.pending)}))

    def _on_message(self) -> None:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):  # the parent is gone: nobody to report to
            os._exit(1)
        if msg[0] == "go":
            if not self.go.done():
                self.go.set_result(msg[1])
        elif msg[0] == "stop":
            self.done.set()
        else:  # meant for after the step ('exit' from an interrupted run): keep it
            self.backlog.append(msg)
            self.done.set()

    async def _tick(self) -> None:
        """Close windows on time even when nothing completes."""
        windows = self.windows
        while True:
            await asyncio.sleep(max(0.0, windows.boundary - CLOCK()) + 0.001)
            windows.roll(CLOCK())

    async def _user(self, i: int, stride: int) -> None:
        call, requests, metadata, windows = self.call, self.requests, self.metadata, self.windows
        n_req, n_md, timeout, clock = len(requests), len(metadata), self.order.timeout_s, CLOCK
        while not self.stopping:
            request, md = requests[i % n_req], metadata[i % n_md]
            i += stride
            windows.sent += 1
            t0 = clock()
            try:
                response = await call(request, timeout=timeout, metadata=md)
            except grpc.aio.AioRpcError as exc:
                windows.fail(exc.code().name, clock())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a client-side failure is a figure too
                windows.fail(f"CLIENT_{type(exc).__name__}", clock())
            else:
                now = clock()
                windows.ok(now - t0, now, response)

    # ---- open loop -------------------------------------------------------------------------

    def _pace(self, loop: asyncio.AbstractEventLoop, t_start: float) -> None:
        """Thread: sleep to each scheduled time; hand the due times to the loop in one call."""
        order = self.order
        mean_gap = 1.0 / order.rate
        rng = np.random.default_rng(order.seed + order.offset)
        poisson = order.arrivals == "poisson"
        at = t_start + (order.phase_s if not poisson else rng.exponential(mean_gap))
        gaps: list[float] = []
        while not self.stopping:
            delay = at - CLOCK()
            if delay > 0:
                time.sleep(delay)
            due = []
            now = CLOCK()
            while at <= now:
                due.append(at)
                if poisson:
                    if not gaps:
                        gaps = rng.exponential(mean_gap, 1024).tolist()
                    at += gaps.pop()
                else:
                    at += mean_gap
            if self.stopping or loop.is_closed():
                return
            try:
                loop.call_soon_threadsafe(self._fire, due)
            except RuntimeError:  # the loop closed under us: the step is over
                return

    def _fire(self, due: list[float]) -> None:
        cap = self.order.max_inflight
        for scheduled in due:
            if self.stopping:
                return
            if len(self.tasks) < cap:
                self._send(scheduled)
            else:  # over the in-flight cap: send later, still timed from the schedule
                self.pending.append(scheduled)

    def _send(self, scheduled: float) -> None:
        task = asyncio.get_running_loop().create_task(self._one(scheduled))
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if self.pending and not self.stopping:
            self._send(self.pending.popleft())

    async def _one(self, scheduled: float) -> None:
        windows = self.windows
        i = self.counter
        self.counter += 1
        windows.sent += 1
        request = self.requests[i % len(self.requests)]
        md = self.metadata[i % len(self.metadata)]
        t_send = CLOCK()
        if windows.index >= 0:
            windows.lags.append(t_send - scheduled)
        try:
            response = await self.call(request, timeout=self.order.timeout_s, metadata=md)
        except grpc.aio.AioRpcError as exc:
            windows.fail(exc.code().name, CLOCK())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            windows.fail(f"CLIENT_{type(exc).__name__}", CLOCK())
        else:
            now = CLOCK()
            windows.ok(now - scheduled, now, response)


def main(conn) -> None:
    """Entry of a spawned client process: take request pools and step orders until 'exit'."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        run = asyncio.run
    pools: dict[str, list[bytes]] = {}
    backlog: deque = deque()  # messages a step read that are not its own
    while True:
        try:
            msg = backlog.popleft() if backlog else conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "exit":
            return
        if msg[0] == "pool":
            pools[msg[1]] = msg[2]
        elif msg[0] == "step":
            order = msg[1]
            if order.protocol == "http":
                from bench.loadgen_http import HttpStep as step
            else:
                step = Step
            try:
                run(step(conn, order, pools[order.requests_key], backlog).run())
            except Exception as exc:  # report it and stay alive for the next step
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            finally:
                os.set_blocking(conn.fileno(), True)  # the step's loop may have left it not
