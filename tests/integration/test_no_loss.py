"""Nothing accepted is lost: SIGTERM in the middle of steady load.

Real ``gateway serve`` process, real signal, real clients (``tritonclient.grpc.aio``). Every call
is counted with its final status: a call sent before the signal is either answered or refused
with UNAVAILABLE (clients retry that), never CANCELLED or left hanging; calls sent after the
signal are refused with UNAVAILABLE (a few reaching gRPC as it stops may end CANCELLED).
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from support import TIMEOUT, start_gateway, wait_for
from tritonclient.utils import InferenceServerException

from bench import models

CLIENTS = 6  # connections
PER_CLIENT = 12  # calls in flight on each connection, each loop sending the next at once


@pytest.fixture(scope="module")
def no_loss_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("no_loss_repo")
    # A small model that runs on the event loop and one that runs on its instance thread: the
    # server is busy (many calls queued in gRPC) when the signal comes.
    models.make_version(repo, "mlp", 1, models.build_mlp)
    models.write_config(repo / "mlp", "max_batch_size: 8\ndynamic_batching { }")
    models.make_version(repo, "heavy", 1, models.build_mlp, (256, 512, 512, 10))
    models.write_config(repo / "heavy", """
        max_batch_size: 8
        dynamic_batching { }
        parameters { key: "execution" value { string_value: "thread" } }
    """)
    return repo


def inputs(model: str, value: float):
    width = 32 if model == "mlp" else 256
    x = grpcclient.InferInput("input", [1, width], "FP32")
    x.set_data_from_numpy(np.full((1, width), value, np.float32))
    return [x]


class Tally:
    """Every call's outcome, split by whether it was sent before the signal."""

    def __init__(self):
        self.signalled = False
        self.before: Counter = Counter()
        self.after: Counter = Counter()
        self.messages: dict[str, set[str]] = {}

    def record(self, sent_before: bool, code: str, message: str = "") -> None:
        (self.before if sent_before else self.after)[code] += 1
        if code != "OK":
            self.messages.setdefault(code, set()).add(message[:200])


async def caller(url: str, model: str, tally: Tally, seen_ok: asyncio.Event) -> None:
    async with aioclient.InferenceServerClient(url) as client:
        async def loop(index: int) -> None:
            while True:
                sent_before = not tally.signalled
                try:
                    await client.infer(model, inputs(model, float(index)),
                                       client_timeout=TIMEOUT)
                except InferenceServerException as exc:
                    code = (exc.status() or "").replace("StatusCode.", "")
                    tally.record(sent_before, code, exc.message() or "")
                    if not sent_before or code != "UNAVAILABLE":
                        return  # refused after the signal (or lost): this loop is done
                    continue
                tally.record(sent_before, "OK")
                seen_ok.set()

        await asyncio.gather(*(loop(i) for i in range(PER_CLIENT)))


@pytest.mark.parametrize("model", ["mlp", "heavy"])
async def test_sigterm_under_load_answers_every_accepted_call(no_loss_repo, model):
    with start_gateway(no_loss_repo, "--drain-seconds", "20") as gw:
        tally = Tally()
        seen_ok = asyncio.Event()
        callers = [asyncio.create_task(caller(gw.url, model, tally, seen_ok))
                   for _ in range(CLIENTS)]
        await asyncio.wait_for(seen_ok.wait(), TIMEOUT)
        # Let the load build up: the server has calls queued everywhere when the signal comes.
        target = sum(tally.before.values()) + 400
        await asyncio.to_thread(wait_for, lambda: sum(tally.before.values()) >= target,
                                what="load to build up")
        tally.signalled = True
        gw.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*callers), TIMEOUT)
        code = await asyncio.to_thread(gw.process.wait, TIMEOUT)
    assert code == 0, gw.log()
    detail = f"before: {dict(tally.before)} after: {dict(tally.after)} {tally.messages}"
    assert tally.before["OK"] >= 400, detail
    # Before the signal: answered, or refused with UNAVAILABLE (retryable); nothing else.
    assert set(tally.before) <= {"OK", "UNAVAILABLE"}, detail
    # After the signal: refused with UNAVAILABLE (the drain, or no server any more).
    # Sent after the signal: refused with UNAVAILABLE, or answered; a few that reach gRPC after
    # its last barrier, while it stops, end CANCELLED (not accepted: never lost work).
    assert set(tally.after) <= {"OK", "UNAVAILABLE", "CANCELLED"}, detail
    assert tally.after["CANCELLED"] <= tally.after["UNAVAILABLE"], detail
    assert tally.after["UNAVAILABLE"] > 0, detail
    for message in tally.messages.get("UNAVAILABLE", ()):
        assert ("the server is shutting down" in message or "connect" in message.lower()
                or "Socket closed" in message), detail
