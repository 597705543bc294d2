"""Every task route, generated from the task declarations: read → decode → batch → encode → respond."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, create_model

from ..admission import admit, begin
from ..batching import Ticket
from ..engine import Engine, RequestTiming
from ..errors import DeadlineExceeded, Overloaded
from ..runtime import Runtime, release
from ..tasks import TASKS, run_decode
from ..tasks.base import DecodeContext, Reply, Task, TaskRequest, naming
from .requests import read_task_request

if TYPE_CHECKING:
    from ..tracing import Tracing

AnyTask = Task[Any, Any, Any]
READY_PROBE = "/readyz"


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def task_router() -> APIRouter:
    router = APIRouter()
    for task in TASKS.values():
        router.add_api_route(
            task.path,
            _handler(task),
            methods=["POST"],
            name=task.name,
            response_model=task.response_model | results_model(task),
            tags=[task.tag],
            summary=task.summary,
            responses=_responses(task),
            openapi_extra=_openapi_request(task),
        )
    return router


def results_model(task: AnyTask) -> type[BaseModel]:
    """The documented answer to several inputs in one request (images, texts): ``results`` in order, each
    with the task's fields but model and weights, which are said once."""
    shared = ("model", "weights")
    fields: dict[str, Any] = {
        name: (field.annotation, field)
        for name, field in task.response_model.model_fields.items()
        if name not in shared
    }
    prefix = task.response_model.__name__.removesuffix("Response")
    item = create_model(f"{prefix}Result", **fields)
    return create_model(
        f"{prefix}Results",
        model=(str, Field(description="The model that answered")),
        weights=(str, Field(description="pretrained, or random-init in the demo profile")),
        results=(list[item], Field(description="One result per input, in the order they were sent")),
    )


def _handler(task: AnyTask) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        runtime = runtime_of(request)
        begin(request.scope, runtime, READY_PROBE)
        # A task no model serves is a 404 before its body is read: it asked for a valid body first (audit).
        runtime.engine_for(task.name)
        options, files = await read_task_request(request, task, runtime.settings.max_files_per_request)
        # The variant is known once the body is read: admitted before decoding what it could not serve in time.
        engine, deadline = admit(
            request.scope, runtime, READY_PROBE, lambda: runtime.engine_for(task.name, task.variant(options))
        )
        expanded = task.expand(options)  # a JSON list of texts
        if expanded is not None:
            items: list[tuple[TaskRequest, Mapping[str, bytes]]] = [(o, {}) for o in expanded]
        else:
            items = [(options, f) for f in _split(task, files)]
        encoded = await run_items(caller_of(request), runtime, engine, items, deadline)
        return respond(engine, encoded, many=expanded is not None or len(items) > 1)

    handle.__name__ = task.name.replace("-", "_")
    return handle


@dataclass(frozen=True)
class Caller:
    """The front end's side of one admitted request, as the pipeline needs it: REST and v2 over HTTP build one
    from the Starlette request (``caller_of``), gRPC from its call context."""

    tracing: Tracing | None
    disconnected: Callable[[], Awaitable[None]]  # returns once the client has gone away
    state: dict[str, Any]  # the request's state: the pipeline leaves its timings there ("timing")
    started: float  # monotonic: when the request reached the server
    item: str = "input"  # what an error calls one of several items: a REST upload, a v2 or gRPC tensor's "row"


def caller_of(request: Request) -> Caller:
    async def disconnected() -> None:
        # The body has been read, so the next ``receive`` returns only when the client disconnects: one waiting
        # task per request and no polling (a 0.2 s poll of every queued request cost the event loop a wake-up
        # per request five times a second, 6% of its time at 30x overload).
        while (await request.receive())["type"] != "http.disconnect":
            pass  # a body part the handler did not read (none do): keep waiting

    state = request.scope.setdefault("state", {})
    begun = state.get("prologue")
    return Caller(tracing_of(request), disconnected, state, time.monotonic() if begun is None else begun.started)


async def run_items(
    caller: Caller,
    runtime: Runtime,
    engine: Engine,
    items: Sequence[tuple[TaskRequest, Mapping[str, bytes]]],
    deadline: float,
) -> list[dict[str, Any] | Reply]:
    """Decode → batch → encode, for the items of one admitted request: every interface (REST, the Open
    Inference Protocol over HTTP and gRPC) runs its requests through here, so they share the engine, its
    capacity, metrics and statistics."""
    timing = RequestTiming()
    try:
        encoded = await _run_items(caller, runtime, engine, items, deadline, timing)
    except Overloaded:  # refused as it was asked again (before decoding, joining the queue): never admitted, as a
        raise  # refusal at the door is not; counted as a failure, the same 429 was one or not by timing (audit)
    except BaseException:
        engine.account(False, time.monotonic() - caller.started, None)
        raise
    engine.account(True, time.monotonic() - caller.started, timing)
    return encoded


async def _run_items(
    caller: Caller,
    runtime: Runtime,
    engine: Engine,
    items: Sequence[tuple[TaskRequest, Mapping[str, bytes]]],
    deadline: float,
    timing: RequestTiming,
) -> list[dict[str, Any] | Reply]:
    task = engine.task
    ctx = DecodeContext(engine.model.config, runtime.limits, engine.device)
    tracing = caller.tracing
    if tracing is not None:
        tracing.annotate(**{"perceiver.model": engine.name, "perceiver.items": len(items)})
    # Work ends with its request at every stage: decodes and encodes that would start after the deadline do
    # not start, and the batcher's passes skip the requests that have ended (tasks.base.Task.predict).
    began = time.monotonic()
    task.check(items)
    if task.decode_offloaded:  # the decode threads are a queue too: asked again, and counted until queued
        engine.admit(deadline)  # the queue may have grown while the body arrived: refused before decoding
        caller.state["reservation"] = engine.reserve(len(items))
    with span(tracing, "decode", items=len(items)):
        if task.decode_offloaded:
            decodes = (
                _decoded(i, len(items), caller.item, runtime.decode(deadline, run_decode, task.name, *it, ctx))
                for i, it in enumerate(items)
            )
            payloads = await asyncio.gather(*decodes)
        else:
            payloads = []
            for i, (o, f) in enumerate(items):
                with which(i, len(items), caller.item):
                    payloads.append(task.decode(o, f, ctx))
    decoded = time.monotonic()
    results = await run_watched(caller, engine, payloads, deadline)
    inferred = time.monotonic()
    with span(tracing, "encode", items=len(items)):
        encoded: list[dict[str, Any] | Reply] = []
        for result, (options, _) in zip(results, items, strict=True):
            if task.encode_offloaded:
                encoded.append(await runtime.offload(deadline, task.encode, result, options))
            elif time.monotonic() >= deadline:
                raise DeadlineExceeded("the request did not finish before its deadline")
            else:
                encoded.append(task.encode(result, options))
    timing.queue_s, timing.infer_s, _ = caller.state["timing"]
    timing.input_s, timing.output_s = decoded - began, time.monotonic() - inferred
    return encoded


def which(index: int, count: int, item: str = "input") -> contextlib.AbstractContextManager[None]:
    """Of several inputs in one request (images, texts, v2 rows), the error of one names it (it named none)."""
    return naming(f"{item} {index + 1} of {count}") if count > 1 else contextlib.nullcontext()


async def _decoded(index: int, count: int, item: str, decode: Awaitable[Any]) -> Any:
    with which(index, count, item):
        return await decode


def tracing_of(request: Request) -> Tracing | None:
    tracing: Tracing | None = getattr(request.app.state, "tracing", None)
    return tracing


def span(tracing: Tracing | None, name: str, **attributes: Any) -> contextlib.AbstractContextManager[None]:
    """A child span of the request's when tracing is on; nothing at all when it is off."""
    return contextlib.nullcontext() if tracing is None else tracing.span(name, **attributes)


def _split(task: AnyTask, files: dict[str, list[bytes]]) -> list[dict[str, bytes]]:
    """One file per upload name per item; a repeatable upload with n files makes n items."""
    repeated = next((u.name for u in task.uploads if u.repeatable and len(files.get(u.name, ())) > 1), None)
    single = {name: found[0] for name, found in files.items() if name != repeated}
    if repeated is None:
        return [single]
    return [{**single, repeated: data} for data in files[repeated]]


async def run_watched(caller: Caller, engine: Engine, payloads: list[Any], deadline: float) -> list[Any]:
    """``engine.run``, its tickets dropped as soon as the client goes away; the timings for the response."""
    release(caller.state)  # queued from here on: counted by the queue itself
    tickets = engine.submit(payloads, deadline)
    watcher = asyncio.create_task(_watch_disconnect(caller, tickets))
    try:
        results = await engine.wait(tickets, deadline)
    finally:
        watcher.cancel()
    if caller.tracing is not None:
        caller.tracing.record_batching(tickets)
    caller.state["timing"] = (
        max(t.queue_s for t in tickets),
        max(t.inference_s for t in tickets),
        max(t.batch_size for t in tickets),
    )
    return results


async def _watch_disconnect(caller: Caller, tickets: list[Ticket[Any, Any]]) -> None:
    """Cancel the tickets as soon as the client goes away (Starlette does not cancel plain handlers)."""
    await caller.disconnected()
    for ticket in tickets:
        ticket.cancel()


def respond(engine: Engine, encoded: list[dict[str, Any] | Reply], *, many: bool) -> Response:
    """The task's fields behind model and weights; several items as ``results`` in upload order."""
    meta = {"model": engine.name, "weights": engine.weights}
    if many:
        fields = [e if isinstance(e, dict) else e.content for e in encoded]
        return JSONResponse({**meta, "results": fields})
    reply = encoded[0]
    if isinstance(reply, dict):
        return JSONResponse({**meta, **reply})
    headers = {"x-model": engine.name, "x-weights": engine.weights, **reply.headers}
    if isinstance(reply.content, dict):
        return JSONResponse({**meta, **reply.content}, headers=headers)
    return Response(reply.content, media_type=reply.media_type, headers=headers)


# ---------------------------------------------------------------------------------------------- OpenAPI


def _responses(task: AnyTask) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": text}
        for status, text in (
            (400, "Malformed body (e.g. multipart without its closing boundary)"),
            (401, "Missing or wrong API key (when PERCEIVER_API_KEYS is set)"),
            (404, "No such model variant"),
            (408, "The upload did not arrive within the request timeout"),
            (413, "Upload or decoded input too large"),
            (415, "Not a supported media type"),
            (422, "Invalid input: the message says which field and why"),
            (429, "Overloaded: retry after Retry-After seconds"),
            (500, "The forward pass failed (only this batch's requests; the server stays ready)"),
            (503, "Not ready, or draining"),
            (504, "Deadline exceeded"),
        )
    }
    if task.media_types:
        responses[200] = {"content": {media: {} for media in task.media_types}}
    return responses


def _replaceable(task: AnyTask, name: str) -> bool:
    """An upload that another may be sent instead of (two frames or a video): not required on its own."""
    return any(name in u.instead_of for u in task.uploads)


def _openapi_request(task: AnyTask) -> dict[str, Any]:
    """The request body and query parameters, from the declaration (the handler reads them itself)."""
    schema = task.request_model.model_json_schema()
    options: dict[str, Any] = schema.get("properties", {})
    parameters = [
        {"name": name, "in": "query", "required": False, "schema": prop, "description": prop.get("description", "")}
        for name, prop in options.items()
        if name not in schema.get("required", ())
    ]
    if not task.uploads:
        return {
            "parameters": parameters,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        }
    binary = {"type": "string", "format": "binary"}
    properties: dict[str, Any] = {
        u.name: ({"type": "array", "items": binary} if u.repeatable else binary) | {"description": u.description}
        for u in task.uploads
    }
    form = {
        "type": "object",
        "properties": properties | options,
        "required": [u.name for u in task.uploads if u.required and not _replaceable(task, u.name)],
    }
    base64_text = {"type": "string", "contentEncoding": "base64"}
    as_json = {
        "type": "object",
        "properties": options
        | {
            u.name: ({"type": "array", "items": base64_text} if u.repeatable else base64_text)
            | {"description": f"{u.description} (base64, or a data: URL)"}
            for u in task.uploads
        },
        "required": form["required"],
        "additionalProperties": False,
    }
    content: dict[str, Any] = {"multipart/form-data": {"schema": form}, "application/json": {"schema": as_json}}
    for upload in task.uploads:
        for media in upload.raw_types:
            content[media + "*" if media.endswith("/") else media] = {"schema": binary}
    return {"parameters": parameters, "requestBody": {"required": True, "content": content}}
