"""The control plane of one replica: its view of the operator state, and what keeps it current.

The view is the last snapshot read from the store; the router's policies and the rollouts the
replica knows come from it and from nothing else. A follower task reads the whole state again
on every change notification (and every few seconds anyway), so every replica converges on the
store's latest revision. If the store cannot be read, the replica keeps serving with the last
snapshot, says so once in its log and in ``gateway_state_store_up``, and catches up as soon as
a read succeeds; operator changes fail with UNAVAILABLE meanwhile (their commit cannot land).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from gateway.control.figures import WindowCounter
from gateway.control.models import ModelControl
from gateway.control.rollouts import RolloutController
from gateway.control.store import (
    Change,
    Conflict,
    Snapshot,
    Store,
    StoreUnavailable,
    transact,
)
from gateway.control.traffic import TrafficControl
from gateway.routing import Router

log = logging.getLogger(__name__)
START_WAIT_S = 10.0  # how long start() retries the first read before serving without it


class ControlPlane:
    def __init__(self, store: Store, router: Router, lease_s: float | None = None):
        self.store = store
        self.router = router
        # Unique per process lifetime: a restarted process never mistakes itself for the owner.
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.snapshot = Snapshot()
        self.store_up = False
        self.counter = WindowCounter()  # the data plane's observer feeds it
        self.traffic = TrafficControl(self)
        self.rollouts = (RolloutController(self) if lease_s is None
                         else RolloutController(self, lease_s))
        self.models = ModelControl(self, router.repository)
        self._tasks: list[asyncio.Task] = []

    async def start(self, judge_interval: float = 1.0, wait_s: float = START_WAIT_S) -> None:
        """Read the state (retrying up to ``wait_s``), then follow it and run the judge every
        ``judge_interval`` seconds."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                await self.refresh()
                break
            except StoreUnavailable as exc:
                if asyncio.get_running_loop().time() >= deadline:
                    log.error("%s; serving without traffic policies until it can be read",
                              exc.message)
                    break
                await asyncio.sleep(0.5)
        self._tasks = [asyncio.create_task(self.follow(), name="state-follow"),
                       asyncio.create_task(self.rollouts.run(judge_interval), name="rollouts"),
                       asyncio.create_task(self.models.run(), name="membership")]

    async def refresh(self) -> Snapshot:
        """Read the whole state and serve it."""
        try:
            snapshot = await self.store.read()
        except StoreUnavailable as exc:
            self._mark(False, exc.message)
            raise
        self._mark(True, "")
        if snapshot.revision == 0 and self.snapshot.revision > 0:
            snapshot = await self._restore()
        self.install(snapshot)
        return snapshot

    async def _restore(self) -> Snapshot:
        """The store came back empty (a Redis restarted without its append-only file, a
        state directory wiped): put back the last state this replica served rather than drop
        every split and rollout. Creation is conditional, so one replica restores it."""
        lost = self.snapshot
        changes = [Change(section, key, entry.value, 0)
                   for section, entries in lost.sections.items() for key, entry in entries.items()]
        log.error("the operator state store %s came back empty (it held revision %d): restoring "
                  "the %d entries this replica served", self.store.url, lost.revision,
                  len(changes))
        try:
            await self.store.commit(changes, [{
                "time": time.time(), "who": self.identity, "section": "store", "model": "",
                "action": "restore", "old": None, "new": None,
                "summary": f"restored {len(changes)} entries of revision {lost.revision} after "
                           "the store came back empty"}])
        except Conflict:
            pass  # another replica restored it (or an operator wrote) first
        return await self.store.read()

    def install(self, snapshot: Snapshot) -> None:
        if snapshot.revision < self.snapshot.revision:
            log.warning("the operator state store went back from revision %d to %d (restored "
                        "or reset?); serving what it holds now", self.snapshot.revision,
                        snapshot.revision)
        elif snapshot.revision == self.snapshot.revision and snapshot.revision:
            return
        self.snapshot = snapshot
        self.traffic.apply(snapshot)
        for model in set(self.counter.windows) - set(self.rollouts.rollouts):
            self.counter.follow(model, None)
        for model, rollout in self.rollouts.rollouts.items():
            self.counter.follow(model, rollout.window if rollout.active else None)
        self.models.apply(snapshot)

    def _mark(self, up: bool, why: str) -> None:
        if up and not self.store_up:
            log.info("operator state store %s is reachable", self.store.url)
        elif not up and self.store_up:
            log.error("%s", why)
        self.store_up = up

    async def follow(self) -> None:
        async for _ in self.store.changes():
            try:
                await self.refresh()
            except StoreUnavailable:
                pass  # reported by refresh; the store's change feed retries
            except Exception:
                log.exception("applying the operator state failed; retrying")

    async def commit(self, build):
        """An operator (or judge) change: compare-and-set until it lands on the current state,
        then serve the state it produced. Returns what ``build`` returned as its result."""
        result, revision = await transact(self.store, build)
        if revision:
            try:
                await self.refresh()
            except StoreUnavailable:
                pass  # landed; the follower catches up
        return result

    async def history(self, model: str | None, limit: int) -> list[dict]:
        return await self.store.history(model, limit)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.rollouts.release(), 3.0)
            await asyncio.wait_for(self.models.leave(), 3.0)
        except (StoreUnavailable, TimeoutError):
            pass
        except Exception:
            log.exception("releasing rollout leases failed")
        await self.store.close()
