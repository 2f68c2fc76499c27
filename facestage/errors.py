"""One exception hierarchy for facestage, translated to gRPC status codes in one place.

Code raises these anywhere; the server interceptor (:mod:`facestage.server`) and the
client helpers map them to and from :class:`grpc.StatusCode`. Anything else that escapes
a handler is a bug and becomes INTERNAL with a logged traceback, never a bare UNKNOWN.
"""

from __future__ import annotations

import grpc


class FacestageError(Exception):
    """Base of every error facestage raises on purpose."""

    status_code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(FacestageError):
    """The caller sent something malformed; ``field`` names the offending field."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class FailedPreconditionError(FacestageError):
    """The request is well formed but cannot be served as it is (e.g. no face found)."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(FacestageError):
    """Over a limit: batch size, queue, memory."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(FacestageError):
    """Draining, not warmed up, or a downstream stage is down; retryable."""

    status_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(FacestageError):
    """A deadline passed before the work finished."""

    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelFileError(FacestageError):
    """A model file is missing, unreadable, corrupt or of the wrong contract.

    Raised at start-up; the service exits non-zero with this message, which names the
    file and the command that fetches it.
    """

    status_code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, path: str, problem: str, hint: str | None = None) -> None:
        self.path = path
        hint = hint or "fetch a model with: facestage models pull NAME (see: facestage models list)"
        super().__init__(f"model file {path}: {problem}; {hint}")


class DownloadError(FacestageError):
    """A model download failed or did not match its pinned checksum."""

    status_code = grpc.StatusCode.UNAVAILABLE
