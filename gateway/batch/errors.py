"""What can stop a batch scoring job, and what only fails some of its rows.

``UsageError``: the job cannot start as asked (a missing column, an unknown model, a resume of
a different job); the command exits 2. ``JobAborted``: it started and had to stop (the gateway
stayed unavailable past the retries, ``--fail-fast`` met a bad row, a credential was refused);
the command exits 1, and the completed chunks are kept for ``--resume``. ``InferenceFailure``
is one request's gRPC-style failure; the runner decides whether it retries, fails rows or aborts.
"""

from __future__ import annotations

# Retried with backoff: the server or its queue is (for now) unable to take the request.
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
# The request's rows are at fault (or the model failed on them): those rows get the error. A
# request of several rows is split in halves until the failing rows are found.
ISOLATE = frozenset({"INVALID_ARGUMENT", "INTERNAL", "OUT_OF_RANGE"})
# The rows get the error as they are, without splitting (a model that hangs would hang again).
ROW_ONLY = frozenset({"DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "DATA_LOSS"})
# Anything else (NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED, UNIMPLEMENTED,
# FAILED_PRECONDITION) is the same for every row: the job stops.


class BatchError(Exception):
    """Base of the errors a scoring job reports to its user."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(BatchError):
    """The job cannot start as asked."""

    exit_code = 2


class JobAborted(BatchError):
    """The job stopped; completed chunks stay in its checkpoint."""


class InferenceFailure(Exception):
    """One request failed with a gRPC status ``code`` (a name, e.g. ``INVALID_ARGUMENT``)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    @property
    def rows_at_fault(self) -> bool:
        return self.code in ISOLATE or self.code in ROW_ONLY
