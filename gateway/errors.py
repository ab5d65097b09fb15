"""One error tree for the whole gateway.

Every failure the gateway reports to a caller is a ``GatewayError``; each subclass names the
gRPC status it maps to (as a plain string, so the core never imports grpc). The protocol edge
turns ``code`` into a ``grpc.StatusCode`` and ``message`` into the status details. Anything
else that escapes is our bug and is reported as INTERNAL without its text.
"""

from __future__ import annotations

# A model version could not be loaded: raised by runtimes too, which import nothing of gateway/.
from runtimes.base import ModelLoadError  # noqa: F401

ECHO_LIMIT = 128  # characters of a caller's value that an error message repeats


def echo(value) -> str:
    """A caller's value as an error message (or a log line) may repeat it: at most
    ``ECHO_LIMIT`` characters, control characters escaped. Status details travel in a gRPC
    trailer, which is limited (16 KiB by default): a message that repeated a long name whole
    would turn the caller's INVALID_ARGUMENT or NOT_FOUND into RESOURCE_EXHAUSTED."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > ECHO_LIMIT:
        text = f"{text[:ECHO_LIMIT]}...({len(text)} characters)"
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                       for c in text)
    return text


class GatewayError(Exception):
    """Base of every error a caller may see; ``code`` is a gRPC status code name."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(GatewayError):
    code = "INVALID_ARGUMENT"


class NotFound(GatewayError):
    code = "NOT_FOUND"


class Unavailable(GatewayError):
    code = "UNAVAILABLE"


class ResourceExhausted(GatewayError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(GatewayError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(GatewayError):
    code = "CANCELLED"


class Unauthenticated(GatewayError):
    code = "UNAUTHENTICATED"


class PermissionDenied(GatewayError):
    code = "PERMISSION_DENIED"


class Unimplemented(GatewayError):
    code = "UNIMPLEMENTED"


class FailedPrecondition(GatewayError):
    code = "FAILED_PRECONDITION"


class ModelExecutionError(GatewayError):
    """The model itself failed while running a batch: the caller's request was well formed."""

    code = "INTERNAL"
