"""Per-model monitoring settings from ``<repository>/<model>/gateway.yaml``.

    drift:
      enabled: true            # monitor this model's inputs (default true)
      window: 5m               # sliding window of the drift score (number = seconds)
      min_samples: 200         # samples the window needs before a score is reported
      threshold: 0.25          # PSI above which an input counts as drifting
      for: 1m                  # how long it must stay above before the alert fires
      baseline_samples: 1000   # without baseline.npz: the first N served samples are the baseline
      bins: 10                 # bins of a served-sample baseline (a file brings its own)
      max_features: 32         # inputs with up to this many values per sample: per feature
      max_rows_per_second: 1000  # above this rate batches are sampled
      export_bins: false       # per-bin proportions (window and baseline): ~20 series per
                               # feature and version, so off unless a dashboard needs them
      inputs:                  # optional, per input tensor
        input:
          enabled: true
          features: [0, 3, 7]  # feature indices of the flattened sample, or "tensor"
          threshold: 0.3
      hook:                    # called when an alert fires, then at most once per cooldown
        command: ["python3", "retrain.py", "--reason", "drift"]  # JSON payload on stdin
        # url: http://trainer:8080/drift                       # or an HTTP POST of it
        timeout: 30s
        cooldown: 1h

Unknown keys are logged and ignored; a file that cannot be used is logged and the defaults apply
(without a hook).
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)
FILENAME = "gateway.yaml"


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class InputSettings:
    enabled: bool = True
    features: tuple[int, ...] | str | None = None  # None: automatic; "tensor"; explicit indices
    threshold: float | None = None  # None: the model's threshold


@dataclass(frozen=True)
class HookSettings:
    command: tuple[str, ...] = ()
    url: str = ""
    timeout: float = 30.0
    cooldown: float = 3600.0

    @property
    def configured(self) -> bool:
        return bool(self.command or self.url)


@dataclass(frozen=True)
class DriftSettings:
    enabled: bool = True
    window: float = 300.0
    min_samples: int = 200
    threshold: float = 0.25
    for_seconds: float = 60.0
    baseline_samples: int = 1000
    bins: int = 10
    max_features: int = 32
    max_rows_per_second: float = 1000.0
    export_bins: bool = False  # per-bin series multiply cardinality: asked for, never default
    inputs: dict[str, InputSettings] = field(default_factory=dict)
    hook: HookSettings = field(default_factory=HookSettings)

    def for_input(self, name: str) -> InputSettings:
        return self.inputs.get(name, InputSettings())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value, what: str) -> float:
    """Seconds from a number or a string like '500ms', '30s', '5m', '1h'."""
    if isinstance(value, bool):
        raise SettingsError(f"{what} must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise SettingsError(f"{what} must be a duration like 30s, 5m or 1h; got {value!r}")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not seconds >= 0:
        raise SettingsError(f"{what} must not be negative")
    return seconds


def _number(value, what: str, kind=float, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{what} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise SettingsError(f"{what} must be a whole number, got {value!r}")
    if not value >= minimum:
        raise SettingsError(f"{what} must be at least {minimum:g}, got {value!r}")
    return kind(value)


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{what} must be true or false, got {value!r}")
    return value


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SettingsError(f"{what} must be a mapping")
    return value


def _unknown(where: str, data: dict, known: set[str], source: str) -> None:
    for key in data:
        if key not in known:
            log.warning("%s: unknown key %s.%s ignored", source, where, key)


def parse(data, source: str = FILENAME) -> DriftSettings:
    """DriftSettings from a parsed gateway.yaml document; SettingsError on bad values."""
    data = _mapping(data, "the document")
    # feedback: read by gateway.feedback; require_approval: by gateway.control.approvals
    _unknown("", data, {"drift", "feedback", "require_approval"}, source)
    drift = _mapping(data.get("drift"), "drift")
    _unknown("drift", drift, {"enabled", "window", "min_samples", "threshold", "for",
                              "baseline_samples", "bins", "max_features", "max_rows_per_second",
                              "export_bins", "inputs", "hook"}, source)
    s = DriftSettings()
    changes = {}
    if "enabled" in drift:
        changes["enabled"] = _flag(drift["enabled"], "drift.enabled")
    if "window" in drift:
        changes["window"] = parse_duration(drift["window"], "drift.window")
        if changes["window"] <= 0:
            raise SettingsError("drift.window must be positive")
    if "for" in drift:
        changes["for_seconds"] = parse_duration(drift["for"], "drift.for")
    for key, kind, minimum in (("min_samples", int, 1), ("threshold", float, 0.0),
                               ("baseline_samples", int, 10), ("bins", int, 2),
                               ("max_features", int, 1), ("max_rows_per_second", float, 1.0)):
        if key in drift:
            changes[key] = _number(drift[key], f"drift.{key}", kind, minimum)
    if "bins" in changes and changes["bins"] > 100:
        raise SettingsError("drift.bins must be at most 100")
    if "export_bins" in drift:
        changes["export_bins"] = _flag(drift["export_bins"], "drift.export_bins")
    inputs = {}
    for name, spec in _mapping(drift.get("inputs"), "drift.inputs").items():
        inputs[str(name)] = _input(str(name), _mapping(spec, f"drift.inputs.{name}"), source)
    changes["inputs"] = inputs
    changes["hook"] = _hook(_mapping(drift.get("hook"), "drift.hook"), source)
    return replace(s, **changes)


def _input(name: str, spec: dict, source: str) -> InputSettings:
    where = f"drift.inputs.{name}"
    _unknown(where, spec, {"enabled", "features", "threshold"}, source)
    enabled = _flag(spec["enabled"], f"{where}.enabled") if "enabled" in spec else True
    threshold = (_number(spec["threshold"], f"{where}.threshold")
                 if "threshold" in spec else None)
    features = spec.get("features")
    if features is not None:
        if features == "tensor":
            pass
        elif isinstance(features, list) and features and all(
                isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in features):
            if len(set(features)) != len(features):
                raise SettingsError(f"{where}.features lists a feature twice")
            if len(features) > 1024:
                raise SettingsError(f"{where}.features: at most 1024 features")
            features = tuple(features)
        else:
            raise SettingsError(f"{where}.features must be \"tensor\" or a list of feature "
                                "indices (integers >= 0)")
    return InputSettings(enabled, features, threshold)


def _hook(spec: dict, source: str) -> HookSettings:
    _unknown("drift.hook", spec, {"command", "url", "timeout", "cooldown"}, source)
    command = spec.get("command")
    if command is None:
        command = ()
    elif isinstance(command, str):
        command = tuple(shlex.split(command))
    elif isinstance(command, list) and all(isinstance(c, (str, int, float)) for c in command):
        command = tuple(str(c) for c in command)
    else:
        raise SettingsError("drift.hook.command must be a string or a list of strings")
    url = spec.get("url") or ""
    if url and not re.match(r"^https?://", str(url)):
        raise SettingsError("drift.hook.url must be an http:// or https:// URL")
    if command and url:
        raise SettingsError("drift.hook: give either command or url, not both")
    hook = HookSettings(command, str(url))
    if "timeout" in spec:
        hook = replace(hook, timeout=parse_duration(spec["timeout"], "drift.hook.timeout"))
    if "cooldown" in spec:
        hook = replace(hook, cooldown=parse_duration(spec["cooldown"], "drift.hook.cooldown"))
    return hook


def load(model_dir: Path) -> DriftSettings:
    """The model's settings; defaults when there is no gateway.yaml or it cannot be used."""
    path = model_dir / FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return DriftSettings()
    except OSError as exc:
        log.error("model '%s': cannot read %s (%s); monitoring uses defaults", model_dir.name,
                  FILENAME, type(exc).__name__)
        return DriftSettings()
    import yaml

    try:
        return parse(yaml.safe_load(text), f"{model_dir.name}/{FILENAME}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        log.error("model '%s': %s is not valid YAML%s; monitoring uses defaults",
                  model_dir.name, FILENAME, where)
    except SettingsError as exc:
        log.error("model '%s': %s: %s; monitoring uses defaults", model_dir.name, FILENAME, exc)
    return DriftSettings()
