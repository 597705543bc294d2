"""The task table. Adding a task means one module here and one line in TASKS."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .autoencode import TASK as AUTOENCODE
from .base import DecodeContext, Task, TaskRequest
from .classify import TASK as CLASSIFY
from .classify_text import TASK as CLASSIFY_TEXT
from .fill_mask import TASK as FILL_MASK
from .optical_flow import TASK as OPTICAL_FLOW

TASKS: dict[str, Task[Any, Any, Any]] = {
    t.name: t for t in (CLASSIFY, FILL_MASK, CLASSIFY_TEXT, OPTICAL_FLOW, AUTOENCODE)
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def run_decode(task: str, request: TaskRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> Any:
    """``TASKS[task].decode``, by name, so that decode processes receive a picklable call."""
    return TASKS[task].decode(request, files, ctx)


__all__ = ["TASKS", "TASK_NAMES", "Task", "run_decode"]
