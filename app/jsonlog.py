"""Structured JSON log lines; the request id travels in a context variable."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

request_id: ContextVar[str] = ContextVar("request_id", default="-")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id.get(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)  # server-side only, never sent to clients
        return json.dumps(entry, default=str)


def configure(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LibraryWarnings())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = name != "uvicorn.access"  # our middleware logs each request
    if not any(isinstance(f, CancelledLifespan) for f in logging.getLogger("uvicorn.error").filters):
        logging.getLogger("uvicorn.error").addFilter(CancelledLifespan())


class CancelledLifespan(logging.Filter):
    """A second signal stops at once: uvicorn skips the app's shutdown and cancels its lifespan task, which
    Starlette reports as a failed shutdown, the CancelledError's traceback as an ERROR. That stop is the one asked
    for, said already by a WARNING line: the traceback is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Traceback") and message.rstrip().endswith("asyncio.exceptions.CancelledError"))


class LibraryWarnings(logging.Filter):
    """A library's warning about a client's input (OpenTelemetry's, about a ``tracestate`` of more than 32 entries
    or a ``traceparent`` over 512 characters) at most once a minute each, the next saying how many it left out: a
    client could write one line per request."""

    INTERVAL_S = 60.0
    PREFIXES = ("opentelemetry",)

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, message template) → (written, left out)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.name.startswith(self.PREFIXES):
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        written, left_out = self.seen.get(key, (now - self.INTERVAL_S, 0))
        if now - written < self.INTERVAL_S:
            self.seen[key] = (written, left_out + 1)
            return False
        self.seen[key] = (now, 0)
        if left_out:
            record.fields = {**getattr(record, "fields", {}), "left_out": left_out}
        return True
