"""benchmarks/knobs.py: the measuring knobs reach every process the server spawns, not the first one only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import runpy, sys
from app.settings import Settings
before = Settings().limits()
runpy.run_module("benchmarks.knobs", run_name=sys.argv[1])  # what multiprocessing's spawn does in a child
after = Settings().limits()
print(before.cpu_jpeg_min_pixels, before.cpu_jpeg_slots, after.cpu_jpeg_min_pixels, after.cpu_jpeg_slots)
"""


def _limits_in(run_name: str, env: dict[str, str]) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, run_name],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [int(v) for v in done.stdout.split()]


def test_a_spawned_process_applies_the_knobs_its_parent_was_started_with() -> None:
    knobs = {"BENCH_CPU_JPEG_MIN_PIXELS": "8000000", "BENCH_CPU_JPEG_SLOTS": "3"}
    assert _limits_in("__mp_main__", knobs) == [0, 0, 8_000_000, 3]  # a front end or the model process


def test_importing_the_module_elsewhere_changes_nothing() -> None:
    knobs = {"BENCH_CPU_JPEG_MIN_PIXELS": "8000000", "BENCH_CPU_JPEG_SLOTS": "3"}
    assert _limits_in("benchmarks.knobs", knobs) == [0, 0, 0, 0]
