"""The model repository: which models and versions exist on disk, and which are serving.

Layout is Triton's: ``<root>/<model>/config.pbtxt`` and ``<root>/<model>/<version>/model.onnx``.
Loading is version by version and never all-or-nothing: a version that fails is UNAVAILABLE with
its reason while the others serve. A reload loads the new versions first and only then retires
the old ones, so a caller never sees a gap; if none of the new versions load, the old keep serving.
Readers (the data plane) see each model's serving versions as an immutable snapshot, swapped whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from gateway.batching import Batcher
from gateway.cache import ResponseCache
from gateway.classification import read_labels
from gateway.ensemble import (
    Composition,
    EnsembleScheduler,
    check_composing,
    ensemble_config,
    is_ensemble,
)
from gateway.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    Unavailable,
    echo,
)
from gateway.events import Events
from gateway.loading import load_version
from gateway.modelconfig import (
    DEFAULT_MAX_BATCH_SIZE,
    ModelConfig,
    read_config_file,
    version_policy,
)
from gateway.statistics import ModelStats

log = logging.getLogger(__name__)

# Always with fullmatch: with match and "$", a trailing newline would pass ("m\n").
# A comma too: Triton's QA generators name models "nop_TYPE_FP32_4,1,2" (their shape).
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,\-]{0,127}")


def valid_model_name(name: str) -> bool:
    """A plain directory name: safe in a path, a metric label and a log line."""
    return MODEL_NAME.fullmatch(name) is not None and ".." not in name


# What a load request's name may hold to be looked up at all (Triton accepts "...", "..m",
# "m..1": valid names, just never model directories here).
LOADABLE_NAME = re.compile(r"[A-Za-z0-9_.,\-]{1,128}")


def unknown_model(name: str) -> NotFound:
    """Triton's words, which clients match on (``simple_grpc_health_metadata.py`` does)."""
    return NotFound(f"Request for unknown model: '{echo(name)}' is not found")


def unknown_version(name: str, version: str) -> NotFound:
    return NotFound(f"Request for unknown model: '{echo(name)}' version {echo(version)} is not "
                    "found")


def failed_to_poll(name: str, why: str) -> NotFound:
    return NotFound(f"failed to load '{echo(name)}', failed to poll from model repository: {why}")


def check_load_name(name: str) -> None:
    """Triton's model name validation on load (its ``ValidateModelName``), in its words: an
    empty or blank name, then ``..`` or a ``/``. Then this gateway's own rule for names it may
    look up (letters, digits, '_', '-', '.'; at most 128)."""
    trimmed = name.strip()
    if not trimmed:
        raise InvalidArgument("Model name cannot be empty. Please enter a valid name to deploy.")
    if trimmed == ".." or "/" in trimmed:
        raise InvalidArgument(f"invalid model name '{echo(name)}', model name must not contain "
                              "path traversal characters")
    if LOADABLE_NAME.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid model name '{echo(name)}': use letters, digits, '_', '-', '.' and ',' "
            "(at most 128, not starting with '.' or '-')")


def check_model_name(name: str) -> str:
    """Refuse names that could escape the repository or are not plain directory names."""
    if not valid_model_name(name):
        raise InvalidArgument(
            f"invalid model name '{echo(name)}': use letters, digits, '_', '-', '.' and ',' "
            "(at most 128, not starting with '.' or '-')")
    return name


@dataclass(slots=True)
class ServingVersion:
    """A loaded version that takes requests."""

    model: str
    version: str
    config: ModelConfig
    batcher: Batcher
    stats: ModelStats
    signature: tuple  # what the files looked like when loaded; a change means reload


@dataclass(slots=True)
class ModelEntry:
    name: str
    # Replaced whole, never mutated: readers on the request path see a consistent snapshot.
    serving: dict[str, ServingVersion] = field(default_factory=dict)
    latest: ServingVersion | None = None
    config: ModelConfig | None = None
    reasons: dict[str, str] = field(default_factory=dict)  # version ("" = model) -> why unavailable
    loading: bool = False


class Repository:
    def __init__(self, root: Path, cpu_threads: int = 1, control_mode: str = "none"):
        self.root = root.resolve()
        self.cpu_threads = cpu_threads
        self.control_mode = control_mode
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.events = Events()  # the core's event seam (gateway/events.py): one per server
        self.execution_timeout_s = 0.0  # server default; a model's parameter overrides it
        self.max_inflight_per_model = 2048  # the data plane's; bounds lower priorities' shares
        # max_batch_size of a model without one whose tensors all have a dynamic first dim
        self.default_max_batch_size = DEFAULT_MAX_BATCH_SIZE
        self.cache: ResponseCache | None = None  # --cache-size; models opt in by their config
        # async (model, loaded, action) -> (processes done, live processes): set by the server
        # so an operator's load or unload reaches every process of the fleet
        self.broadcast = None
        self.starting = False  # the server sets it while it loads its models at start
        # Names of the models served as ensembles: a caller's routing key matters to them
        # when any step's model has a split (the protocols read the key only when it may).
        self.ensembles: set[str] = set()
        self._skipped: set[str] = set()  # directories whose names are not model names
        self.closing = False  # set by close(): unloads are the end, not an outage

    # ---- reading (request path) ----------------------------------------------------------

    def get(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise self._unknown(name)
        return entry

    def _unknown(self, name: str):
        """NOT_FOUND, except while the server is still loading its models at start: then the
        model may be on its way, and UNAVAILABLE tells clients to retry."""
        if self.starting:
            return Unavailable(f"model '{echo(name)}' is not loaded yet: the server is starting "
                               "and still loading its models; retry")
        return unknown_model(name)

    def version(self, name: str, version: str) -> ServingVersion:
        """The serving version asked for ("" = newest), or the right error."""
        entry = self.models.get(name)
        if entry is None:
            raise self._unknown(name)
        if not version:
            if entry.latest is None:
                raise Unavailable(_why_unavailable(entry, name))
            return entry.latest
        served = entry.serving.get(version)
        if served is not None:
            return served
        if version in entry.reasons:
            raise Unavailable(f"model '{name}' version {version} is not available: "
                              f"{entry.reasons[version]}")
        raise unknown_version(name, version)

    def ready(self, name: str, version: str) -> ServingVersion:
        """The version if it can serve now, else the error that says why (ModelReady): as
        ``version``, and an ensemble is not ready while a composing model it needs is not."""
        served = self.version(name, version)
        if served.config.ensemble is not None and served.batcher.broken:
            raise Unavailable(f"in ensemble '{name}', {served.batcher.broken}")
        return served

    # ---- disk -----------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        check_model_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidArgument(f"invalid model name '{echo(name)}'")
        return path

    def scan(self) -> list[str]:
        """Model names present on disk (directories with a valid name).

        Unavailable, with the reason, when the root itself cannot be read (moved, unmounted,
        no permission): that is never "no models"."""
        try:
            children = list(self.root.iterdir())
        except OSError as exc:
            raise Unavailable(f"the model repository cannot be read ({unreadable(exc)}); "
                              "the loaded models keep serving") from None
        names = []
        for path in children:
            if not path.is_dir() or path.name.startswith("."):  # .gateway: operator state
                continue
            if valid_model_name(path.name):
                names.append(path.name)
            elif path.name not in self._skipped:  # said once: polls rescan every second
                self._skipped.add(path.name)
                log.warning("directory '%s' in the model repository is not served: a model "
                            "name holds letters, digits, '_', '-', '.' and ',' (at most 128, "
                            "not starting with '-')", echo(path.name))
        return sorted(names)

    def snapshot(self) -> dict[str, tuple]:
        """{model: disk signature} of every model on disk (blocking: run it off the loop)."""
        return {name: self.disk_signature(name) for name in self.scan()}

    def _disk_state(self, name: str):
        """(config proto, explicit batch flag, {version: (file, signature)}) read from disk."""
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            raise NotFound(f"model '{name}' is not in the repository")
        proto, explicit_batch = read_config_file(model_dir, name)
        filename = proto.default_model_filename or "model.onnx"
        cfg_sig = file_signature(model_dir / "config.pbtxt")
        if is_ensemble(proto):  # no model file: its version directories (Triton's are empty)
            numbers = [int(c.name) for c in model_dir.iterdir()
                       if c.is_dir() and c.name.isdigit() and int(c.name) > 0]
            return proto, explicit_batch, {n: (None, (cfg_sig,)) for n in numbers or [1]}
        versions = {}
        for child in model_dir.iterdir():
            if child.is_dir() and child.name.isdigit() and int(child.name) > 0:
                model_file = child / filename
                if model_file.is_file():
                    signature = (cfg_sig, file_signature(model_file))
                    versions[int(child.name)] = (model_file, signature)
        return proto, explicit_batch, versions

    def disk_signature(self, name: str) -> tuple:
        """Cheap fingerprint of a model directory, for poll mode's change detection."""
        model_dir = self.root / name
        parts = [file_signature(model_dir / "config.pbtxt")]
        try:
            for child in sorted(model_dir.iterdir()):
                if child.is_dir() and child.name.isdigit():
                    files = tuple(file_signature(f) for f in sorted(child.iterdir()))
                    parts.append((child.name, files))
        except OSError:
            pass
        return tuple(parts)

    # ---- load / unload --------------------------------------------------------------------

    async def load(self, name: str) -> ModelEntry:
        """Load (or reload) a model: new and changed versions first, then retire the rest."""
        self.model_dir(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self.models.setdefault(name, ModelEntry(name))
            entry.loading = True
            try:
                await self._load_locked(entry)
            finally:
                entry.loading = False
            return entry

    async def _load_locked(self, entry: ModelEntry) -> None:
        name = entry.name
        loop = asyncio.get_running_loop()
        try:
            proto, explicit_batch, on_disk = await loop.run_in_executor(
                None, self._disk_state, name)
            wanted = version_policy(proto).select(list(on_disk))
            ensemble, composition = (await self._prepare_ensemble(proto) if is_ensemble(proto)
                                     else (None, None))
        except (ModelLoadError, NotFound) as exc:
            reason = exc.args[0] if isinstance(exc, ModelLoadError) else exc.message
            log.error("model '%s' cannot load: %s", name, reason)
            self._load_failed(name, "", reason)
            entry.reasons = {"": reason}  # what is loaded keeps serving; the index shows why
            return
        if not wanted:
            entry.reasons = {"": "no version directory with a model file matches the version "
                                 "policy"}
            if not entry.serving:
                log.error("model '%s': %s", name, entry.reasons[""])
            return
        new_serving: dict[str, ServingVersion] = {}
        reasons: dict[str, str] = {}
        for number in wanted:
            key = str(number)
            model_file, signature = on_disk[number]
            current = entry.serving.get(key)
            if current is not None and current.signature == signature:
                new_serving[key] = current
                continue
            if ensemble is not None:
                stats = ModelStats()
                scheduler = EnsembleScheduler(name, key, ensemble, stats, composition.steps)
                new_serving[key] = ServingVersion(name, key, ensemble, scheduler, stats,
                                                  signature)
                steps = ensemble.ensemble.steps
                log.info("ensemble '%s' version %s ready (%d step%s: %s)", name, key,
                         len(steps), "" if len(steps) == 1 else "s",
                         ", ".join(s.model for s in steps))
                continue
            try:
                loaded = await loop.run_in_executor(
                    None, load_version, model_file, name, number, proto, explicit_batch,
                    self.cpu_threads, self.default_max_batch_size)
            except ModelLoadError as exc:
                log.error("model '%s' version %s failed to load: %s", name, key, exc)
                reasons[key] = str(exc)
            except Exception as exc:  # an unexpected loader failure must not stop the server
                log.exception("model '%s' version %s failed to load", name, key)
                reasons[key] = f"unexpected load failure ({type(exc).__name__})"
            if key in reasons:
                self._load_failed(name, key, reasons[key])
                if current is not None:
                    # A failed reload (a file being copied over in place): the copy that works
                    # keeps serving until a new one loads.
                    log.error("model '%s' version %s: its previous copy keeps serving", name, key)
                    reasons[key] = f"reload failed, the previous copy serves: {reasons[key]}"
                    new_serving[key] = current
                continue
            config = loaded.config
            stats = ModelStats()
            batcher = Batcher(name, key, config.max_batch_size, config.batching, loaded.instances,
                              [i.name for i in config.inputs], [o.name for o in config.outputs],
                              stats, execution_timeout(config, self.execution_timeout_s),
                              inline=loaded.inline, inline_budget_s=loaded.inline_budget_s,
                              max_inflight=self.max_inflight_per_model,
                              cache=self._cache_for(config))
            batcher.observer = self.events.batch
            batcher.start()
            new_serving[key] = ServingVersion(name, key, config, batcher, stats, signature)
            log.info("model '%s' version %s ready (%d instance%s, %s)", name, key,
                     len(loaded.instances), "" if len(loaded.instances) == 1 else "s",
                     "runs on the event loop" if loaded.inline else "runs on instance threads")
        if not new_serving and entry.serving:
            # Nothing new could load: keep the old versions rather than serve nothing.
            log.error("model '%s': no wanted version loaded; previous versions keep serving", name)
            entry.reasons = reasons
            return
        retired = [v for k, v in entry.serving.items() if new_serving.get(k) is not v]
        self._publish(entry, new_serving, reasons)
        for old in retired:
            log.info("model '%s' version %s retiring", name, old.version)
        await asyncio.gather(*(old.batcher.close() for old in retired))

    async def _prepare_ensemble(self, proto) -> tuple[ModelConfig, Composition]:
        """An ensemble's config, checked against its composing models, which load first (as
        in Triton, loading an ensemble loads the models it needs). Its outputs' class labels
        are its own label_filename's, else those of the model output that produces them."""
        config = ensemble_config(proto)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._refuse_cycles, config.name,
                                   config.ensemble.models)
        own = {t.name: t.label_filename for t in proto.output if t.label_filename}
        own = {name: await loop.run_in_executor(None, read_labels, self.root / config.name, f)
               for name, f in own.items()}
        for model in sorted(config.ensemble.models):
            entry = self.models.get(model)
            if ((entry is None or not entry.serving) and valid_model_name(model)
                    and (self.root / model).is_dir()):
                await self.load(model)
        composition = check_composing(config, self._composing(config))
        labels = {**composition.labels, **own}
        return (dataclasses.replace(config, labels=labels) if labels else config), composition

    def _composing(self, config: ModelConfig) -> dict[int, list[ModelConfig]]:
        """For each step of an ensemble, the configs of the versions that may serve it now."""
        configs = {}
        for step in config.ensemble.steps:
            entry = self.models.get(step.model)
            serving = entry.serving if entry is not None else {}
            if step.version:
                configs[step.index] = ([serving[step.version].config]
                                       if step.version in serving else [])
            else:
                configs[step.index] = [v.config for v in serving.values()]
        return configs

    def _refuse_cycles(self, name: str, models) -> None:
        """Refuse an ensemble that reaches itself through other ensembles (read from disk:
        blocking). Loading one would wait on its own lock."""
        stack = [(model, (name, model)) for model in sorted(models)]
        seen = set()
        while stack:
            model, path = stack.pop()
            if model == name:
                raise ModelLoadError("circular dependency between ensembles: "
                                     + " -> ".join(path))
            if model in seen or not valid_model_name(model):
                continue
            seen.add(model)
            try:
                proto, _ = read_config_file(self.root / model, model)
            except ModelLoadError:
                continue  # that model's own load reports it
            if is_ensemble(proto):
                stack += [(s.model_name, (*path, s.model_name))
                          for s in proto.ensemble_scheduling.step]

    def _recheck_ensembles(self, changed: str) -> None:
        """A model changed: the ensembles that use it serve only while they still fit it
        (a composing model unloaded, or reloaded with other tensors, stops them with why)."""
        if self.closing:  # the server stops and unloads everything: not an outage
            return
        changed_state = []
        for entry in self.models.values():
            for served in entry.serving.values():
                plan = served.config.ensemble
                if plan is None or changed not in plan.models:
                    continue
                scheduler = served.batcher
                try:
                    scheduler.shapes = check_composing(served.config,
                                                       self._composing(served.config)).steps
                    broken = ""
                except ModelLoadError as exc:
                    broken = str(exc)
                if broken != scheduler.broken:
                    if broken:
                        log.error("ensemble '%s' version %s cannot serve: %s", entry.name,
                                  served.version, broken)
                    else:
                        log.info("ensemble '%s' version %s serves again", entry.name,
                                 served.version)
                    scheduler.broken = broken
                    changed_state.append(entry.name)
        for name in dict.fromkeys(changed_state):  # health and metrics follow
            self.events.emit("model_changed", name)

    def serves(self, name: str) -> bool:
        """Whether a model has a version that can serve now (grpc.health's SERVING)."""
        entry = self.models.get(name)
        return entry is not None and any(
            v.config.ensemble is None or not v.batcher.broken for v in entry.serving.values())

    def _cache_for(self, config: ModelConfig) -> ResponseCache | None:
        if not config.response_cache:
            return None
        if self.cache is None:
            log.warning("model '%s' enables response_cache but the server has none "
                        "(--cache-size BYTES); it is served without", config.name)
        return self.cache

    def _load_failed(self, name: str, version: str, reason: str) -> None:
        self.events.emit("load_failed", name, version, reason)

    def _publish(self, entry: ModelEntry, serving: dict[str, ServingVersion],
                 reasons: dict[str, str]) -> None:
        entry.serving = serving
        entry.latest = serving[max(serving, key=int)] if serving else None
        entry.config = entry.latest.config if entry.latest else entry.config
        entry.reasons = reasons
        if any(v.config.ensemble is not None for v in serving.values()):
            self.ensembles.add(entry.name)
        else:
            self.ensembles.discard(entry.name)
        self._recheck_ensembles(entry.name)
        self.events.emit("model_changed", entry.name)

    async def unload(self, name: str) -> None:
        """Stop serving a model; queued and running requests finish first."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self.models.get(name)
            if entry is None:
                raise unknown_model(name)
            retired = list(entry.serving.values())
            self._publish(entry, {}, {"": "unloaded"})
            await asyncio.gather(*(v.batcher.close() for v in retired))

    # ---- operator requests (RepositoryModelLoad / Unload) -----------------------------------

    def _check_explicit(self, verb: str) -> None:
        if self.control_mode != "explicit":
            raise FailedPrecondition(
                "explicit model load / unload is not allowed if polling is enabled: cannot "
                f"{verb} models, the repository is in '{self.control_mode}' control mode; "
                "start the server with --control-mode explicit")

    async def load_requested(self, name: str, parameter_keys: list[str]) -> None:
        """Load on an operator's request; refuses content or config sent over the network."""
        self._check_explicit("load")
        check_load_name(name)
        for key in parameter_keys:
            if key.startswith("file:") or key == "config":
                raise InvalidArgument(
                    f"load parameter '{echo(key)}' is refused: models and configs are read only "
                    "from the server's repository, never from the request")
        if not valid_model_name(name):
            raise failed_to_poll(name, "a name starting with '.' or '-' or holding '..' is "
                                       "never a model directory")
        self.model_dir(name)  # a directory that resolves out of the repository is refused
        if not (self.root / name).is_dir():
            raise failed_to_poll(name, f"model '{name}' is not in the repository")
        entry = await self.load(name)
        if not entry.serving:
            reason = entry.reasons.get("") or "; ".join(
                f"version {v}: {r}" for v, r in sorted(entry.reasons.items()))
            raise Unavailable(f"model '{name}' failed to load: {reason}")
        await self._everywhere(name, True, "load")

    async def unload_requested(self, name: str) -> None:
        self._check_explicit("unload")
        check_model_name(name)
        await self.unload(name)
        await self._everywhere(name, False, "unload")

    async def _everywhere(self, name: str, loaded: bool, action: str) -> None:
        """The other processes of the fleet follow (when ``broadcast`` is set, by the control
        plane); refused when some did not within the time limit."""
        if self.broadcast is None:
            return
        done, live = await self.broadcast(name, loaded, action)
        if done < live:
            raise Unavailable(f"model '{name}': {action} done by {done} of {live} gateway "
                              "processes so far; the others are still at it or failed (see "
                              "their logs and the repository index)")

    def abandon(self, message: str) -> None:
        """Answer every request queued or running in any version UNAVAILABLE (``message``)."""
        error = Unavailable(message)
        for entry in self.models.values():
            for served in entry.serving.values():
                served.batcher.abandon(error)

    async def close(self) -> None:
        self.closing = True
        await asyncio.gather(*(self.unload(name) for name in list(self.models)),
                             return_exceptions=True)

    # ---- index ----------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """(model, version, state, reason) rows for every model on disk or loaded."""
        rows = []
        for name in sorted(set(self.scan()) | set(self.models)):
            entry = self.models.get(name)
            if entry is None:
                rows.append((name, "", "UNAVAILABLE", "not loaded"))
                continue
            if entry.loading and not entry.serving:
                rows.append((name, "", "LOADING", ""))
            for version, served in sorted(entry.serving.items(), key=lambda kv: int(kv[0])):
                if served.config.ensemble is not None and served.batcher.broken:
                    rows.append((name, version, "UNAVAILABLE", served.batcher.broken))
                else:  # a reason: a failed reload
                    rows.append((name, version, "READY", entry.reasons.get(version, "")))
            for version, reason in sorted(entry.reasons.items()):
                if version not in entry.serving:
                    rows.append((name, version, "UNAVAILABLE", reason))
        if ready_only:
            rows = [r for r in rows if r[2] == "READY"]
        return rows


def execution_timeout(config: ModelConfig, default_s: float) -> float:
    """Seconds a batch may run before its instance is declared stuck (config parameter
    ``execution_timeout_ms`` wins over the server's ``--execution-timeout``)."""
    value = config.parameters.get("execution_timeout_ms")
    try:
        return float(value) / 1000 if value else default_s
    except ValueError:
        log.warning("model '%s': execution_timeout_ms %r is not a number; using %gs",
                    config.name, value, default_s)
        return default_s


def file_signature(path: Path):
    """(mtime, size) of a file, None if absent: enough to notice it was replaced."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def unreadable(exc: OSError) -> str:
    """Why a directory cannot be read, for an operator, without its path."""
    if exc.errno == errno.ENOENT:
        return "it does not exist: moved or unmounted?"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOTDIR:
        return "it is not a directory"
    return exc.strerror or type(exc).__name__


def _why_unavailable(entry: ModelEntry, name: str) -> str:
    if entry.loading:
        return f"model '{name}' is loading"
    reason = entry.reasons.get("") or next(iter(entry.reasons.values()), "not loaded")
    return f"model '{name}' is not available: {reason}"
