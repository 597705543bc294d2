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
- ``BENCH_SLEEP_MODEL=F,P,D[,one]`` (or ``F/P/D[/one]`` inside serve_load.py's ``--variant``): /v1/classify's
  model as sleeps. Each forward pass sleeps F ms plus P ms an image and answers uniform scores without running
  the model; each batch's prepare stage sleeps D ms an image; and the batcher prepares each batch while the one
  before runs, on the CPU too (PERCEIVER_PREPARE_AHEAD=false turns it off). ``one`` makes the two stages take
  turns, as nvJPEG's kernels queue behind a forward pass on one GPU. The serving path (front ends, channel,
  door, batcher, admission) is the real one, so a 2-core machine can replay a GPU host's timings at a smaller
  scale (docs/performance.md, run 12).

Operators have no use for them, so they are not settings. They are applied when this module is imported, so
also in the front-end and model processes the server spawns (multiprocessing's spawn imports the main module
in each child: front ends, the model process, workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

import app.engine
import app.main
from app.batching import EVERY
from app.cli import main
from app.settings import Settings
from app.tasks.base import Limits, top_predictions
from app.tasks.classify import Classify

KNOBS = ("BENCH_GC_FREEZE", "BENCH_CPU_JPEG_MIN_PIXELS", "BENCH_CPU_JPEG_SLOTS", "BENCH_SLEEP_MODEL")


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
    if environ.get("BENCH_SLEEP_MODEL"):
        sleep_model(environ["BENCH_SLEEP_MODEL"])


CROP = torch.zeros(1, dtype=torch.uint8)  # what a prepared payload carries instead of its crop (never read)


def sleep_model(spec: str) -> None:
    """BENCH_SLEEP_MODEL: Classify's forward pass and prepare stage sleep (releasing the GIL, as CUDA's waits do)."""
    fields = re.split("[,/]", spec)
    forward_ms, per_item_ms, prepare_ms = (float(v) for v in fields[:3])
    device: Any = threading.Lock() if "one" in fields[3:] else contextlib.nullcontext()

    def slept_predict(self: Classify, model: Any, payloads: Sequence[Any], batch: Any = EVERY) -> Any:
        unprepared = sum(p.crop is None for p in payloads)  # decoded here, in turn with the forward pass
        with device:
            time.sleep((prepare_ms * unprepared + forward_ms + per_item_ms * len(payloads)) / 1000)
        probs = torch.full((model.config.num_labels,), 1 / model.config.num_labels)  # no forward pass: its answers
        return [top_predictions(probs, p.top_k, model.config) for p in payloads]

    def slept_prepare(self: Classify, model: Any, payloads: Sequence[Any]) -> Any:
        with device:
            time.sleep(prepare_ms * len(payloads) / 1000)
        return [dataclasses.replace(p, pixels=None, crop=CROP) for p in payloads]

    Classify.predict = slept_predict  # type: ignore[method-assign]
    Classify.prepare = slept_prepare  # type: ignore[method-assign]
    app.engine.prepares_ahead = lambda setting, task, model, on_lanes: setting and task.prepares and not on_lanes


if __name__ in ("__main__", "__mp_main__"):  # the server, and each process it spawns (which imports it so)
    apply(dict(os.environ))
if __name__ == "__main__":
    main()
