"""Ground-truth feedback: keep what each model version predicted for a request id, join labels
that arrive later, and report per-version accuracy (classification) or mean absolute error
(regression).

Enabled per model in ``<repository>/<model>/gateway.yaml``::

    feedback:
      output: label            # the output holding the prediction (default: inferred)
      kind: classification     # or regression (default: inferred from the output)
      max_requests: 100000     # request ids kept; the oldest are dropped first
      max_bytes: 67108864      # and at most about this much memory (64 MiB) for them

Inferred: the first integer or string output with one value per row is a class label; else a
float output with several values per row is class scores (the prediction is the argmax), and
one with a single value per row is a regression. Only requests with a non-empty id are kept,
and only for enabled models: on the request path that is one dict lookup, a small argmax or
slice of the response, and one append, with no logging. Request ids over ``MAX_ID_LENGTH``
characters are not kept.

Shared (``gateway serve`` always shares): predictions go to the fleet's prediction table
(gateway/control/predictions.py: Redis with a fleet store, SQLite beside the file store) in
batches every ``FLUSH_S``, labels are joined there whichever process made the prediction, and
per-version totals are counted there, so every process reports the same accuracy. Without a
shared table (unit tests, embedding) predictions stay in this process, bounded by count and by
(estimated) bytes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from math import prod
from pathlib import Path

from gateway.errors import NotFound, echo

log = logging.getLogger(__name__)
FILENAME = "gateway.yaml"
KINDS = ("classification", "regression")
DEFAULT_CAPACITY = 100_000
DEFAULT_MAX_BYTES = 64 << 20
MAX_ID_LENGTH = 1024  # characters; a longer request id is not kept (its label is "unknown")
_ENTRY_BYTES = 240  # one kept entry besides its id and values: dict slot, tuple, list, headers
VALUE, ARGMAX = 0, 1  # how a prediction is read from its output
INTEGERS = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"}
FLOATS = {"FP16", "FP32", "FP64"}
FLUSH_S = 0.1  # predictions reach the shared table within this
TOTALS_S = 1.0  # the fleet's totals are read back this often
COUNT_S = 30.0  # the shared table's kept predictions are counted this often (for the metric)
OUTBOX_MAX = 50_000  # predictions waiting for a flush (ids <= 1 KiB: <= ~60 MB); beyond, oldest dropped


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class FeedbackSettings:
    output: str | None = None
    kind: str | None = None
    capacity: int = DEFAULT_CAPACITY
    max_bytes: int = DEFAULT_MAX_BYTES


def parse_settings(document) -> FeedbackSettings | None:
    """The ``feedback`` section of a parsed gateway.yaml; None when feedback is off."""
    if not isinstance(document, dict) or "feedback" not in document:
        return None
    section = document["feedback"]
    if section is True or section is None:
        return FeedbackSettings()
    if section is False:
        return None
    if not isinstance(section, dict):
        raise SettingsError("feedback must be a mapping (or true)")
    for key in section:
        if key not in ("enabled", "output", "kind", "max_requests", "max_bytes"):
            log.warning("gateway.yaml: unknown key feedback.%s ignored", key)
    if section.get("enabled", True) is False:
        return None
    output = section.get("output")
    if output is not None and not isinstance(output, str):
        raise SettingsError("feedback.output must be an output name")
    kind = section.get("kind")
    if kind is not None and kind not in KINDS:
        raise SettingsError(f"feedback.kind must be one of {', '.join(KINDS)}")
    capacity = section.get("max_requests", DEFAULT_CAPACITY)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise SettingsError("feedback.max_requests must be a positive whole number")
    max_bytes = section.get("max_bytes", DEFAULT_MAX_BYTES)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise SettingsError("feedback.max_bytes must be a positive whole number")
    return FeedbackSettings(output, kind, capacity, max_bytes)


def load_settings(model_dir: Path) -> FeedbackSettings | None:
    try:
        text = (model_dir / FILENAME).read_text()
    except OSError:
        return None
    import yaml

    try:
        return parse_settings(yaml.safe_load(text))
    except (yaml.YAMLError, ValueError) as exc:
        log.error("model '%s': %s: feedback is off: %s", model_dir.name, FILENAME,
                  str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def plan_output(config, settings: FeedbackSettings) -> tuple[int, int, str, str]:
    """(output index, VALUE | ARGMAX, kind, output name) for one version's config;
    ValueError when no output fits."""
    outputs = list(config.outputs)

    def per_row(spec) -> int:
        dims = [d for d in spec.dims if d != -1]
        return prod(dims) if dims else 1

    def label_like(spec) -> bool:
        return (spec.datatype in INTEGERS or spec.datatype == "BYTES") and per_row(spec) == 1

    if settings.output is not None:
        index = config.output_index.get(settings.output)
        if index is None:
            raise ValueError(f"feedback.output '{settings.output}' is not an output (outputs: "
                             f"{', '.join(o.name for o in outputs)})")
        candidates = [outputs[index]]
    else:
        candidates = outputs
    for spec in candidates:
        index = config.output_index[spec.name]
        if settings.kind in (None, "classification") and label_like(spec):
            return index, VALUE, "classification", spec.name
    for spec in candidates:
        index = config.output_index[spec.name]
        if spec.datatype not in FLOATS:
            continue
        if settings.kind in (None, "classification") and per_row(spec) > 1:
            return index, ARGMAX, "classification", spec.name
        if settings.kind in (None, "regression") and per_row(spec) == 1:
            return index, VALUE, "regression", spec.name
        if settings.kind == "regression":
            return index, VALUE, "regression", spec.name  # the first value of each row
    raise ValueError("no output holds a " + (settings.kind or "class label, class scores or "
                                             "regression value"))


class VersionTotals:
    __slots__ = ("abs_error", "correct", "labelled")

    def __init__(self):
        self.labelled = 0
        self.correct = 0
        self.abs_error = 0.0


class ModelFeedback:
    """Predictions kept for one model, and its per-version totals."""

    def __init__(self, model: str, settings: FeedbackSettings):
        self.model = model
        self.settings = settings
        self.kept: OrderedDict[str, tuple[str, list]] = OrderedDict()
        self.plans: dict[str, tuple | None] = {}  # version -> plan (None: nothing to record)
        self.kind = settings.kind or ""
        self.output = settings.output or ""
        self.totals: dict[str, VersionTotals] = {}
        self.unmatched = 0
        self.kept_bytes = 0  # estimated memory of ``kept`` (see entry_bytes)
        self.long_ids = 0  # requests whose id was too long to keep
        self.lock = threading.Lock()  # totals are read by the metrics thread
        self.outbox: deque | None = None  # set when predictions go to the shared table
        self.shared_kept = 0  # predictions in the shared table, as last counted

    def record(self, request_id: str, served, outputs: list, rows: int) -> None:
        """Request path: keep this request's prediction (never raises, never logs per call)."""
        if len(request_id) > MAX_ID_LENGTH:
            if not self.long_ids:
                log.warning("model '%s': feedback does not keep request ids longer than %d "
                            "characters", self.model, MAX_ID_LENGTH)
            self.long_ids += 1
            return
        plan = self.plans.get(served.version, False)
        if plan is False:
            plan = self._plan(served)
        if plan is None:
            return
        index, how = plan
        try:
            data = outputs[index].reshape(rows, -1)
            values = (data.argmax(axis=1) if how == ARGMAX else data[:, 0]).tolist()
        except Exception:
            return
        if self.outbox is not None:
            self.outbox.append((self.model, request_id, served.version, values))
            return
        kept = self.kept
        old = kept.get(request_id)
        if old is not None:  # the same id again: the newer prediction replaces it
            self.kept_bytes -= entry_bytes(request_id, old[1])
        kept[request_id] = (served.version, values)
        self.kept_bytes += entry_bytes(request_id, values)
        if len(kept) > self.settings.capacity or self.kept_bytes > self.settings.max_bytes:
            self.trim()

    def trim(self) -> None:
        """Drop the oldest predictions until the store is within its count and bytes."""
        kept, settings = self.kept, self.settings
        while kept and (len(kept) > settings.capacity or self.kept_bytes > settings.max_bytes):
            request_id, (_, values) = kept.popitem(last=False)
            self.kept_bytes -= entry_bytes(request_id, values)

    def _plan(self, served):
        try:
            index, how, kind, name = plan_output(served.config, self.settings)
        except ValueError as exc:
            log.error("model '%s' version %s: feedback cannot record predictions: %s",
                      self.model, served.version, exc)
            self.plans[served.version] = None
            return None
        self.kind, self.output = kind, name
        self.plans[served.version] = (index, how)
        return index, how

    def label(self, request_id: str, labels: list[str]) -> str | None:
        """Join one label set kept here; None when the id is unknown, else "" or a refusal."""
        entry = self.kept.get(request_id)
        if entry is None:
            self.unmatched += 1
            return None
        version, predictions = entry
        judged = self.judge(request_id, predictions, labels)
        if isinstance(judged, str):
            return judged
        del self.kept[request_id]
        self.kept_bytes -= entry_bytes(request_id, predictions)
        self.count(version, len(labels), *judged)
        return ""

    def judge(self, request_id: str, predictions: list,
              labels: list[str]) -> tuple[int, float] | str:
        """(correct, sum of absolute errors) of one request's labels, or why they are refused."""
        if len(labels) != len(predictions):
            return (f"request '{echo(request_id)}' had {len(predictions)} row(s); "
                    f"{len(labels)} label(s) given")
        if self.kind == "regression":
            try:
                return 0, sum(abs(float(p) - float(label))
                              for p, label in zip(predictions, labels))
            except ValueError:
                return f"request '{echo(request_id)}': regression labels must be numbers"
        return sum(_same(p, label) for p, label in zip(predictions, labels)), 0.0

    def count(self, version: str, labelled: int, correct: int, abs_error: float) -> None:
        with self.lock:
            totals = self.totals.get(version)
            if totals is None:
                totals = self.totals[version] = VersionTotals()
            totals.labelled += labelled
            totals.correct += correct
            totals.abs_error += abs_error

    def set_totals(self, totals: dict[str, tuple[int, int, float]]) -> None:
        """Replace the totals with the fleet's (from the shared table)."""
        fresh = {}
        for version, (labelled, correct, abs_error) in totals.items():
            t = fresh[version] = VersionTotals()
            t.labelled, t.correct, t.abs_error = labelled, correct, abs_error
        with self.lock:
            self.totals = fresh

    def snapshot(self) -> list[tuple[str, int, int, float]]:
        """(version, labelled, correct, sum of absolute errors), by version."""
        with self.lock:
            rows = [(v, t.labelled, t.correct, t.abs_error) for v, t in self.totals.items()]
        return sorted(rows, key=lambda r: int(r[0]) if r[0].isdigit() else 0)

    @property
    def waiting(self) -> int:
        """Predictions waiting for a label: here, or in the shared table as last counted."""
        return self.shared_kept if self.outbox is not None else len(self.kept)

    def scores(self) -> list[tuple[str, int, int, float | None]]:
        """(version, labelled, correct, score) by version: the score is the accuracy, or the
        mean absolute error for regression; None before the first label."""
        return [(v, n, correct, (abs_error / n if self.kind == "regression" else correct / n)
                 if n else None) for v, n, correct, abs_error in self.snapshot()]


def entry_bytes(request_id: str, values: list) -> int:
    """Estimated memory of one kept prediction: O(1), or O(rows) for text labels."""
    size = _ENTRY_BYTES + len(request_id) + 40 * len(values)
    if values and isinstance(values[0], (bytes, str)):
        size += sum(len(v) for v in values if isinstance(v, (bytes, str)))
    return size


def _same(prediction, label: str) -> bool:
    label = label.strip()
    if isinstance(prediction, bytes):
        return prediction.decode("utf-8", "replace") == label
    if isinstance(prediction, (bool, int, float)):
        try:
            return float(prediction) == float(label)
        except ValueError:
            return str(prediction) == label
    return str(prediction) == label


class FeedbackStore:
    """Feedback of every enabled model; installs the record hooks into the data plane."""

    def __init__(self, repository, dataplane, shared=None):
        self.repository = repository
        self.dataplane = dataplane
        self.models: dict[str, ModelFeedback] = {}
        self.shared = shared  # gateway.control.predictions.SharedPredictions, or None
        self.outbox: deque | None = deque(maxlen=OUTBOX_MAX) if shared is not None else None
        self.flush_failures = 0  # the server subscribes model_changed to the event seam

    def model_changed(self, model: str) -> None:
        """(Re)read the model's settings after it (re)loads; versions may have new configs."""
        entry = self.repository.models.get(model)
        settings = None
        if entry is not None and entry.serving:
            settings = load_settings(self.repository.root / model)
        current = self.models.get(model)
        if settings is None:
            if current is not None:
                self.dataplane.feedback.pop(model, None)
            return
        if current is None or current.settings != settings:
            current = ModelFeedback(model, settings) if current is None else \
                _carry_over(current, settings)
            self.models[model] = current
            current.outbox = self.outbox
            log.info("model '%s': feedback on (%s)", model,
                     "predictions shared by every process" if self.outbox is not None else
                     f"keeping up to {settings.capacity} request ids")
        current.plans.clear()
        for served in entry.serving.values():
            current._plan(served)
        self.dataplane.feedback[model] = current.record

    def _get(self, model: str) -> ModelFeedback:
        feedback = self.models.get(model)
        if feedback is None:
            if model not in self.repository.models:
                raise NotFound(f"unknown model '{echo(model)}'")
            raise NotFound(f"model '{model}' does not keep predictions for feedback: add "
                           f"'feedback: {{}}' to its {FILENAME} (and send requests with an id)")
        return feedback

    async def label(self, model: str, items: list[tuple[str, list[str]]]):
        """(matched, unknown ids, refusals) for labels of earlier request ids."""
        feedback = self._get(model)
        matched, unknown, errors = 0, [], []
        valid = []
        for request_id, labels in items:
            if not request_id:
                errors.append("a label without a request id")
            elif not labels:
                errors.append(f"request '{echo(request_id)}': no label given")
            else:
                valid.append((request_id, labels))
        if self.shared is None:
            for request_id, labels in valid:
                outcome = feedback.label(request_id, labels)
                if outcome is None:
                    unknown.append(request_id)
                elif outcome:
                    errors.append(outcome)
                else:
                    matched += 1
            return matched, unknown, errors
        await self.flush()  # this process's latest predictions first
        taken = await self.shared.take(model, [request_id for request_id, _ in valid])
        counts: dict[str, list] = {}
        for request_id, labels in valid:
            entry = taken.get(request_id)
            if entry is None:
                unknown.append(request_id)
                feedback.unmatched += 1
                continue
            version, predictions = entry
            judged = feedback.judge(request_id, predictions, labels)
            if isinstance(judged, str):  # refused: the prediction goes back for a corrected label
                errors.append(judged)
                await self.shared.put(model, [(request_id, version, predictions)])
                continue
            matched += 1
            total = counts.setdefault(version, [0, 0, 0.0])
            total[0] += len(labels)
            total[1] += judged[0]
            total[2] += judged[1]
        for version, (labelled, correct, abs_error) in counts.items():
            await self.shared.add(model, version, labelled, correct, abs_error)
        feedback.set_totals(await self.shared.totals(model))
        return matched, unknown, errors

    async def flush(self) -> None:
        """Send the predictions recorded since the last flush to the shared table."""
        outbox = self.outbox
        if not outbox:
            return
        taken = [outbox.popleft() for _ in range(len(outbox))]
        batches: dict[str, list] = {}
        for model, request_id, version, values in taken:
            batches.setdefault(model, []).append((request_id, version, values))
        sent = set()
        try:
            for model, items in batches.items():
                await self.shared.put(model, items)
                sent.add(model)
        except BaseException:  # not sent: back in front of newer ones (the outbox is bounded)
            outbox.extendleft(reversed([t for t in taken if t[0] not in sent]))
            raise

    async def run(self) -> None:
        """Flush predictions every FLUSH_S and read the fleet's totals every TOTALS_S."""
        loop = asyncio.get_running_loop()
        next_totals = next_count = 0.0
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
                if loop.time() >= next_totals:
                    next_totals = loop.time() + TOTALS_S
                    for model, feedback in list(self.models.items()):
                        feedback.set_totals(await self.shared.totals(model))
                if loop.time() >= next_count:  # for the metric; counting may scan Redis
                    next_count = loop.time() + COUNT_S
                    for model, feedback in list(self.models.items()):
                        feedback.shared_kept = await self.shared.count(model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: predictions wait (bounded) and retry
                self.flush_failures += 1
                if self.flush_failures in (1, 10, 100) or self.flush_failures % 1000 == 0:
                    log.error("feedback: the shared prediction table failed (%d times): %s",
                              self.flush_failures, getattr(exc, "message", exc))

    def status(self, model: str) -> ModelFeedback:
        return self._get(model)

    async def current(self, model: str) -> ModelFeedback:
        """The model's feedback with the fleet's totals read just now (the same answer from
        every process)."""
        feedback = self._get(model)
        if self.shared is not None:
            await self.flush()
            feedback.set_totals(await self.shared.totals(model))
            feedback.shared_kept = await self.shared.count(model)
        return feedback

    def quality(self, model: str, version: str) -> tuple[str, int, float] | None:
        """(kind, labelled, accuracy or mean absolute error) of one version, if labelled."""
        feedback = self.models.get(model)
        if feedback is None:
            return None
        for v, labelled, _, score in feedback.scores():
            if v == version and labelled:
                return feedback.kind, labelled, score
        return None


def _carry_over(old: ModelFeedback, settings: FeedbackSettings) -> ModelFeedback:
    """New settings keep the totals; kept predictions stay unless the output changed."""
    new = ModelFeedback(old.model, settings)
    new.totals, new.unmatched = old.totals, old.unmatched
    if (settings.output, settings.kind) == (old.settings.output, old.settings.kind):
        new.kept, new.kept_bytes = old.kept, old.kept_bytes
        new.trim()
    return new


class FeedbackCollector:
    """Prometheus families of the feedback store (registered with the monitoring registry)."""

    def __init__(self, store: FeedbackStore):
        self.store = store

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labelled = CounterMetricFamily(
            "gateway_feedback_labelled", "Predictions joined to a ground-truth label, by model "
            "and version (the fleet's total: every replica reports the same)",
            labels=["model", "version"])
        accuracy = GaugeMetricFamily(
            "gateway_feedback_accuracy_ratio", "Share of labelled predictions that were right "
            "(classification models)", labels=["model", "version"])
        mae = GaugeMetricFamily(
            "gateway_feedback_mean_absolute_error", "Mean absolute error of labelled "
            "predictions (regression models)", labels=["model", "version"])
        kept = GaugeMetricFamily("gateway_feedback_predictions_kept", "Predictions waiting "
                                 "for a label", labels=["model"])
        unmatched = CounterMetricFamily(
            "gateway_feedback_unmatched_labels", "Labels whose request id had no kept "
            "prediction", labels=["model"])
        for model, feedback in sorted(self.store.models.copy().items()):
            kept.add_metric([model], feedback.waiting)
            unmatched.add_metric([model], feedback.unmatched)
            for version, n, correct, abs_error in feedback.snapshot():
                labelled.add_metric([model, version], n)
                if not n:
                    continue
                if feedback.kind == "regression":
                    mae.add_metric([model, version], abs_error / n)
                else:
                    accuracy.add_metric([model, version], correct / n)
        yield from (labelled, accuracy, mae, kept, unmatched)
