"""Fault behaviour: disconnecting clients free their slots; load/unload cycles keep memory flat;
a hung model call takes only its instance out of service; in poll mode, a repository that
vanishes for a while or a version file copied over in place never stops a model serving."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from support import (
    TIMEOUT,
    busy_inputs,
    busy_output,
    index_rows,
    model_file,
    raises,
    reference,
    start_blocker,
    start_gateway,
    wait_for,
)
from tritonclient.utils import InferenceServerException

from bench import models


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_disconnects_frees_its_slot(tmp_path):
    models.make_version(tmp_path, "busy", 1, models.build_busy_model)
    models.write_config(tmp_path / "busy", "max_batch_size: 8\nparameters { key: "
                        "\"execution_timeout_ms\" value { string_value: \"0\" } }")
    with start_gateway(tmp_path, "--max-inflight-per-model", "2") as gw, \
            grpcclient.InferenceServerClient(gw.url) as client:
        # Two callers give up while the model is busy: their slots must come back.
        for _ in range(2):
            with pytest.raises(InferenceServerException) as info:
                client.infer("busy", busy_inputs(3000), client_timeout=0.3)
            assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        # Both slots free again: two more requests are admitted (and answered).
        for _ in range(2):
            result = client.infer("busy", busy_inputs(1), client_timeout=120)
            assert result.as_numpy("OUTPUT0").shape == (1, 4)


def test_memory_stays_flat_over_load_unload_cycles(tmp_path):
    models.make_version(tmp_path, "mlp", 1, models.build_mlp, models.HEAVY_MLP)
    models.write_config(tmp_path / "mlp", "max_batch_size: 4\ndynamic_batching { }")
    x = np.zeros((1, 512), np.float32)
    with start_gateway(tmp_path, "--control-mode", "explicit") as gw, \
            grpcclient.InferenceServerClient(gw.url) as client:
        def cycle():
            client.load_model("mlp")
            inp = grpcclient.InferInput("input", [1, 512], "FP32")
            inp.set_data_from_numpy(x)
            assert client.infer("mlp", [inp]).as_numpy("output").shape == (1, 10)
            client.unload_model("mlp")
            wait_for(lambda: not client.is_model_ready("mlp"), what="unload")

        # RSS after each cycle. Loads run on executor threads, and glibc keeps a few freed
        # arenas: RSS steps up by a model's size two or three times, then stays. A leak grows
        # by a model (~38 MB) every cycle, ~450 MB over the last 12 here. The lowest of three
        # readings in a row is compared, so a copy still mapped for a moment does not count.
        readings = []
        for _ in range(18):
            cycle()
            readings.append(rss_mb(gw.process.pid))
    print(f"RSS after each cycle (MB): {[round(r) for r in readings]}")
    grown = min(readings[-3:]) - min(readings[3:6])
    assert grown < 100, f"RSS grew {grown:.0f} MB over the last 12 cycles: {readings}"
    total = min(readings[-3:]) - readings[0]
    assert total < 4 * 38, f"RSS grew {total:.0f} MB over 18 cycles: {readings}"


def test_a_hung_model_call_takes_only_its_instance_out(tmp_path):
    models.make_version(tmp_path, "busy", 1, models.build_busy_model)
    models.write_config(tmp_path / "busy", """
        max_batch_size: 1
        dynamic_batching { }
        instance_group [ { kind: KIND_CPU, count: 2 } ]
        parameters { key: "execution_timeout_ms" value { string_value: "300" } }
    """)
    with start_gateway(tmp_path) as gw, grpcclient.InferenceServerClient(gw.url) as client:
        with raises("INTERNAL", "did not finish a batch within 0.3s",
                    "its instance is taken out of service"):
            client.infer("busy", busy_inputs(20000), client_timeout=120)
        # The other instance still serves.
        for _ in range(3):
            assert client.infer("busy", busy_inputs(1)).as_numpy("OUTPUT0").shape == (1, 4)
        wait_for(lambda: "is stuck in a model call and is out of service" in gw.log(),
                 what="the log line")


# ---- poll mode: the repository under the server's feet -----------------------------------------

SMALL = (8, 16, 4)


def small_inputs(x: np.ndarray):
    t = grpcclient.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return [t]


def answers_like(client, path, x: np.ndarray) -> bool:
    """Whether the served model answers ``x`` as the model file at ``path`` does."""
    got = client.infer("m", small_inputs(x), client_timeout=TIMEOUT).as_numpy("output")
    (expected,) = reference(path, {"input": x})
    return bool(np.allclose(got, expected, rtol=1e-5, atol=1e-6))


def poll_gateway(tmp_path):
    return start_gateway(tmp_path / "repo", "--control-mode", "poll", "--poll-interval", "0.2",
                         "--state-dir", str(tmp_path / "state"))


def test_a_repository_that_vanishes_keeps_its_models_serving(tmp_path):
    repo = tmp_path / "repo"
    models.make_version(repo, "m", 1, models.build_mlp, SMALL)
    models.write_config(repo / "m", "max_batch_size: 4")
    x = np.ones((1, SMALL[0]), np.float32)
    with poll_gateway(tmp_path) as gw, grpcclient.InferenceServerClient(gw.url) as client:
        reference_copy = tmp_path / "reference.onnx"
        reference_copy.write_bytes(model_file(repo, "m").read_bytes())
        repo.rename(tmp_path / "moved")  # a mv, or an unmount: the root is gone
        wait_for(lambda: "the model repository cannot be read" in gw.log(), what="the outage")
        for _ in range(5):  # polls go on; the model keeps serving
            assert answers_like(client, reference_copy, x)
        assert client.is_model_ready("m")
        with raises("UNAVAILABLE", "the model repository cannot be read (it does not exist: "
                    "moved or unmounted?); the loaded models keep serving"):
            client.get_model_repository_index()
        (tmp_path / "moved").rename(repo)
        wait_for(lambda: "the model repository can be read again" in gw.log(), what="recovery")
        assert index_rows(client)[("m", "1")] == ("READY", "")
        assert answers_like(client, reference_copy, x)
    assert gw.log().count("the model repository cannot be read") == 1, gw.log()  # once an outage
    assert "retiring" not in gw.log()


def test_an_empty_repository_unloads_only_once_confirmed(tmp_path):
    """An unmounted volume leaves an empty mount point: the models keep serving for a few
    polls; only a repository that stays empty unloads them."""
    repo = tmp_path / "repo"
    models.make_version(repo, "m", 1, models.build_mlp, SMALL)
    x = np.ones((1, SMALL[0]), np.float32)
    with poll_gateway(tmp_path) as gw, grpcclient.InferenceServerClient(gw.url) as client:
        repo.rename(tmp_path / "moved")
        repo.mkdir()
        wait_for(lambda: not client.is_model_ready("m"), what="the model to unload")
        log = gw.log()
        first = log.index("the model repository is empty (an unmounted volume?); 1 loaded "
                          "models keep serving, and unload if it is still empty at 2 more polls")
        second = log.index("unload if it is still empty at 1 more polls")
        assert first < second < log.index("model 'm' left the repository: unloading"), log
        with raises("UNAVAILABLE", "model 'm' is not available: unloaded"):
            client.infer("m", small_inputs(x), client_timeout=TIMEOUT)


def test_a_version_copied_over_in_place_keeps_its_old_copy_until_the_new_one_loads(tmp_path):
    repo = tmp_path / "repo"
    models.make_version(repo, "m", 1, models.build_mlp, SMALL, seed=1)
    models.make_version(repo, "m", 2, models.build_mlp, SMALL, seed=2)
    models.write_config(repo / "m", "max_batch_size: 4\nversion_policy { all { } }")
    old = tmp_path / "old-2.onnx"
    old.write_bytes(model_file(repo, "m", 2).read_bytes())
    new = models.build_mlp(tmp_path / "new-2.onnx", SMALL, seed=3)
    x = np.linspace(-1, 1, SMALL[0], dtype=np.float32).reshape(1, -1)
    with poll_gateway(tmp_path) as gw, grpcclient.InferenceServerClient(gw.url) as client:
        assert answers_like(client, old, x)
        complete = new.read_bytes()
        model_file(repo, "m", 2).write_bytes(complete[: len(complete) // 2])  # copy under way
        wait_for(lambda: index_rows(client)[("m", "2")][1], what="the failed reload")
        state, reason = index_rows(client)[("m", "2")]
        assert state == "READY", reason
        assert reason.startswith("reload failed, the previous copy serves: onnxruntime could "
                                 "not load the model"), reason
        assert answers_like(client, old, x)  # the working copy still answers
        assert client.is_model_ready("m", "2") and client.is_model_ready("m", "1")
        model_file(repo, "m", 2).write_bytes(complete)  # the copy completes
        wait_for(lambda: index_rows(client)[("m", "2")] == ("READY", ""), what="the new copy")
        assert answers_like(client, new, x)
    assert "model 'm' version 2: its previous copy keeps serving" in gw.log()


# ---- strict priority ---------------------------------------------------------------------------

def queue_depth(metrics_port: int, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'gateway_queue_depth{{model="{model}"'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_starved_low_priority_requests_never_lock_out_the_first_level(tmp_path):
    """Low-priority requests starved behind a busy instance may hold only their level's share
    of --max-inflight-per-model: the next low one is refused, a high one still gets in."""
    models.make_version(tmp_path, "busy", 1, models.build_busy_model)
    models.write_config(tmp_path / "busy", """
        max_batch_size: 1
        dynamic_batching { priority_levels: 2 default_priority_level: 2 }
    """)
    with start_gateway(tmp_path, "--max-inflight-per-model", "4") as gw, \
            grpcclient.InferenceServerClient(gw.url) as client:
        async with aioclient.InferenceServerClient(gw.url) as aio:
            blocker = await start_blocker(aio, client, "busy")  # running: not queued
            low = [asyncio.ensure_future(aio.infer("busy", busy_inputs(1, marker=float(i)),
                                                   priority=2, client_timeout=TIMEOUT))
                   for i in range(2)]  # level 2's share of 4 in flight: 2
            await asyncio.to_thread(wait_for, lambda: queue_depth(gw.metrics_port, "busy") == 2,
                                    what="two low-priority requests queued")
            with raises("RESOURCE_EXHAUSTED", "model 'busy' version 1: priority level 2 has 2 "
                        "requests waiting, its share of the model's in-flight limit"):
                await aio.infer("busy", busy_inputs(1), priority=2, client_timeout=TIMEOUT)
            high = await aio.infer("busy", busy_inputs(1, marker=7.0), priority=1,
                                   client_timeout=TIMEOUT)  # the 4th in flight: admitted
            np.testing.assert_array_equal(high.as_numpy("OUTPUT0"), busy_output(1, 7.0))
            await blocker
            for i, result in enumerate(await asyncio.gather(*low)):
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), busy_output(1, float(i)))
