"""Fault behaviour: disconnecting clients free their slots; load/unload cycles keep memory flat;
a hung model call takes only its instance out of service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from support import busy_inputs, raises, start_gateway, wait_for
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

        for _ in range(3):  # allocator arenas settle
            cycle()
        settled = rss_mb(gw.process.pid)
        for _ in range(12):
            cycle()
        grown = rss_mb(gw.process.pid) - settled
    # Each load maps a ~38 MB model; a leak would grow by that much per cycle (~450 MB here).
    assert grown < 60, f"RSS grew {grown:.0f} MB over 12 load/unload cycles"


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
