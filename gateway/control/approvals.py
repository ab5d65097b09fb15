"""The approval gate: with ``require_approval: true`` in a model's ``gateway.yaml``, a new
version receives no live traffic (split, rollout or promotion) until someone other than its
publisher approves it.

Approvals live in the operator-state store (section ``approvals``, one entry per model:
``{"versions": {VERSION: {by, time, publisher, sha256}}}``), written like every operator
change: a compare-and-set on the revision read, with an audit record. Refusals (a publisher
approving their own version, a change the gate blocks) are audited too.

The rules, for a gated model:

- a split may give a version more traffic than it gets now only if that version is approved or
  is not newer than the newest version receiving traffic now ("new" means newer than what
  serves: moving traffic back to an older version, a rollback, is never blocked);
- a rollout starts, steps and promotes only an approved canary; a step or a promotion the gate
  blocks (the gate was turned on mid-rollout) pauses the rollout and says why; rolling back and
  aborting are never blocked;
- with no split, requests go to the newest *approved* serving version (the oldest serving one
  while none is approved) instead of the newest: publishing a version never moves traffic by
  itself. This hold is installed in the router with the stored policies (``hold``), so it
  holds from the moment a new version loads;
- approving does not move traffic either: where the hold would switch to the version just
  approved, the approval stores the version serving now as the split, in the same commit
  (a rollout or a split then moves traffic).

The publisher of a version is ``published_by`` in its ``metadata.json`` (the identity that
published it through a gateway: the token's name, or the caller's address without auth), else
``publisher`` (the user@host that wrote it with ``gateway publish --repository``). Identities
compare without their port: without ``--auth-tokens`` a caller is known only by its address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path

from gateway.control.store import Change, Snapshot, StoreUnavailable
from gateway.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, echo

log = logging.getLogger(__name__)
SECTION = "approvals"
SETTING = "require_approval"
SETTINGS_FILE = "gateway.yaml"
_gates: dict[Path, tuple[tuple, bool]] = {}  # gateway.yaml -> (file signature, setting)


class ApprovalRequired(FailedPrecondition):
    """The gate refused a change that would give an unapproved version traffic."""

    def __init__(self, model: str, versions: list[str], what: str):
        names = ", ".join(versions)
        plural = "s" if len(versions) > 1 else ""
        super().__init__(
            f"model '{model}' requires approval (gateway.yaml require_approval): version{plural} "
            f"{names} {'are' if plural else 'is'} not approved, so {what} cannot give "
            f"{'them' if plural else 'it'} traffic; someone other than the publisher must "
            f"approve first (gateway approve {model} {versions[0]}, or the console)")
        self.model, self.versions = model, versions


# ---- reading ------------------------------------------------------------------------------------

def gated(repository, model: str) -> bool:
    """Whether ``require_approval: true`` is set in the model's gateway.yaml (read again only
    when the file changes; a file that cannot be read keeps the last setting read)."""
    root = getattr(repository, "root", None)
    if root is None:  # a repository that is no directory (a test's stand-in)
        return False
    path = Path(root) / model / SETTINGS_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        _gates.pop(path, None)
        return False
    except OSError:
        return _gates.get(path, ((), False))[1]
    signature = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _gates.get(path)
    if cached is not None and cached[0] == signature:
        return cached[1]
    value = cached[1] if cached is not None else False
    try:
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        setting = data.get(SETTING, False) if isinstance(data, dict) else False
        if not isinstance(setting, bool):
            raise TypeError(f"{SETTING} must be true or false, not {setting!r}")
        value = setting
    except Exception as exc:  # a bad file keeps the last setting, logged
        log.error("model '%s': %s: %s; the approval gate stays %s", model, SETTINGS_FILE,
                  getattr(exc, "problem", None) or exc, "on" if value else "off")
    _gates[path] = (signature, value)
    return value


def approvals(snapshot: Snapshot, model: str) -> dict[str, dict]:
    """The model's approved versions: version -> {by, time, publisher, sha256}."""
    value = snapshot.value(SECTION, model)
    versions = value.get("versions") if isinstance(value, dict) else None
    return versions if isinstance(versions, dict) else {}


def identity(who: str) -> str:
    """Who, for comparing publisher and approver: annotations and the port dropped
    ("alice (publish: ...)" -> "alice", "ipv4:10.0.0.5:40022" -> "10.0.0.5")."""
    text = who.split(" (", 1)[0].strip()
    peer = re.fullmatch(r"ipv[46]:\[?(.*?)\]?:\d+", text)
    return (peer.group(1) if peer else text).lower()


def publisher_of(metadata: dict) -> str:
    return str(metadata.get("published_by") or metadata.get("publisher") or "")


# ---- the gate ---------------------------------------------------------------------------------

def check_split(snapshot: Snapshot, router, model: str, shares: dict[str, float],
                what: str = "this split") -> None:
    """Refuse (ApprovalRequired) a split of a gated model that gives a new, unapproved
    version more traffic than it gets now. ``shares``: version -> percent (or slots)."""
    if not gated(router.repository, model):
        return
    approved = approvals(snapshot, model)
    now, _ = router.effective(model)
    total = sum(shares.values()) or 1.0
    in_service = max((int(v) for v, p in now.items() if p > 0), default=0)
    blocked = [v for v, weight in shares.items()
               if weight * 100.0 / total > now.get(v, 0.0) + 1e-6
               and v not in approved and int(v) > in_service]
    if blocked:
        raise ApprovalRequired(model, sorted(blocked, key=int), what)


def check_canary(snapshot: Snapshot, router, model: str, version: str,
                 what: str = "a rollout") -> None:
    """Refuse (ApprovalRequired) a rollout's start, step or promotion of an unapproved
    canary of a gated model."""
    if gated(router.repository, model) and version not in approvals(snapshot, model):
        raise ApprovalRequired(model, [version], what)


def hold(snapshot: Snapshot, router, model: str, stored):
    """The policy to serve for ``model``: ``stored`` (a TrafficPolicy or None), except that a
    gated model without a split serves its newest approved version (the oldest serving one
    while none is approved) rather than its newest."""
    if stored is not None and stored.weights:
        return stored
    entry = router.repository.models.get(model)
    if entry is None or not entry.serving or entry.latest is None:
        return stored
    if not gated(router.repository, model):
        return stored
    approved = approvals(snapshot, model)
    candidates = [v for v in entry.serving if v in approved]
    target = max(candidates, key=int) if candidates else min(entry.serving, key=int)
    if target == entry.latest.version:
        return stored  # the newest serves anyway
    from gateway.routing import TrafficPolicy, normalise_weights

    return TrafficPolicy(normalise_weights({target: 100.0}),
                         stored.shadow if stored is not None else None)


def held(snapshot: Snapshot, router, model: str) -> str:
    """Why a gated model serves what it serves without a split ('' when not held)."""
    entry = router.repository.models.get(model)
    stored = snapshot.value("traffic", model)
    if entry is None or entry.latest is None or (isinstance(stored, dict)
                                                 and stored.get("weights")) \
            or not gated(router.repository, model):
        return ""
    policy = hold(snapshot, router, model, None)
    if policy is None:
        return ""
    target = next(iter(policy.weights))
    return (f"the approval gate holds traffic on version {target}: newer versions are not "
            "approved")


# ---- changes ------------------------------------------------------------------------------------

def refusal_record(who: str, model: str, action: str, summary: str, detail=None) -> dict:
    return {"time": time.time(), "who": who, "section": SECTION, "model": model,
            "action": action, "old": None, "new": detail, "summary": summary}


async def audit_refusal(plane, who: str, model: str, action: str, summary: str,
                        detail=None) -> None:
    """Write a refusal to the audit trail (an audit-only commit); never raises."""
    try:
        await plane.store.commit([], [refusal_record(who, model, action, summary, detail)])
    except StoreUnavailable as exc:
        log.warning("model '%s': refusal not audited (%s): %s", model, exc.message, summary)
    except Exception:
        log.exception("model '%s': refusal not audited: %s", model, summary)


async def commit_gated(plane, build, who: str):
    """``plane.commit(build)``, auditing a refusal of the gate before re-raising it."""
    try:
        return await plane.commit(build)
    except ApprovalRequired as exc:
        await audit_refusal(plane, who, exc.model, "gate-refused", exc.message,
                            {"versions": exc.versions})
        raise


def _keep_serving(snapshot: Snapshot, router, model: str, approved: dict, who: str):
    """An approval makes a version eligible for traffic; it does not move traffic. Without a
    split, the hold would now pick the newly approved version: pin what serves now instead,
    in the same commit (a rollout or a split then moves traffic, as for any canary)."""
    from gateway.control.traffic import SECTION as TRAFFIC
    from gateway.control.traffic import policy_change, policy_of
    from gateway.routing import TrafficPolicy, normalise_weights

    entry = router.repository.models.get(model)
    stored = policy_of(snapshot.value(TRAFFIC, model))
    if entry is None or not entry.serving or stored.weights or \
            not gated(router.repository, model):
        return None
    shares, _ = router.effective(model)
    if not shares:
        return None
    current = max(shares, key=lambda v: (shares[v], int(v)))
    eligible = [v for v in entry.serving if v in approved]
    after = max(eligible, key=int) if eligible else min(entry.serving, key=int)
    if after == current:
        return None
    change, record = policy_change(snapshot, model, TrafficPolicy(
        normalise_weights({current: 100.0}), stored.shadow), who, "approval-hold")
    record["summary"] += (f" (traffic stays on version {current}: an approval does not move "
                          "traffic; start a rollout or set a split)")
    return change, record


def _version_on_disk(root: Path, model: str, version: str) -> tuple[bool, dict]:
    vdir = root / model / version
    if not vdir.is_dir():
        return False, {}
    try:
        data = json.loads((vdir / "metadata.json").read_text())
    except (OSError, ValueError):
        data = {}
    return True, data if isinstance(data, dict) else {}


async def approve(plane, model: str, version: str, who: str) -> dict:
    """Approve ``version`` of ``model`` as ``who``: refused (PermissionDenied, audited) for its
    publisher. Returns the approval, with ``already`` true when it was approved before."""
    from gateway.repository import check_model_name

    check_model_name(model)
    if not version.isdigit() or int(version) <= 0:
        raise InvalidArgument(f"version '{echo(version)}' is not a positive integer")
    version = str(int(version))
    repository = plane.router.repository
    found, metadata = await asyncio.to_thread(_version_on_disk, Path(repository.root), model,
                                              version)
    if not found:
        raise NotFound(f"model '{model}' has no version {version} in the repository")
    publisher = publisher_of(metadata)
    if publisher and identity(publisher) == identity(who):
        address = re.fullmatch(r"ipv[46]:.*", who.split(" (", 1)[0]) is not None
        message = (f"{who.split(' (', 1)[0]} published version {version} of model '{model}' and "
                   "cannot approve it: the approval gate needs someone else"
                   + (" (without --auth-tokens callers are known only by their address: "
                      "approve from another machine, or turn authentication on)"
                      if address else ""))
        await audit_refusal(plane, who, model, "approve-refused", message,
                            {"version": version, "publisher": publisher})
        raise PermissionDenied(message)
    now = time.time()
    approval = {"by": who, "time": now, "publisher": publisher,
                "sha256": str(metadata.get("sha256", ""))}
    seen: dict = {}

    def build(snapshot: Snapshot):
        versions = dict(approvals(snapshot, model))
        if version in versions:
            seen.update(versions[version])
            return None
        versions[version] = approval
        by = f" (published by {publisher})" if publisher else ""
        changes = [Change(SECTION, model, {"versions": versions},
                          snapshot.revision_of(SECTION, model))]
        audit = [{"time": now, "who": who, "section": SECTION, "model": model,
                  "action": "approve", "old": None, "new": {"version": version, **approval},
                  "summary": f"version {version} approved by {who}{by}"}]
        keep = _keep_serving(snapshot, plane.router, model, versions, who)
        if keep is not None:
            changes.append(keep[0])
            audit.append(keep[1])
        return changes, audit, approval

    result = await plane.commit(build)
    gate = gated(repository, model)
    if result is None:
        return {**seen, "model": model, "version": version, "gated": gate, "already": True}
    log.info("model '%s' version %s approved by %s", model, version, who)
    return {**approval, "model": model, "version": version, "gated": gate, "already": False}
