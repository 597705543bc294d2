from __future__ import annotations

from fastapi import APIRouter, Request

from ..runtime import Runtime
from ..tasks import TASKS


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def task_router() -> APIRouter:
    router = APIRouter()
    for task in TASKS.values():
        task.register(router, runtime_of)
    return router
