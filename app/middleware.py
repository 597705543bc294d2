"""Pure-ASGI middleware: request ids, the body-size limit, the drain gate, timing headers, metrics, logs.

``reject`` is the one place an error becomes a response, and where each rejection is counted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
import zlib
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors, jsonlog
from .errors import BadRequest, DeadlineExceeded, Draining, PayloadTooLarge, RequestTimeout, ServiceError
from .runtime import Runtime, release
from .tasks import TASKS

# A body cut off unread: the connection closes after the answer. Kept alive, uvicorn reads and drops the rest of
# the body, and each byte that comes restarts its keep-alive timer: a client trickling bytes held it for ever.
CLOSE = {"Connection": "close"}

log = logging.getLogger("perceiver.server")
# Request ids: a random per-process prefix and a counter (uuid4 per request costs a syscall each).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count()
TASK_PATHS = {task.path: task.name for task in TASKS.values()}
V2_PREFIX = "/v2/"  # the Open Inference Protocol: its own error body
V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")


def task_of(path: str) -> str | None:
    """The task a request path runs (a REST task route, or an Open Inference Protocol infer call), else None."""
    task = TASK_PATHS.get(path)
    if task is None and (found := V2_INFER.match(path)):
        name = found.group(1).split(".", 1)[0]  # v2 model names are the served names with "." for "/"
        task = name if name in TASKS else None
    return task


def reject(runtime: Runtime, error: ServiceError, path: str, model: str) -> JSONResponse:
    """The JSON error response for ``error``, its rejection counted once under its reason. Errors are
    ``{"error": {"type", "message"}}``, but ``{"error": message}`` on the protocol's /v2 routes."""
    runtime.access.refused(task_of(path) or "none", model, error.reason)
    status = error.status
    if path.startswith(V2_PREFIX):
        content: dict[str, Any] = {"error": error.message}
        # The protocol answers every request it cannot take with a 400 (its specification lists no other): a
        # file in a tensor that does not decode, or an encoding it does not take, is that too. The message says which.
        status = 400 if status in (415, 422) else status
    else:
        content = errors.body(error)
    return JSONResponse(content, status_code=status, headers=error.headers or None)


class JsonCors(CORSMiddleware):
    """Starlette's CORS, with a refused preflight as this server's JSON error (it was a plain-text 400)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        error = BadRequest(
            f"CORS preflight refused: its {refused} not allowed (PERCEIVER_CORS_ORIGINS names the allowed origins; "
            f"methods: {', '.join(sorted(self.allow_methods))}; headers: {', '.join(sorted(self.allow_headers))})"
        )
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
        return JSONResponse(errors.body(error), status_code=400, headers=headers)


class HeadAsGet:
    """HEAD is GET without the body (RFC 9110 9.3.2) on every route that answers GET: the app answers the GET, and
    uvicorn, whose own scope still says HEAD, sends the head alone (Content-Length as GET's). FastAPI's routes
    take HEAD only where it is named: the pages, /metrics, /v1/models and most of /v2 were a 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


COMPRESS_MIN_BYTES = 1024  # smaller answers go as they are: the coding's own bytes and the time would not pay
# Larger ones are compressed off the event loop: up to this size, 0.4 ms of JSON and 1.3 ms of float32 tensors
COMPRESS_IN_THREAD_BYTES = 64 * 1024
COMPRESS_LEVEL = 1  # zlib's fastest; level 6 took 3-6x as long for 5-15% fewer bytes on our JSON answers
# Answers already compressed in their own format go as they are (the flow's png, the mp4s, autoencode's npz)
PACKED_TYPES = (
    b"image/png",
    b"image/jpeg",
    b"image/webp",
    b"image/gif",
    b"video/",
    b"audio/",
    b"application/zip",
    b"application/x-npz",
)


def answer_coding(accept: str) -> str | None:
    """The coding to answer in for an Accept-Encoding value: gzip or deflate (the zlib format, RFC 9110 8.4.1.2),
    the one with the higher q, gzip on a tie; ``*`` stands for those it does not name; else None (identity)."""
    weights: dict[str, float] = {}
    for part in accept.lower().split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        name = "gzip" if name.strip() == "x-gzip" else name.strip()
        weights.setdefault(name, q)
    any_q = weights.get("*", 0.0)
    best = max(("gzip", "deflate"), key=lambda coding: weights.get(coding, any_q))  # gzip first on a tie
    return best if weights.get(best, any_q) > 0 else None


def _compress(body: bytes, coding: str) -> bytes:
    packer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31 if coding == "gzip" else 15)
    return packer.compress(body) + packer.flush()


class CompressAnswers:
    """A 200 of at least ``COMPRESS_MIN_BYTES``, whole (one body part) and not in a compressed format of its own
    (png, mp4, npz), goes in gzip or deflate when the request's Accept-Encoding asks for it; on the protocol's
    /v2 routes only the infer answer does, as Triton's (tritonclient's ``response_compression_algorithm``). Such
    an answer says ``Vary: Accept-Encoding`` either way. A /v2 binary answer's Inference-Header-Content-Length
    stays the JSON header's length once inflated, as Triton's. Large answers are compressed in a thread.

    The other /v2 answers and every error go as they are: tritonclient's asyncio client turns aiohttp's
    decompression off, which still asks for gzip, and parses them raw (review: its statistics call failed on
    3.2 KB of gzip). An answer with an ETag (a docs asset; a range of it) goes as it is: the tag names the bytes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or (path.startswith(V2_PREFIX) and not V2_INFER.match(path)):
            await self.app(scope, receive, send)
            return
        accept = b",".join(v for k, v in scope["headers"] if k.lower() == b"accept-encoding")
        coding = answer_coding(accept.decode("latin-1")) if accept else None
        start: Message | None = None

        async def compressing(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            first, start = start, None
            body = message.get("body", b"")
            headers = list(first.get("headers", []))
            if (
                first["status"] != 200
                or message.get("more_body", False)
                or len(body) < COMPRESS_MIN_BYTES
                or any(
                    k.lower() in (b"content-encoding", b"etag", b"content-range")
                    or (k.lower() == b"content-type" and v.lower().startswith(PACKED_TYPES))
                    for k, v in headers
                )
            ):
                await send(first)
                await send(message)
                return
            vary = [v for k, v in headers if k.lower() == b"vary"]
            headers = [(k, v) for k, v in headers if k.lower() != b"vary"]
            headers.append((b"vary", b", ".join([*vary, b"Accept-Encoding"])))
            if coding is not None:
                if len(body) >= COMPRESS_IN_THREAD_BYTES:  # zlib lets go of the GIL while it works
                    body = await asyncio.get_running_loop().run_in_executor(None, _compress, body, coding)
                else:
                    body = _compress(body, coding)
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers += [(b"content-encoding", coding.encode()), (b"content-length", str(len(body)).encode())]
            await send({**first, "headers": headers})
            await send({**message, "body": body})

        await self.app(scope, receive, compressing)


class ObservabilityMiddleware:
    """Request ids, body-size limit, drain gate, timing headers, metrics and one JSON log line per request
    (per second for refusals: ``LogThrottle``)."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        runtime, metrics = self.runtime, self.runtime.metrics
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")[:64] or f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"
        token = jsonlog.request_id.set(rid)
        path = scope["path"]
        task = task_of(path)
        state = scope.setdefault("state", {})
        started = time.monotonic()
        status = 500
        started_response = False
        limit = runtime.settings.max_body_bytes

        recorded = False

        def record() -> None:
            """The request's duration and status in the metrics, and its log line: once, before the client can
            have its whole answer (a client that read its answer and then scraped /metrics missed it)."""
            nonlocal recorded
            if recorded:
                return
            recorded = True
            shown, reason = status, state.get("reason")
            refused: ServiceError | None = state.get("refused")  # the HTTP parser's refusal, in this body
            if refused is not None and status != refused.status:
                # What the client got: a route that reads no body (a probe, a 404) answered after the parser had
                # answered the 400 and closed, and was counted and logged as its own 200 or 404 (review).
                shown, reason = refused.status, refused.reason
                runtime.access.refused(task or "none", state.get("model", ""), refused.reason)
            runtime.access.record(
                scope.get("method", ""),
                path,
                shown,
                time.monotonic() - started,
                task=task or "none",
                model=state.get("model", ""),
                reason=reason,
            )

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                extra = [(b"x-request-id", rid.encode("latin-1"))]  # the bytes it came as (read as latin-1)
                timing = state.get("timing")
                if timing is not None:
                    queue_s, inference_s, batch = timing
                    extra += [
                        (b"x-queue-time-ms", f"{queue_s * 1000:.2f}".encode()),
                        (b"x-inference-time-ms", f"{inference_s * 1000:.2f}".encode()),
                        (b"x-batch-size", str(batch).encode()),
                    ]
                headers_out = list(message.get("headers", []))
                if runtime.draining and not any(name.lower() == b"connection" for name, _ in headers_out):
                    # the connection is closed after this answer: a client that sent its next request on it as
                    # the server stopped got a reset, and could not tell whether that request had run (audit)
                    extra.append((b"connection", b"close"))
                message["headers"] = headers_out + extra
            await send(message)

        received = 0
        body_done = False
        body_deadline = started + runtime.settings.request_timeout_s

        async def limited_receive() -> Message:
            """The body, bounded in size and in time: a slow upload (slowloris) holds only its own
            connection, never a decode thread or the model, and is cut off at the request timeout."""
            nonlocal received, body_done
            if body_done:  # later calls only watch for a disconnect
                return await receive()
            begun = state.get("prologue")  # a task request's own deadline (x-request-timeout-ms) bounds it too
            deadline = body_deadline if begun is None else min(body_deadline, begun.deadline)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                if begun is not None and deadline < body_deadline:  # the client's deadline: 504, as at any stage
                    budget_ms = (begun.deadline - begun.started) * 1000
                    raise DeadlineExceeded(
                        f"the request body did not arrive before the request's deadline ({budget_ms:.0f} ms, "
                        "x-request-timeout-ms)",
                        CLOSE,
                    ) from None
                raise RequestTimeout(
                    f"the request body did not arrive within {runtime.settings.request_timeout_s:g} s", CLOSE
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes", CLOSE)
                body_done = not message.get("more_body", False)
            return message

        if task is not None:
            runtime.inflight += 1
            runtime.taken += 1
            metrics.inflight.set(runtime.inflight)
        try:
            declared = headers.get("content-length", "")
            early: ServiceError | None = None
            if declared.isascii() and declared.isdigit() and int(declared) > limit:
                early = PayloadTooLarge(f"request body of {declared} bytes exceeds {limit} bytes")
            elif task is not None and runtime.draining:
                early = Draining("the server is shutting down; retry on another replica")
            if early is not None:
                await reject(runtime, early, path, "")(scope, receive, send_wrapper)
            else:
                await self.app(scope, limited_receive, send_wrapper)
        except Exception as exc:  # the last resort: every other handler sits inside this one
            await self._last_resort(exc, rid, scope, receive, send_wrapper, started_response)
        except asyncio.CancelledError:
            # The drain's time ran out and uvicorn cancelled what still ran: a JSON 503 to retry elsewhere, not
            # uvicorn's plain-text 500. The request ends here; its task was cancelled to end it.
            if not runtime.draining or started_response:
                raise
            why = "a second signal" if runtime.forced else "drain timeout"
            cut = Draining(f"the server stopped before this request finished ({why}); retry on another replica")
            await reject(runtime, cut, path, "")(scope, receive, send_wrapper)
        finally:
            release(state)  # a request that ended before it was queued no longer counts as work ahead
            record()  # a response that never completed (the client left, or an error after it started)
            if task is not None:
                runtime.inflight -= 1
                metrics.inflight.set(runtime.inflight)
            jsonlog.request_id.reset(token)

    async def _last_resort(
        self, exc: Exception, rid: str, scope: Scope, receive: Receive, send: Send, started: bool
    ) -> None:
        """Any exception that got this far becomes a JSON 500 that carries the request id, logged with its
        traceback under that id; the response completes, so the client's keep-alive connection stays usable.
        (Starlette's outermost handler runs after the request id is gone, and re-raises: uvicorn then closed
        the connection.) A response already started cannot be replaced: it is cut short, and logged."""
        path = scope["path"]
        model = scope.get("state", {}).get("model", "")
        if isinstance(exc, ServiceError):  # raised where no handler was (a middleware): its own status
            if not started:
                await reject(self.runtime, exc, path, model)(scope, receive, send)
            return
        log.error("unhandled error", exc_info=exc)
        if not started:
            error = errors.InternalError(f"internal error; request id {rid}")
            await reject(self.runtime, error, path, model)(scope, receive, send)
