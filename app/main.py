"""create_app(settings): the FastAPI app, its lifespan (load, warm up, mark ready) and its error handlers.

Start-up loads every model and warms every bucket in the background (liveness answers at once,
readiness only after). The ``perceiver-serve`` command, with draining and worker processes, is
``app/cli.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import jsonlog, memory, remote
from .access import ApiKeyMiddleware, cors_origins, key_digests
from .admission import AdmissionMiddleware
from .errors import InternalError, InvalidInput, ServiceError, for_status, join_problems
from .loading import LoadedModel, build_models, start_engine
from .metrics import Metrics
from .middleware import CompressAnswers, HeadAsGet, JsonCors, ObservabilityMiddleware, reject
from .oip import grpc as oip_grpc
from .routes.docs import DOCS_ASSETS
from .routes.docs import router as docs_router
from .routes.health import router as health_router
from .routes.playground import router as playground_router
from .routes.requests import what_it_takes
from .routes.tasks import task_router
from .routes.v2 import router as v2_router
from .routes.v2 import served_models, v2_name
from .runtime import Runtime
from .settings import Settings, load_settings
from .tasks import TASKS
from .tracing import configure as configure_tracing

log = logging.getLogger("perceiver.server")
ModelLoader = Callable[[Settings], list[LoadedModel]]


async def _load(runtime: Runtime, load_models: ModelLoader) -> None:
    loop = asyncio.get_running_loop()
    try:
        loaded = await loop.run_in_executor(runtime.inference_executor, load_models, runtime.settings)
        for model in loaded:
            runtime.add(await start_engine(runtime, model))
    except Exception as exc:  # fatal: the CLI exits 1, readiness reports it
        log.exception("model loading failed: %s", exc)
        runtime.load_error = f"{type(exc).__name__}: {exc}"
        return
    freeze_startup_heap()
    await loop.run_in_executor(runtime.offload_executor, memory.trim)  # what loading and warm-up freed
    runtime.ready = True
    log.info(
        "ready %.1fs after the app was created (load + warm-up per model: %s)",
        time.monotonic() - runtime.created,
        ", ".join(f"{e.name} {e.load_s:.1f}+{e.warmup_s:.1f}s" for e in runtime.engines()),
    )


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (modules, models, warm-up caches) out of the collector's reach.

    A full (generation-2) collection walks every tracked object. Serving allocates short-lived request
    objects fast enough to trigger one about every second, and each walked the whole start-up heap
    (about 0.1 s on 2 cores) to free nothing; every request in flight waited. Frozen objects are never
    walked again, so full collections only scan what serving itself keeps.
    """
    gc.collect()
    gc.freeze()


async def keep_memory(runtime: Runtime, keeper: memory.MemoryKeeper) -> None:
    """Give the memory the allocator keeps for forward passes (app/memory.py) back to the kernel when it grows
    past its bound, and once the server has been idle a while: RSS falls back between bursts."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(1.0)
        runtime.metrics.record_gc_pauses()  # also in processes that never serve /metrics (the model process)
        runtime.metrics.update_gpu_memory()
        free = memory.free_bytes()
        if keeper.poll(runtime.idle(), runtime.taken, free):
            await loop.run_in_executor(runtime.offload_executor, memory.trim)
            log.debug("freed memory returned to the kernel (%.0f MiB free in the heap)", free / 2**20)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    unwatch_gc = runtime.metrics.watch_gc()
    # gRPC listens from the start, as HTTP does: its health service says NOT_SERVING while the models load.
    grpc_server = await oip_grpc.start(runtime, app.version, key_digests(runtime.settings))
    model_socket = app.state.model_socket
    if model_socket is None:
        loader = asyncio.create_task(_load(runtime, app.state.load_models))
    else:  # a front-end process: the models are the model process's (app/remote.py)
        loader = asyncio.create_task(remote.connect(runtime, model_socket))
    keeper = asyncio.create_task(keep_memory(runtime, memory.MemoryKeeper()))
    try:
        yield
    finally:
        if grpc_server is not None:  # HTTP has drained; calls still running get what is left of the drain's time
            started = runtime.drain_started
            left = runtime.settings.drain_timeout_s - (time.monotonic() - started) if started is not None else 0.0
            await grpc_server.stop(max(left, 0.0))
        unwatch_gc()
        for job in (loader, keeper):
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
        for engine in runtime.engines():
            await engine.stop()
        runtime.shutdown_executors()
        runtime.access.flush()  # the refusals the log's one line a second left out since its last line
        if app.state.tracing is not None:
            app.state.tracing.shutdown()  # flush the spans still held


V2_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>.+?)(?P<rest>(/versions/[^/]+)?(/(infer|ready|config|stats))?)$")


def not_found_hint(app: FastAPI, path: str) -> str:
    if path.endswith("/") and path.rstrip("/") in app.openapi()["paths"]:
        return f"no route {path}; did you mean {path.rstrip('/')} (without the trailing slash)?"
    found = V2_MODEL_PATH.match(path)
    if found and "/" in found["name"]:  # a served name (classify/learned) where the protocol's (classify.learned) goes
        name = found["name"].replace("/", ".")
        if name in {v2_name(e) for e in served_models(app.state.runtime)}:
            return f"no route {path}; v2 names a model with . for /: did you mean /v2/models/{name}{found['rest']}?"
    return f"no route {path}; the API is listed at /docs, the models at /v1/models"


def wrong_method_hint(method: str, path: str, allowed: str) -> str:
    """A 405's message: the method the path takes, and for a task route what its body should hold."""
    methods = " or ".join(m.strip() for m in allowed.split(",") if m.strip() not in ("", "HEAD"))
    hint = f"{method} is not allowed on {path}; use {methods or 'another method'}"
    task = next((t for t in TASKS.values() if t.path == path), None)
    return f"{hint}: {what_it_takes(task)}" if task is not None else hint


def create_app(
    settings: Settings | None = None, load_models: ModelLoader = build_models, *, model_socket: str | None = None
) -> FastAPI:
    """The app for ``settings`` (read from the environment and config file when None). ``load_models`` puts the
    models on their device at start-up (tests pass one that substitutes a model whose answers they know).
    ``model_socket``: a front-end process, whose models run in the model process listening there."""
    settings = settings or load_settings()
    runtime = Runtime(settings, Metrics())
    tracing = configure_tracing(settings)  # None when off: nothing of OpenTelemetry's SDK is imported
    # The request spans are FastAPI's native telemetry (0.165+, which the tracing extra brings), on our provider.
    # With tracing off it is off too: otherwise FastAPI asks OpenTelemetry's global providers on every
    # request whether they are configured (11 µs a request, a fifth of a refusal's cost under overload).
    telemetry: dict[str, Any] = {}
    if tracing is not None:
        telemetry["telemetry"] = tracing.fastapi_telemetry()
    elif "telemetry" in inspect.signature(FastAPI.__init__).parameters:  # FastAPI 0.165+
        telemetry["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    # fastapi-offline serves Swagger UI's and ReDoc's assets from its own package data (FastAPI's default pages
    # load them from a CDN, so /docs was blank offline and in air-gapped clusters); the pages themselves, with
    # their Content-Security-Policy, are app/routes/docs.py's.
    app = FastAPIOffline(
        docs_url=None,
        redoc_url=None,
        static_url=DOCS_ASSETS,
        title="Perceiver IO serving",
        version="0.1.0",
        description="Perceiver IO heads behind a dynamic batching queue, over REST (/v1) and the Open Inference "
        'Protocol (/v2, KServe v2 with binary tensors). Errors are `{"error": {"type", "message"}}`, and '
        '`{"error": "message"}` on /v2.',
        lifespan=lifespan,
        # A trailing slash gets a 404 that names the right path (a 307 has no body, and curl neither
        # follows it nor shows why nothing happened).
        redirect_slashes=False,
        **telemetry,
    )
    app.state.runtime = runtime
    app.state.tracing = tracing
    app.state.load_models = load_models
    app.state.model_socket = model_socket

    def respond(request: Request, error: ServiceError) -> JSONResponse:
        refused = request.scope.get("state", {}).get("refused")  # what the HTTP parser refused in its body
        if refused is not None:  # what the client got, and counted once: the route's own error (the connection
            error = refused  # ended, a 404 for a path that reads no body) went nowhere (review)
        if error.reason is not None:
            request.state.reason = error.reason  # the request's log line says why it was refused
        return reject(runtime, error, request.url.path, getattr(request.state, "model", ""))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = join_problems(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or 'request'}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        )
        return respond(request, InvalidInput(problems or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404:
            detail = not_found_hint(app, request.url.path)
        elif exc.status_code == 405:
            allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "")
            detail = wrong_method_hint(request.method, request.url.path, allowed)
        return respond(request, for_status(exc.status_code, detail, dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return respond(request, InternalError(f"internal error; request id {jsonlog.request_id.get()}"))

    app.include_router(health_router)
    app.include_router(task_router())
    app.include_router(v2_router)
    app.include_router(playground_router)
    app.include_router(docs_router)
    # Added last runs first: CORS (preflights answered without a key), observability (401s are logged and
    # counted like every response), answers compressed where asked, the key check, admission (429s before
    # routing, to keys' holders), then HEAD answered as GET.
    app.add_middleware(HeadAsGet)
    app.add_middleware(AdmissionMiddleware, runtime=runtime)
    digests = key_digests(settings)
    if digests:
        app.add_middleware(ApiKeyMiddleware, runtime=runtime, digests=digests)
        log.info("API keys on: %d key(s); every endpoint but the probes and the pages needs one", len(digests))
    else:
        log.info("API keys off (PERCEIVER_API_KEYS and PERCEIVER_API_KEYS_FILE unset): every endpoint is open")
    app.add_middleware(CompressAnswers)
    app.add_middleware(ObservabilityMiddleware, runtime=runtime)
    origins = cors_origins(settings)
    if origins:
        app.add_middleware(
            JsonCors,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=[
                "authorization",
                "x-api-key",
                "content-type",
                "x-request-timeout-ms",
                "x-request-id",
                "inference-header-content-length",
                "traceparent",
                "tracestate",
            ],
            expose_headers=[
                "x-request-id",
                "x-queue-time-ms",
                "x-inference-time-ms",
                "x-batch-size",
                "retry-after",
                "inference-header-content-length",
            ],
            max_age=600,
        )
    return app
