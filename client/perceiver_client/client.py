"""``Client`` and ``AsyncClient``: one method per endpoint, the same retry and deadline rules for both.

Retries: a 429 (overloaded) or 503 (not ready, draining) is retried at most ``max_retries`` times, each after
the server's ``Retry-After`` (or a short exponential backoff when it sends none), never past the call's
deadline and never for longer than ``max_retry_wait_s`` at once; then the error is raised. Deadlines: a call's
``timeout_ms`` is sent as ``x-request-timeout-ms`` (what is left of it, on a retry), so the server drops the
work once nobody waits for it, and the client stops waiting too.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import httpx

from .models import Classification, FilledText, Flow, ModelInfo, VideoClassification

T = TypeVar("T")
File = bytes | str | os.PathLike[str] | IO[bytes]
RETRY_STATUSES = frozenset({429, 503})
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # safe to send again: retried
DEFAULT_TIMEOUT_S = 60.0


class PerceiverError(Exception):
    """Every error this client raises."""


class APIError(PerceiverError):
    """The server's error answer: status, error type and message, as in ``{"error": {"type", "message"}}``."""

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        *,
        request_id: str | None = None,
        retry_after_s: float | None = None,
        attempts: int = 1,
    ) -> None:
        tried = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{status_code} {error_type}: {message}{tried}")
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.attempts = attempts


class OverloadedError(APIError):
    """429: the server's queue is full or could not finish in time; raised once the retries are spent."""


class UnavailableError(APIError):
    """503: the server is loading its models or draining; raised once the retries are spent."""


class DeadlineExceeded(PerceiverError):
    """The call's deadline passed before an answer came (the server's 504 is an ``APIError``)."""


class ConnectionFailed(PerceiverError):
    """The server could not be reached (retried, as a 503 is), or the connection broke or went silent before its
    answer (not retried: the server may have done the work); the httpx error is its ``__cause__``."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        tried = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(message + tried)
        self.attempts = attempts


def _error(response: httpx.Response, attempts: int) -> APIError:
    try:
        detail = response.json()["error"]
        error_type, message = (detail["type"], detail["message"]) if isinstance(detail, dict) else ("error", detail)
    except (ValueError, KeyError, TypeError):
        error_type, message = "http_error", response.text[:500] or response.reason_phrase
    cls = {429: OverloadedError, 503: UnavailableError}.get(response.status_code, APIError)
    return cls(
        response.status_code,
        str(error_type),
        str(message),
        request_id=response.headers.get("x-request-id"),
        retry_after_s=retry_after(response),
        attempts=attempts,
    )


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None without a usable one."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read(file: File) -> bytes:
    if isinstance(file, bytes):
        return file
    if isinstance(file, (str, os.PathLike)):
        return Path(file).read_bytes()
    return file.read()


@dataclass
class _Call(Generic[T]):
    """One API call: how to send it and how to read its answer."""

    method: str
    path: str
    parse: Callable[[dict[str, Any]], T]
    timeout_ms: float | None = None
    json: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes]]] = field(default_factory=list)

    def request(self, deadline: float | None) -> dict[str, Any]:
        headers = {}
        timeout: float | None = None
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"{self.method} {self.path}: the deadline passed before an answer came")
            headers["x-request-timeout-ms"] = str(math.ceil(left * 1000))
            timeout = left + 1.0  # the server answers 504 at the deadline; give its answer a moment to arrive
        kwargs: dict[str, Any] = {"headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if self.json is not None:
            kwargs["json"] = self.json
        if self.data:
            kwargs["data"] = self.data
        if self.files:
            kwargs["files"] = self.files
        return kwargs


class _Base:
    def __init__(self, max_retries: int, max_retry_wait_s: float) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries ({max_retries}) must be >= 0")
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s

    def _wait(
        self, response: httpx.Response | httpx.TransportError, attempt: int, deadline: float | None
    ) -> float | None:
        """Seconds to wait before retrying, or None to give up now."""
        if isinstance(response, httpx.TransportError):  # only what never reached the server is safe to send again
            if not isinstance(response, NOT_SENT):
                return None
        elif response.status_code not in RETRY_STATUSES:
            return None
        if attempt >= self.max_retries:
            return None
        wait = None if isinstance(response, httpx.TransportError) else retry_after(response)
        if not wait:  # no Retry-After, or one of 0 or a date past: short exponential backoff, never a burst
            wait = min(0.5 * 2**attempt, self.max_retry_wait_s)
        if wait > self.max_retry_wait_s:
            return None
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None  # the retry could not be answered in time
        return wait

    @staticmethod
    def _deadline(call: _Call[Any]) -> float | None:
        return None if call.timeout_ms is None else time.monotonic() + call.timeout_ms / 1000

    @staticmethod
    def _result(
        call: _Call[T], response: httpx.Response | httpx.TransportError, attempts: int, deadline: float | None
    ) -> T:
        """The answer, or the error the last attempt ends in."""
        if isinstance(response, httpx.TransportError):
            raise _Base._failed(call, response, attempts, deadline) from response
        if response.status_code != 200:
            raise _error(response, attempts)
        try:
            return call.parse(response.json())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PerceiverError(
                f"{call.method} {call.path}: the server's 200 answer could not be read ({type(exc).__name__}: {exc})"
            ) from exc

    @staticmethod
    def _failed(call: _Call[Any], exc: httpx.TransportError, attempts: int, deadline: float | None) -> PerceiverError:
        where = f"{call.method} {call.path}"
        if isinstance(exc, httpx.TimeoutException) and deadline is not None and time.monotonic() >= deadline:
            return DeadlineExceeded(f"{where}: the deadline passed before an answer came")
        if isinstance(exc, NOT_SENT):
            return ConnectionFailed(
                f"{where}: cannot reach the server ({exc or type(exc).__name__})", attempts=attempts
            )
        what = "no answer in time" if isinstance(exc, httpx.TimeoutException) else "the connection broke"
        return ConnectionFailed(f"{where}: {what} ({exc or type(exc).__name__})", attempts=attempts)

    # ------------------------------------------------------------------ the calls, shared by both clients

    @staticmethod
    def _classify(image: File, top_k: int, model: str | None, timeout_ms: float | None) -> _Call[Classification]:
        return _Call(
            "POST",
            "/v1/classify",
            Classification.parse,
            timeout_ms,
            data=_options(top_k=top_k, model=model),
            files=[("image", ("image", _read(image)))],
        )

    @staticmethod
    def _classify_many(
        images: Sequence[File], top_k: int, model: str | None, timeout_ms: float | None
    ) -> _Call[list[Classification]]:
        # one image given alone (a str is a Sequence[str] to a type checker too)
        if isinstance(images, (str, bytes, bytearray, os.PathLike)) or hasattr(images, "read"):
            raise TypeError("classify_many takes a list of images; for one image, call classify")

        def parse(body: dict[str, Any]) -> list[Classification]:
            rows = body.get("results", [body])  # one image answers without "results"
            return [Classification.parse(row, body) for row in rows]

        return _Call(
            "POST",
            "/v1/classify",
            parse,
            timeout_ms,
            data=_options(top_k=top_k, model=model),
            files=[("image", (f"image{i}", _read(image))) for i, image in enumerate(images)],
        )

    @staticmethod
    def _autoencode(
        video: File, audio: File | None, top_k: int, timeout_ms: float | None
    ) -> _Call[VideoClassification]:
        files = [("video", ("video", _read(video)))]
        if audio is not None:
            files.append(("audio", ("audio", _read(audio))))
        return _Call(
            "POST", "/v1/autoencode", VideoClassification.parse, timeout_ms, data=_options(top_k=top_k), files=files
        )

    @staticmethod
    def _flow(frame1: File, frame2: File, timeout_ms: float | None) -> _Call[Flow]:
        files = [("frame1", ("frame1", _read(frame1))), ("frame2", ("frame2", _read(frame2)))]
        return _Call("POST", "/v1/optical-flow", Flow.parse, timeout_ms, data={"format": "json"}, files=files)


def _options(**options: Any) -> dict[str, str]:
    return {k: str(v) for k, v in options.items() if v is not None}


def _models(body: dict[str, Any]) -> list[ModelInfo]:
    return [ModelInfo.parse(m) for m in body["models"]]


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class Client(_Base):
    """A synchronous client. ``Client("http://localhost:8000")``; extra keyword arguments go to httpx.Client
    (``transport``, ``verify``, ``event_hooks``, ...)."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_retry_wait_s: float = 30.0,
        **httpx_options: Any,
    ) -> None:
        super().__init__(max_retries, max_retry_wait_s)
        self.http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout_s, **httpx_options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, call: _Call[T]) -> T:
        deadline = self._deadline(call)
        attempt = 0
        while True:
            try:
                response: httpx.Response | httpx.TransportError = self.http.request(
                    call.method, call.path, **call.request(deadline)
                )
            except httpx.TransportError as exc:
                response = exc
            wait = self._wait(response, attempt, deadline)
            if wait is None:
                return self._result(call, response, attempt + 1, deadline)
            time.sleep(wait)
            attempt += 1

    def classify(
        self, image: File, *, top_k: int = 5, model: str | None = None, timeout_ms: float | None = None
    ) -> Classification:
        """One image (bytes, a path or a binary file): its top_k classes."""
        return self._send(self._classify(image, top_k, model, timeout_ms))

    def classify_many(
        self, images: Sequence[File], *, top_k: int = 5, model: str | None = None, timeout_ms: float | None = None
    ) -> list[Classification]:
        """Several images in one request (they may share forward passes): one result each, in order."""
        return self._send(self._classify_many(images, top_k, model, timeout_ms))

    def classify_text(self, text: str, *, top_k: int = 5, timeout_ms: float | None = None) -> Classification:
        call = _Call("POST", "/v1/classify-text", Classification.parse, timeout_ms, json={"text": text, "top_k": top_k})
        return self._send(call)

    def fill_mask(self, text: str, *, top_k: int = 5, timeout_ms: float | None = None) -> FilledText:
        """Each [MASK] in ``text`` stands for one UTF-8 byte."""
        call = _Call("POST", "/v1/fill-mask", FilledText.parse, timeout_ms, json={"text": text, "top_k": top_k})
        return self._send(call)

    def optical_flow(self, frame1: File, frame2: File, *, timeout_ms: float | None = None) -> Flow:
        return self._send(self._flow(frame1, frame2, timeout_ms))

    def autoencode(
        self, video: File, *, audio: File | None = None, top_k: int = 5, timeout_ms: float | None = None
    ) -> VideoClassification:
        return self._send(self._autoencode(video, audio, top_k, timeout_ms))

    def models(self) -> list[ModelInfo]:
        return self._send(_Call("GET", "/v1/models", _models))

    def ready(self) -> bool:
        """True once every model is loaded and warmed (and the server is not draining); False while the server
        cannot be reached, so that a loop can wait for a starting server."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncClient(_Base):
    """The same methods as ``Client``, as coroutines, on httpx.AsyncClient."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_retry_wait_s: float = 30.0,
        **httpx_options: Any,
    ) -> None:
        super().__init__(max_retries, max_retry_wait_s)
        self.http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout_s, **httpx_options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        deadline = self._deadline(call)
        attempt = 0
        while True:
            try:
                response: httpx.Response | httpx.TransportError = await self.http.request(
                    call.method, call.path, **call.request(deadline)
                )
            except httpx.TransportError as exc:
                response = exc
            wait = self._wait(response, attempt, deadline)
            if wait is None:
                return self._result(call, response, attempt + 1, deadline)
            await asyncio.sleep(wait)
            attempt += 1

    async def classify(
        self, image: File, *, top_k: int = 5, model: str | None = None, timeout_ms: float | None = None
    ) -> Classification:
        return await self._send(self._classify(image, top_k, model, timeout_ms))

    async def classify_many(
        self, images: Sequence[File], *, top_k: int = 5, model: str | None = None, timeout_ms: float | None = None
    ) -> list[Classification]:
        return await self._send(self._classify_many(images, top_k, model, timeout_ms))

    async def classify_text(self, text: str, *, top_k: int = 5, timeout_ms: float | None = None) -> Classification:
        call = _Call("POST", "/v1/classify-text", Classification.parse, timeout_ms, json={"text": text, "top_k": top_k})
        return await self._send(call)

    async def fill_mask(self, text: str, *, top_k: int = 5, timeout_ms: float | None = None) -> FilledText:
        call = _Call("POST", "/v1/fill-mask", FilledText.parse, timeout_ms, json={"text": text, "top_k": top_k})
        return await self._send(call)

    async def optical_flow(self, frame1: File, frame2: File, *, timeout_ms: float | None = None) -> Flow:
        return await self._send(self._flow(frame1, frame2, timeout_ms))

    async def autoencode(
        self, video: File, *, audio: File | None = None, top_k: int = 5, timeout_ms: float | None = None
    ) -> VideoClassification:
        return await self._send(self._autoencode(video, audio, top_k, timeout_ms))

    async def models(self) -> list[ModelInfo]:
        return await self._send(_Call("GET", "/v1/models", _models))

    async def ready(self) -> bool:
        try:
            return (await self.http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
