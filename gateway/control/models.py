"""Model control shared by every process: a load, an unload or a published version through any
worker or replica reaches all of them, and the caller learns when it has.

The store holds, per model, the wanted state (``loaded``) and a generation that every request
raises. Each process applies the generations it has not applied yet (loading or reloading its
own copy, or unloading it) and says which generation it has applied in its membership record,
which it renews every ``HEARTBEAT_S`` on the store. The process that took the request waits
until every live member reports that generation, or until its time limit, and says how many
have it. A member that stops renewing its record for ``DEAD_AFTER_S`` is not waited for.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.control.store import Change, Snapshot, StoreUnavailable
from gateway.control.traffic import audit_record

log = logging.getLogger(__name__)
SECTION = "models"
MEMBERS = "members"
HEARTBEAT_S = 2.0
DEAD_AFTER_S = 3 * HEARTBEAT_S
WAIT_S = 120.0  # how long a request waits for every member (loading a large model is slow)


class ModelControl:
    def __init__(self, plane, repository):
        self.plane = plane
        self.repository = repository
        self.applied: dict[str, int] = {}  # model -> generation applied here
        self._applying: set[str] = set()
        self.enabled = False  # the server turns it on once its own start-up loads are done

    # ---- requests -----------------------------------------------------------------------

    async def request(self, model: str, loaded: bool, who: str, action: str,
                      applied_here: bool = False) -> int:
        """Store the wanted state of ``model``; the new generation. ``applied_here``: this
        process is already in that state (it just loaded or unloaded the model itself)."""
        before = self.applied.get(model, 0)

        def build(snapshot: Snapshot):
            old = snapshot.value(SECTION, model) or {}
            generation = int(old.get("generation", 0)) + 1
            if applied_here:  # before the commit lands, so following it does not load again
                self.applied[model] = generation
            new = {"loaded": loaded, "generation": generation}
            return ([Change(SECTION, model, new, snapshot.revision_of(SECTION, model))],
                    [audit_record(who, SECTION, model, action, old or None, new,
                                  f"{action}: every process {'loads' if loaded else 'unloads'} "
                                  f"it (generation {generation})")], generation)
        try:
            return await self.plane.commit(build)
        except BaseException:
            self.applied[model] = before
            raise

    async def broadcast(self, model: str, loaded: bool, action: str) -> tuple[int, int]:
        """After this process loaded (or unloaded) ``model`` itself: every other process does
        the same; (processes that have, live processes) once all have or at the time limit."""
        generation = await self.request(model, loaded, "api", action, applied_here=True)
        return await self.wait(model, generation)

    async def wait(self, model: str, generation: int, timeout: float = WAIT_S
                   ) -> tuple[int, int]:
        """(members that applied ``generation``, live members), once all have or at timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.heartbeat()
            records = await self.plane.store.records(MEMBERS)
            now = await self.plane.store.now()
            live = [r for r in records if now - float(r.get("time", 0)) < DEAD_AFTER_S]
            done = [r for r in live
                    if int((r.get("applied") or {}).get(model, 0)) >= generation]
            if len(done) >= len(live) or loop.time() >= deadline:
                return len(done), len(live)
            await asyncio.sleep(0.1)

    # ---- following ----------------------------------------------------------------------

    def adopt_current(self, snapshot: Snapshot) -> None:
        """At start, after this process's own loads: a stored state this process already
        matches counts as applied (no second load of the same model)."""
        for model, want in snapshot.items(SECTION).items():
            entry = self.repository.models.get(model)
            serving = entry is not None and bool(entry.serving)
            if bool(want.get("loaded")) == serving:
                self.applied[model] = int(want.get("generation", 0))
        self.enabled = True
        self.apply(snapshot)

    def apply(self, snapshot: Snapshot) -> None:
        """Start applying every generation newer than what this process applied."""
        if not self.enabled:
            return
        for model, want in snapshot.items(SECTION).items():
            generation = int(want.get("generation", 0))
            if generation > self.applied.get(model, 0) and model not in self._applying:
                self._applying.add(model)
                asyncio.get_running_loop().create_task(self._apply(model, want))

    async def _apply(self, model: str, want: dict) -> None:
        generation = int(want.get("generation", 0))
        try:
            if want.get("loaded"):
                await self.repository.load(model)
            else:
                await self.repository.unload(model)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the reason shows in the repository index; still applied
            log.error("model '%s': %s for generation %d failed: %s", model,
                      "load" if want.get("loaded") else "unload", generation,
                      getattr(exc, "message", exc))
        finally:
            self._applying.discard(model)
        self.applied[model] = max(self.applied.get(model, 0), generation)
        try:
            await self.heartbeat()
        except StoreUnavailable:
            pass  # the next heartbeat says it
        self.apply(self.plane.snapshot)  # a newer generation may have arrived meanwhile

    async def heartbeat(self) -> None:
        store = self.plane.store
        await store.put_record(MEMBERS, self.plane.identity, {
            "replica": self.plane.identity, "time": await store.now(),
            "applied": dict(self.applied)})

    async def run(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except StoreUnavailable:
                pass  # the plane reports the store down
            except Exception:
                log.exception("membership heartbeat failed; retrying")
            await asyncio.sleep(HEARTBEAT_S)

    async def leave(self) -> None:
        await self.plane.store.clear_records(MEMBERS, self.plane.identity)
