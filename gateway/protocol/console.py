"""The operator console: one web page under ``/ui/`` on the HTTP port, and the small JSON API
under ``/ui/api/`` it calls.

The page (``gateway/console/``: plain HTML, CSS and JavaScript, no build step, nothing fetched
from elsewhere) shows models and versions (state, lineage from metadata.json, approval, traffic
share, requests/s, error rate, p50/p99, drift, feedback accuracy), the split and shadow of each
model, rollouts with their figures and history, and the audit trail; it polls ``overview``
every two seconds.

Every API endpoint stands for the admin RPC it does the work of (``ROUTES``), so the token file
grants the console the same roles as gRPC (``viewer`` reads, ``operator`` changes splits and
rollouts, ``admin`` also approves), and every change goes through the same control plane
objects as the admin servicer (``GatewayServer.control``): the same validation, compare-and-set
and audit. Without ``--auth-tokens`` the console reads for everyone and accepts changes only
from this machine: a loopback peer, a loopback ``Host`` (no DNS rebinding) and, when the browser
sends one, the same ``Origin`` (no cross-site form posts).
"""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import json
import logging
import math
import time
from collections import deque
from pathlib import Path

from aiohttp import web

from gateway.control import StoreUnavailable, approvals, rollout_spec
from gateway.control.traffic import describe, stored
from gateway.errors import GatewayError, InvalidArgument, NotFound, PermissionDenied, echo
from gateway.protocol.http import STATUS, error
from gateway.repository import check_model_name

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent.parent / "console"
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
ADMIN = "/gateway.admin.v1.GatewayAdmin/"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
RATE_WINDOW_S = 30.0  # requests/s, error rate and percentiles cover about this long
AUDIT_LIMIT = 10_000
LOCAL_NOTICE = ("no authentication (--auth-tokens is not set): the console accepts changes only "
                "from a browser on this machine (localhost, --console-allow-changes); "
                "elsewhere it is read-only")
READ_ONLY_NOTICE = ("no authentication (--auth-tokens is not set): the console is read-only; "
                    "start the gateway with --auth-tokens, or with --console-allow-changes to "
                    "change from a browser on this machine")


class Console:
    """The console of one gateway; ``register`` adds its routes to the HTTP app."""

    def __init__(self, server):
        self.server = server  # gateway.server.GatewayServer
        self.control = server.control
        self.router = server.router
        self.repository = server.repository
        self.authenticator = server.authenticator
        self.allow_local_changes = server.settings.console_allow_changes
        self.rates = Rates(server)

    def register(self, app: web.Application) -> None:
        """Routes under /ui; registered before the HTTP frontend's catch-all."""
        app.router.add_get("/ui", self._redirect)
        app.router.add_get("/ui/", self._static)
        for name in FILES:
            app.router.add_get(f"/ui/{name}", self._static)
        for method, path, handler, rpc, change in self.routes():
            app.router.add_route(method, "/ui/api/" + path, self._endpoint(handler, rpc, change))

    def routes(self):
        """(HTTP method, path under /ui/api/, handler, the admin RPC it stands for, changes?)"""
        model = "models/{model}"
        return [
            ("GET", "session", self.session, "ListTraffic", False),
            ("GET", "overview", self.overview, "ListTraffic", False),
            ("GET", "audit", self.audit, "TrafficHistory", False),
            ("POST", model + "/split", self.set_split, "SetTraffic", True),
            ("POST", model + "/clear", self.clear_split, "ClearTraffic", True),
            ("POST", model + "/shadow", self.set_shadow, "SetShadow", True),
            ("POST", model + "/unshadow", self.clear_shadow, "ClearShadow", True),
            ("POST", model + "/rollout", self.start_rollout, "StartRollout", True),
            ("POST", model + "/rollout/pause", self.pause, "PauseRollout", True),
            ("POST", model + "/rollout/resume", self.resume, "ResumeRollout", True),
            ("POST", model + "/rollout/abort", self.abort, "AbortRollout", True),
            ("POST", model + "/versions/{version}/approve", self.approve, "ApproveVersion",
             True),
        ]

    # ---- the edge: static files, auth, errors ------------------------------------------------

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[1] or "index.html"
        body = await asyncio.to_thread((STATIC / name).read_bytes)
        return web.Response(body=body, content_type=FILES[name], charset="utf-8",
                            headers=HEADERS)

    def _endpoint(self, handler, rpc: str, change: bool):
        async def endpoint(request: web.Request) -> web.Response:
            try:
                who, role = self._authorize(request, rpc, change)
                response = await handler(request, who, role)
            except GatewayError as exc:
                response = error(STATUS.get(exc.code, 500), exc.message)
            except Exception:
                log.exception("unexpected error in console %s %s", request.method, request.path)
                response = error(500, "internal error; see the server log")
            response.headers.update({k: v for k, v in HEADERS.items()
                                     if k != "Content-Security-Policy"})
            return response
        return endpoint

    def _authorize(self, request: web.Request, rpc: str, change: bool) -> tuple[str, str]:
        """(who, role) of the caller, or Unauthenticated / PermissionDenied."""
        if self.authenticator is not None:
            header = request.headers.get("Authorization")
            credential = self.authenticator.check(
                ADMIN + rpc, (("authorization", header),) if header is not None else ())
            return credential.name, credential.role
        peer = request.transport.get_extra_info("peername") if request.transport else None
        host, port = (peer[0], peer[1]) if peer else ("unknown", 0)
        who = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        local = _is_local(request, host) and self.allow_local_changes
        if change and not self.allow_local_changes:
            raise PermissionDenied("the gateway runs without --auth-tokens, so the console is "
                                   "read-only; start it with --auth-tokens, or with "
                                   "--console-allow-changes to change from a browser on this "
                                   "machine")
        if change and not local:
            raise PermissionDenied("the gateway runs without --auth-tokens, so the console "
                                   "accepts changes only from a browser on this machine "
                                   "(localhost); start it with --auth-tokens to change from "
                                   "elsewhere")
        return who, "admin" if local else "viewer"

    # ---- reading ------------------------------------------------------------------------------

    async def session(self, request, who, role) -> web.Response:
        from gateway.auth import allows

        return answer({"auth": self.authenticator is not None, "who": who, "role": role,
                       "can_operate": allows(role, "operate"),
                       "can_approve": allows(role, "admin"),
                       "notice": "" if self.authenticator is not None else
                       LOCAL_NOTICE if self.allow_local_changes else READ_ONLY_NOTICE})

    async def overview(self, request, who, role) -> web.Response:
        self.rates.sample()
        snapshot = self.control.snapshot
        names = sorted(self.repository.models)
        rows = await asyncio.gather(*(self._version_rows(name) for name in names))
        rollouts = self.control.rollouts.rollouts
        now = time.time()
        if any(r.active for r in rollouts.values()):
            try:
                now = await self.control.store.now()
            except StoreUnavailable:
                pass
        models = []
        for name, versions in zip(names, rows):
            models.append(await self._model(name, versions, snapshot, rollouts.get(name), now))
        return answer({"time": time.time(), "revision": snapshot.revision,
                       "store_up": self.control.store_up, "store": self.control.store.url,
                       "rate_window_s": self.rates.span(), "models": models})

    async def _version_rows(self, model: str) -> list[dict]:
        from gateway.registry import version_rows

        try:
            return await version_rows(self.router, model)
        except NotFound:
            return []

    async def _model(self, name, rows, snapshot, rollout, now) -> dict:
        entry = self.repository.models.get(name)
        policy = snapshot.value("traffic", name) or {}
        approved = approvals.approvals(snapshot, name)
        shares, note = self.router.effective(name) if entry is not None else ({}, "")
        drift = self._drift(name)
        quality = self._feedback(name)
        versions = []
        for row in rows:
            v = row["version"]
            meta = row["metadata"] or {}
            approval = approved.get(v)
            versions.append({
                "version": v, "state": row["state"], "reason": row["reason"],
                "traffic": shares.get(v, 0.0), "has_baseline": row["has_baseline"],
                "lineage": {k: meta.get(k) for k in ("created", "sha256", "size", "source",
                                                     "publisher", "published_by", "metadata",
                                                     "baseline") if meta.get(k) is not None},
                "approval": ({"by": approval.get("by", ""), "time": approval.get("time", 0)}
                             if isinstance(approval, dict) else None),
                **self.rates.figures(name, v),
                "drift": drift.get(v, []), "feedback": quality.get(v)})
        shadow = policy.get("shadow") if isinstance(policy, dict) else None
        return {"name": name, "gated": approvals.gated(self.repository, name),
                "held": approvals.held(snapshot, self.router, name),
                "split": (policy.get("weights") or {}) if isinstance(policy, dict) else {},
                "shadow": shadow, "effective": shares, "note": note,
                "reason": entry.reasons.get("", "") if entry is not None else "",
                "rollout": await self._rollout(rollout, now) if rollout is not None else None,
                "versions": versions}

    async def _rollout(self, rollout, now: float) -> dict:
        spec = rollout.spec
        canary = baseline = None
        if rollout.active:
            try:
                canary, baseline = await self.control.rollouts.figures(rollout)
            except StoreUnavailable:
                pass

        def window(w):
            return None if w is None else {"requests": w.requests, "errors": w.errors,
                                           "error_rate": w.error_rate,
                                           "p99_ms": w.p99_s * 1000, "replicas": w.replicas}

        remaining = (max(0.0, spec.interval_s - (now - rollout.step_started))
                     if rollout.state == "running" else None)
        return {"state": rollout.state, "to": spec.to_version, "from": spec.from_version,
                "step": rollout.step, "steps": list(spec.steps), "percent": rollout.percent,
                "interval_s": spec.interval_s, "step_remaining_s": remaining,
                "reason": rollout.reason, "max_error_rate": spec.max_error_rate,
                "max_latency_ratio": spec.max_latency_ratio, "min_requests": spec.min_requests,
                "canary": window(canary), "baseline": window(baseline),
                "history": rollout.history[-30:]}

    def _drift(self, model: str) -> dict[str, list]:
        """version -> [{input, score, threshold, alert, source, samples, worst}]"""
        monitoring = self.server.monitoring
        engine = getattr(monitoring, "drift", None)
        out: dict[str, list] = {}
        for monitor in list(getattr(engine, "monitors", {}).copy().values()):
            if monitor.model != model:
                continue
            for m in monitor.inputs:
                worst = []
                scores = m.feature_scores
                if scores is not None and not m.pooled:
                    ranked = sorted(((float(s), label) for s, label in zip(scores.tolist(),
                                                                           m.labels)
                                     if s is not None and math.isfinite(s)), reverse=True)
                    worst = [{"feature": label, "score": s} for s, label in ranked[:3]]
                out.setdefault(monitor.version, []).append({
                    "input": m.name, "score": m.score, "threshold": m.alert.threshold,
                    "alert": bool(m.alert.active), "source": m.source, "samples": m.rows,
                    "worst": worst})
        return out

    def _feedback(self, model: str) -> dict[str, dict]:
        feedback = getattr(self.server, "feedback", None)
        state = feedback.models.get(model) if feedback is not None else None
        if state is None:
            return {}
        return {v: {"kind": state.kind, "labelled": n, "score": score}
                for v, n, _, score in state.scores() if n}

    async def audit(self, request, who, role) -> web.Response:
        q = request.query
        model = q.get("model") or None
        if model is not None:
            check_model_name(model)
        limit = _integer(q.get("limit", "500"), "limit", 1, AUDIT_LIMIT)
        records = await self.control.history(model, AUDIT_LIMIT if _filtered(q) else limit)
        records = [r for r in records if _matches(r, q)][-limit:]
        kind = q.get("format", "json")
        if kind == "json":
            return answer({"records": records})
        if kind == "jsonl":
            body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
            return _download(body, "application/x-ndjson", "gateway-audit.jsonl")
        if kind == "csv":
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(["time", "revision", "who", "section", "model", "action", "old",
                             "new", "summary"])
            for r in records:
                writer.writerow([_iso(r.get("time", 0)), r.get("revision", ""), r.get("who", ""),
                                 r.get("section", ""), r.get("model", ""), r.get("action", ""),
                                 json.dumps(r.get("old")), json.dumps(r.get("new")),
                                 r.get("summary", "")])
            return _download(out.getvalue(), "text/csv", "gateway-audit.csv")
        raise InvalidArgument(f"format '{echo(kind)}' is not json, jsonl or csv")

    # ---- changes: the control plane's own operations ----------------------------------------

    async def set_split(self, request, who, role) -> web.Response:
        model = check_model_name(request.match_info["model"])
        body = await _body(request)
        weights = body.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise InvalidArgument("send {\"weights\": {\"VERSION\": PERCENT, ...}}")
        split = {}
        for version, weight in weights.items():
            split[str(version)] = _number(weight, f"weight of version {echo(version)}")
        policy = await self.control.traffic.set_split(model, split, who,
                                                      force=body.get("force") is True)
        return _done(f"model {model}: split {describe(stored(policy))}")

    async def clear_split(self, request, who, role) -> web.Response:
        model = check_model_name(request.match_info["model"])
        body = await _body(request)
        await self.control.traffic.clear(model, who, force=body.get("force") is True)
        return _done(f"model {model}: split cleared (the newest version serves)")

    async def set_shadow(self, request, who, role) -> web.Response:
        model = check_model_name(request.match_info["model"])
        body = await _body(request)
        version = str(body.get("version", ""))
        percent = _number(body.get("percent"), "percent")
        policy = await self.control.traffic.set_shadow(model, version, percent, who)
        return _done(f"model {model}: {describe(stored(policy))}")

    async def clear_shadow(self, request, who, role) -> web.Response:
        model = check_model_name(request.match_info["model"])
        await _body(request)
        await self.control.traffic.clear_shadow(model, who)
        return _done(f"model {model}: shadow removed")

    async def start_rollout(self, request, who, role) -> web.Response:
        model = check_model_name(request.match_info["model"])
        body = await _body(request)
        steps = body.get("steps") or None
        if isinstance(steps, str):
            try:
                steps = [float(s) for s in steps.split(",") if s.strip()]
            except ValueError:
                raise InvalidArgument("steps must be percents like 5,25,50,100") from None
        elif steps is not None:
            if not isinstance(steps, list):
                raise InvalidArgument("steps must be a list of percents")
            steps = [_number(s, "a step") for s in steps]

        def optional(key, kind=float):
            value = body.get(key)
            return None if value in (None, "") else kind(_number(value, key))

        spec = rollout_spec(model, str(body.get("to", "")), str(body.get("from") or ""),
                            steps=steps, interval_s=optional("interval"),
                            max_error_rate=optional("max_error_rate"),
                            max_latency_ratio=optional("max_latency_ratio"),
                            min_requests=optional("min_requests", int))
        spec.validate_limits()
        rollout = await self.control.rollouts.start(spec, who)
        return _done(f"model {model}: rollout to version {rollout.spec.to_version} started at "
                     f"{rollout.percent:g}% (baseline {rollout.spec.from_version})")

    async def pause(self, request, who, role) -> web.Response:
        return await self._operate(request, who, "pause")

    async def resume(self, request, who, role) -> web.Response:
        return await self._operate(request, who, "resume")

    async def abort(self, request, who, role) -> web.Response:
        return await self._operate(request, who, "abort")

    async def _operate(self, request, who, verb) -> web.Response:
        model = check_model_name(request.match_info["model"])
        await _body(request)
        rollout = await getattr(self.control.rollouts, verb)(model, who)
        return _done(f"model {model}: rollout {rollout.state.replace('_', ' ')} at "
                     f"{rollout.percent:g}%")

    async def approve(self, request, who, role) -> web.Response:
        model = check_model_name(request.match_info["model"])
        await _body(request)
        approval = await approvals.approve(self.control, model, request.match_info["version"],
                                           who)
        verb = "was already approved" if approval["already"] else "approved"
        return _done(f"model {model} version {approval['version']} {verb} by "
                     f"{approval.get('by', who)}", approval=approval)


# ---- per-version figures from the gateway's own statistics -----------------------------------

class Rates:
    """Requests/s, error rate and p50/p99 per version over the last ``RATE_WINDOW_S`` seconds,
    from differences of the monitoring's per-version counters (or, with monitoring off, of
    the Triton-style statistics, which give a mean instead of percentiles). Sampled when the
    console asks (at most once a second): nothing runs while nobody looks."""

    def __init__(self, server):
        self.server = server
        self.samples: deque = deque()

    def sample(self) -> None:
        now = time.monotonic()
        if self.samples and now - self.samples[-1][0] < 1.0:
            return
        counts = {}
        metrics = getattr(self.server.monitoring, "metrics", None)
        if metrics is not None:
            for key, vm in list(metrics.versions.items()):
                counts[key] = (vm.ok, sum(vm.errors.values()), tuple(vm.latency), 0)
        else:
            for name, entry in list(self.repository.models.items()):
                for version, served in entry.serving.items():
                    s = served.stats
                    counts[(name, version)] = (s.success.count, s.fail.count, None,
                                               s.success.ns)
        self.samples.append((now, counts))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()

    @property
    def repository(self):
        return self.server.repository

    def span(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0

    def figures(self, model: str, version: str) -> dict:
        none = {"rps": None, "error_rate": None, "p50_ms": None, "p99_ms": None,
                "mean_ms": None, "requests": None}
        if len(self.samples) < 2:
            return none
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        now = last.get((model, version))
        if now is None:
            return none
        before = first.get((model, version), (0, 0, None, 0))
        ok, errors = now[0] - before[0], now[1] - before[1]
        if ok < 0 or errors < 0:  # reloaded: counters started again
            ok, errors, before = now[0], now[1], (0, 0, None, 0)
        total = ok + errors
        out = {"rps": total / (t1 - t0), "error_rate": errors / total if total else 0.0,
               "requests": total, "p50_ms": None, "p99_ms": None, "mean_ms": None}
        if now[2] is not None:
            from gateway.monitoring.metrics import LATENCY_BUCKETS

            old = before[2] or (0,) * len(now[2])
            delta = [max(0, a - b) for a, b in zip(now[2], old)]
            out["p50_ms"] = _quantile(0.5, delta, LATENCY_BUCKETS)
            out["p99_ms"] = _quantile(0.99, delta, LATENCY_BUCKETS)
        elif ok:
            out["mean_ms"] = (now[3] - before[3]) / ok / 1e6
        return out


def _quantile(q: float, counts: list[int], bounds) -> float | None:
    """Milliseconds at quantile ``q`` of a bucketed histogram (linear within a bucket, as
    Prometheus' histogram_quantile)."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            low = bounds[i - 1] if i > 0 else 0.0
            high = bounds[i] if i < len(bounds) else bounds[-1]
            return (low + (high - low) * (rank - seen) / count) * 1000
        seen += count
    return bounds[-1] * 1000


# ---- helpers ----------------------------------------------------------------------------------

def _is_local(request: web.Request, peer: str) -> bool:
    """A browser on this machine: loopback peer, loopback Host, same Origin when sent."""
    if not _loopback(peer):
        return False
    host = request.host or ""
    name = host[1:host.index("]")] if host.startswith("[") and "]" in host else \
        host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() != "localhost" and not _loopback(name):
        return False
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{host}"


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


async def _body(request: web.Request) -> dict:
    """A change's JSON object body ({} when empty). Changes must be JSON: a cross-site form
    cannot send that without a CORS preflight, which this server never grants."""
    if request.content_type != "application/json":
        raise InvalidArgument("send changes as JSON (Content-Type: application/json)")
    text = await request.text()
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except ValueError:
        raise InvalidArgument("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidArgument(f"{what} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise InvalidArgument(f"{what} must be a number, not '{echo(value)}'") from None
    if not math.isfinite(number):
        raise InvalidArgument(f"{what} must be a finite number")
    return number


def _integer(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be an integer") from None
    if not low <= value <= high:
        raise InvalidArgument(f"{what} must be between {low} and {high}")
    return value


def _filtered(q) -> bool:
    return any(q.get(k) for k in ("who", "action", "section", "text", "since", "until"))


def _matches(record: dict, q) -> bool:
    def has(key, field):
        want = (q.get(key) or "").lower()
        return not want or want in str(record.get(field, "")).lower()

    t = float(record.get("time", 0) or 0)
    try:
        if q.get("since") and t < float(q["since"]):
            return False
        if q.get("until") and t > float(q["until"]):
            return False
    except ValueError:
        raise InvalidArgument("since and until are seconds since the epoch") from None
    return (has("who", "who") and has("action", "action") and has("section", "section")
            and has("text", "summary"))


def _iso(t) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t or 0)))


def _download(body: str, content_type: str, filename: str) -> web.Response:
    return web.Response(text=body, content_type=content_type, charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _done(message: str, **extra) -> web.Response:
    return answer({"ok": True, "message": message, **extra})


def answer(doc) -> web.Response:
    """JSON the browser can parse: NaN and infinities (JSON has none) become null."""
    try:
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        body = json.dumps(_finite(doc), separators=(",", ":"), default=str)
    return web.Response(body=body.encode(), content_type="application/json")


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
