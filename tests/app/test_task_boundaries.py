"""Task modules declare; they never reach for the web framework or the server's state."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).parents[2] / "app" / "tasks"
FORBIDDEN = ("fastapi", "starlette", "uvicorn", "app.runtime", "app.routes", "app.main")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against app.tasks)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "app.tasks" if node.level == 1 else "app" if node.level == 2 else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted(TASKS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_task_modules_import_no_web_framework_and_no_runtime(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}"


def test_the_checker_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from ..runtime import Runtime\nimport starlette.requests\nfrom fastapi import File\n")
    assert {"app.runtime", "starlette.requests", "fastapi"} <= imported_modules(probe)
