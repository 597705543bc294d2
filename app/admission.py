"""The prologue every front end shares (deadline, readiness, model, admission), and refusal at the door: a task
request that its model would refuse gets its 429 here, before routing, dependency solving and exception
handling, and before its upload is parsed.

At 30x overload nearly every request is refused. Through the whole FastAPI stack a refusal cost the event
loop about 0.6 ms of Python, and the model paid for it twice over: while the loop holds the GIL, the
inference thread cannot start its next operator, so both cores wait. This middleware sits inside the
key check (a caller without a key gets its 401 first) and outside everything FastAPI adds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .engine import Engine
from .errors import BadRequest, ModelNotFound, Overloaded, ServiceError, shown
from .middleware import TASK_PATHS, reject
from .runtime import Runtime


def timeout_s(header: bytes | str | None, server_timeout_s: float) -> float:
    """The request's time budget: the server's timeout, shortened (never lengthened) by x-request-timeout-ms;
    400 for a value that is not a number of milliseconds (nan, abc, -5), which used to pass as no budget or none."""
    if header is None:
        return server_timeout_s
    try:
        milliseconds = float(header)
    except ValueError:
        milliseconds = math.nan
    if not math.isfinite(milliseconds) or milliseconds < 0:
        text = header.decode("latin-1") if isinstance(header, bytes) else header
        raise BadRequest(f"x-request-timeout-ms is {shown(text)}; it must be a number of milliseconds >= 0")
    return min(server_timeout_s, milliseconds / 1000)


@dataclass
class Prologue:
    """What a task request is worked out to be before its body is read, once, and carried in its scope: the
    door, the REST routes and the Open Inference Protocol all read it from there."""

    deadline: float  # monotonic: the server's timeout from when the request reached the door, or less
    started: float  # monotonic: when the request reached the door
    engine: Engine | None = None  # the model that admitted it, once known


def prologue(scope: Scope, runtime: Runtime) -> Prologue:
    """The request's prologue, begun at the first call (the door, for a task POST): its deadline is taken then."""
    state = scope.setdefault("state", {})
    found: Prologue | None = state.get("prologue")
    if found is None:
        header = next((v for k, v in scope["headers"] if k == b"x-request-timeout-ms"), None)
        now = time.monotonic()
        found = Prologue(now + timeout_s(header, runtime.settings.request_timeout_s), now)
        state["prologue"] = found
    return found


def begin(scope: Scope, runtime: Runtime, probe: str) -> Prologue:
    """The prologue's first half, before the body is read: the deadline, and readiness (503 naming ``probe``,
    the readiness path of the front end's protocol)."""
    begun = prologue(scope, runtime)
    runtime.check_ready(probe)
    return begun


def admit(scope: Scope, runtime: Runtime, probe: str, find: Callable[[], Engine]) -> tuple[Engine, float]:
    """Every front end's prologue: ``begin``; the model (``find``: 404 if there is none); admission (429).
    Returns the engine and the request's deadline."""
    begun = begin(scope, runtime, probe)
    engine = find()
    scope["state"]["model"] = engine.name
    engine.admit(begun.deadline)
    begun.engine = engine
    return engine, begun.deadline


REFUSAL_PACE_PER_S = 100  # refusals a second the door answers at once; past that, each waits REFUSAL_PAUSE_S
REFUSAL_PAUSE_S = 0.25


class RefusalPacer:
    """How long the door holds a 429 before sending it: nothing while refusals are few; REFUSAL_PAUSE_S once
    more than REFUSAL_PACE_PER_S came in the last second.

    A client that ignores Retry-After and retries at once would otherwise turn each refusal into the next
    request within a millisecond: 32 such clients kept the event loop refusing full time, and the model
    waited for the GIL. Held for a pause (a sleeping coroutine, no CPU), each connection can be refused at
    most 1 / REFUSAL_PAUSE_S times a second. A client that honours Retry-After (a second or more) loses
    nothing to the pause."""

    def __init__(self, per_s: int | None = None, pause_s: float | None = None) -> None:
        self.per_s, self.pause_s = per_s, pause_s  # None: the module's values, read at each refusal
        self.window_start, self.count = 0.0, 0

    def pause(self, now: float) -> float:
        if now - self.window_start >= 1.0:
            self.window_start, self.count = now, 0
        self.count += 1
        per_s = REFUSAL_PACE_PER_S if self.per_s is None else self.per_s
        if self.count <= per_s:
            return 0.0
        return REFUSAL_PAUSE_S if self.pause_s is None else self.pause_s


class AdmissionMiddleware:
    """429 before the body is parsed, where that is sound: every model of the task would refuse (whichever
    variant the body names), or the model the request will get is known and would refuse (the query names
    it, or the body holds no ``model`` anywhere, so the default serves it). Everything else, and every
    request that is not a task POST, goes on unchanged; the route admits again once it knows the variant."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.pacer = RefusalPacer()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.runtime
        task = TASK_PATHS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if task is None or not runtime.ready:  # not ready: the route answers 503
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        try:
            refusal = await self._door_refusal(scope, receive, task, messages)
        except ServiceError as exc:  # from reading the body: too large, too slow
            await reject(runtime, exc, scope["path"], scope.get("state", {}).get("model", ""))(scope, receive, send)
            return
        if refusal is not None:
            scope["state"]["reason"] = refusal.reason
            pause = self.pacer.pause(time.monotonic())
            if pause:
                await asyncio.sleep(pause)
            await reject(runtime, refusal, scope["path"], scope["state"]["model"])(scope, receive, send)
            return
        if not messages:
            await self.app(scope, receive, send)
            return

        async def replay() -> Message:  # the body this middleware read, then the connection's own messages
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _door_refusal(
        self, scope: Scope, receive: Receive, task: str, messages: list[Message]
    ) -> Overloaded | None:
        runtime = self.runtime
        variants = runtime.models.get(task)
        if not variants:
            return None
        deadline = prologue(scope, runtime).deadline
        refusals: dict[str, Overloaded] = {}
        for engine in variants.values():
            refusal = engine.refusal(deadline)
            if refusal is not None:
                refusals[engine.name] = refusal
        if not refusals:
            return None
        state = scope.setdefault("state", {})
        query = scope.get("query_string", b"")
        named = QueryParams(query).get("model") if query else None
        try:
            engine = runtime.engine_for(task, named)
        except ModelNotFound:
            return None  # the route says so, once the rest of the request is checked
        if len(refusals) == len(variants):  # whichever the body names: counted under the one the query names,
            state["model"] = engine.name  # else the task's default, with the soonest Retry-After of them all
            if named is not None:
                return refusals[engine.name]
            return min(refusals.values(), key=lambda e: int(e.headers["Retry-After"]))
        if engine.name not in refusals:
            return None
        if named is None:
            body = await _read_body(receive, messages)  # bounded in size and time by the receive it was given
            if body is None or b"model" in body:
                return None  # the client left (the route reports it), or the body may name another variant
        state["model"] = engine.name
        return refusals[engine.name]


async def _read_body(receive: Receive, messages: list[Message]) -> bytes | None:
    """The whole body, its messages kept in ``messages`` for the app; None if the client disconnected."""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None
        if not message.get("more_body", False):
            return b"".join(m.get("body", b"") for m in messages)
