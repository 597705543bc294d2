"""create_app(settings) and the ``perceiver-serve`` command.

Start-up loads every model and warms every bucket in the background (liveness answers at once,
readiness only after). SIGTERM turns readiness off, refuses new task requests with 503, lets accepted
ones finish, and exits 0 once the queues are empty (or after ``drain_timeout_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logging as jsonlog
from .errors import PayloadTooLarge, ServiceError
from .loading import attach_batcher, build_models, maybe_enable_graphs, warm_up
from .metrics import Metrics
from .routes.health import router as health_router
from .routes.tasks import task_router
from .runtime import Runtime
from .settings import Settings, load_settings
from .tasks import TASKS

log = logging.getLogger("perceiver.server")
# Request ids: a random per-process prefix and a counter (uuid4 per request costs a syscall each).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count()
TASK_PATHS = {task.path: task.name for task in TASKS.values()}


# ---------------------------------------------------------------------------------------------- start-up


async def _load(runtime: Runtime) -> None:
    loop = asyncio.get_running_loop()
    try:
        served_models = await loop.run_in_executor(runtime.inference_executor, build_models, runtime.settings)
        for served in served_models:
            runtime.add(served)
            maybe_enable_graphs(runtime.settings, served)
            if runtime.settings.warmup:
                await loop.run_in_executor(runtime.inference_executor, warm_up, TASKS[served.task], served)
            attach_batcher(runtime, served)
    except Exception as exc:  # fatal: the CLI exits 1, readiness reports it
        log.exception("model loading failed")
        runtime.load_error = f"{type(exc).__name__}: {exc}"
        return
    runtime.ready = True
    log.info("ready: %s", ", ".join(m.name for m in runtime.all_models()))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    loader = asyncio.create_task(_load(runtime))
    try:
        yield
    finally:
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        for served in runtime.all_models():
            if served.batcher is not None:
                await served.batcher.stop()
        runtime.shutdown_executors()


# ---------------------------------------------------------------------------------------------- middleware


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


class _BodyTooLarge(PayloadTooLarge):
    pass


class ObservabilityMiddleware:
    """Request ids, body-size limit, drain gate, timing headers, metrics and one JSON log line per request."""

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
        task = TASK_PATHS.get(path)
        state = scope.setdefault("state", {})
        started = time.monotonic()
        status = 500
        limit = runtime.settings.max_body_bytes

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                timing = state.get("timing")
                if timing is not None:
                    queue_s, inference_s, batch = timing
                    extra += [
                        (b"x-queue-time-ms", f"{queue_s * 1000:.2f}".encode()),
                        (b"x-inference-time-ms", f"{inference_s * 1000:.2f}".encode()),
                        (b"x-batch-size", str(batch).encode()),
                    ]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(f"request body exceeds {limit} bytes")
            return message

        if task is not None:
            runtime.inflight += 1
            metrics.inflight.set(runtime.inflight)
        try:
            declared = headers.get("content-length", "")
            early: JSONResponse | None = None
            if declared.isdigit() and int(declared) > limit:
                early = _error(413, "payload_too_large", f"request body of {declared} bytes exceeds {limit} bytes")
            elif task is not None and runtime.draining:
                early = _error(503, "draining", "the server is shutting down; retry on another replica")
            if early is not None:
                reason = "draining" if early.status_code == 503 else "payload_too_large"
                metrics.rejections.labels(task=task or "none", model="", reason=reason).inc()
                await early(scope, receive, send_wrapper)
            else:
                await self.app(scope, limited_receive, send_wrapper)
        finally:
            elapsed = time.monotonic() - started
            model = state.get("model", "")
            label_task = task or "none"
            metrics.request_duration.labels(task=label_task, model=model).observe(elapsed)
            metrics.requests.labels(task=label_task, model=model, status=str(status)).inc()
            if task is not None:
                runtime.inflight -= 1
                metrics.inflight.set(runtime.inflight)
            fields = {"method": scope.get("method"), "path": path, "status": status, "ms": round(elapsed * 1000, 2)}
            if model:
                fields["model"] = model
            log.info("request", extra={"fields": fields})
            jsonlog.request_id.reset(token)


# ---------------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    runtime = Runtime(settings, Metrics())
    app = FastAPI(
        title="Perceiver IO serving",
        version="0.1.0",
        description='Perceiver IO heads behind a dynamic batching queue. Errors are `{"error": {"type", "message"}}`.',
        lifespan=lifespan,
    )
    app.state.runtime = runtime

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status < 500 and exc.type not in ("overloaded", "draining"):
            runtime.metrics.rejections.labels(
                task=TASK_PATHS.get(request.url.path, "none"),
                model=getattr(request.state, "model", ""),
                reason=exc.type,
            ).inc()
        return _error(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        )
        return await service_error(request, _ValidationProblem(problems or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        headers = dict(exc.headers) if exc.headers else None
        return _error(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error(500, "internal_error", f"internal error; request id {jsonlog.request_id.get()}")

    app.include_router(health_router)
    app.include_router(task_router())
    app.add_middleware(ObservabilityMiddleware, runtime=runtime)
    return app


class _ValidationProblem(ServiceError):
    status, type = 422, "invalid_input"


# ---------------------------------------------------------------------------------------------- CLI


def _server_class() -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but SIGTERM drains first (readiness off, accepted work finishes) and exits 0."""

        def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
            super().__init__(config)
            self.runtime = runtime
            self.exit_code = 0

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:  # unlike uvicorn, do not re-raise the signal: a drained exit is a clean exit
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.runtime.draining:  # a second signal: stop now
                self.should_exit = True
                self.force_exit = True
            else:
                self.runtime.begin_drain()

        async def on_tick(self, counter: int) -> bool:
            runtime = self.runtime
            if runtime.load_error is not None:
                self.exit_code = 1
                return True
            if runtime.draining and runtime.drain_started is not None:
                waited = time.monotonic() - runtime.drain_started
                if runtime.idle():
                    log.info("drained in %.2fs; exiting", waited)
                    return True
                if waited > runtime.settings.drain_timeout_s:
                    log.warning("drain timeout (%.0fs) with %d requests in flight", waited, runtime.inflight)
                    return True
            return bool(await super().on_tick(counter))

    return DrainingServer


def _uvicorn_config(app: FastAPI, settings: Settings) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    )


def _serve(settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    jsonlog.configure(settings.log_level)
    app = create_app(settings)
    server = _server_class()(_uvicorn_config(app, settings), app.state.runtime)
    server.run(sockets=sockets)
    return int(server.exit_code)


def _worker(settings_json: str, sock: socket.socket) -> None:
    sys.exit(_serve(Settings.model_validate_json(settings_json), [sock]))


def _supervise(settings: Settings) -> int:
    """Run ``settings.workers`` server processes on one listening socket; SIGTERM drains them all."""
    import multiprocessing
    import tempfile

    from prometheus_client import multiprocess

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="perceiver-metrics-")
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
    payload = settings.model_dump_json()
    procs = [context.Process(target=_worker, args=(payload, sock), name=f"worker-{i}") for i in range(settings.workers)]
    stopping = False

    def forward(sig: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for proc in procs:
        proc.start()
    log.info("started %d workers on %s:%d", settings.workers, settings.host, settings.port)
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        for proc in procs:
            if proc.pid in codes or proc.is_alive():
                continue
            if proc.pid is None or proc.exitcode is None:  # not started yet
                continue
            codes[proc.pid] = proc.exitcode
            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
            if not stopping:  # a worker died on its own: take the rest down, let the orchestrator restart us
                log.error("worker %s exited with %s; stopping", proc.name, proc.exitcode)
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    sock.close()
    return 0 if all(code == 0 for code in codes.values()) and stopping else 1


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="perceiver-serve", description="Serve Perceiver IO models over HTTP.")
    parser.add_argument("--host", help="interface to bind (PERCEIVER_HOST)")
    parser.add_argument("--port", type=int, help="TCP port (PERCEIVER_PORT)")
    parser.add_argument("--workers", type=int, help="server processes (PERCEIVER_WORKERS)")
    parser.add_argument("--config", help="JSON or YAML file with settings and per-model overrides")
    args = parser.parse_args(argv)
    given = (("host", args.host), ("port", args.port), ("workers", args.workers))
    settings = load_settings(args.config, **{k: v for k, v in given if v is not None})
    jsonlog.configure(settings.log_level)
    sys.exit(_supervise(settings) if settings.workers > 1 else _serve(settings))


if __name__ == "__main__":
    cli()
