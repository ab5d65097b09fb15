"""A client process's step over KServe V2 REST (``--protocol http``).

The same step as ``loadgen.Step`` (start together, windows, closed and open loop, pacing, drain),
with the connection and the two request loops swapped: requests are REST bodies built once by the
parent (``inputs.serialise_http``) and replayed over keep-alive HTTP/1.1 connections
(``bench.httpclient``). A response counts as a success on HTTP 200; any other status counts as
``HTTP_<status>``, a timeout as ``DEADLINE_EXCEEDED`` and a refused, reset or closed connection
as ``UNAVAILABLE`` (the names gRPC gives the same failures). ``model_version`` is read from the
response's JSON part with one regular-expression search.
"""

from __future__ import annotations

import asyncio

from bench.httpclient import CLIENTS, header_variants, response_version
from bench.loadgen import CLOCK, Step, Windows

CONNECT_S = 10.0


class VersionWindows(Windows):
    """Windows whose ``ok`` takes the answering version, read by the HTTP loops."""

    __slots__ = ()

    def ok(self, latency: float, now: float, version: bytes) -> None:
        if now >= self.boundary:
            self.roll(now)
        if self.index >= 0 and not self.done.is_set():
            self.latencies.append(latency)
            self.versions[version] = self.versions.get(version, 0) + 1
            if self.quota is not None:
                self._count(now)


def failure(exc: BaseException) -> str:
    """The error name a failed exchange counts under."""
    if isinstance(exc, TimeoutError):  # asyncio's too (the same class since Python 3.11)
        return "DEADLINE_EXCEEDED"
    if isinstance(exc, OSError) or any(  # refused, reset, closed early; aiohttp's alike
            c.__name__ == "ClientConnectionError" for c in type(exc).__mro__):
        return "UNAVAILABLE"
    return f"CLIENT_{type(exc).__name__}"


class HttpStep(Step):
    def __init__(self, conn, order, requests, backlog):
        super().__init__(conn, order, requests, backlog)
        self.headers = header_variants(order.token, order.routing_keys)

    async def connect(self) -> bool:
        order = self.order
        self.client = CLIENTS[order.http_client](order.url, self.requests, self.headers,
                                                 order.tls)
        try:
            # A closed loop's users each keep one connection: open them before the clock runs.
            await asyncio.wait_for(self.client.warm(max(1, order.concurrency)), CONNECT_S)
        except OSError as exc:  # refused, TLS, a timeout (TimeoutError is an OSError)
            await self.client.close()
            reason = str(exc) or type(exc).__name__
            self.conn.send(("error", f"cannot connect to {order.url}: {reason}"))
            return False
        return True

    async def disconnect(self) -> None:
        await self.client.close()

    def make_windows(self, *args) -> Windows:
        return VersionWindows(*args)

    async def _user(self, i: int, stride: int) -> None:
        request, windows = self.client.request, self.windows
        n_req, n_md, timeout, clock = len(self.requests), len(self.headers), self.order.timeout_s, \
            CLOCK
        while not self.stopping:
            windows.sent += 1
            t0 = clock()
            try:
                status, json_length, body = await request(i % n_req, i % n_md, timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                windows.fail(failure(exc), clock())
            else:
                now = clock()
                if status == 200:
                    windows.ok(now - t0, now, response_version(body, json_length))
                else:
                    windows.fail(f"HTTP_{status}", now)
            i += stride

    async def _one(self, scheduled: float) -> None:
        windows = self.windows
        i = self.counter
        self.counter += 1
        windows.sent += 1
        t_send = CLOCK()
        if windows.index >= 0:
            windows.lags.append(t_send - scheduled)
        try:
            status, json_length, body = await self.client.request(
                i % len(self.requests), i % len(self.headers), self.order.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            windows.fail(failure(exc), CLOCK())
        else:
            now = CLOCK()
            if status == 200:
                windows.ok(now - scheduled, now, response_version(body, json_length))
            else:
                windows.fail(f"HTTP_{status}", now)
