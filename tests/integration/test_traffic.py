"""Traffic splits operated live: a real gateway, two versions of a real sklearn model,
tritonclient for traffic and the `gateway traffic` CLI for the operator."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from support import ROOT, start_gateway, wait_for

from bench import models

X = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)


def build_repo(root, versions=(1, 2), failing_shadow=False):
    """Model `iris` with identical-signature versions (the same sklearn pipeline each)."""
    first = models.make_version(root, "iris", versions[0], models.build_iris_classifier)
    for v in versions[1:]:
        (root / "iris" / str(v)).mkdir(parents=True)
        shutil.copy(first, root / "iris" / str(v) / "model.onnx")
    models.write_config(root / "iris", """
        max_batch_size: 32
        version_policy { all { } }
        dynamic_batching { }
    """)
    if failing_shadow:
        models.make_version(root, "ff", 1, models.build_identity, "FP32")
        models.make_version(root, "ff", 2, models.build_failing_model, always=True)
        models.write_config(root / "ff", "max_batch_size: 0\nversion_policy { all { } }")
    return root


def cli(url, *args):
    """Run `gateway traffic ...` as an operator would; return (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "gateway", "traffic", *args, "--url", url],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr


def infer_input(x=X):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


async def versions_served(url, n, keys=None, model="iris", concurrency=32):
    """Send n requests (optionally with sticky keys); return the served version of each."""
    client = aioclient.InferenceServerClient(url)
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            headers = {"x-routing-key": keys[i]} if keys else None
            result = await client.infer(model, [infer_input()], headers=headers)
            return result.get_response().model_version

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    repo = build_repo(tmp_path_factory.mktemp("traffic"), failing_shadow=True)
    with start_gateway(repo, "--state-dir", str(repo / ".gateway")) as gw:
        yield gw


def test_observed_shares_match_the_split(gateway):
    code, out, err = cli(gateway.url, "set", "iris", "1=70", "2=30")
    assert code == 0, err
    assert "split:      1=70% 2=30%" in out
    served = Counter(asyncio.run(versions_served(gateway.url, 2000)))
    sd = (2000 * 0.3 * 0.7) ** 0.5
    assert abs(served["2"] - 600) < 5 * sd, served
    assert served["1"] + served["2"] == 2000


def test_sticky_keys_are_stable_and_move_minimally(gateway):
    keys = [f"user-{i}" for i in range(400)]
    assert cli(gateway.url, "set", "iris", "1=90", "2=10")[0] == 0
    before = asyncio.run(versions_served(gateway.url, len(keys), keys))
    assert before == asyncio.run(versions_served(gateway.url, len(keys), keys))
    assert cli(gateway.url, "set", "iris", "1=80", "2=20")[0] == 0
    after = asyncio.run(versions_served(gateway.url, len(keys), keys))
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert set(moved) <= {("1", "2")}  # nothing moves back from 2 to 1
    assert 10 < len(moved) < 80  # about the 10% that changed hands (40 of 400)


def test_explicit_version_wins(gateway):
    assert cli(gateway.url, "set", "iris", "1=100", "2=0")[0] == 0
    with grpcclient.InferenceServerClient(gateway.url) as client:
        result = client.infer("iris", [infer_input()], model_version="2")
        assert result.get_response().model_version == "2"
        result = client.infer("iris", [infer_input()])
        assert result.get_response().model_version == "1"


def test_a_refused_split_keeps_the_old_one(gateway):
    assert cli(gateway.url, "set", "iris", "1=60", "2=40")[0] == 0
    code, out, err = cli(gateway.url, "set", "iris", "1=60", "9=40")
    assert code == 1
    assert err.strip() == ("gateway traffic set: INVALID_ARGUMENT: model 'iris' version 9 is not "
                           "serving; serving versions: 1, 2")
    code, out, err = cli(gateway.url, "set", "iris", "1=60", "2=60")
    assert code == 1
    assert "INVALID_ARGUMENT: weights must sum to 100 (or to 1 as fractions); they sum to 120" in err
    code, out, err = cli(gateway.url, "set", "iris", "1=-10", "2=110")
    assert code == 1
    assert "INVALID_ARGUMENT: weight of version 1 must not be negative" in err
    code, out, _ = cli(gateway.url, "show", "iris")
    assert code == 0 and "split:      1=60% 2=40%" in out


def test_unknown_model_is_not_found(gateway):
    code, _, err = cli(gateway.url, "show", "nope")
    assert code == 1
    assert err.strip() == ("gateway traffic show: NOT_FOUND: Request for unknown model: 'nope' "
                           "is not found")


def test_live_changes_under_load_lose_no_request(gateway):
    async def scenario():
        load = asyncio.create_task(versions_served(gateway.url, 1500))
        for split in (("1=10", "2=90"), ("1=50", "2=50"), ("1=100", "2=0"), ("1=0", "2=100")):
            await asyncio.sleep(0.1)
            code, _, err = await asyncio.to_thread(cli, gateway.url, "set", "iris", *split)
            assert code == 0, err
        return await load  # raises if any request failed

    served = asyncio.run(scenario())
    assert len(served) == 1500 and set(served) <= {"1", "2"}


def test_shadow_never_affects_the_primary(gateway):
    code, out, err = cli(gateway.url, "shadow", "ff", "--to", "2", "--percent", "100")
    assert code == 0, err
    assert "shadow:     version 2 gets a copy of 100% of requests" in out
    code, _, err = cli(gateway.url, "set", "ff", "1=100")
    assert code == 0, err
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with grpcclient.InferenceServerClient(gateway.url) as client:
        for _ in range(50):
            inp = grpcclient.InferInput("INPUT0", [2, 4], "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("ff", [inp])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
            assert result.get_response().model_version == "1"

        def shadow_failures():
            stats = client.get_inference_statistics("ff", "2", as_json=True)["model_stats"][0]
            return int(stats["inference_stats"].get("fail", {}).get("count", 0))

        wait_for(lambda: shadow_failures() >= 40, what="shadow requests to fail")
    assert cli(gateway.url, "unshadow", "ff")[0] == 0


def test_history_records_who_what_and_when(gateway):
    assert cli(gateway.url, "set", "iris", "1=55", "2=45")[0] == 0
    code, out, _ = cli(gateway.url, "history", "iris")
    assert code == 0
    last = out.strip().splitlines()[-1]
    # One readable line: when, revision, model, action, who (the peer address, decoded), what.
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  rev \d+ +iris  set +by "
                        r"ipv4:127\.0\.0\.1:\d+: .* -> 1=55% 2=45%", last), last


def test_split_survives_restart_and_replicas_converge(tmp_path):
    repo = build_repo(tmp_path)
    state = ["--state-dir", str(tmp_path / "state")]
    with start_gateway(repo, *state) as first:
        assert cli(first.url, "set", "iris", "1=25", "2=75")[0] == 0
    # Restart: the split comes back from the state file.
    with start_gateway(repo, *state) as first, \
            start_gateway(repo, *state, env={"GATEWAY_STATE_POLL_INTERVAL": "0.2"}) as second:
        assert "split:      1=25% 2=75%" in cli(first.url, "show", "iris")[1]
        assert "split:      1=25% 2=75%" in cli(second.url, "show", "iris")[1]
        # A change on one replica reaches the other through the shared state file.
        assert cli(first.url, "set", "iris", "1=100")[0] == 0
        wait_for(lambda: "split:      1=100%" in cli(second.url, "show", "iris")[1],
                 timeout=15, what="the second replica to follow")
        assert set(asyncio.run(versions_served(second.url, 50))) == {"1"}
