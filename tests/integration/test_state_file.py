"""The embedded file store under a live gateway: a damaged ``state.json`` never reads as "no
state" (the splits in force stay, the gateway says why, changes are refused), and two gateway
processes changing splits at the same time lose no change."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from contextlib import ExitStack

import grpc
import pytest
from support import start_gateway, wait_for
from test_traffic import build_repo, cli

from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc

FAST = {"GATEWAY_STATE_POLL_INTERVAL": "0.2"}


def metrics(gateway) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics",
                                timeout=10) as r:
        return r.read().decode()


@pytest.mark.parametrize("damage", [b"null", b"[1, 2]", b"truncated"])
def test_a_damaged_state_file_keeps_the_splits_in_force(tmp_path, damage):
    repo = build_repo(tmp_path / "repo")
    state = tmp_path / "state"
    with start_gateway(repo, "--state-dir", str(state), env=FAST) as gw:
        assert cli(gw.url, "set", "iris", "1=95", "2=5")[0] == 0
        path = state / "state.json"
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2] if damage == b"truncated" else damage)
        wait_for(lambda: "gateway_state_store_up 0.0" in metrics(gw), timeout=15,
                 what="the store-down metric")
        wait_for(lambda: str(path) in gw.log(), timeout=5, what="a log line naming the file")
        code, out, _ = cli(gw.url, "show", "iris")
        assert code == 0 and "split:      1=95% 2=5%" in out
        assert "the state store is unreachable" in out
        code, _, err = cli(gw.url, "set", "iris", "1=100")
        assert code == 1 and "UNAVAILABLE:" in err and str(path) in err
        assert path.read_bytes() != good  # nothing was written over the damaged file
        path.write_bytes(good)  # the operator restores it
        wait_for(lambda: "gateway_state_store_up 1.0" in metrics(gw), timeout=15,
                 what="recovery")
        assert cli(gw.url, "set", "iris", "1=100")[0] == 0


def test_a_gateway_starting_on_a_damaged_state_file_starts_and_says_why(tmp_path):
    repo = build_repo(tmp_path / "repo")
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text("null")
    with start_gateway(repo, "--state-dir", str(state),
                       env={**FAST, "GATEWAY_STATE_START_WAIT": "1"}) as gw:
        assert "does not hold gateway state (a JSON object); found NoneType" in gw.log()
        code, _, err = cli(gw.url, "set", "iris", "1=100")
        assert code == 1 and "UNAVAILABLE:" in err


async def _set_many(url: str, count: int, offset: int) -> list[str]:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = apb_grpc.GatewayAdminStub(channel)

        async def one(i):
            weight = (offset + i) % 99 + 1
            try:
                await stub.SetTraffic(apb.SetTrafficRequest(model="iris", split=[
                    apb.VersionWeight(version="1", percent=weight),
                    apb.VersionWeight(version="2", percent=100 - weight)]), timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_two_processes_changing_splits_at_once_lose_no_change(tmp_path):
    repo = build_repo(tmp_path / "repo")
    state = tmp_path / "state"
    with ExitStack() as stack:
        a, b = (stack.enter_context(start_gateway(repo, "--state-dir", str(state), env=FAST))
                for _ in range(2))

        async def both():
            return await asyncio.gather(_set_many(a.url, 50, 0), _set_many(b.url, 50, 50))

        results = [code for batch in asyncio.run(both()) for code in batch]
        assert results.count("OK") == 100, results
        data = json.loads((state / "state.json").read_text())
        records = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
        assert data["revision"] == 100 == len(records)
        assert sorted(r["revision"] for r in records) == list(range(1, 101))
        # Both replicas converge on the last change.
        last = data["sections"]["traffic"]["iris"]["value"]["weights"]
        expected = " ".join(f"{v}={p:g}%" for v, p in sorted(last.items()))
        for gw in (a, b):
            wait_for(lambda gw=gw: f"split:      {expected}" in cli(gw.url, "show", "iris")[1],
                     timeout=15, what="convergence")
