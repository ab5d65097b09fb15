"""Drift alerts and the hooks they call.

An alert fires when an input's drift score stays above its threshold for the configured time,
and clears when the score falls back below it (or no score can be computed: too few samples).
When any input of a model version is alerting, the model's hook is called with a JSON payload,
then at most once per cooldown per model while drift persists; a hook is a command (payload on
stdin, run in the model directory) or an HTTP POST. Hooks run on their own thread, never on the
event loop nor on the statistics thread, and a slow or failing hook is logged, never fatal.
With a fleet state store the hook thread first claims the call in the store, so several
processes (``--workers``, replicas) seeing one drift episode call the hook once between them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gateway.monitoring.settings import HookSettings

log = logging.getLogger(__name__)


class AlertState:
    """Threshold with a hold time: ``update`` returns "fired", "cleared" or None."""

    __slots__ = ("above_since", "active", "for_seconds", "threshold")

    def __init__(self, threshold: float, for_seconds: float):
        self.threshold = threshold
        self.for_seconds = for_seconds
        self.above_since: float | None = None
        self.active = False

    def update(self, score: float | None, now: float) -> str | None:
        if score is None or not score > self.threshold:
            self.above_since = None
            if self.active:
                self.active = False
                return "cleared"
            return None
        if self.above_since is None:
            self.above_since = now
        if not self.active and now - self.above_since >= self.for_seconds:
            self.active = True
            return "fired"
        return None


class HookRunner:
    """Runs drift hooks one at a time on a background thread and counts the outcomes."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-hook")
        self._lock = threading.Lock()
        self.calls: dict[tuple[str, str], int] = {}  # (model, "ok" | "error") -> count

    def submit(self, hook: HookSettings, model: str, model_dir: Path, payload: dict):
        return self._executor.submit(self._call, hook, model, model_dir, payload)

    def submit_claimed(self, hook: HookSettings, model: str, model_dir: Path, payload: dict,
                       claim):
        """Call the hook only if ``claim()`` says this process is the one to (once per fleet).
        The future's result: "ok", "error", "suppressed" (another process calls it) or
        "unclaimed" (the store did not answer: not called)."""
        return self._executor.submit(self._claimed_call, hook, model, model_dir, payload, claim)

    def _claimed_call(self, hook, model, model_dir, payload, claim) -> str:
        try:
            mine = claim()
        except Exception as exc:  # the store is down or slow: better late than N times
            detail = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            log.warning("drift hook of model '%s' not called yet: the state store did not say "
                        "whether another process calls it (%s)", model, detail)
            return "unclaimed"
        if not mine:
            log.info("drift hook of model '%s' not called here: another gateway process "
                     "calls it", model)
            return "suppressed"
        return "ok" if self._call(hook, model, model_dir, payload) else "error"

    def _call(self, hook: HookSettings, model: str, model_dir: Path, payload: dict) -> bool:
        body = json.dumps(payload, sort_keys=True).encode()
        try:
            ok, detail = (_run_command(hook, model_dir, payload, body) if hook.command
                          else _post(hook, body))
        except Exception as exc:  # a broken hook must never take the statistics down
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        if ok:
            log.info("drift hook of model '%s' called (%s)", model, detail)
        else:
            log.error("drift hook of model '%s' failed: %s", model, detail)
        key = (model, "ok" if ok else "error")
        with self._lock:
            self.calls[key] = self.calls.get(key, 0) + 1
        return ok

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _run_command(hook: HookSettings, model_dir: Path, payload: dict, body: bytes):
    env = {**os.environ, "GATEWAY_EVENT": payload["event"], "GATEWAY_MODEL": payload["model"],
           "GATEWAY_VERSION": payload["version"]}
    try:
        done = subprocess.run(list(hook.command), input=body, capture_output=True,
                              timeout=hook.timeout, cwd=model_dir, env=env, check=False)
    except subprocess.TimeoutExpired:
        return False, f"command timed out after {hook.timeout:g}s"
    except OSError as exc:
        return False, f"command could not start ({exc.strerror or type(exc).__name__})"
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-500:]
        return False, f"command exited with {done.returncode}" + (f": {tail}" if tail else "")
    return True, "command exited with 0"


def _post(hook: HookSettings, body: bytes):
    request = urllib.request.Request(hook.url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "gateway-drift-hook"})
    try:
        with urllib.request.urlopen(request, timeout=hook.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"POST failed ({reason})"
    return 200 <= status < 300, f"HTTP {status}"


def payload(monitor, alerting: list, now: float) -> dict:
    """The JSON document a drift hook receives (monitor: a DriftMonitor; alerting: its inputs
    in alert)."""
    wall = time.time()
    inputs = []
    for m in alerting:
        features = {}
        if not m.pooled and m.feature_scores is not None:
            order = np.argsort(-np.nan_to_num(m.feature_scores, nan=-1.0))[:20]
            features = {m.labels[i]: round(float(m.feature_scores[i]), 6) for i in order
                        if not np.isnan(m.feature_scores[i])}
        since = m.alert.above_since
        inputs.append({"input": m.name, "score": round(m.score or 0.0, 6),
                       "threshold": m.alert.threshold, "features": features,
                       "above_since": round(wall - (now - since), 3) if since is not None else None,
                       "baseline": m.source})
    return {"event": "drift", "model": monitor.model, "version": monitor.version,
            "model_dir": str(monitor.model_dir), "time": round(wall, 3),
            "window_seconds": monitor.settings.window, "inputs": inputs}
