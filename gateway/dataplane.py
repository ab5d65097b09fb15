"""The request path, protocol-free: admit -> route -> validate -> batch -> execute -> respond.

A newcomer should be able to read how a request becomes a response in ``DataPlane.infer``
(admission) and ``DataPlane._serve`` (the rest, top to bottom; an ensemble's steps come back
through ``_serve`` as requests of their own). Protocol adapters decode into ``InferRequest``
before calling it and encode the ``InferResponse`` it returns; errors are ``GatewayError``
subclasses that carry their status.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from gateway.classification import classify
from gateway.errors import GatewayError, InvalidArgument, ResourceExhausted, Unavailable, echo
from gateway.modelconfig import ModelConfig, carry_variable_dims
from gateway.repository import ServingVersion
from gateway.routing import Router
from gateway.tensors import InferRequest, InferResponse, Tensor

log = logging.getLogger(__name__)
now_ns = time.monotonic_ns
MAX_SHADOW_INFLIGHT = 64  # mirrored requests beyond this are dropped, never queued
DEADLINE_SLACK_NS = 2_000_000  # a cancellation this close to the deadline is the deadline


class DataPlane:
    def __init__(self, router: Router, max_inflight: int = 8192,
                 max_inflight_per_model: int = 2048):
        self.router = router
        self.accepting = True
        self.refused = 0  # requests refused because the server is draining
        self.inflight = 0
        self.max_inflight = max_inflight
        self.max_inflight_per_model = max_inflight_per_model
        self._per_model: dict[str, int] = {}  # model -> requests in flight
        self._idle = asyncio.Event()
        self._shadows: set[asyncio.Task] = set()
        self.shadow_dropped = 0
        # request_finished (once per request: its subscribers must be cheap) and shadow_done
        # go to the server's event seam (gateway/events.py)
        self.events = router.events
        # model -> callable(request id, served, outputs, rows): keeps predictions of requests
        # with an id for ground-truth feedback (gateway/feedback.py); only enabled models.
        self.feedback: dict = {}

    async def infer(self, request: InferRequest, encode=None):
        """The response to one request; with ``encode``, what ``encode(response)`` returns:
        a protocol's encoding fails inside the accounting, so a response refused there (too
        large to send) is counted as the error the caller gets, not as OK."""
        start = now_ns()
        self.inflight += 1
        try:
            # Admit: not while draining, and not beyond the server's bound.
            if not self.accepting:
                self.refused += 1
                refusal = Unavailable("the server is shutting down; retry on another replica")
            elif self.inflight > self.max_inflight:
                refusal = ResourceExhausted(
                    f"the server has {self.max_inflight} requests in flight; retry later")
            else:
                return await self._serve(request, start, encode)
            self._finished(request, None, refusal.code, start)
            raise refusal
        finally:
            self.inflight -= 1
            if not self.inflight and not self.accepting:
                self._idle.set()

    async def _serve(self, request: InferRequest, start: int, encode=None):
        """One admitted request to one model (also each step of an ensemble), accounted."""
        served = None
        counted = None
        try:
            # Route: an explicit version as asked, otherwise the model's traffic policy.
            served = self.router.route(request.model, request.version, request.routing_key)
            model_inflight = self._per_model.get(served.model, 0)
            if model_inflight >= self.max_inflight_per_model:
                raise ResourceExhausted(f"model '{served.model}' has "
                                        f"{self.max_inflight_per_model} requests in flight; "
                                        "retry later")
            self._per_model[served.model] = model_inflight + 1
            counted = served.model
            # Validate against the served version's config, before anything reaches the model.
            config = served.config
            arrays, size, shape_key = prepare_inputs(config, request.inputs)
            wanted = requested_outputs(config, request.outputs)
            if self.router.policies and not request.version:
                self._maybe_mirror(request, served)
            if config.ensemble is None:
                # Batch and execute: the batcher queues, merges and runs on a free instance (a
                # small model with nothing queued runs at once).
                outputs = await served.batcher.run_now(arrays, size)
                if outputs is None:
                    outputs = await served.batcher.submit(arrays, size, shape_key,
                                                          request.priority, request.timeout_us,
                                                          request.deadline_ns)
            else:
                # An ensemble: each step is a request to its model through this same path.
                outputs = await served.batcher.run(arrays, size, self._step, request)
            if request.id and self.feedback:  # keep the prediction for a later label
                keep = self.feedback.get(served.model)
                if keep is not None:
                    keep(request.id, served, outputs, size)
            # Respond with the outputs asked for, named by the version that actually served.
            tensors = [response_tensor(config, i, outputs[i], size) for i in wanted]
            if request.classification:  # Triton's extension: top-k classes as text
                tensors = classified(config, tensors, request.classification)
            response = InferResponse(request.model, served.version, request.id, tensors)
            if encode is not None:
                response = encode(response)
        except GatewayError as exc:
            self._finished(request, served, exc.code, start)
            raise
        except asyncio.CancelledError:
            # gRPC cancels a call whose deadline passed: that is a timeout, not a change of mind.
            late = request.deadline_ns and now_ns() >= request.deadline_ns - DEADLINE_SLACK_NS
            self._finished(request, served, "DEADLINE_EXCEEDED" if late else "CANCELLED", start)
            raise
        except Exception:
            # Our bug: the caller gets INTERNAL (from the protocol edge); it counts as one too.
            self._finished(request, served, "INTERNAL", start)
            raise
        finally:
            if counted is not None:
                self._per_model[counted] -= 1
        self._finished(request, served, "OK", start)
        return response

    def _step(self, step, tensors: list[Tensor], outer: InferRequest):
        """One step of an ensemble as a request of its own to the step's model: routed (the
        caller's routing key keeps a sticky caller on one composing version), with the
        caller's priority and deadline."""
        request = InferRequest(step.model, step.version, "", tensors,
                               [name for name, _ in step.outputs], outer.routing_key,
                               outer.priority, outer.timeout_us, outer.deadline_ns)
        return self._serve(request, now_ns())

    def _finished(self, request: InferRequest, served: ServingVersion | None, code: str,
                  start_ns: int) -> None:
        """Account one request: statistics of the version that served it, then the observer."""
        elapsed = now_ns() - start_ns
        if served is not None:
            (served.stats.success if code == "OK" else served.stats.fail).add(elapsed)
        for handler in self.events.request_finished:
            try:
                handler(request.model, served, code, elapsed)
            except Exception:
                log.exception("a subscriber of request_finished failed")

    def _maybe_mirror(self, request: InferRequest, served: ServingVersion) -> None:
        """Copy the request to the shadow version, off the response path, if one is set."""
        shadow = self.router.shadow_target(request.model)
        if shadow is None or shadow is served:
            return
        if len(self._shadows) >= MAX_SHADOW_INFLIGHT:
            self.shadow_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._mirror(request, shadow))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _mirror(self, request: InferRequest, shadow: ServingVersion) -> None:
        start = now_ns()
        ok = False
        try:
            config = shadow.config
            arrays, size, key = prepare_inputs(config, request.inputs)
            if config.ensemble is None:
                await shadow.batcher.submit(arrays, size, key)
            else:
                await shadow.batcher.run(arrays, size, self._step, request)
            shadow.stats.success.add(now_ns() - start)
            ok = True
        except GatewayError:
            shadow.stats.fail.add(now_ns() - start)
        except Exception:
            log.exception("shadow request to model '%s' version %s failed", shadow.model,
                          shadow.version)
        self.events.emit("shadow_done", shadow, ok, (now_ns() - start) / 1e9)

    async def drain(self, grace_seconds: float) -> bool:
        """Refuse new requests and wait for in-flight ones; True if all finished in time."""
        self.accepting = False
        if not self.inflight:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except TimeoutError:
            return False
        return True


def prepare_inputs(config: ModelConfig,
                   tensors: list[Tensor]) -> tuple[list[np.ndarray], int, tuple]:
    """Check inputs against the config; return arrays in model order, batch size, shape key."""
    specs = config.inputs
    if len(tensors) != len(specs):
        names = {t.name for t in tensors}
        missing = [s.name for s in specs if s.name not in names]
        if missing:
            raise InvalidArgument(f"model '{config.name}' expects input(s) {', '.join(missing)}")
    arrays: list[np.ndarray | None] = [None] * len(specs)
    batching = config.max_batch_size > 0
    size = 0
    for t in tensors:
        index = config.input_index.get(t.name)
        if index is None:
            raise InvalidArgument(f"model '{config.name}' has no input '{echo(t.name)}'; its "
                                  f"inputs are {', '.join(s.name for s in specs)}")
        if arrays[index] is not None:
            raise InvalidArgument(f"input '{t.name}' already exists in request")
        spec = specs[index]
        if t.datatype != spec.datatype:
            raise InvalidArgument(f"input '{t.name}' must be {spec.datatype}, got {t.datatype}")
        shape = t.data.shape
        if batching:
            if not shape or not 1 <= shape[0] <= config.max_batch_size:
                raise InvalidArgument(
                    f"input '{t.name}': the first dimension is the batch size and must be 1 to "
                    f"{config.max_batch_size}; got shape {list(shape)}")
            if not size:
                size = shape[0]
            elif shape[0] != size:
                raise InvalidArgument("all inputs must have the same batch size")
            dims = shape[1:]
        else:
            dims = shape
        if len(dims) != len(spec.dims) or any(
                want != -1 and got != want for got, want in zip(dims, spec.dims)):
            expected = ([-1] if batching else []) + list(spec.dims)
            raise InvalidArgument(
                f"input '{t.name}' has shape {list(shape)}; the model expects {expected}")
        data = t.data
        if spec.datatype == "BYTES":
            data = as_text(t.name, data)
        if spec.reshape is not None:
            reshape = spec.reshape
            if -1 in reshape:
                reshape = carry_variable_dims(dims, spec.dims, reshape)
            data = data.reshape(((size,) if batching else ()) + reshape)
        arrays[index] = data
    key = tuple(a.shape[1:] for a in arrays) if batching else ()
    return arrays, size or 1, key


def as_text(name: str, data: np.ndarray) -> np.ndarray:
    """BYTES elements decoded to str, once: ONNX string tensors hold UTF-8 text. Other bytes
    are refused here, before the request can share a batch (and so its failure) with other
    callers' requests: ONNX Runtime's Python API cannot carry them (it str()s object elements,
    so b"\xff" would reach the model as the text "b'\\xff'", and decodes numpy bytes_ arrays
    as UTF-8), so Triton's round trip of arbitrary bytes through string tensors is not served."""
    flat = data.reshape(-1)
    out = np.empty(flat.shape[0], dtype=object)
    for i, value in enumerate(flat):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"input '{name}': BYTES element {i} is not valid UTF-8 (at byte {exc.start}); "
                    "ONNX string tensors hold text, and ONNX Runtime passes them to the model "
                    "as UTF-8 only") from None
        out[i] = value
    return out.reshape(data.shape)


def requested_outputs(config: ModelConfig, names: list[str]) -> list[int]:
    """Indexes into the model's outputs of the ones the caller asked for (all when none);
    each at most once, as in Triton, so a response is never larger than all outputs once."""
    if not names:
        return list(range(len(config.outputs)))
    wanted = []
    for name in names:
        index = config.output_index.get(name)
        if index is None:
            if name in config.unsupported_outputs:
                raise InvalidArgument(
                    f"output '{echo(name)}' is a {config.unsupported_outputs[name]}, which this "
                    "gateway cannot return; ask for tensor outputs only")
            raise InvalidArgument(f"unexpected inference output '{echo(name)}' for model "
                                  f"'{config.name}'; its outputs are "
                                  f"{', '.join(o.name for o in config.outputs)}")
        if index in wanted:  # at most a model's outputs: a short list
            raise InvalidArgument(f"output '{echo(name)}' already exists in request")
        wanted.append(index)
    return wanted


def classified(config: ModelConfig, tensors: list[Tensor],
               classes: dict[str, int]) -> list[Tensor]:
    """The tensors, those asked for with ``classification`` as their top classes."""
    batching = config.max_batch_size > 0
    return [classify(t, classes[t.name], config.labels.get(t.name, ()), batching)
            if t.name in classes else t for t in tensors]


def response_tensor(config: ModelConfig, index: int, data: np.ndarray, size: int) -> Tensor:
    spec = config.outputs[index]
    if spec.reshape is not None:
        batching = config.max_batch_size > 0
        dims = spec.dims
        if -1 in dims:
            dims = carry_variable_dims(data.shape[1:] if batching else data.shape, spec.reshape,
                                       dims)
        data = data.reshape(((size,) if batching else ()) + dims)
    return Tensor(spec.name, spec.datatype, data)
