"""``gateway.admin.v1.GatewayAdmin``: the operator API, converted at the edge like inference."""

from __future__ import annotations

import json

from gateway.auth import IDENTITY
from gateway.errors import InvalidArgument
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc
from gateway.protocol.servicer import handles_errors
from gateway.repository import check_model_name
from gateway.rollout import Rollout, RolloutController, RolloutSpec
from gateway.traffic import TrafficControl


def caller(context) -> str:
    """Who made a change, for the audit log: the authenticated identity, else the peer."""
    return IDENTITY.get() or context.peer() or "unknown"


class AdminServicer(apb_grpc.GatewayAdminServicer):
    def __init__(self, traffic: TrafficControl, rollouts: RolloutController):
        self.traffic = traffic
        self.router = traffic.router
        self.rollouts = rollouts

    def _status(self, model: str) -> apb.TrafficStatus:
        policy = self.traffic.policy(model)
        shares, note = self.router.effective(model)
        entry = self.router.repository.get(model)
        split = policy.to_json()["weights"]
        status = apb.TrafficStatus(
            model=model,
            split=[apb.VersionWeight(version=v, percent=p) for v, p in split.items()],
            effective=[apb.VersionWeight(version=v, percent=p) for v, p in shares.items()],
            serving_versions=sorted(entry.serving, key=int), note=note)
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
        self.traffic.set_split(model, weights, caller(context))
        return self._status(model)

    @handles_errors
    async def ClearTraffic(self, request, context):
        model = check_model_name(request.model)
        self.traffic.clear(model, caller(context))
        return self._status(model)

    @handles_errors
    async def SetShadow(self, request, context):
        model = check_model_name(request.model)
        self.traffic.set_shadow(model, request.version, request.percent, caller(context))
        return self._status(model)

    @handles_errors
    async def ClearShadow(self, request, context):
        model = check_model_name(request.model)
        self.traffic.clear_shadow(model, caller(context))
        return self._status(model)

    @handles_errors
    async def TrafficHistory(self, request, context):
        model = check_model_name(request.model) if request.model else None
        records = self.traffic.store.history(model, request.limit or 100)
        return apb.TrafficHistoryResponse(records=[apb.AuditRecord(
            time=r.get("time", 0.0), who=str(r.get("who", "")), model=str(r.get("model", "")),
            action=str(r.get("action", "")), old_json=json.dumps(r.get("old")),
            new_json=json.dumps(r.get("new"))) for r in records])

    # ---- rollouts -------------------------------------------------------------------------

    def _rollout_status(self, rollout: Rollout) -> apb.RolloutStatus:
        spec = rollout.spec
        windows = self.rollouts.windows

        def window(version):
            w = windows.window(spec.model, version)
            return apb.RolloutWindow(requests=w.requests, errors=w.errors, p99_ms=w.p99_s * 1000)

        remaining = 0.0
        if rollout.state == "running":
            remaining = max(0.0, spec.interval_s - (self.rollouts.clock() - rollout.step_started))
        return apb.RolloutStatus(
            model=spec.model, to_version=spec.to_version, from_version=spec.from_version,
            state=rollout.state, step=rollout.step, percent=rollout.percent, steps=spec.steps,
            interval_seconds=spec.interval_s, step_remaining_seconds=remaining,
            reason=rollout.reason, canary=window(spec.to_version),
            baseline=window(spec.from_version), owner=rollout.owner,
            max_error_rate=spec.max_error_rate, max_latency_ratio=spec.max_latency_ratio,
            min_requests=spec.min_requests,
            history=[apb.RolloutEvent(time=h["time"], event=h["event"], detail=h["detail"],
                                      percent=h["percent"], who=str(h["who"]))
                     for h in rollout.history])

    @handles_errors
    async def StartRollout(self, request, context):
        model = check_model_name(request.model)
        defaults = RolloutSpec(model, request.to_version, request.from_version)
        spec = RolloutSpec(
            model, request.to_version, request.from_version,
            steps=tuple(request.steps) or defaults.steps,
            interval_s=request.interval_seconds or defaults.interval_s,
            max_error_rate=(request.max_error_rate if request.HasField("max_error_rate")
                            else defaults.max_error_rate),
            max_latency_ratio=request.max_latency_ratio or defaults.max_latency_ratio,
            min_requests=(max(0, request.min_requests) if request.min_requests
                          else defaults.min_requests))
        return self._rollout_status(self.rollouts.start(spec, caller(context)))

    @handles_errors
    async def GetRollout(self, request, context):
        return self._rollout_status(self.rollouts.status(check_model_name(request.model)))

    @handles_errors
    async def PauseRollout(self, request, context):
        model = check_model_name(request.model)
        return self._rollout_status(self.rollouts.pause(model, caller(context)))

    @handles_errors
    async def ResumeRollout(self, request, context):
        model = check_model_name(request.model)
        return self._rollout_status(self.rollouts.resume(model, caller(context)))

    @handles_errors
    async def AbortRollout(self, request, context):
        model = check_model_name(request.model)
        return self._rollout_status(self.rollouts.abort(model, caller(context)))
