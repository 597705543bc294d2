"""The server with the knobs that exist only to measure them: ``python -m benchmarks.knobs`` instead of
``python -m app.cli``, with these environment variables (serve_load.py's ``spawn`` does this for an env that
sets any of them):

- ``BENCH_GC_FREEZE=false``: keep the start-up heap in the garbage collector's reach (the server always freezes
  it after warm-up; docs/performance.md has what that gains).
- ``BENCH_CPU_JPEG_MIN_PIXELS=N``: on CUDA hosts, decode JPEGs of at least N pixels on the CPU at reduced scale
  instead of by nvJPEG in the batch (the server never does; docs/performance.md, runs 8 and 9, has why).
- ``BENCH_CPU_JPEG_SLOTS=K``: with it, at most K such JPEGs at once a process on the CPU (each front end, or each
  decode process with PERCEIVER_DECODE_PROCESSES); one that finds all K busy goes to nvJPEG (the host's cores and
  the GPU's decoder share the photos).

Operators have no use for them, so they are not settings. They are applied when this module is imported, so
also in the front-end and model processes the server spawns (multiprocessing's spawn imports the main module
in each child: front ends, the model process, workers).
"""

from __future__ import annotations

import dataclasses
import os

import app.main
from app.cli import main
from app.settings import Settings
from app.tasks.base import Limits

KNOBS = ("BENCH_GC_FREEZE", "BENCH_CPU_JPEG_MIN_PIXELS", "BENCH_CPU_JPEG_SLOTS")


def apply(environ: dict[str, str]) -> None:
    if environ.get("BENCH_GC_FREEZE", "true").lower() in ("0", "false", "no", "off"):
        app.main.freeze_startup_heap = lambda: None
    pixels = int(environ.get("BENCH_CPU_JPEG_MIN_PIXELS", "0"))
    slots = int(environ.get("BENCH_CPU_JPEG_SLOTS", "0"))
    if pixels:
        limits = Settings.limits

        def with_cpu_jpeg(self: Settings) -> Limits:
            return dataclasses.replace(limits(self), cpu_jpeg_min_pixels=pixels, cpu_jpeg_slots=slots)

        Settings.limits = with_cpu_jpeg  # type: ignore[method-assign]


if __name__ in ("__main__", "__mp_main__"):  # the server, and each process it spawns (which imports it so)
    apply(dict(os.environ))
if __name__ == "__main__":
    main()
