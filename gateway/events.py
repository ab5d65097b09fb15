"""The core's one event seam: what happened to requests, batches and models, for whoever watches.

The data plane, the batchers, the repository and the router report here; metrics, drift,
rollout figures, feedback and health subscribe here, all in one place (``GatewayServer``), so
what runs after an event does not depend on the order objects were built in. Each event is a
list of subscribers called in subscription order, synchronously, in the thread that produced
the event (the event loop, except ``batch_finished`` for models that run on instance threads).
Subscribers must be cheap (``request_finished`` runs once per request) and must not raise; one
that does is logged and the others still run.

Events and their arguments:

- ``request_finished(model, served, code, elapsed_ns)``: every request, whatever its outcome
  (``served`` is the version that served it, or None when none was reached; ``code`` a gRPC
  status name).
- ``batch_finished(batcher, batch, feeds, size, start_ns, compute_ns, done_ns)``: every batch run.
- ``model_changed(model)``: a model's serving versions changed (loaded, reloaded, unloaded).
- ``load_failed(model, version, reason)``: a version (``""``: the model) failed to load.
- ``fallback(model, note)``: a split could not be honoured in full (a version not serving).
- ``shadow_done(served, ok, seconds)``: a mirrored request finished.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
NAMES = ("request_finished", "batch_finished", "model_changed", "load_failed", "fallback",
         "shadow_done")


class Events:
    __slots__ = NAMES

    def __init__(self):
        for name in NAMES:
            setattr(self, name, [])

    def subscribe(self, **handlers) -> None:
        """``subscribe(request_finished=f, model_changed=g)``: unknown names are refused."""
        for name, handler in handlers.items():
            if name not in NAMES:
                raise ValueError(f"no event named {name!r}; events are {', '.join(NAMES)}")
            getattr(self, name).append(handler)

    def emit(self, name: str, *args) -> None:
        """For the events that are not per request; the data plane inlines its loop."""
        for handler in getattr(self, name):
            try:
                handler(*args)
            except Exception:
                log.exception("a subscriber of %s failed", name)

    def batch(self, *args) -> None:
        """The batchers' observer: a batch ran."""
        for handler in self.batch_finished:
            try:
                handler(*args)
            except Exception:
                log.exception("a subscriber of batch_finished failed")
