"""Assembles the gateway and owns its lifecycle: start, ready, drain, stop.

Start: the gRPC port listens first (so liveness answers while models load), models load per the
control mode, then the server reports ready. Stop (SIGTERM/SIGINT): health turns NOT_SERVING,
new requests get UNAVAILABLE, in-flight requests finish within the grace period, model
sessions close, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.auth import AuthInterceptor, TokenAuthenticator
from gateway.cache import ResponseCache
from gateway.config import Settings
from gateway.control import ControlPlane, open_store
from gateway.control.filestore import FileStore
from gateway.control.predictions import shared_predictions
from gateway.dataplane import DataPlane
from gateway.errors import Unavailable
from gateway.feedback import FeedbackCollector, FeedbackStore
from gateway.protocol.admin import AdminServicer
from gateway.protocol.pb import gateway_admin_pb2, grpc_service_pb2
from gateway.protocol.registration import add_servicer
from gateway.protocol.servicer import InferenceServicer
from gateway.registry import RegistryService
from gateway.repository import Repository
from gateway.routing import Router
from gateway.tls import check_server_files

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BARRIER_METHOD = "/gateway.drain.Barrier/Wait"  # served by nobody: answered UNIMPLEMENTED
BARRIER_SETTLE_SECONDS = 1.0  # past the drain, how long stop() waits for callers to go quiet
EMPTY_POLLS = 3  # polls in a row that must find the repository empty before all models unload


class GatewayServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.repository = Repository(settings.model_repository, settings.cpu_threads,
                                     settings.control_mode)
        self.repository.execution_timeout_s = settings.execution_timeout
        self.repository.max_inflight_per_model = settings.max_inflight_per_model
        self.repository.default_max_batch_size = settings.default_max_batch_size
        if settings.cache_size:
            self.repository.cache = ResponseCache(settings.cache_size)
        # From the moment the port listens until the first loads are done, a model the
        # repository does not know yet is UNAVAILABLE (retry), not NOT_FOUND.
        self.repository.starting = True
        self.router = Router(self.repository)
        store = open_store(settings.state_url, settings.state_directory())
        if isinstance(store, FileStore):
            store.poll_interval = settings.state_poll_interval
        self.control = ControlPlane(store, self.router, settings.rollout_lease)
        self.traffic = self.control.traffic
        self.rollouts = self.control.rollouts
        self.dataplane = DataPlane(self.router, settings.max_inflight,
                                   settings.max_inflight_per_model)
        self.feedback = FeedbackStore(self.repository, self.dataplane,
                                      shared_predictions(store))
        self.rollouts.quality = self.feedback.quality  # for min_accuracy_ratio
        self.registry = RegistryService(self.repository, self.traffic, self.rollouts)
        self.health = health.aio.HealthServicer()
        self.authenticator = (TokenAuthenticator(settings.auth_tokens) if settings.auth_tokens
                              else None)
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = -1
        self._http = None  # gateway.protocol.http.HttpFrontend when --http-port is not -1
        self.monitoring = None
        self._ready = False
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self._barrier_dir: Path | None = None  # holds the private socket of the drain barrier
        self._barrier_address = ""  # set once the server has started
        # Every subscriber of the core's events, in one place (monitoring adds its own when
        # metrics are on). The gate first: a new version of a gated model must not take the
        # traffic of "the newest serves" before anyone else hears of it.
        self.repository.events.subscribe(
            request_finished=self.control.counter.observe,
            model_changed=self.traffic.model_changed)
        self.repository.events.subscribe(model_changed=self.feedback.model_changed)
        self.repository.events.subscribe(model_changed=self._model_changed)

    def is_ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # A second server on a taken port must fail, not share it, unless sharing is the
            # point (--workers).
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
        ]
        interceptors = [AuthInterceptor(self.authenticator)] if self.authenticator else []
        self._grpc = grpc.aio.server(options=options, interceptors=interceptors)
        add_servicer(self._grpc, InferenceServicer(self.dataplane, self.repository, self.is_ready,
                                                   max_message_bytes=s.max_message_bytes),
                     grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])
        add_servicer(self._grpc, AdminServicer(self.control, self.registry, self.feedback),
                     gateway_admin_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection([
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            gateway_admin_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ], self._grpc)
        address = f"{_host(s.host)}:{s.grpc_port}"
        if s.tls_cert:
            self.grpc_port = self._grpc.add_secure_port(address, server_credentials(s))
        else:
            self.grpc_port = self._grpc.add_insecure_port(address)
        barrier = self._add_barrier_port()
        await self._grpc.start()
        self._barrier_address = barrier
        await self.health.set("", NOT_SERVING)
        self.metrics_port = self._start_metrics()
        if s.http_port >= 0:  # KServe V2 over HTTP: the same data plane, auth and limits
            from gateway.protocol.http import HttpFrontend
            from gateway.tls import server_context

            self._http = HttpFrontend(self.dataplane, self.repository, self.is_ready,
                                      self.authenticator, s.max_message_bytes)
            from gateway.protocol.console import Console

            self._http.console = Console(self)  # the operator console under /ui/
            tls = server_context(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
            self.http_port = await self._http.start(s.host, s.http_port, tls, s.reuse_port)
        # The stored splits first: the first request after a model loads must already follow
        # them (a 5% canary must not take 100% while the state is read).
        await self.control.start(wait_s=s.state_start_wait)
        try:
            await self._load_initial_models()
        finally:
            self.repository.starting = False
        # Loads, unloads and publishes through any process reach every process from now on.
        self.control.models.adopt_current(self.control.snapshot)
        self.repository.broadcast = self.control.models.broadcast
        if s.control_mode == "poll":
            self._tasks.append(asyncio.create_task(self._poll(), name="repository-poll"))
        self._tasks.append(asyncio.create_task(self.feedback.run(), name="feedback"))
        self._ready = True
        await self.health.set("", SERVING)

    def _start_metrics(self) -> int:
        """Metrics, GPU sampling and drift (gateway/monitoring); before models load."""
        s = self.settings
        if s.metrics_port < 0:
            return -1
        from gateway.monitoring import Monitoring

        self.monitoring = Monitoring(self.repository, self.router, self.dataplane,
                                     s.gpu_sample_interval, s.drift_interval,
                                     fleet=(self.control.store, self.control.identity,
                                            asyncio.get_running_loop()))
        self.monitoring.registry.register(FeedbackCollector(self.feedback))
        from gateway.monitoring.control import ControlCollector

        self.monitoring.registry.register(ControlCollector(self.control))
        if s.metrics_rundir is not None:  # a --workers worker: the supervisor's port serves it
            from gateway.monitoring.fleet import announce

            announce(s.metrics_rundir, s.worker_index, self.monitoring.start("127.0.0.1", 0))
            return s.metrics_port
        return self.monitoring.start(s.host, s.metrics_port)

    async def _load_initial_models(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            on_disk = await loop.run_in_executor(None, self.repository.snapshot)
        except Unavailable as exc:  # gone since the settings were checked: poll retries
            log.error("%s", exc.message)
            on_disk = {}
        if s.control_mode == "explicit" and "*" not in s.load_models:
            names = list(s.load_models)
        else:
            names = list(on_disk)
        for name in names:
            try:
                await self.repository.load(name)
            except Exception as exc:  # a bad name or directory never stops the server
                log.error("model '%s' not loaded: %s", name, getattr(exc, "message", exc))
        self._signatures = on_disk

    async def _poll(self) -> None:
        """Poll mode: reload models whose files changed, load new ones, unload removed ones.

        A repository that cannot be read (moved, unmounted, no permission) changes nothing:
        the loaded models keep serving, the error is logged when the outage starts (and again
        each minute while it lasts), and polling goes on. A poll that finds the repository
        empty while models serve (an unmounted volume leaves an empty mount point) unloads
        them only if it is still empty ``EMPTY_POLLS`` polls in a row."""
        loop = asyncio.get_running_loop()
        outage, logged, empty = "", 0.0, 0
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                try:
                    on_disk = await loop.run_in_executor(None, self.repository.snapshot)
                except Unavailable as exc:
                    if exc.message != outage or loop.time() - logged >= 60:
                        log.error("repository poll: %s; retrying every %gs", exc.message,
                                  self.settings.poll_interval)
                        outage, logged = exc.message, loop.time()
                    continue
                if outage:
                    log.warning("the model repository can be read again; polling resumes")
                    outage = ""
                serving = [n for n, e in self.repository.models.items() if e.serving]
                if serving and not on_disk:
                    empty += 1
                    if empty < EMPTY_POLLS:
                        log.error("the model repository is empty (an unmounted volume?); %d "
                                  "loaded models keep serving, and unload if it is still empty "
                                  "at %d more polls", len(serving), EMPTY_POLLS - empty)
                        continue
                empty = 0
                for name, signature in on_disk.items():
                    if self._signatures.get(name) != signature:
                        self._signatures[name] = signature
                        await self.repository.load(name)
                for name in serving:
                    if name not in on_disk:
                        log.info("model '%s' left the repository: unloading", name)
                        self._signatures.pop(name, None)
                        await self.repository.unload(name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repository poll failed; retrying at the next interval")

    def _model_changed(self, name: str) -> None:
        status = SERVING if self.repository.serves(name) else NOT_SERVING
        asyncio.get_running_loop().create_task(self.health.set(name, status))

    async def stop(self) -> None:
        """Drain and stop; safe to call more than once.

        Nothing the server accepted is lost. gRPC holds calls it has received but not yet handed
        to a handler in its own queue, and its shutdown cancels those (the client sees
        CANCELLED): so before it, a barrier call through a private socket waits until every
        call received so far has reached a handler. In order: health turns NOT_SERVING; a
        barrier (what was sent before the signal runs as usual); the data plane refuses new
        requests with UNAVAILABLE and running ones finish (``drain_seconds``, past which they
        are answered UNAVAILABLE); barriers until no more calls arrive (each refused); then
        gRPC stops."""
        if self._grpc is None or self._stopped.is_set():
            return
        self._stopped.set()
        self._ready = False
        loop = asyncio.get_running_loop()
        grace = self.settings.drain_seconds
        deadline = loop.time() + grace
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await self._barrier(deadline)
        drained = await self.dataplane.drain(max(deadline - loop.time(), 0.0))
        if not drained:
            log.warning("drain: requests still running after %.1fs; answering them UNAVAILABLE",
                        grace)
            self.repository.abandon(
                "the server is shutting down and the request did not finish within its drain "
                "period; retry on another replica")
        # Calls that arrived while draining were refused; settle until none arrive any more
        # (clients stop sending once refused), for at most a second past the drain.
        settle = loop.time() + BARRIER_SETTLE_SECONDS
        while True:
            refused = self.dataplane.refused
            await self._barrier(settle)
            if self.dataplane.refused == refused or loop.time() >= settle:
                break
        if self._barrier_dir is not None:  # its listener lives on until gRPC stops
            shutil.rmtree(self._barrier_dir, ignore_errors=True)
        if self._http is not None:
            await self._http.stop()
        # Every call is answered or about to be (a refusal); open streams end after a second.
        await self._grpc.stop(grace=1.0)
        try:  # the last predictions, for labels that come after this replica is gone
            await asyncio.wait_for(self.feedback.flush(), 5.0)
        except Exception as exc:
            log.warning("feedback: predictions not shared before stopping: %s",
                        getattr(exc, "message", exc))
        await self.control.stop()
        await self.repository.close()
        if self.monitoring is not None:
            self.monitoring.stop()

    def _add_barrier_port(self) -> str:
        """A Unix socket in a private directory (only this user reaches it) on the same server:
        the drain's barrier calls come through it, so they queue behind every call that reached
        the server before them, whichever port or worker those came to. "" if unavailable."""
        try:
            self._barrier_dir = Path(tempfile.mkdtemp(prefix="gateway-"))
        except OSError as exc:
            log.warning("no drain barrier (a private socket directory: %s); calls still "
                        "queued in gRPC at shutdown may be cancelled", exc)
            return ""
        address = f"unix:{self._barrier_dir / 'drain.sock'}"
        if len(address) > 100 or not self._grpc.add_insecure_port(address):
            log.warning("no drain barrier (cannot listen on %s)", address)
            return ""
        return address

    async def _barrier(self, deadline: float) -> None:
        """Return once every call this server received before now has reached its handler.

        gRPC hands calls to the handlers in the order they arrived (one queue for the methods
        served by generic handlers, as all of ours are); a call to an unknown method on the
        private socket is answered UNIMPLEMENTED only once it has been handed over, so its
        answer means every call before it was too."""
        if not self._barrier_address:
            return
        timeout = max(deadline - asyncio.get_running_loop().time(), 0.05)
        async with grpc.aio.insecure_channel(self._barrier_address) as channel:
            try:
                await channel.unary_unary(BARRIER_METHOD)(b"", timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNIMPLEMENTED,
                                      grpc.StatusCode.UNAUTHENTICATED):
                    log.warning("drain barrier: %s (%s); calls still queued in gRPC may be "
                                "cancelled", exc.code().name, exc.details())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def server_credentials(s: Settings) -> grpc.ServerCredentials:
    """TLS for the gRPC port; with a client CA, clients must present a certificate it signed."""
    # gRPC reports a bad PEM only as "Failed to bind": check first, naming the file.
    check_server_files(s.tls_cert, s.tls_key, s.tls_client_ca)  # ValueError
    ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
    return grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain; the process exit code."""
    server = GatewayServer(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    # SIGHUP (a closed terminal, a config reload by habit) never stops the server.
    loop.add_signal_handler(signal.SIGHUP, server.authenticator.reload if server.authenticator
                            else lambda: log.info("SIGHUP ignored: no --auth-tokens to re-read"))
    try:
        await server.start()
    except (RuntimeError, OSError, ValueError) as exc:  # the port is taken, a bad certificate...
        from gateway.workers import listening_on

        taken = "Failed to bind" in str(exc) and not settings.reuse_port and \
            listening_on(settings.host, settings.grpc_port)
        if taken:  # gRPC's own text names neither the cause nor the remedy
            exc = f"the gRPC port {taken} is already in use by another process (choose " \
                  "another with --grpc-port, or 0 for any free port)"
        log.error("cannot start: %s", exc)
        await server.stop()
        return 1
    worker = (f" worker {settings.worker_index} pid {os.getpid()}" if settings.reuse_port
              else "")
    print(f"gateway ready: grpc {settings.host}:{server.grpc_port} "
          f"metrics {server.metrics_port} http {server.http_port}{worker}", flush=True)
    await stop_requested.wait()
    log.info("shutting down: draining in-flight requests")
    await server.stop()
    log.info("stopped")
    return 0
