"""The SDK's exceptions: one base class carrying a gRPC-style status and details, a few named subclasses.

Every error the SDK raises is a :class:`BrainTumorError`; catch that to handle them all, or a subclass to
handle one case. ``status`` is the gRPC status name (``INVALID_ARGUMENT``, ``UNAVAILABLE``, …) so that
errors map one-to-one onto the protocol, whichever side raised them; :func:`http_status` maps it onto HTTP,
and :func:`retry_delay` is the one retry policy over those statuses.
"""

from __future__ import annotations

from typing import Any


class BrainTumorError(Exception):
    """Base of every SDK error.

    Args:
        message: what went wrong, for a person.
        status: the gRPC status name; defaults to the class's own.
        details: extra facts (never patient data).
    """

    status: str = "UNKNOWN"

    def __init__(self, message: str, *, status: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.details = details or {}

    def __init_subclass__(cls, status: str | None = None, **kwargs: Any) -> None:
        """A named error says its gRPC status in its class line: ``class X(BrainTumorError, status="...")``."""
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status

    def __str__(self) -> str:
        return self.message


class InvalidImageError(BrainTumorError, ValueError, status="INVALID_ARGUMENT"):
    """The input is not a usable image (unreadable, truncated, too large, too small, no pixel data)."""


class InvalidTargetError(BrainTumorError, ValueError, status="INVALID_ARGUMENT"):
    """The server address cannot be used: an empty server list, an entry that is not ``host:port``."""


class ServerUnavailableError(BrainTumorError, ConnectionError, status="UNAVAILABLE"):
    """The server cannot be reached (down, wrong address, TLS mismatch)."""


class ModelNotReadyError(BrainTumorError, status="UNAVAILABLE"):
    """The server is up but the model (or the requested version) is not loaded and ready."""


class ModelMismatchError(BrainTumorError, status="FAILED_PRECONDITION"):
    """The served model's inputs or outputs are not what this SDK sends and reads."""


class DeadlineExceededError(BrainTumorError, TimeoutError, status="DEADLINE_EXCEEDED"):
    """A call did not finish within its deadline."""


class InferenceError(BrainTumorError, status="INTERNAL"):
    """The server refused or failed an inference request."""


#: gRPC status codes worth retrying: the request did not run, and may succeed later.
RETRYABLE_STATUSES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"})
#: How gRPC words a connection lost mid-call when it reports it under UNKNOWN or INTERNAL (lower case).
CONNECTION_LOST = ("stream removed", "socket closed", "goaway", "rst_stream", "connection reset", "broken pipe")

#: The HTTP status that answers an SDK error's gRPC status (the web app's, for instance); others: 502.
HTTP_STATUSES: dict[str, int] = {
    "INVALID_ARGUMENT": 422,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "FAILED_PRECONDITION": 502,
}
#: The HTTP status of an SDK error whose gRPC status :data:`HTTP_STATUSES` does not name (a bad gateway).
DEFAULT_HTTP_STATUS = 502


def http_status(error: BrainTumorError) -> int:
    """The HTTP status a web front answers ``error`` with.

    Args:
        error: any SDK error.
    """
    return HTTP_STATUSES.get(error.status, DEFAULT_HTTP_STATUS)


def from_triton(error: Exception, *, during: str) -> BrainTumorError:
    """Translate a ``tritonclient`` exception into the matching SDK error.

    Args:
        error: the ``InferenceServerException`` (or any exception) raised by tritonclient.
        during: what the SDK was doing, for the message.
    """
    raw = str(error.status() if hasattr(error, "status") and callable(error.status) else "") or ""
    status = raw.removeprefix("StatusCode.") or "UNKNOWN"
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    message = f"{during}: {text}"
    lowered = text.lower()
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(message)
    # gRPC may report a connection that went away mid-call under UNKNOWN or INTERNAL rather than UNAVAILABLE
    # (``Stream removed``, a GOAWAY or RST_STREAM from a server or proxy that stops): no server, not a bad request
    if status in ("UNKNOWN", "INTERNAL") and any(s in lowered for s in CONNECTION_LOST):
        return ServerUnavailableError(message)
    # Before UNAVAILABLE: Triton answers UNAVAILABLE "... is not at ready state" for an unloaded version.
    if status == "NOT_FOUND" or any(s in lowered for s in ("is not ready", "not at ready state", "unknown model")):
        return ModelNotReadyError(message, status=status)
    if status == "UNAVAILABLE":
        if "hostname verification" in lowered:
            message += (
                " (the server's TLS certificate does not carry the name the client checks: its host, the first "
                "host of a list, or tls_server_name / --tls-server-name)"
            )
        return ServerUnavailableError(message)
    return InferenceError(message, status=status)


def server_stopping(error: BaseException | None) -> bool:
    """Whether a tritonclient error is Triton's answer while it stops (after SIGTERM): ``UNAVAILABLE ... Server
    is stopping`` while the requests in flight finish, then, while it unloads the models until its endpoints
    close, ``NOT_FOUND ... has no available versions`` (a request that names no version) or ``UNAVAILABLE ...
    version N is not at ready state`` (the SDK's, which name theirs; also a version loading or failed). Another
    server of a balanced target can answer instead.

    Args:
        error: what tritonclient raised (``None``: no).
    """
    if error is None:
        return False
    raw = str(error.status() if hasattr(error, "status") and callable(error.status) else "") or ""
    status = raw.removeprefix("StatusCode.")
    text = (error.message() if hasattr(error, "message") and callable(error.message) else str(error)) or ""
    lowered = text.lower()
    if status == "UNAVAILABLE":
        return "server is stopping" in lowered or "is not at ready state" in lowered
    return status == "NOT_FOUND" and "has no available versions" in lowered


def retry_delay(error: Exception, *, during: str, attempt: int, retries: int, backoff: float) -> float:
    """The SDK's one retry policy: the wait before attempt ``attempt + 1``, or raise the SDK error.

    Only :data:`RETRYABLE_STATUSES` are retried, ``retries`` times at most, waiting ``backoff`` seconds
    first and twice as long each time after.

    Args:
        error: what tritonclient raised.
        during: what the SDK was doing, for the message.
        attempt: the attempt that failed, from 0.
        retries: further attempts allowed after the first.
        backoff: the first wait, in seconds.

    Raises:
        BrainTumorError: the translated error, when it is not retryable or the retries are spent.
    """
    translated = from_triton(error, during=during)
    if translated.status not in RETRYABLE_STATUSES or attempt >= retries:
        raise translated from error
    return backoff * 2**attempt
