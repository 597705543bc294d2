"""One exception hierarchy and one table: each error kind's HTTP status, error type, metric reason.

Every error a client sees is ``{"error": {"type": ..., "message": ...}}``; never a traceback. Handlers
raise these; the app's exception handlers (``app/main.py``) translate everything else (framework errors
with ``for_status``, anything unexpected as InternalError) into one of them, and ``middleware.reject``
turns each into its response in one place, where rejections are counted once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import ClassVar

MAX_MESSAGE_BYTES = 3000  # a message as JSON: the whole error body stays under 4 KB, whatever the input echoed
MAX_PROBLEMS = 10  # problems listed in one message; the rest are counted


def bounded(message: str) -> str:
    """``message``, cut so that it takes at most MAX_MESSAGE_BYTES as JSON (escapes and UTF-8 counted)."""
    if len(message) * 6 <= MAX_MESSAGE_BYTES:  # no character takes more than 6 bytes as JSON
        return message
    size = len(json.dumps(message, ensure_ascii=False).encode())
    if size <= MAX_MESSAGE_BYTES:
        return message
    keep = len(message) * (MAX_MESSAGE_BYTES - 100) // size
    while keep and len(json.dumps(message[:keep], ensure_ascii=False).encode()) > MAX_MESSAGE_BYTES - 100:
        keep //= 2
    return f"{message[:keep]}... ({len(message) - keep} more characters not shown)"


def shown(value: object, limit: int = 80) -> str:
    """A client's value, for a message: short, and never a huge integer written out (Python refuses to write
    one of over 4,300 digits, and a 500 came of that)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def join_problems(problems: Iterable[str]) -> str:
    """Up to MAX_PROBLEMS problems, "; "-separated, and how many more there were."""
    shown: list[str] = []
    more = 0
    for problem in problems:
        if len(shown) < MAX_PROBLEMS:
            shown.append(problem)
        else:
            more += 1
    return "; ".join(shown) + (f"; and {more} more problems" if more else "")


class ServiceError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    # Label of perceiver_rejections_total; None: a failure of ours, counted only by status. A kind's own, but
    # an instance may say more precisely why (Overloaded: the queue, or the deadline).
    reason: str | None = None

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


# The table. A low limit or a refusal is the client's to act on (4xx, or 503/429 to retry elsewhere/later).
class BadRequest(ServiceError):
    status, type, reason = 400, "bad_request", "bad_request"


class Unauthorized(ServiceError):
    status, type, reason = 401, "unauthorized", "unauthorized"


class NotFound(ServiceError):
    status, type, reason = 404, "not_found", "not_found"


class ModelNotFound(ServiceError):
    status, type, reason = 404, "model_not_found", "model_not_found"


class MethodNotAllowed(ServiceError):
    status, type, reason = 405, "method_not_allowed", "method_not_allowed"


class RequestTimeout(ServiceError):
    status, type, reason = 408, "request_timeout", "slow_upload"


class PayloadTooLarge(ServiceError):
    status, type, reason = 413, "payload_too_large", "payload_too_large"


class UriTooLong(ServiceError):
    status, type, reason = 414, "uri_too_long", "uri_too_long"


class HeadersTooLarge(ServiceError):
    status, type, reason = 431, "request_header_fields_too_large", "headers_too_large"


class UnsupportedMedia(ServiceError):
    status, type, reason = 415, "unsupported_media_type", "unsupported_media_type"


class InvalidInput(ServiceError):
    status, type, reason = 422, "invalid_input", "invalid_input"


class Overloaded(ServiceError):
    """Refused for load: the queue is full or its estimated wait is over the target (reason queue_full), or
    the estimated wait and pass would end after the request's deadline (would_miss_deadline: a 429 now, not a
    504 later)."""

    status, type, reason = 429, "overloaded", "queue_full"

    def __init__(self, message: str, headers: dict[str, str] | None = None, reason: str = "queue_full") -> None:
        super().__init__(message, headers)
        self.reason = reason


class ClientClosedRequest(ServiceError):
    status, type, reason = 499, "client_closed_request", "cancelled"


class InternalError(ServiceError):
    status, type, reason = 500, "internal_error", None


class InferenceFailed(ServiceError):
    status, type, reason = 500, "inference_failed", None


class TransferCodingNotImplemented(ServiceError):
    status, type, reason = 501, "not_implemented", "not_implemented"


class NotReady(ServiceError):
    status, type, reason = 503, "not_ready", "not_ready"


class Draining(ServiceError):
    status, type, reason = 503, "draining", "draining"


class DeadlineExceeded(ServiceError):
    status, type, reason = 504, "deadline_exceeded", "deadline"


_BY_STATUS: dict[int, type[ServiceError]] = {
    cls.status: cls for cls in (BadRequest, NotFound, MethodNotAllowed, PayloadTooLarge, UnsupportedMedia)
}


def for_status(status: int, message: str, headers: dict[str, str] | None = None) -> ServiceError:
    """A framework's HTTP error (404 for an unknown path, 405, ...) as one of ours."""
    cls = _BY_STATUS.get(status, BadRequest if status < 500 else InternalError)
    return cls(message, headers)


def body(error: ServiceError) -> dict[str, dict[str, str]]:
    return {"error": {"type": error.type, "message": error.message}}
