"""Several replicas, one fleet: three gateway processes on one machine share one model repository
and one state directory in poll mode, as the replicas of deploy/k8s share one volume. A version
published into the repository (built elsewhere, copied next to it, renamed in: atomic) comes up
on every replica; a split set through any one replica holds on all of them, sticky keys land on
the same version whichever replica answers; a version retired from the repository leaves them
all. Clients are tritonclient and the `gateway traffic` CLI, as an operator would use them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from support import ROOT, TIMEOUT, reference, start_gateway, wait_for

from bench import models

MODEL = "fleet_mlp"
LAYERS = (8, 16, 4)
REPLICAS = 3
CONVERGE = 30.0  # seconds; poll every 0.5 s and state checks every 0.2 s converge in ~1 s
X = np.random.default_rng(7).standard_normal((3, LAYERS[0])).astype(np.float32)
KEYS = [f"user-{i}" for i in range(60)]


def build(path: Path, version: int) -> Path:
    """A training job's output: each version a different MLP (seed = version)."""
    return models.build_mlp(path, LAYERS, seed=version)


def publish(repo: Path, version: int, artifacts: Path) -> Path:
    """Copy a built version directory next to the repository, then rename it in: the pollers
    see either nothing or the whole version, never a half-copied file."""
    built = artifacts / f"{MODEL}-{version}"
    build(built / "model.onnx", version)
    staging = repo / f".incoming-{MODEL}-{version}-{os.getpid()}"  # same filesystem
    shutil.copytree(built, staging)
    target = repo / MODEL / str(version)
    os.rename(staging, target)
    return target / "model.onnx"


def retire(repo: Path, version: int, attic: Path) -> None:
    """Take a version out of the repository in one rename."""
    os.rename(repo / MODEL / str(version), attic / f"{MODEL}-{version}")


def traffic(url: str, *args: str) -> str:
    """`gateway traffic ...` against one replica; its stdout (the command must succeed)."""
    done = subprocess.run([sys.executable, "-m", "gateway", "traffic", *args, "--url", url],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def field(show: str, name: str) -> str:
    """One line of `traffic show`, e.g. field(out, "split") -> "1=30% 2=70%"."""
    for line in show.splitlines():
        if line.strip().startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name!r} in {show!r}")


def infer_input() -> grpcclient.InferInput:
    inp = grpcclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    return inp


def serving_versions(client) -> list[str]:
    return sorted(client.get_model_metadata(MODEL).versions, key=int)


def versions_by_key(client) -> dict[str, str]:
    """The version that answers each sticky key on one replica."""
    return {key: client.infer(MODEL, [infer_input()], headers={"x-routing-key": key},
                              client_timeout=TIMEOUT).get_response().model_version
            for key in KEYS}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    repo, state, artifacts, attic = (root / n for n in ("repo", "state", "artifacts", "attic"))
    for d in (repo, artifacts, attic):
        d.mkdir()
    publish_dir = repo / MODEL
    publish_dir.mkdir()
    models.write_config(publish_dir, """
        max_batch_size: 8
        version_policy { all { } }
        dynamic_batching { }
    """)
    files = {1: publish(repo, 1, artifacts)}
    args = ["--control-mode", "poll", "--poll-interval", "0.5", "--state-dir", str(state)]
    with ExitStack() as stack:
        gateways = [stack.enter_context(start_gateway(
            repo, *args, env={"GATEWAY_STATE_POLL_INTERVAL": "0.2"})) for _ in range(REPLICAS)]
        clients = [stack.enter_context(grpcclient.InferenceServerClient(gw.url))
                   for gw in gateways]
        yield {"repo": repo, "artifacts": artifacts, "attic": attic, "files": files,
               "gateways": gateways, "clients": clients}
        stack.close()  # stop every replica (SIGTERM), then check each drained cleanly
        for gw in gateways:
            assert gw.process.returncode == 0, gw.log()


def converge(fleet, predicate, what: str):
    """Wait until ``predicate(replica index)`` holds on every replica."""
    for i in range(REPLICAS):
        wait_for(lambda i=i: predicate(i), timeout=CONVERGE, interval=0.1,
                 what=f"replica {i}: {what}")


def check_answers(fleet, version: int) -> None:
    """Every replica answers an explicit ``version`` exactly as the published file does."""
    expected = reference(fleet["files"][version], {"input": X})[0]
    for client in fleet["clients"]:
        result = client.infer(MODEL, [infer_input()], model_version=str(version),
                              client_timeout=TIMEOUT)
        assert result.get_response().model_version == str(version)
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)


def test_replicas_start_on_the_same_versions(fleet):
    assert len({gw.port for gw in fleet["gateways"]}) == REPLICAS
    for client in fleet["clients"]:
        assert serving_versions(client) == ["1"]
    check_answers(fleet, 1)


def test_a_published_version_comes_up_on_every_replica(fleet):
    fleet["files"][2] = publish(fleet["repo"], 2, fleet["artifacts"])
    converge(fleet, lambda i: serving_versions(fleet["clients"][i]) == ["1", "2"],
             "versions 1 and 2 serving")
    for client in fleet["clients"]:
        assert client.is_model_ready(MODEL, "2")
    check_answers(fleet, 1)
    check_answers(fleet, 2)
    # No split yet: the newest version takes the requests that name none, everywhere.
    for client in fleet["clients"]:
        assert set(versions_by_key(client).values()) == {"2"}


def test_a_split_set_on_one_replica_holds_on_all(fleet):
    gateways, clients = fleet["gateways"], fleet["clients"]
    out = traffic(gateways[0].url, "set", MODEL, "1=30", "2=70")
    assert field(out, "split") == "1=30% 2=70%"
    converge(fleet, lambda i: field(traffic(gateways[i].url, "show", MODEL), "split")
             == "1=30% 2=70%", "the split 1=30 2=70")
    for gw in gateways:
        assert field(traffic(gw.url, "show", MODEL), "effective") == "1=30% 2=70%"
    # A sticky key lands on the same version whichever replica answers.
    answers = [versions_by_key(client) for client in clients]
    assert answers[0] == answers[1] == answers[2]
    shares = list(answers[0].values())
    assert set(shares) == {"1", "2"}, "60 keys over a 30/70 split reach both versions"


def test_a_new_version_takes_no_traffic_until_a_split_names_it(fleet):
    gateways, clients = fleet["gateways"], fleet["clients"]
    fleet["files"][3] = publish(fleet["repo"], 3, fleet["artifacts"])
    converge(fleet, lambda i: serving_versions(clients[i]) == ["1", "2", "3"],
             "versions 1, 2 and 3 serving")
    check_answers(fleet, 3)
    for gw, client in zip(gateways, clients):
        assert field(traffic(gw.url, "show", MODEL), "split") == "1=30% 2=70%"
        assert set(versions_by_key(client).values()) <= {"1", "2"}
    # Promote through another replica: the last one.
    traffic(gateways[-1].url, "set", MODEL, "3=100")
    converge(fleet, lambda i: field(traffic(gateways[i].url, "show", MODEL), "split")
             == "3=100%", "the split 3=100")
    for client in clients:
        assert set(versions_by_key(client).values()) == {"3"}
    # The audit log is shared as well: each replica lists both changes, whichever replica
    # made them.
    for gw in gateways:
        history = traffic(gw.url, "history", MODEL)
        assert "-> 1=30% 2=70%" in history and "1=30% 2=70% -> 3=100%" in history, history


def test_a_retired_version_leaves_every_replica(fleet):
    clients = fleet["clients"]
    retire(fleet["repo"], 1, fleet["attic"])
    converge(fleet, lambda i: serving_versions(clients[i]) == ["2", "3"],
             "version 1 retired")
    for client in clients:
        assert not client.is_model_ready(MODEL, "1")
        assert set(versions_by_key(client).values()) == {"3"}
    check_answers(fleet, 2)
