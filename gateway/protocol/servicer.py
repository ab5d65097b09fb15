"""``inference.GRPCInferenceService``: gRPC in, core calls, gRPC out.

Each handler decodes its message, calls the data plane or repository, and encodes the answer.
Every ``GatewayError`` becomes its status code with its message; anything else is logged and
answered INTERNAL without details, so no path or trace leaks to a caller.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from gateway import __version__
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, NotFound, Unimplemented
from gateway.protocol import codec
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc
from gateway.protocol.registration import INVALID
from gateway.repository import Repository
from gateway.statistics import Duration

log = logging.getLogger(__name__)
EXTENSIONS = ["classification", "model_repository", "model_configuration", "statistics",
              "schedule_policy"]
# Requests of one ModelStreamInfer stream read and not yet answered on the wire; the next
# request is read only when one finishes (see ModelStreamInfer).
STREAM_INFLIGHT = 64
NAME_ECHO = 1024  # a stream's error answer repeats model name and version up to this length


async def abort(context: grpc.aio.ServicerContext, exc: BaseException):
    """Finish the call with the status the error carries (INTERNAL, detail-free, if unknown)."""
    if isinstance(exc, GatewayError):
        await context.abort(grpc.StatusCode[exc.code], exc.message)
    log.error("unexpected error in %s", type(exc).__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def handles_errors(method):
    """Map GatewayError (and surprises) to gRPC statuses for a unary handler."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc)

    return wrapper


def _deadline_ns(remaining: float | None) -> int:
    """The caller's deadline on the data plane's clock; 0 when it set none."""
    if remaining is None or remaining > 1e6:
        return 0
    return time.monotonic_ns() + int(max(remaining, 0.0) * 1e9)


def _routing_key(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-routing-key":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, repository: Repository, ready, *,
                 max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                 stream_inflight: int = STREAM_INFLIGHT):
        self.dataplane = dataplane
        self.policies = dataplane.router.policies  # models with a traffic policy (live dict)
        self.ensembles = repository.ensembles  # their steps may be split (live set)
        self.repository = repository
        self.ready = ready  # () -> bool: server started and not draining
        self.max_message_bytes = max_message_bytes  # the server's gRPC send limit
        # Encoding runs inside the data plane's accounting (a response too large to send is
        # counted as the RESOURCE_EXHAUSTED the caller gets).
        self._encode = functools.partial(codec.encode_response, limit=max_message_bytes)
        self.stream_inflight = stream_inflight

    # ---- inference ------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        try:
            # Reading metadata costs tens of microseconds: only when a split may use the key.
            # The deadline reaches the batcher (expired requests never run) and the accounting
            # (a call cancelled at its deadline timed out).
            name = request.model_name
            key = (_routing_key(context) if name in self.policies or name in self.ensembles
                   else None)
            remaining = context.time_remaining()
            core = codec.decode_request(request, key, _deadline_ns(remaining))
            return await self.dataplane.infer(core, self._encode)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc)

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests on one stream run concurrently; each answer (or error) is sent as it ends.

        Backpressure: a request holds one of the stream's ``stream_inflight`` slots from when it
        is read until its answer has been handed to gRPC, and the next request is read only
        once a slot is free. So a client that sends without reading stops being read (gRPC flow
        control then holds it back), the answers queue holds at most that many, and every
        request running counts in the data plane's limits. An answer over the send limit is
        replaced by an error answer for that request alone; the stream goes on."""
        slots = asyncio.Semaphore(self.stream_inflight)
        answers: asyncio.Queue = asyncio.Queue()  # never longer than stream_inflight
        routing_key = _routing_key(context)
        limit = self.max_message_bytes
        pending: set[asyncio.Task] = set()

        async def one(msg):
            if msg is INVALID:
                answers.put_nowait(pb.ModelStreamInferResponse(
                    error_message="the request is not a valid inference.ModelInferRequest message"))
                return
            try:
                core = codec.decode_request(msg, routing_key, 0)
                # Encoded inside the data plane's accounting: an answer refused as too large
                # counts as the error the caller gets.
                answer = pb.ModelStreamInferResponse(infer_response=await self.dataplane.infer(
                    core, lambda response: codec.encode_response(response, limit)))
            except GatewayError as exc:
                answer = _stream_error(msg, exc.message, limit)
            except Exception:
                log.exception("unexpected error in a stream request")
                answer = _stream_error(msg, "internal error", limit)
            answers.put_nowait(answer)

        async def read():
            try:
                await slots.acquire()
                async for msg in request_iterator:
                    task = asyncio.create_task(one(msg))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    await slots.acquire()  # the next read waits for a free slot
            except Exception as exc:  # the call broke while reading: answer what was read
                log.debug("stream read ended: %s", type(exc).__name__)
            finally:
                if pending:
                    await asyncio.wait(list(pending))
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                slots.release()
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    # ---- health and metadata --------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready())

    @handles_errors
    async def ModelReady(self, request, context):
        try:
            self.repository.ready(request.name, request.version)
        except GatewayError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="gateway", version=__version__,
                                         extensions=EXTENSIONS)

    @handles_errors
    async def ModelMetadata(self, request, context):
        served = self.repository.version(request.name, request.version)
        entry = self.repository.get(request.name)
        config = served.config
        batch = [-1] if config.max_batch_size > 0 else []

        def meta(specs):
            return [pb.ModelMetadataResponse.TensorMetadata(
                name=s.name, datatype=s.datatype, shape=batch + list(s.dims)) for s in specs]

        return pb.ModelMetadataResponse(
            name=request.name, versions=sorted(entry.serving, key=int), platform=config.platform,
            inputs=meta(config.inputs), outputs=meta(config.outputs))

    @handles_errors
    async def ModelConfig(self, request, context):
        served = self.repository.version(request.name, request.version)
        return pb.ModelConfigResponse(config=served.config.proto)

    @handles_errors
    async def ModelStatistics(self, request, context):
        if request.name:
            entry = self.repository.get(request.name)
            if request.version:
                served = [self.repository.version(request.name, request.version)]
            else:
                served = list(entry.serving.values())
        else:
            served = [v for e in self.repository.models.values() for v in e.serving.values()]
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in served])

    # ---- repository -----------------------------------------------------------------------

    @handles_errors
    async def RepositoryIndex(self, request, context):
        self._check_repository_name(request.repository_name)
        rows = self.repository.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r)
            for n, v, s, r in rows])

    @handles_errors
    async def RepositoryModelLoad(self, request, context):
        self._check_repository_name(request.repository_name)
        await self.repository.load_requested(request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @handles_errors
    async def RepositoryModelUnload(self, request, context):
        self._check_repository_name(request.repository_name)
        await self.repository.unload_requested(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _check_repository_name(self, name: str) -> None:
        if name:
            raise NotFound(f"unknown repository '{name[:64]}'; this server has one repository, "
                           "leave repository_name empty")

    # ---- not offered ----------------------------------------------------------------------

    async def _unsupported(self, what: str, context):
        await abort(context, Unimplemented(f"{what} is not supported by this gateway"))

    async def SystemSharedMemoryStatus(self, request, context):
        await self._unsupported("system shared memory", context)

    SystemSharedMemoryRegister = SystemSharedMemoryUnregister = SystemSharedMemoryStatus

    async def CudaSharedMemoryStatus(self, request, context):
        await self._unsupported("CUDA shared memory", context)

    CudaSharedMemoryRegister = CudaSharedMemoryUnregister = CudaSharedMemoryStatus

    async def TraceSetting(self, request, context):
        await self._unsupported("tracing (TraceSetting)", context)

    async def LogSettings(self, request, context):
        await self._unsupported("LogSettings (use the server's --log-level)", context)


def _stream_error(msg, message: str, limit: int) -> pb.ModelStreamInferResponse:
    """An error answer on a stream, naming the request it answers by its id (and its model and
    version when short): never larger than the send limit, whatever the request held."""
    answer = pb.ModelInferResponse()
    if codec.text_size(msg.id) <= limit // 2:
        answer.id = msg.id
    if len(msg.model_name) <= NAME_ECHO and len(msg.model_version) <= NAME_ECHO:
        answer.model_name = msg.model_name
        answer.model_version = msg.model_version
    return pb.ModelStreamInferResponse(error_message=message, infer_response=answer)


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(served) -> pb.ModelStatistics:
    s = served.stats
    return pb.ModelStatistics(
        name=served.model, version=served.version, last_inference=s.last_inference_ms,
        inference_count=s.inference_count, execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success), fail=_duration(s.fail), queue=_duration(s.queue),
            compute_input=_duration(s.compute_input), compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output), cache_hit=_duration(s.cache_hit),
            cache_miss=_duration(s.cache_miss)),
        batch_stats=[pb.InferBatchStatistics(
            batch_size=size, compute_input=_duration(b.compute_input),
            compute_infer=_duration(b.compute_infer), compute_output=_duration(b.compute_output))
            for size, b in sorted(s.batches.items())])
