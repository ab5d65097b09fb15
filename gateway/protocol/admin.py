"""``gateway.admin.v1.GatewayAdmin``: the operator API, converted at the edge like inference."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

from gateway.auth import IDENTITY
from gateway.control import (
    ControlPlane,
    Rollout,
    RolloutSpec,
    StoreUnavailable,
    Window,
    rollout_spec,
)
from gateway.errors import FailedPrecondition, InvalidArgument
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc
from gateway.protocol.registration import INVALID
from gateway.protocol.servicer import handles_errors
from gateway.repository import check_model_name

MAX_FEEDBACK_ITEMS = 100_000  # labels in one SendFeedback call


def caller(context) -> str:
    """Who made a change, for the audit log: the token's name when auth is on, else the peer
    address as written ("ipv6:[::1]:5000", not "ipv6:%5B::1%5D:5000")."""
    return IDENTITY.get() or unquote(context.peer() or "") or "unknown"


class AdminServicer(apb_grpc.GatewayAdminServicer):
    def __init__(self, control: ControlPlane, registry=None, feedback=None):
        self.control = control
        self.traffic = control.traffic
        self.router = control.router
        self.rollouts = control.rollouts
        self.registry = registry  # gateway.registry.RegistryService
        self.feedback = feedback  # gateway.feedback.FeedbackStore

    def _status(self, model: str) -> apb.TrafficStatus:
        policy = self.traffic.policy(model)
        rollout = self.rollouts.active(model)
        shares, note = self.router.effective(model)
        entry = self.router.repository.get(model)
        split = policy.to_json()["weights"]
        status = apb.TrafficStatus(
            model=model,
            split=[apb.VersionWeight(version=v, percent=p) for v, p in split.items()],
            effective=[apb.VersionWeight(version=v, percent=p) for v, p in shares.items()],
            serving_versions=sorted(entry.serving, key=int), note=note,
            rollout=(f"{rollout.state} rollout to version {rollout.spec.to_version} at "
                     f"{rollout.percent:g}%" if rollout else ""),
            revision=self.control.snapshot.revision, store_up=self.control.store_up)
        if policy.shadow:
            status.shadow.CopyFrom(apb.ShadowPolicy(version=policy.shadow.version,
                                                    percent=policy.shadow.percent))
        return status

    @handles_errors
    async def GetTraffic(self, request, context):
        return self._status(check_model_name(request.model))

    @handles_errors
    async def ListTraffic(self, request, context):
        return apb.ListTrafficResponse(models=[
            self._status(name) for name in sorted(self.router.repository.models)])

    @handles_errors
    async def SetTraffic(self, request, context):
        model = check_model_name(request.model)
        weights: dict[str, float] = {}
        for item in request.split:
            if item.version in weights:
                raise InvalidArgument(f"version {item.version} is listed twice")
            weights[item.version] = item.percent
        await self.traffic.set_split(model, weights, caller(context), force=request.force)
        return self._status(model)

    @handles_errors
    async def ClearTraffic(self, request, context):
        model = check_model_name(request.model)
        await self.traffic.clear(model, caller(context), force=request.force)
        return self._status(model)

    @handles_errors
    async def SetShadow(self, request, context):
        model = check_model_name(request.model)
        await self.traffic.set_shadow(model, request.version, request.percent, caller(context))
        return self._status(model)

    @handles_errors
    async def ClearShadow(self, request, context):
        model = check_model_name(request.model)
        await self.traffic.clear_shadow(model, caller(context))
        return self._status(model)

    @handles_errors
    async def TrafficHistory(self, request, context):
        model = check_model_name(request.model) if request.model else None
        records = await self.control.history(model, min(request.limit or 100, 10_000))
        return apb.TrafficHistoryResponse(records=[apb.AuditRecord(
            time=float(r.get("time", 0.0)), who=str(r.get("who", "")),
            model=str(r.get("model", "")), action=str(r.get("action", "")),
            old_json=json.dumps(r.get("old")), new_json=json.dumps(r.get("new")),
            revision=int(r.get("revision", 0)), summary=str(r.get("summary", "")),
            section=str(r.get("section", ""))) for r in records])

    # ---- rollouts -------------------------------------------------------------------------

    async def _rollout_status(self, rollout: Rollout) -> apb.RolloutStatus:
        spec = rollout.spec
        try:
            canary, baseline = await self.rollouts.figures(rollout)
            now = await self.control.store.now()
        except StoreUnavailable:  # the state this replica serves, without the fleet's figures
            canary = baseline = Window(0, 0, 0.0)
            now = time.time()

        def window(w):
            return apb.RolloutWindow(requests=w.requests, errors=w.errors, p99_ms=w.p99_s * 1000,
                                     replicas=w.replicas)

        remaining = lease = 0.0
        if rollout.state == "running":
            remaining = max(0.0, spec.interval_s - (now - rollout.step_started))
            lease = max(0.0, rollout.lease_until - now)
        return apb.RolloutStatus(
            model=spec.model, to_version=spec.to_version, from_version=spec.from_version,
            state=rollout.state, step=rollout.step, percent=rollout.percent, steps=spec.steps,
            interval_seconds=spec.interval_s, step_remaining_seconds=remaining,
            reason=rollout.reason, canary=window(canary), baseline=window(baseline),
            owner=rollout.owner, epoch=rollout.epoch, lease_remaining_seconds=lease,
            max_error_rate=spec.max_error_rate, max_latency_ratio=spec.max_latency_ratio,
            min_requests=spec.min_requests, min_accuracy_ratio=spec.min_accuracy_ratio,
            min_labels=spec.min_labels, feedback=self._rollout_feedback(spec),
            history=[apb.RolloutEvent(time=h["time"], event=h["event"], detail=h["detail"],
                                      percent=h["percent"], who=str(h["who"]))
                     for h in rollout.history])

    def _rollout_feedback(self, spec: RolloutSpec) -> list:
        if self.feedback is None or spec.model not in self.feedback.models:
            return []
        rows = []
        for version in (spec.to_version, spec.from_version):
            quality = self.feedback.quality(spec.model, version)
            if quality is not None:
                kind, labelled, score = quality
                row = apb.VersionFeedback(version=version, labelled=labelled)
                if kind == "regression":
                    row.mean_absolute_error = score
                else:
                    row.accuracy = score
                rows.append(row)
        return rows

    def _rollout_spec(self, model: str, request, to_version: str,
                      default_steps: tuple = ()) -> RolloutSpec:
        """A RolloutSpec from a StartRolloutRequest: proto3's zeros mean "the default"."""
        spec = rollout_spec(
            model, to_version, request.from_version,
            steps=tuple(request.steps) or default_steps or None,
            interval_s=request.interval_seconds or None,
            max_error_rate=(request.max_error_rate if request.HasField("max_error_rate")
                            else None),
            max_latency_ratio=request.max_latency_ratio or None,
            min_requests=(request.min_requests if request.HasField("min_requests") else None),
            min_accuracy_ratio=request.min_accuracy_ratio or None,
            min_labels=request.min_labels or None)
        spec.validate_limits()
        if spec.min_accuracy_ratio and (self.feedback is None
                                        or model not in self.feedback.models):
            raise FailedPrecondition(
                f"--min-accuracy-ratio needs ground-truth feedback, but model '{model}' keeps "
                "no predictions: add 'feedback: {}' to its gateway.yaml")
        return spec

    @handles_errors
    async def StartRollout(self, request, context):
        model = check_model_name(request.model)
        spec = self._rollout_spec(model, request, request.to_version)
        return await self._rollout_status(await self.rollouts.start(spec, caller(context)))

    @handles_errors
    async def GetRollout(self, request, context):
        model = check_model_name(request.model)
        return await self._rollout_status(self.rollouts.status(model))

    @handles_errors
    async def PauseRollout(self, request, context):
        model = check_model_name(request.model)
        return await self._rollout_status(await self.rollouts.pause(model, caller(context)))

    @handles_errors
    async def ResumeRollout(self, request, context):
        model = check_model_name(request.model)
        return await self._rollout_status(await self.rollouts.resume(model, caller(context)))

    @handles_errors
    async def AbortRollout(self, request, context):
        model = check_model_name(request.model)
        return await self._rollout_status(await self.rollouts.abort(model, caller(context)))

    # ---- publishing -----------------------------------------------------------------------

    @handles_errors
    async def PublishVersion(self, request_iterator, context):
        if self.registry is None:
            raise FailedPrecondition("this gateway does not publish versions")
        header, received = None, 0
        with tempfile.TemporaryDirectory(prefix="gateway-upload-") as tmp:
            upload = Path(tmp) / "upload.onnx"
            out = await asyncio.to_thread(open, upload, "wb")
            try:
                async for chunk in request_iterator:
                    if chunk is INVALID:
                        raise InvalidArgument("a publish message is not a valid PublishChunk")
                    part = chunk.WhichOneof("part")
                    if header is None:
                        if part != "header":
                            raise InvalidArgument("the first publish message must be the header")
                        header = chunk.header
                        check_model_name(header.model)
                        continue
                    if part != "data":
                        raise InvalidArgument("only model file data may follow the header")
                    received += len(chunk.data)
                    if header.size and received > header.size:
                        raise InvalidArgument(f"more than the announced {header.size} bytes")
                    await asyncio.to_thread(out.write, chunk.data)
            finally:
                out.close()
            if header is None:
                raise InvalidArgument("nothing to publish: send a header, then the model file")
            if header.size and received != header.size:
                raise InvalidArgument(f"the upload ended after {received} of {header.size} "
                                      "bytes")
            if not received:
                raise InvalidArgument("the model file is empty")
            try:
                metadata = json.loads(header.metadata_json) if header.metadata_json else {}
            except ValueError:
                raise InvalidArgument("metadata_json is not JSON") from None
            if not isinstance(metadata, dict):
                raise InvalidArgument("metadata_json must be a JSON object")
            canary = None
            if header.canary_percent:
                from gateway.registry import canary_steps

                canary = self._rollout_spec(header.model, header.canary, "",
                                            canary_steps(header.canary_percent))
                canary.validate_limits()
            published, state, detail, rollout = await self.registry.publish(
                header.model, upload, metadata=metadata, baseline_npz=header.baseline_npz,
                allow_signature_change=header.allow_signature_change, canary=canary,
                source=Path(header.source).name if header.source else "",
                sha256=header.sha256, who=caller(context))
        result = apb.PublishResult(model=published.model, version=str(published.version),
                                   state=state, detail=detail,
                                   metadata_json=json.dumps(published.metadata, sort_keys=True))
        if rollout is not None:
            result.rollout.CopyFrom(await self._rollout_status(rollout))
        return result

    @handles_errors
    async def ListVersions(self, request, context):
        from gateway.registry import version_rows

        model = check_model_name(request.model)
        rows = await version_rows(self.router, model)
        return apb.ListVersionsResponse(model=model, versions=[apb.VersionInfo(
            version=r["version"], state=r["state"], reason=r["reason"],
            metadata_json=json.dumps(r["metadata"], sort_keys=True),
            traffic_percent=r["traffic_percent"], has_baseline=r["has_baseline"])
            for r in rows])

    # ---- governance -----------------------------------------------------------------------

    @handles_errors
    async def ApproveVersion(self, request, context):
        from gateway.control.approvals import approve

        model = check_model_name(request.model)
        approval = await approve(self.control, model, request.version, caller(context))
        return apb.ApprovalStatus(
            model=model, version=approval["version"], approved_by=str(approval.get("by", "")),
            time=float(approval.get("time", 0.0)), publisher=str(approval.get("publisher", "")),
            gated=approval["gated"], already_approved=approval["already"])

    # ---- feedback -------------------------------------------------------------------------

    async def _feedback_status(self, model: str) -> apb.FeedbackStatus:
        feedback = await self.feedback.current(model)
        status = apb.FeedbackStatus(model=model, kind=feedback.kind, output=feedback.output,
                                    kept=feedback.waiting,
                                    capacity=feedback.settings.capacity,
                                    unmatched=feedback.unmatched)
        for version, n, correct, score in feedback.scores():
            row = apb.VersionFeedback(version=version, labelled=n, correct=correct)
            if score is not None and feedback.kind == "regression":
                row.mean_absolute_error = score
            elif score is not None:
                row.accuracy = score
            status.versions.append(row)
        return status

    def _need_feedback(self):
        if self.feedback is None:
            raise FailedPrecondition("this gateway does not take feedback")

    @handles_errors
    async def SendFeedback(self, request, context):
        self._need_feedback()
        model = check_model_name(request.model)
        if len(request.labels) > MAX_FEEDBACK_ITEMS:
            raise InvalidArgument(f"at most {MAX_FEEDBACK_ITEMS} labels per call")
        matched, unknown, errors = await self.feedback.label(
            model, [(item.id, list(item.labels)) for item in request.labels])
        return apb.FeedbackResponse(matched=matched, unknown=len(unknown),
                                    unknown_ids=[i[:128] for i in unknown[:20]],
                                    errors=errors[:20],
                                    status=await self._feedback_status(model))

    @handles_errors
    async def GetFeedback(self, request, context):
        self._need_feedback()
        return await self._feedback_status(check_model_name(request.model))
