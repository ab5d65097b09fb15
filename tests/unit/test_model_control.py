"""Model control across processes over the real file store: every process applies each
generation once, and a request waits for the live members only."""

from __future__ import annotations

import asyncio

from test_routing import FakeRepository

from gateway.control import ControlPlane
from gateway.control.filestore import FileStore
from gateway.control.models import DEAD_AFTER_S, MEMBERS
from gateway.routing import Router


class Repository(FakeRepository):
    """The router's fake plus the load and unload the control plane calls."""

    def __init__(self):
        super().__init__(m=["1"])
        self.calls = []

    async def load(self, name):
        self.calls.append(("load", name))
        self.set_serving(name, ["1"])
        return self.models[name]

    async def unload(self, name):
        self.calls.append(("unload", name))
        self.set_serving(name, [])


async def plane(directory) -> ControlPlane:
    control = ControlPlane(FileStore(directory, poll_interval=0.02), Router(Repository()))
    await control.refresh()
    control.models.adopt_current(control.snapshot)
    return control


async def test_a_request_through_one_process_is_applied_by_every_process(tmp_path):
    first, second = await plane(tmp_path), await plane(tmp_path)
    follower = asyncio.create_task(second.follow())
    try:
        await second.models.heartbeat()
        first.router.repository.calls.clear()
        done, live = await first.models.broadcast("n", True, "load")
        assert (done, live) == (2, 2)
        assert first.router.repository.calls == []  # it loaded before asking the others
        assert second.router.repository.calls == [("load", "n")]
        await first.models.broadcast("n", False, "unload")
        assert second.router.repository.calls == [("load", "n"), ("unload", "n")]
        history = [r["action"] for r in await first.history("n", 10)]
        assert history == ["load", "unload"]
    finally:
        follower.cancel()


async def test_a_silent_member_is_not_waited_for(tmp_path):
    first = await plane(tmp_path)
    stale = await first.store.now() - DEAD_AFTER_S - 1
    await first.store.put_record(MEMBERS, "gone:1:ab", {"replica": "gone:1:ab", "time": stale,
                                                        "applied": {}})
    assert await first.models.broadcast("n", True, "load") == (1, 1)


async def test_a_state_already_matched_at_start_is_not_applied_again(tmp_path):
    first = await plane(tmp_path)
    await first.models.request("m", True, "ops", "load")  # "m" serves in every fake
    later = await plane(tmp_path)
    await asyncio.sleep(0.05)
    assert later.router.repository.calls == []
    assert later.models.applied == {"m": 1}
