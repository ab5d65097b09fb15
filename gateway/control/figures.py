"""This process's share of a rollout's evidence: per-version counts for the current window.

The data plane calls ``observe`` once per finished request (on the event loop; it must stay a
dict lookup for models without a rollout). Counts are kept only for models under rollout and
only for the window the rollout names now; when the window changes (a step, a resume) the
counts start again. Every replica publishes its counts to the store, and the judge adds them up
(``analysis.merge``), so a rollout is judged on the traffic of the whole fleet.
"""

from __future__ import annotations

from gateway.control.analysis import CALLER_CODES, bucket_of


class _Counts:
    __slots__ = ("buckets", "errors", "requests")

    def __init__(self):
        self.requests = 0
        self.errors = 0
        self.buckets: dict[int, int] = {}  # sparse: a window touches a few dozen buckets


class WindowCounter:
    def __init__(self):
        self.windows: dict[str, str] = {}  # model under rollout -> the window counted now
        self._counts: dict[tuple[str, str], _Counts] = {}
        self.changed: set[str] = set()  # models counted since the last publish

    def observe(self, model: str, served, code: str, elapsed_ns: int) -> None:
        if served is None or served.model not in self.windows or code in CALLER_CODES:
            return
        key = (served.model, served.version)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = _Counts()
        counts.requests += 1
        if code != "OK":
            counts.errors += 1
        index = bucket_of(elapsed_ns)
        counts.buckets[index] = counts.buckets.get(index, 0) + 1
        self.changed.add(served.model)

    def follow(self, model: str, window: str | None) -> None:
        """Count ``model`` for ``window`` (None: stop counting it); a new window starts at 0."""
        if self.windows.get(model) == window:
            return
        for key in [k for k in self._counts if k[0] == model]:
            del self._counts[key]
        if window is None:
            self.windows.pop(model, None)
        else:
            self.windows[model] = window
            self.changed.add(model)  # publish the empty window too: it says "I am counting"

    def export(self, model: str, replica: str, now: float) -> dict:
        versions = {}
        for (name, version), counts in list(self._counts.items()):
            if name == model:
                versions[version] = {"requests": counts.requests, "errors": counts.errors,
                                     "buckets": {str(i): c for i, c in counts.buckets.items()}}
        return {"replica": replica, "window": self.windows.get(model), "time": now,
                "versions": versions}

