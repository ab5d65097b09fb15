"""The model registry on disk: check a new model file, give it the next version number, and
write its version directory atomically, with ``metadata.json`` and an optional ``baseline.npz``.

A publish never leaves half a version behind. Everything is written into a hidden staging
directory beside the versions (``<model>/.publish-*``, or ``<repo>/.publish-*`` for a new
model), checked there, fsynced, and renamed into place under a lock on the model directory,
so a polling gateway, a second publisher or a crash sees either the whole version or nothing.
A refused file (corrupt, not loadable by ONNX Runtime, incompatible with the model's config or
its last version's inputs and outputs) raises :class:`PublishRefused` and leaves nothing.

``RegistryService`` is the gateway's side of publishing over the admin API: it writes the
upload with the same code, loads the model, and starts a canary rollout when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import fcntl
import getpass
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gateway.errors import FailedPrecondition, InvalidArgument, ModelLoadError, NotFound
from gateway.modelconfig import complete_config, read_config_file, validate, version_policy
from gateway.repository import check_model_name
from runtimes.base import ModelIO, RuntimeOptions

log = logging.getLogger(__name__)

METADATA = "metadata.json"
BASELINE = "baseline.npz"
MAX_BASELINE_BYTES = 256 << 20  # uncompressed arrays of a published baseline.npz
STAGING_PREFIX = ".publish-"
STALE_STAGING_S = 24 * 3600  # staging directories left by a crashed publisher are removed after
DEFAULT_STEPS = (5.0, 25.0, 50.0, 100.0)  # the rollout's default canary steps


class PublishRefused(InvalidArgument):
    """The file (or its baseline) cannot become a version; nothing was written."""


@dataclass(frozen=True)
class Published:
    model: str
    version: int
    path: Path  # the version directory
    metadata: dict


# ---- checks ---------------------------------------------------------------------------------

def inspect_model(path: Path, display: str | None = None) -> ModelIO:
    """The model's inputs and outputs, after the onnx checker (when onnx is installed) and
    ONNX Runtime have both accepted the file; PublishRefused says why not (naming the file
    ``display``, by default its own name)."""
    path = Path(path)
    display = display or path.name
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:  # DecodeError, ValidationError, ... all mean "not valid"
            raise PublishRefused(f"{display} is not a valid ONNX model: "
                                 f"{_brief(exc, path, display)}") from None
    from runtimes.ort import OrtRuntime

    try:
        runtime = OrtRuntime(path, RuntimeOptions(device="cpu", intra_op_threads=1))
    except ModelLoadError as exc:
        reason = _brief(exc, path, display).removeprefix("onnxruntime could not load the model: ")
        raise PublishRefused(f"ONNX Runtime cannot open {display}: {reason}") from None
    io = runtime.io
    runtime.close()
    return io


def signature(io: ModelIO) -> dict:
    """Inputs and outputs as recorded in metadata.json and compared between versions."""
    def tensors(specs):
        return [{"name": s.name, "datatype": s.datatype, "dims": list(s.dims)} for s in specs]
    return {"inputs": tensors(io.inputs), "outputs": tensors(io.outputs)}


def signature_problems(old: dict, new: dict) -> list[str]:
    """What a caller of the old signature would trip over with the new one.

    Inputs must match exactly (names, datatypes, dims; a dynamic dim matches any); every old
    output must still exist with the same datatype and dims (new extra outputs are fine).
    """
    problems = []
    old_in = {t["name"]: t for t in old.get("inputs", [])}
    new_in = {t["name"]: t for t in new.get("inputs", [])}
    for name in sorted(old_in.keys() - new_in.keys()):
        problems.append(f"input '{name}' is gone")
    for name in sorted(new_in.keys() - old_in.keys()):
        problems.append(f"input '{name}' is new")
    new_out = {t["name"]: t for t in new.get("outputs", [])}
    pairs = [("input", old_in[n], new_in[n]) for n in sorted(old_in.keys() & new_in.keys())]
    gone = [t["name"] for t in old.get("outputs", []) if t["name"] not in new_out]
    pairs += [("output", t, new_out[t["name"]]) for t in old.get("outputs", [])
              if t["name"] in new_out]
    for kind, was, now in pairs:
        if was["datatype"] != now["datatype"]:
            problems.append(f"{kind} '{was['name']}' is {now['datatype']} (was {was['datatype']})")
        elif not _dims_compatible(was["dims"], now["dims"]):
            problems.append(f"{kind} '{was['name']}' has shape {now['dims']} (was {was['dims']})")
    problems += [f"output '{name}' is gone" for name in gone]
    return problems


def _dims_compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def check_against_model(model_dir: Path, model: str, io: ModelIO) -> None:
    """Refuse a file that the model's config.pbtxt or its newest version would not accept."""
    if not model_dir.is_dir():
        return
    try:
        proto, explicit_batch = read_config_file(model_dir, model)
        proto = copy.deepcopy(proto)
        complete_config(proto, explicit_batch, io)
        validate(proto, io)
    except ModelLoadError as exc:
        raise PublishRefused(f"the model does not fit model '{model}''s config.pbtxt: {exc}; "
                             "fix the config first, or publish with --allow-signature-change") \
            from None
    newest = newest_version(model_dir)
    if newest is None:
        return
    old = _version_signature(model_dir, newest)
    if old is None:
        return
    problems = signature_problems(old, signature(io))
    if problems:
        raise PublishRefused(
            f"the model's inputs/outputs differ from version {newest}'s: {'; '.join(problems)}. "
            "Callers of the model would break; publish with --allow-signature-change if this is "
            "intended")


def _version_signature(model_dir: Path, version: int) -> dict | None:
    """A version's signature: from its metadata.json, else by opening its model file."""
    meta = read_metadata(model_dir / str(version))
    if isinstance(meta.get("signature"), dict):
        return meta["signature"]
    path = model_file(model_dir / str(version), _filename(model_dir))
    if path is None:
        return None
    try:
        return signature(inspect_model(path))
    except PublishRefused:
        return None  # the old version is broken itself: nothing to stay compatible with


# ---- baselines --------------------------------------------------------------------------------

def baseline_data(source, io: ModelIO) -> dict[str, np.ndarray]:
    """Training inputs for the drift baseline from a ``.npy`` file or an array (the first
    input's data), an ``.npz`` file (keys = input names) or a dict {input name: array};
    checked against ``io``."""
    if isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, np.ndarray):
        if not io.inputs:
            raise PublishRefused("the model has no inputs to attach a baseline to")
        data = {io.inputs[0].name: source}
    else:
        path = Path(source)
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                data = {io.inputs[0].name: loaded} if io.inputs else {}
            else:
                with loaded:
                    data = {name: loaded[name] for name in loaded.files}
        except Exception as exc:  # OSError, ValueError, EOFError, BadZipFile, zlib.error ...
            raise PublishRefused(f"baseline {path.name}: not a readable .npy/.npz file "
                                 f"({type(exc).__name__})") from None
        if isinstance(loaded, np.ndarray) and not io.inputs:
            raise PublishRefused("the model has no inputs to attach a baseline to")
    inputs = {s.name: s for s in io.inputs}
    if not data:
        raise PublishRefused("baseline: no arrays given")
    for name, values in data.items():
        spec = inputs.get(name)
        if spec is None:
            raise PublishRefused(f"baseline: '{name}' is not an input of the model (inputs: "
                                 f"{', '.join(inputs) or 'none'})")
        values = np.asarray(values)
        if values.dtype.kind not in "biuf":
            raise PublishRefused(f"baseline '{name}': numeric data needed, got {values.dtype}")
        if values.ndim == 0 or values.shape[0] == 0:
            raise PublishRefused(f"baseline '{name}': needs samples along the first dimension")
        dims = list(spec.dims[1:]) if spec.dims and spec.dims[0] == -1 else list(spec.dims)
        if spec.dims and spec.dims[0] == -1 and not _dims_compatible(dims, values.shape[1:]):
            raise PublishRefused(f"baseline '{name}': samples of shape {list(values.shape[1:])} "
                                 f"do not fit the input's {dims}")
        data[name] = values
    return data


def check_baseline_file(path: Path, io: ModelIO) -> dict:
    """Validate an already built baseline.npz (bytes a remote publisher sent: anything may be
    in it); return its summary for metadata.json."""
    from gateway.monitoring.stats import read_baseline

    try:  # the sizes its members declare bound what reading them can take (no zip bombs)
        with zipfile.ZipFile(path) as archive:
            declared = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise PublishRefused("baseline.npz is not usable: not a readable npz (zip) archive "
                             f"({type(exc).__name__})") from None
    if declared > MAX_BASELINE_BYTES:
        raise PublishRefused(f"baseline.npz is not usable: its arrays hold {declared} bytes; "
                             f"the limit is {MAX_BASELINE_BYTES}")
    try:
        baselines = read_baseline(path)
    except ValueError as exc:
        raise PublishRefused(f"baseline.npz is not usable: {exc}") from None
    names = {s.name for s in io.inputs}
    unknown = sorted(set(baselines) - names)
    if unknown:
        raise PublishRefused(f"baseline.npz: {', '.join(unknown)} not an input of the model")
    return {"inputs": sorted(baselines),
            "samples": max((b.samples for b in baselines.values()), default=0)}


# ---- the repository on disk ------------------------------------------------------------------

def _filename(model_dir: Path) -> str:
    try:
        proto, _ = read_config_file(model_dir, model_dir.name)
    except ModelLoadError:
        return "model.onnx"
    return proto.default_model_filename or "model.onnx"


def model_file(version_dir: Path, filename: str = "model.onnx") -> Path | None:
    path = version_dir / filename
    return path if path.is_file() else None


def version_numbers(model_dir: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in model_dir.iterdir()
                      if p.is_dir() and p.name.isdigit() and int(p.name) > 0)
    except OSError:
        return []


def newest_version(model_dir: Path) -> int | None:
    numbers = version_numbers(model_dir)
    return numbers[-1] if numbers else None


def read_metadata(version_dir: Path) -> dict:
    try:
        data = json.loads((version_dir / METADATA).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def list_versions(root: Path, model: str) -> list[dict]:
    """Every version directory of a model, oldest first: number, metadata, files present."""
    check_model_name(model)
    model_dir = Path(root) / model
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model '{model}' is not in the repository")
    filename = _filename(model_dir)
    return [{"version": n, "metadata": read_metadata(model_dir / str(n)),
             "has_model": model_file(model_dir / str(n), filename) is not None,
             "has_baseline": (model_dir / str(n) / BASELINE).is_file()}
            for n in version_numbers(model_dir)]


async def version_rows(router, model: str) -> list[dict]:
    """Every version of a model, on disk or known to the server, oldest first: its state
    (READY, UNAVAILABLE with the reason, NOT_LOADED), metadata, baseline and traffic share now.
    The directory listing runs off the event loop."""
    repository = router.repository
    try:
        on_disk = await asyncio.to_thread(list_versions, repository.root, model)
    except FileNotFoundError:
        on_disk = []
    entry = repository.models.get(model)
    if not on_disk and entry is None:
        raise NotFound(f"unknown model '{model}'")
    shares = router.effective(model)[0] if entry is not None else {}
    found = {str(v["version"]): v for v in on_disk}
    versions = set(found) | (set(entry.serving) | set(entry.reasons) - {""} if entry else set())
    rows = []
    for version in sorted(versions, key=int):
        info = found.get(version, {})
        if entry is not None and version in entry.serving:
            state, reason = "READY", ""
        elif entry is not None and version in entry.reasons:
            state, reason = "UNAVAILABLE", entry.reasons[version]
        else:
            state, reason = "NOT_LOADED", ""
        rows.append({"version": version, "state": state, "reason": reason,
                     "metadata": info.get("metadata", {}),
                     "traffic_percent": shares.get(version, 0.0),
                     "has_baseline": bool(info.get("has_baseline"))})
    return rows


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive flock on a directory: publishers of one model take turns."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _copy_hashing(source: Path, target: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _remove_stale_staging(directory: Path) -> None:
    now = time.time()
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            if not path.name.startswith(STAGING_PREFIX):
                continue
            if now - path.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(path, ignore_errors=True)


def publish_version(root: Path, model: str, source: Path, *, metadata: dict | None = None,
                    baseline=None, baseline_npz: bytes | None = None,
                    allow_signature_change: bool = False, source_name: str | None = None,
                    expected_sha256: str | None = None, published_by: str = "") -> Published:
    """Check ``source`` and write it as the next version of ``model`` under ``root``.

    ``baseline``: a .npy/.npz path or {input: array} (turned into baseline.npz);
    ``baseline_npz``: the bytes of a ready baseline.npz (what a remote publisher sends).
    """
    root = Path(root).resolve()
    check_model_name(model)
    if not root.is_dir():
        raise PublishRefused("the model repository is not a directory")
    if metadata is not None and not isinstance(metadata, dict):
        raise PublishRefused("metadata must be a mapping of names to values")
    source = Path(source)
    if not source.is_file():
        raise PublishRefused(f"{source.name}: no such file")
    model_dir = root / model
    new_model = not model_dir.is_dir()
    parent = root if new_model else model_dir
    _remove_stale_staging(parent)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # as mkdir would: mkdtemp's 0700 would hide it
        vdir = staging / "1" if new_model else staging
        vdir.mkdir(exist_ok=True)
        filename = "model.onnx" if new_model else _filename(model_dir)
        sha256, size = _copy_hashing(source, vdir / filename)
        if expected_sha256 and expected_sha256.lower() != sha256:
            raise PublishRefused("the file's sha256 does not match what the publisher sent: "
                                 "the upload was damaged")
        io = inspect_model(vdir / filename, source_name or source.name)
        if not allow_signature_change:
            check_against_model(model_dir, model, io)
        summary = None
        if baseline is not None:
            from gateway.monitoring.stats import write_baseline

            data = baseline_data(baseline, io)
            try:
                write_baseline(vdir / BASELINE, data)
            except (ValueError, TypeError) as exc:
                raise PublishRefused(f"baseline: {exc}") from None
            summary = {"inputs": sorted(data), "samples": int(max(len(v) for v in data.values()))}
        elif baseline_npz:
            (vdir / BASELINE).write_bytes(baseline_npz)
            summary = check_baseline_file(vdir / BASELINE, io)
        record = {
            "model": model, "version": None, "file": filename, "sha256": sha256, "size": size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_unix": round(time.time(), 3), "source": source_name or source.name,
            "publisher": _publisher(), "signature": signature(io), "baseline": summary,
            "metadata": metadata or {},
        }
        if published_by:  # who asked a gateway to publish it (the approval gate reads it)
            record["published_by"] = published_by
        return _commit(root, model_dir, staging, vdir, new_model, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(root, model_dir, staging, vdir, new_model, record) -> Published:
    """Number the version and rename it into place, under the lock."""
    if new_model:
        with _locked(root):
            if not model_dir.exists():
                record["version"] = 1
                _write_metadata(vdir, record)
                _fsync_tree(staging)
                os.rename(staging, model_dir)
                _fsync_dir(root)
                return _done(model_dir / "1", record)
        model_dir = root / record["model"]  # someone else created the model meanwhile
    with _locked(model_dir):
        for _attempt in range(100):
            number = (newest_version(model_dir) or 0) + 1
            target = model_dir / str(number)
            if target.exists():  # an empty or odd directory in the way: take the next number
                continue
            record["version"] = number
            _write_metadata(vdir, record)
            _fsync_tree(vdir)
            try:
                os.rename(vdir, target)
            except OSError as exc:  # taken meanwhile (by a writer that ignores the lock)
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            _fsync_dir(model_dir)
            return _done(target, record)
    raise FailedPrecondition(f"could not find a free version number for model "
                             f"'{record['model']}'")


def _write_metadata(vdir: Path, record: dict) -> None:
    (vdir / METADATA).write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def _done(path: Path, record: dict) -> Published:
    log.info("published model '%s' version %s (%s, sha256 %s)", record["model"],
             record["version"], _size(record["size"]), record["sha256"][:12])
    return Published(record["model"], record["version"], path, record)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _publisher() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _brief(exc: Exception, path: Path, display: str) -> str:
    """The first line of an error, without the staging path (messages may travel to clients)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.replace(str(path), display).replace(str(path.parent) + os.sep, "")
    return text.replace(path.name, display)[:300]


def canary_steps(percent: float) -> tuple[float, ...]:
    """A canary at ``percent``, then the default steps above it, ending at 100."""
    if not 0 < percent < 100:
        raise InvalidArgument("the canary share must be above 0 and below 100 percent")
    return (float(percent), *(s for s in DEFAULT_STEPS if s > percent))


# ---- the gateway's side of publishing ----------------------------------------------------------

class RegistryService:
    """Publish over the admin API: write the version, load it, and start a canary if asked."""

    def __init__(self, repository, traffic, rollouts):
        self.repository = repository
        self.traffic = traffic
        self.rollouts = rollouts

    async def publish(self, model: str, upload: Path, *, metadata: dict, baseline_npz: bytes,
                      allow_signature_change: bool, canary, source: str, sha256: str,
                      who: str):
        """(Published, state, detail, Rollout | None); ``canary``: a RolloutSpec whose
        to_version is filled in once the version has its number, or None."""
        check_model_name(model)
        held = await self._hold_traffic(model, who) if canary is not None else None
        loop = asyncio.get_running_loop()
        try:
            published = await loop.run_in_executor(None, lambda: publish_version(
                self.repository.root, model, upload, metadata=metadata,
                baseline_npz=baseline_npz or None, allow_signature_change=allow_signature_change,
                source_name=source, expected_sha256=sha256, published_by=who))
        except BaseException:
            await self._release(model, held, who)
            raise
        version = str(published.version)
        entry = await self.repository.load(model)
        spread = ""
        if self.repository.broadcast is not None:  # every other process loads it too
            done, live = await self.repository.broadcast(model, True, "publish")
            if done < live:
                spread = (f"; loaded by {done} of {live} gateway processes so far (the others "
                          "are still loading)")
        if version in entry.serving:
            state, detail = "READY", ""
        else:
            state = "UNAVAILABLE"
            detail = (entry.reasons.get(version) or entry.reasons.get("")
                      or "the model's version policy does not serve it")
        rollout = None
        if canary is not None and state == "READY":
            try:
                rollout = await self.rollouts.start(replace(canary, to_version=version), who)
            except Exception as exc:  # the version is written and loaded: say why, keep it safe
                detail = f"the canary did not start: {getattr(exc, 'message', exc)}"
                if held is not None:
                    detail += (f"; all traffic stays on version {held['version']} (`gateway "
                               f"traffic clear {model}` lets the newest version serve)")
        elif canary is not None:
            await self._release(model, held, who)
            detail = f"{detail}; the canary did not start"
        return published, state, (detail + spread).removeprefix("; "), rollout

    async def _hold_traffic(self, model: str, who: str) -> dict | None:
        """Before a canary's version appears, keep requests on what serves now: with no split
        the newest version would take all traffic the moment it loads."""
        entry = self.repository.models.get(model)
        if entry is None or not entry.serving:
            raise FailedPrecondition(f"a canary of model '{model}' needs a serving version to "
                                     "compare with; publish without --canary first")
        policy = version_policy(entry.config.proto) if entry.config is not None else None
        if policy is not None and (policy.kind == "specific"
                                   or (policy.kind == "latest" and policy.num_versions < 2)):
            raise FailedPrecondition(
                f"model '{model}''s version policy serves only its newest version, so the old "
                "one would retire when the canary loads: set version_policy { latest { "
                "num_versions: 2 } } (or all { }) in its config.pbtxt")
        active = self.rollouts.active(model)
        if active is not None:
            raise FailedPrecondition(
                f"model '{model}' already has a {active.state} rollout to version "
                f"{active.spec.to_version}; let it finish or abort it before a new canary")
        if self.traffic.policy(model).weights:
            return None  # a split is set: the new version gets nothing until the rollout
        shares, _ = self.traffic.router.effective(model)
        current = max(shares, key=shares.get) if shares else max(entry.serving, key=int)
        await self.traffic.set_split(model, {current: 100.0},
                                     f"{who} (publish: hold traffic on version {current} for "
                                     "the canary)")
        return {"version": current, "shadow": self.traffic.policy(model).shadow}

    async def _release(self, model: str, held: dict | None, who: str) -> None:
        """Undo the hold when no new version came to serve (a shadow set before stays)."""
        if held is None:
            return
        try:
            await self.traffic.clear(model, f"{who} (publish: no canary)")
            shadow = held["shadow"]
            if shadow is not None:
                await self.traffic.set_shadow(model, shadow.version, shadow.percent, who)
        except Exception as exc:
            log.error("model '%s': could not clear the held split: %s", model,
                      getattr(exc, "message", exc))
