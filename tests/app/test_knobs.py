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


SLEEP_CHILD = """
import runpy, sys, time
import numpy as np
import app.engine
from app.tasks.classify import TASK, ImagePayload
from perceiver_core import build_model
runpy.run_module("benchmarks.knobs", run_name="__mp_main__")
model = build_model(TASK.demo_configs["learned"])
payloads = [ImagePayload(np.zeros((224, 224, 3), np.uint8), top_k) for top_k in (1, 2, 3)]
started = time.perf_counter()
prepared = TASK.prepare(model, payloads)
prepare_s = time.perf_counter() - started
started = time.perf_counter()
answers = TASK.predict(model, prepared)
predict_s = time.perf_counter() - started
print(app.engine.prepares_ahead(True, TASK, model, False), app.engine.prepares_ahead(True, TASK, model, True))
print([p.crop is not None and p.pixels is None for p in prepared], [len(a) for a in answers])
print(prepare_s >= 3 * 0.05, predict_s >= 0.2 + 3 * 0.1)
"""


def test_the_sleep_model_replays_a_gpu_hosts_stages_on_the_cpu_with_batches_prepared_ahead() -> None:
    """BENCH_SLEEP_MODEL=F,P,D: the forward pass and the prepare stage are sleeps of the given length (at least
    that long: a sleep never ends early), the answers keep their shape, and the batcher prepares ahead on the CPU
    (not on lanes, which run batches side by side)."""
    done = subprocess.run(
        [sys.executable, "-c", SLEEP_CHILD],
        env={**os.environ, "BENCH_SLEEP_MODEL": "200,100,50", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.split("\n")[:3] == ["True False", "[True, True, True] [1, 2, 3]", "True True"]
