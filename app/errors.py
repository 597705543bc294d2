"""One exception hierarchy (each class carries its HTTP status and error type), one JSON error shape.

Every error a client sees is ``{"error": {"type": ..., "message": ...}}``; never a traceback.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "message": self.message}}


class InvalidInput(ServiceError):
    status, type = 422, "invalid_input"


class UnsupportedMedia(ServiceError):
    status, type = 415, "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class ModelNotFound(ServiceError):
    status, type = 404, "model_not_found"


class Overloaded(ServiceError):
    status, type = 429, "overloaded"


class Draining(ServiceError):
    status, type = 503, "draining"


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, type = 504, "deadline_exceeded"


class ClientClosedRequest(ServiceError):
    status, type = 499, "client_closed_request"


class InferenceFailed(ServiceError):
    status, type = 500, "inference_failed"
