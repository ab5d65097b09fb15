"""Process lifecycle: SIGTERM drains in-flight requests (they succeed), health turns NOT_SERVING,
new requests are refused with UNAVAILABLE, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    BUSY_ITERATIONS,
    TIMEOUT,
    busy_inputs,
    check_error,
    raises,
    start_gateway,
    wait_for,
)
from tritonclient.utils import InferenceServerException

from bench import models

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def lifecycle_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("lifecycle_repo")
    # No dynamic batching: requests run one after another, so several stay in flight a while.
    models.make_version(repo, "busy", 1, models.build_busy_model)
    models.write_config(repo / "busy", "max_batch_size: 8")
    models.make_version(repo, "mlp", 1, models.build_mlp)
    return repo


def mlp_inputs():
    x = grpcclient.InferInput("input", [1, 32], "FP32")
    x.set_data_from_numpy(np.ones((1, 32), np.float32))
    return [x]


def health(url: str, service: str = ""):
    with grpc.insecure_channel(url) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


async def _in_flight(client, count: int, iterations: int) -> list[asyncio.Future]:
    """Start ``count`` long requests; return once the first has finished, so that the server
    surely holds the others (one running, the rest queued behind it)."""
    calls = [asyncio.ensure_future(client.infer("busy", busy_inputs(iterations, marker=float(i)),
                                                request_id=str(i), client_timeout=TIMEOUT))
             for i in range(count)]
    done, pending = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
    for call in done:
        call.result()  # raises if the first one failed
    assert len(pending) >= count - 1, "requests finished before the test could stop the server"
    return calls


async def test_sigterm_drains_in_flight_requests(lifecycle_repo):
    with start_gateway(lifecycle_repo) as gw:
        assert health(gw.url) == SERVING and health(gw.url, "busy") == SERVING
        async with aioclient.InferenceServerClient(gw.url) as client:
            calls = await _in_flight(client, 4, BUSY_ITERATIONS // 2)
            gw.process.send_signal(signal.SIGTERM)

            # Draining: health says NOT_SERVING (overall and per model), the server is live but
            # not ready, and new requests are refused.
            await asyncio.to_thread(wait_for, lambda: health(gw.url) == NOT_SERVING,
                                    what="health to turn NOT_SERVING")
            assert health(gw.url, "busy") == NOT_SERVING
            assert await client.is_server_live()
            assert not await client.is_server_ready()
            assert not await client.is_model_ready("busy")
            with raises("UNAVAILABLE", "the server is shutting down"):
                await client.infer("mlp", mlp_inputs(), client_timeout=TIMEOUT)

            # Every request that was in flight completes, with its own answer.
            results = await asyncio.gather(*calls)
        for i, result in enumerate(results):
            assert result.get_response().id == str(i)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                          np.full((1, 4), float(i), np.float32))
        assert await asyncio.to_thread(gw.process.wait, TIMEOUT) == 0, gw.log()
    assert "shutting down" in gw.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_server_stops_cleanly(lifecycle_repo, sig):
    with start_gateway(lifecycle_repo) as gw:
        with grpcclient.InferenceServerClient(gw.url) as client:
            assert client.infer("mlp", mlp_inputs(), client_timeout=TIMEOUT).as_numpy(
                "output").shape == (1, 4)
        gw.process.send_signal(sig)
        assert gw.process.wait(TIMEOUT) == 0, gw.log()


async def test_drain_grace_exceeded_still_exits_zero(lifecycle_repo):
    """With a short --drain-seconds a request longer than the grace does not hold the process:
    it is answered UNAVAILABLE (retryable; an error, not a hang) and the process exits 0."""
    with start_gateway(lifecycle_repo, "--drain-seconds", "0.1") as gw:
        async with aioclient.InferenceServerClient(gw.url) as client:
            calls = await _in_flight(client, 3, BUSY_ITERATIONS // 2)
            gw.process.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert await asyncio.to_thread(gw.process.wait, TIMEOUT) == 0, gw.log()
    assert "still running" in gw.log()
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert failed, "requests beyond the grace period should have been cut off"
    for exc in failed:
        assert isinstance(exc, InferenceServerException), exc
        check_error(exc, "UNAVAILABLE", "the server is shutting down and the request did not "
                    "finish within its drain period")
