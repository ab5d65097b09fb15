"""``gateway.admin.v1.GatewayAdmin``: the operator API, converted at the edge like inference."""

from __future__ import annotations

import json

from gateway.auth import IDENTITY
from gateway.errors import InvalidArgument
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc
from gateway.protocol.servicer import handles_errors
from gateway.repository import check_model_name
from gateway.traffic import TrafficControl


def caller(context) -> str:
    """Who made a change, for the audit log: the authenticated identity, else the peer."""
    return IDENTITY.get() or context.peer() or "unknown"


class AdminServicer(apb_grpc.GatewayAdminServicer):
    def __init__(self, traffic: TrafficControl):
        self.traffic = traffic
        self.router = traffic.router

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
