"""The task table: one module per task. Adding a task means one module here and one line in TASKS."""

from __future__ import annotations

from .autoencode import TASK as AUTOENCODE
from .base import Task
from .classify import TASK as CLASSIFY
from .classify_text import TASK as CLASSIFY_TEXT
from .fill_mask import TASK as FILL_MASK
from .optical_flow import TASK as OPTICAL_FLOW

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFY, FILL_MASK, CLASSIFY_TEXT, OPTICAL_FLOW, AUTOENCODE)}

__all__ = ["TASKS", "Task"]
