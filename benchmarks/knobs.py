"""The server with the knobs that exist only to measure them: ``python -m benchmarks.knobs`` instead of
``python -m app.cli``, with these environment variables (serve_load.py's ``spawn`` does this for an env that
sets any of them):

- ``BENCH_GC_FREEZE=false``: keep the start-up heap in the garbage collector's reach (the server always freezes
  it after warm-up; docs/performance.md has what that gains).
- ``BENCH_CPU_JPEG_MIN_PIXELS=N``: on CUDA hosts, decode JPEGs of at least N pixels on the CPU at reduced scale
  instead of by nvJPEG in the batch (the server never does; docs/performance.md, runs 8 and 9, has why).

Operators have no use for them, so they are not settings. They apply to this process only: one worker.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import app.main
from app.cli import main
from app.settings import Settings
from app.tasks.base import Limits

KNOBS = ("BENCH_GC_FREEZE", "BENCH_CPU_JPEG_MIN_PIXELS")


def apply(environ: dict[str, str]) -> None:
    if environ.get("BENCH_GC_FREEZE", "true").lower() in ("0", "false", "no", "off"):
        app.main.freeze_startup_heap = lambda: None
    pixels = int(environ.get("BENCH_CPU_JPEG_MIN_PIXELS", "0"))
    if pixels:
        limits = Settings.limits

        def with_cpu_jpeg(self: Settings) -> Limits:
            return dataclasses.replace(limits(self), cpu_jpeg_min_pixels=pixels)

        Settings.limits = with_cpu_jpeg  # type: ignore[method-assign]


if __name__ == "__main__":
    if int(os.environ.get("PERCEIVER_WORKERS", "1")) > 1:
        sys.exit("benchmarks.knobs applies its knobs to this process only: run it with PERCEIVER_WORKERS=1")
    apply(dict(os.environ))
    main()
