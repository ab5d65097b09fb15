"""Input statistics and drift per model version, computed off the event loop.

The batcher's observer hands each executed batch to :meth:`DriftMonitor.offer` (on the event
loop: a counter, maybe a random draw, a deque append). One background thread, the
:class:`DriftEngine`, wakes every interval and, per monitored version, takes what was queued and
updates with numpy, vectorised over the whole interval's rows: running moments, fixed-bin counts,
the sliding window of bin counts, the population stability index against the baseline, and the
alerts. When the offered rate is above ``max_rows_per_second`` batches are sampled at random, and
when the queue is full they are dropped; both are counted.

Baseline: ``baseline.npz`` in the version directory (see ``stats``); without one, the first
``baseline_samples`` served samples become the baseline (quantile edges and proportions), and
the window starts after them. A baseline learned from served samples is persisted beside the
version as ``baseline.served.npz`` (created only if absent, whole or not at all), so the first
process of a fleet (``--workers``, replicas on one volume) to learn one sets it for all: the
others take that file, at creation or as soon as it appears, and a reload or restart reads it
instead of learning again from whatever is served then (drift included). A repository that
cannot be written keeps the learned baseline in memory (logged once). Delete the file to have
the baseline learned again.

Hooks: when a fleet state store is given (``claim``), a drift hook is called only by the process
that claims ``drift-hook/<model>`` in the store for the hook's cooldown, so one drift episode
calls it once per fleet however many processes see it; the others count it as suppressed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from gateway.monitoring import settings as model_settings
from gateway.monitoring.alerts import AlertState, HookRunner, payload
from gateway.monitoring.stats import (
    MAX_POOLED_VALUES,
    TENSOR,
    Baseline,
    RunningStats,
    bin_counts,
    build_baseline,
    create_baseline_file,
    pooled_column,
    proportions,
    psi,
    read_baseline,
    write_baseline,  # noqa: F401  (the publish tool's entry point, also here)
)
from gateway.repository import file_signature

log = logging.getLogger(__name__)
BASELINE_FILE = "baseline.npz"
SERVED_BASELINE_FILE = "baseline.served.npz"  # learned from served samples, written here
CLAIM_TIMEOUT_S = 5.0  # how long a hook waits for the store to say whether it is this one's call
CLAIM_RETRY_S = 10.0  # after the store could not answer, the next try at calling the hook
NUMERIC = frozenset({"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                     "INT64", "FP16", "FP32", "FP64"})
MAX_POOLED_PER_UPDATE = 100_000  # values of a whole-tensor input examined per update


class InputMonitor:
    """Statistics, window and alert of one input tensor of one version (statistics thread)."""

    def __init__(self, name: str, features: np.ndarray, width: int | None,
                 baseline: Baseline | None, source: str, threshold: float, s):
        self.name = name
        self.features = features  # int64 (F,); [-1] = the whole tensor pooled
        self.pooled = bool(features[0] == TENSOR)
        self.width = width  # values per sample, None when variable
        self.settings = s
        self.baseline = baseline
        self.source = source  # "file" | "served" | "pending"
        self.stats = RunningStats(len(features))
        self.rows = 0  # samples seen (after sampling)
        self.mismatched = 0  # samples whose size did not fit the monitored features
        self.alert = AlertState(threshold, s.for_seconds)
        self._buffer: list[np.ndarray] = []  # served-baseline candidates
        self._buffer_rows = 0
        self._window: deque = deque()  # (time, counts (F, B), rows)
        self._window_counts = None
        self._window_rows = 0
        self._rng = np.random.default_rng()
        self.labels = ["all"] if self.pooled else [str(int(f)) for f in features]
        self.score: float | None = None
        self.feature_scores: np.ndarray | None = None
        self.window_proportions: np.ndarray | None = None

    def matrix(self, parts: list[np.ndarray], batching: bool) -> tuple[np.ndarray, int]:
        """Observations (n, F) of the monitored features from these tensors, and the samples."""
        rows = 0
        if self.pooled:
            flat = []
            for part in parts:
                flat.append(part.reshape(-1))
                rows += part.shape[0] if batching and part.ndim else 1
            values = np.concatenate(flat).astype(np.float64, copy=False).reshape(-1, 1)
            if values.shape[0] > MAX_POOLED_PER_UPDATE:
                values = pooled_column(values, MAX_POOLED_PER_UPDATE, self._rng)
            return values, rows
        if batching:  # the usual case: one concatenation of same-shaped batches
            try:
                stacked = np.concatenate(parts) if len(parts) > 1 else parts[0]
            except ValueError:  # shapes differ between batches: sort them out one by one
                stacked = None
            if stacked is not None and stacked.ndim and stacked.shape[0]:
                rows = stacked.shape[0]
                matrix = stacked.reshape(rows, -1)
                if matrix.shape[1] == self.width:
                    return matrix[:, self.features].astype(np.float64), rows
                self.mismatched += rows
                return np.empty((0, len(self.features))), 0
        good = []
        for part in parts:
            samples = part.shape[0] if batching and part.ndim else 1
            matrix = part.reshape(samples, -1)
            if matrix.shape[1] != self.width:
                self.mismatched += samples
                continue
            good.append(matrix)
            rows += samples
        if not good:
            return np.empty((0, len(self.features))), 0
        matrix = good[0] if len(good) == 1 else np.concatenate(good)
        return matrix[:, self.features].astype(np.float64), rows

    def update(self, values: np.ndarray, rows: int, now: float) -> None:
        s = self.settings
        if rows:
            self.rows += rows
            self.stats.update(values)
            if self.baseline is None:
                if self.pooled:  # keep the buffer to about MAX_POOLED_VALUES in all
                    budget = max(1, MAX_POOLED_VALUES * rows // s.baseline_samples)
                    if values.shape[0] > budget:
                        values = pooled_column(values, budget, self._rng)
                self._buffer.append(values)
                self._buffer_rows += rows
                if self._buffer_rows >= s.baseline_samples:
                    data = np.concatenate(self._buffer)
                    self.baseline = build_baseline(data, self.features, self._buffer_rows, s.bins)
                    self.source = "served"
                    self._buffer, self._buffer_rows = [], 0
            else:
                counts = bin_counts(values, self.baseline.edges)
                self._window.append((now, counts, rows))
                if self._window_counts is None:
                    self._window_counts = np.zeros_like(counts)
                self._window_counts += counts
                self._window_rows += rows
        horizon = now - s.window
        while self._window and self._window[0][0] <= horizon:
            _, counts, rows_out = self._window.popleft()
            self._window_counts -= counts
            self._window_rows -= rows_out
        self._score()

    def adopt(self, baseline: Baseline) -> None:
        """Use ``baseline`` (another process's, learned from served samples) from now on."""
        self.baseline = baseline
        self.source = "served"
        self._buffer, self._buffer_rows = [], 0
        self._window.clear()  # counted against other edges
        self._window_counts, self._window_rows = None, 0
        self._score()

    @property
    def learning(self) -> bool:
        """Samples are being collected for a served baseline."""
        return self.baseline is None and self._buffer_rows > 0

    def _score(self) -> None:
        if self.baseline is None or self._window_rows < self.settings.min_samples:
            self.score = self.feature_scores = self.window_proportions = None
            return
        actual = proportions(self._window_counts)
        scores = psi(self.baseline.expected, actual)
        self.window_proportions = actual
        self.feature_scores = scores
        finite = scores[~np.isnan(scores)]
        self.score = float(finite.max()) if finite.size else None


class DriftMonitor:
    """Drift monitoring of one serving version. ``offer`` runs on the event loop; the rest on
    the statistics thread."""

    def __init__(self, model: str, version: str, batching: bool, inputs: list[InputMonitor],
                 s, model_dir: Path, signature: tuple, interval: float,
                 persisted: bool = True):
        self.model = model
        self.version = version
        self.batching = batching
        self.inputs = inputs
        self.settings = s
        self.model_dir = model_dir
        self.signature = signature
        self.pending: deque = deque()  # (feeds, rows); append on the loop, popleft here
        self.max_pending = max(256, int(4 * s.max_rows_per_second * interval))
        self.keep = 1.0  # probability that a batch is taken (set here from the offered rate)
        self.offered = 0  # rows offered (loop)
        self.accepted = 0  # rows queued (loop)
        self.sampled_out = 0  # rows skipped by sampling (loop)
        self.dropped = 0  # rows dropped because the queue was full (loop)
        self.taken = 0  # rows taken off the queue (statistics thread)
        self._last_offered = 0
        self._last_time: float | None = None
        self.failed = 0  # updates that raised (logged once)
        # False until the served baseline is in baseline.served.npz (ours or another
        # process's), or cannot be: checked after every update while False.
        self.persisted = persisted

    # ---- event loop ------------------------------------------------------------------------

    def offer(self, feeds: dict, rows: int) -> None:
        self.offered += rows
        if self.keep < 1.0 and random.random() >= self.keep:
            self.sampled_out += rows
            return
        if self.accepted - self.taken >= self.max_pending:
            self.dropped += rows
            return
        self.pending.append((feeds, rows))
        self.accepted += rows

    # ---- statistics thread -----------------------------------------------------------------

    def update(self, now: float) -> list[tuple[InputMonitor, str]]:
        """Take what was offered, update every input; return alert transitions."""
        items = []
        pending = self.pending
        while True:
            try:
                items.append(pending.popleft())
            except IndexError:
                break
        for _, rows in items:
            self.taken += rows
        self._adjust_sampling(now)
        events = []
        for monitor in self.inputs:
            parts = [feeds[monitor.name] for feeds, _ in items if monitor.name in feeds]
            if parts:
                values, rows = monitor.matrix(parts, self.batching)
            else:
                values, rows = None, 0
            monitor.update(values, rows, now)
            change = monitor.alert.update(monitor.score, now)
            if change:
                events.append((monitor, change))
        if not self.persisted:
            self._persist()
        return events

    @property
    def served_path(self) -> Path:
        return self.model_dir / self.version / SERVED_BASELINE_FILE

    def _persist(self) -> None:
        """Take another process's served baseline once it exists, else write ours once every
        input that is learning has learned."""
        path = self.served_path
        label = f"model '{self.model}' version {self.version}"
        if path.exists():
            self.persisted = True
            self._adopt(path, label)
        elif not any(m.learning for m in self.inputs):
            learned = {m.name: m.baseline for m in self.inputs if m.source == "served"}
            if not learned:
                return
            self.persisted = True
            try:
                written = create_baseline_file(path, learned)
            except OSError as exc:
                log.warning("%s: the baseline learned from served samples cannot be written to "
                            "%s (%s); it is kept in memory and learned again at restart", label,
                            SERVED_BASELINE_FILE, exc.strerror or exc)
                return
            if not written:  # another process wrote it between our look and our write
                self._adopt(path, label)
            else:
                log.info("%s: the baseline learned from served samples is in %s (%s)", label,
                         SERVED_BASELINE_FILE, ", ".join(f"'{n}'" for n in learned))
        else:
            return
        self.signature = files_signature(self.model_dir, self.version)

    def _adopt(self, path: Path, label: str) -> None:
        try:
            baselines = read_baseline(path)
        except ValueError as exc:
            log.error("%s: %s is unusable (%s); this process keeps its own baseline", label,
                      SERVED_BASELINE_FILE, exc)
            return
        taken = []
        for m in self.inputs:
            if m.source not in ("pending", "served") or m.name not in baselines:
                continue
            baseline = baselines[m.name].select(m.features)
            if baseline is not None:
                m.adopt(baseline)
                taken.append(m.name)
        if taken:
            log.info("%s: baseline of %s from %s (learned from served samples by another "
                     "process)", label, ", ".join(f"'{n}'" for n in taken), SERVED_BASELINE_FILE)

    def _adjust_sampling(self, now: float) -> None:
        offered = self.offered
        if self._last_time is not None and now > self._last_time:
            rate = (offered - self._last_offered) / (now - self._last_time)
            limit = self.settings.max_rows_per_second
            self.keep = 1.0 if rate <= limit else limit / rate
        self._last_offered, self._last_time = offered, now

    def alerting(self) -> list[InputMonitor]:
        return [m for m in self.inputs if m.alert.active]


def _in_package(model_dir: Path) -> bool:
    from gateway.config import DEMO_REPOSITORY

    try:
        return Path(model_dir).resolve().is_relative_to(DEMO_REPOSITORY.resolve())
    except OSError:
        return False


def create_monitor(served, model_dir: Path, s, interval: float) -> DriftMonitor | None:
    """A DriftMonitor for a serving version per its settings, or None if nothing to monitor."""
    if not s.enabled:
        return None
    config = served.config
    batching = config.max_batch_size > 0
    version_dir = model_dir / served.version
    baseline_path = version_dir / BASELINE_FILE
    label = f"model '{served.model}' version {served.version}"
    file_baselines: dict[str, Baseline] = {}
    if baseline_path.is_file():
        try:
            file_baselines = read_baseline(baseline_path)
        except ValueError as exc:
            log.error("%s: %s is unusable (%s); the first %d served samples become the baseline",
                      label, BASELINE_FILE, exc, s.baseline_samples)
    served_path = version_dir / SERVED_BASELINE_FILE
    served_exists = served_path.exists()
    served_baselines: dict[str, Baseline] = {}
    if served_exists:
        try:
            served_baselines = read_baseline(served_path)
        except ValueError as exc:
            log.error("%s: %s is unusable (%s); the baseline is learned again, in memory only "
                      "(delete the file to have it written again)", label, SERVED_BASELINE_FILE,
                      exc)
    inputs = []
    for spec in config.inputs:
        own = s.for_input(spec.name)
        if not own.enabled or spec.datatype not in NUMERIC:
            continue
        dims = spec.dims
        width = math.prod(dims) if dims and all(d > 0 for d in dims) else (1 if not dims else None)
        if own.features == "tensor":
            features = np.array([TENSOR])
        elif own.features is not None:
            if width is None or max(own.features) >= width:
                log.error("%s: drift features of input '%s' are out of range (it has %s values "
                          "per sample); monitoring it as a whole tensor", label, spec.name,
                          width if width is not None else "a variable number of")
                features = np.array([TENSOR])
            else:
                features = np.array(own.features, dtype=np.int64)
        elif width is not None and width <= s.max_features:
            features = np.arange(width, dtype=np.int64)
        else:
            features = np.array([TENSOR])
        baseline, source = None, "pending"
        if spec.name in file_baselines:
            baseline = file_baselines[spec.name].select(features)
            if baseline is None:
                log.warning("%s: %s has no rows for the monitored features of input '%s'; the "
                            "first %d served samples become its baseline", label, BASELINE_FILE,
                            spec.name, s.baseline_samples)
            else:
                source = "file"
        elif file_baselines:
            log.warning("%s: %s has no input '%s'; the first %d served samples become its "
                        "baseline", label, BASELINE_FILE, spec.name, s.baseline_samples)
        if baseline is None and spec.name in served_baselines:
            baseline = served_baselines[spec.name].select(features)
            if baseline is None:
                log.warning("%s: %s has no rows for the monitored features of input '%s' (the "
                            "settings changed since it was learned?); its baseline is learned "
                            "again, in memory only", label, SERVED_BASELINE_FILE, spec.name)
            else:
                source = "served"
        threshold = own.threshold if own.threshold is not None else s.threshold
        inputs.append(InputMonitor(spec.name, features, width, baseline, source, threshold, s))
    if not inputs:
        return None
    log.info("%s: drift monitoring of %s", label, ", ".join(
        f"'{m.name}' ({'whole tensor' if m.pooled else f'{len(m.features)} features'}, "
        f"baseline {_origin(m)})" for m in inputs))
    # The bundled demo repository is part of the installed package: never written to.
    persisted = served_exists or not any(m.source == "pending" for m in inputs) \
        or _in_package(model_dir)
    return DriftMonitor(served.model, served.version, batching, inputs, s, model_dir,
                        files_signature(model_dir, served.version), interval, persisted)


def _origin(m: InputMonitor) -> str:
    if m.source == "file":
        return "from " + BASELINE_FILE
    if m.source == "served":
        return f"from {SERVED_BASELINE_FILE} (learned from served samples)"
    return "from served samples"


def files_signature(model_dir: Path, version: str) -> tuple:
    return (file_signature(model_dir / model_settings.FILENAME),
            file_signature(model_dir / version / BASELINE_FILE),
            file_signature(model_dir / version / SERVED_BASELINE_FILE))


def fleet_claim(store, holder: str, loop: asyncio.AbstractEventLoop,
                timeout: float = CLAIM_TIMEOUT_S):
    """``claim(key, ttl_s) -> bool`` for any thread: ``store.claim`` run on the server's event
    loop (where the store's connections live). Raises if the store cannot answer in time."""
    def claim(key: str, ttl_s: float) -> bool:
        coroutine = store.claim(key, holder, ttl_s)
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:  # the loop is closed: shutting down
            coroutine.close()
            raise
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise
    return claim


class DriftEngine:
    """The statistics thread: keeps one DriftMonitor per serving version and updates them."""

    def __init__(self, repository, interval: float = 1.0, clock=time.monotonic,
                 hooks: HookRunner | None = None, claim=None):
        self.repository = repository
        # claim(key, ttl_s) -> bool (see fleet_claim), or None: this process alone calls hooks
        self.claim = claim
        self.interval = interval
        self.clock = clock
        self.hooks = hooks or HookRunner()
        self.monitors: dict = {}  # Batcher -> DriftMonitor; replaced whole, read by the loop
        self.hook_suppressed: dict[str, int] = {}
        self.busy_seconds = 0.0
        self._last_hook: dict[str, float] = {}
        self._hook_calls: dict[str, object] = {}  # model -> Future of its claimed call
        self._hook_retry_at: dict[str, float] = {}  # model -> when to ask the store again
        self._sync_requests: deque = deque()
        self._seen: dict[tuple[str, str], tuple] = {}  # (model, version) -> files at last sync
        self._next_file_check = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- any thread ------------------------------------------------------------------------

    def request_sync(self, model: str) -> None:
        """A model's serving set changed: (re)build its monitors on the next update."""
        self._sync_requests.append(model)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="drift-statistics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.hooks.close()

    # ---- statistics thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # keep the thread alive; the next interval tries again
                log.exception("drift statistics update failed")

    def tick(self, now: float | None = None) -> None:
        started = time.perf_counter()
        now = self.clock() if now is None else now
        models = set()
        while self._sync_requests:
            models.add(self._sync_requests.popleft())
        if now >= self._next_file_check:  # gateway.yaml or baseline.npz edited in place
            self._next_file_check = now + max(5.0, 10 * self.interval)
            root = self.repository.root
            models |= {model for (model, version), signature in self._seen.copy().items()
                       if signature != files_signature(root / model, version)}
        for model in sorted(models):
            self._sync(model)
        self._collect_hook_calls(now)
        for monitor in list(self.monitors.values()):
            try:
                events = monitor.update(now)
            except Exception:  # one version's bug must not stop the others' statistics
                if not monitor.failed:
                    log.exception("model '%s' version %s: drift update failed", monitor.model,
                                  monitor.version)
                monitor.failed += 1
                continue
            for input_monitor, change in events:
                self._log_alert(monitor, input_monitor, change)
            if monitor.signature != self._seen.get((monitor.model, monitor.version),
                                                   monitor.signature):
                self._seen[(monitor.model, monitor.version)] = monitor.signature  # its own file
            self._maybe_call_hook(monitor, now, any(c == "fired" for _, c in events))
        self.busy_seconds += time.perf_counter() - started

    def _sync(self, model: str) -> None:
        entry = self.repository.models.get(model)
        serving = dict(entry.serving) if entry is not None else {}
        model_dir = self.repository.root / model
        current = {b: m for b, m in self.monitors.items() if b.model == model}
        keep = {b: m for b, m in self.monitors.items() if b.model != model}
        s = None
        for key in [k for k in self._seen if k[0] == model]:
            del self._seen[key]
        for served in serving.values():
            signature = files_signature(model_dir, served.version)
            self._seen[(model, served.version)] = signature
            old = current.get(served.batcher)
            if old is not None and old.signature == signature:
                keep[served.batcher] = old
                continue
            if s is None:
                s = model_settings.load(model_dir)
            try:
                monitor = create_monitor(served, model_dir, s, self.interval)
            except Exception:
                log.exception("model '%s' version %s: drift monitoring not started", model,
                              served.version)
                continue
            if monitor is not None:
                keep[served.batcher] = monitor
        self.monitors = keep

    def _log_alert(self, monitor: DriftMonitor, m: InputMonitor, change: str) -> None:
        label = f"model '{monitor.model}' version {monitor.version} input '{m.name}'"
        if change == "fired":
            log.warning("drift: %s: PSI %.3f above %.3g for %gs", label, m.score or 0.0,
                        m.alert.threshold, monitor.settings.for_seconds)
        else:
            log.info("drift: %s back below %.3g", label, m.alert.threshold)

    def _maybe_call_hook(self, monitor: DriftMonitor, now: float, fired: bool) -> None:
        hook = monitor.settings.hook
        alerting = monitor.alerting()
        if not alerting or not hook.configured:
            return
        last = self._last_hook.get(monitor.model)
        if last is not None and now - last < hook.cooldown:
            if fired:
                self.hook_suppressed[monitor.model] = self.hook_suppressed.get(monitor.model, 0) + 1
                log.info("drift hook of model '%s' not called: cooldown, %.0fs left",
                         monitor.model, hook.cooldown - (now - last))
            return
        if now < self._hook_retry_at.get(monitor.model, now) or monitor.model in self._hook_calls:
            return  # the store could not answer lately, or a claim is still on its way
        self._last_hook[monitor.model] = now
        document = payload(monitor, alerting, now)
        if self.claim is None:
            self.hooks.submit(hook, monitor.model, monitor.model_dir, document)
            return
        # One call per fleet: whoever claims the model's hook for its cooldown calls it. On the
        # hook thread: the store's answer must not hold up the statistics.
        key = f"drift-hook/{monitor.model}"
        ttl = max(hook.cooldown, 1.0)
        self._hook_calls[monitor.model] = self.hooks.submit_claimed(
            hook, monitor.model, monitor.model_dir, document, lambda: self.claim(key, ttl))

    def _collect_hook_calls(self, now: float) -> None:
        """Outcomes of claimed hook calls: suppressed (another process calls it) is counted;
        no answer from the store: nobody may have called it, so ask again a little later."""
        for model, future in list(self._hook_calls.items()):
            if not future.done():
                continue
            del self._hook_calls[model]
            outcome = future.result() if not future.cancelled() else "unclaimed"
            if outcome == "suppressed":
                self.hook_suppressed[model] = self.hook_suppressed.get(model, 0) + 1
            elif outcome == "unclaimed":
                self._last_hook.pop(model, None)
                self._hook_retry_at[model] = now + CLAIM_RETRY_S
