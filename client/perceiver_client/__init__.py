"""Python client for perceiver-serve's REST API: ``Client`` and ``AsyncClient``, typed results, bounded retries
that honour Retry-After on 429 and 503, and deadlines passed through as ``x-request-timeout-ms``."""

from .client import (
    APIError,
    AsyncClient,
    Client,
    ConnectionFailed,
    DeadlineExceeded,
    OverloadedError,
    PerceiverError,
    UnavailableError,
)
from .models import (
    Candidate,
    Classification,
    FilledText,
    Flow,
    MaskPrediction,
    ModelInfo,
    Prediction,
    VideoClassification,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "Candidate",
    "Classification",
    "Client",
    "ConnectionFailed",
    "DeadlineExceeded",
    "FilledText",
    "Flow",
    "MaskPrediction",
    "ModelInfo",
    "OverloadedError",
    "PerceiverError",
    "Prediction",
    "UnavailableError",
    "VideoClassification",
]
