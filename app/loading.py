"""Build the served models: configured checkpoints, or the demo profile; then warm every bucket."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

import perceiver_core
from perceiver_core.graphs import enable_cuda_graphs

from .batching import Batcher
from .cores import CoreShare
from .runtime import Runtime, ServedModel
from .settings import Settings
from .tasks import TASKS, Task

AnyTask = Task[Any, Any, Any]

log = logging.getLogger("perceiver.loading")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded; start-up fails (the CLI exits 1)."""


AUTO_MAX_BATCH_SIZE = 64  # largest size max_batch_size=auto tries
AUTO_UNMEASURED_BATCH_SIZE = 16  # max_batch_size=auto with warm-up off: nothing was measured
AUTO_MIN_GAIN = 0.05  # a larger batch must cut the per-item time by this share to be worth its latency
AUTO_TIMED_RUNS = 3  # per size, after one untimed run; the fastest counts (noise only ever adds time)
# ...unless the timed runs already took this long: a forward pass of seconds is measured well enough by one
# run, and repeating it would add seconds to start-up (the demo's optical flow: 2 s a pass on 2 cores).
AUTO_TIMING_BUDGET_S = 0.3
# A first run this slow is the measurement: it already warmed the shape (allocations, kernel choice), and more
# passes would add as much again to start-up for a few percent of accuracy (an overestimate, so admission
# errs on the safe side until the batcher has timed real batches, and a larger batch must win by more).
AUTO_SLOW_FIRST_RUN_S = 0.25


def _batch_sizes(limit: int) -> list[int]:
    sizes = {limit}
    size = 1
    while size < limit:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def build_models(settings: Settings) -> list[ServedModel]:
    """Load every configured model (or the demo profile) onto the device, in eval mode."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PERCEIVER_DEVICE is cuda but no CUDA device is available")
    served: list[ServedModel] = []
    if settings.demo:
        log.warning(
            "demo profile: no models configured, serving small RANDOMLY INITIALISED models for every task; "
            "their predictions are meaningless (set PERCEIVER_MODELS or --config to serve real checkpoints)"
        )
        dtype_name = settings.resolved_dtype()
        tasks = [t for t in TASKS.values() if settings.demo_tasks is None or t.name in settings.demo_tasks]
        for task in tasks:
            for variant, config in task.demo_configs.items():
                started = time.monotonic()
                torch.manual_seed(0)
                model = perceiver_core.build_model(config).to(device=device, dtype=DTYPES[dtype_name]).eval()
                served.append(_served(task, variant, model, "demo", "random-init", dtype_name, settings, {}))
                served[-1].load_s = time.monotonic() - started
        return served
    for spec in settings.models:
        task = TASKS[spec.task]
        dtype_name = settings.resolved_dtype(spec.dtype)
        started = time.monotonic()
        try:
            model = perceiver_core.from_pretrained(
                spec.source, device=device, dtype=DTYPES[dtype_name], revision=spec.revision
            )
        except Exception as exc:  # name the model and its source: the operator has several
            raise ModelLoadError(
                f"could not load model {spec.task}/{spec.variant} from {spec.source}: {type(exc).__name__}: {exc}"
            ) from exc
        if model.config.architecture not in task.architectures:
            raise ValueError(
                f"{spec.source} is a {model.config.architecture}; task {spec.task} needs one of {task.architectures}"
            )
        log.info("loaded %s/%s from %s in %.1fs", spec.task, spec.variant, spec.source, time.monotonic() - started)
        overrides = spec.model_dump(include={"max_batch_size", "max_delay_ms", "max_batch_cost"}, exclude_none=True)
        served.append(_served(task, spec.variant, model, spec.source, "pretrained", dtype_name, settings, overrides))
        served[-1].load_s = time.monotonic() - started
    return served


def _served(
    task: AnyTask,
    variant: str,
    model: perceiver_core.PerceiverHead,
    source: str,
    weights: str,
    dtype: str,
    settings: Settings,
    overrides: dict[str, Any],
) -> ServedModel:
    size = overrides.get("max_batch_size", settings.max_batch_size)
    auto = size == "auto"
    if auto:
        size = AUTO_MAX_BATCH_SIZE if settings.warmup else AUTO_UNMEASURED_BATCH_SIZE
    if task.max_batch_size_cap is not None and (auto or "max_batch_size" not in overrides):
        size = min(size, task.max_batch_size_cap)
    return ServedModel(
        task=task.name,
        variant=variant,
        model=model,
        source=source,
        weights=weights,
        dtype=dtype,
        device=str(model.device),
        max_batch_size=size,
        max_delay_ms=overrides.get("max_delay_ms", settings.max_delay_ms),
        max_batch_cost=overrides.get("max_batch_cost", task.default_max_batch_cost(size)),
        batch_size_auto=auto and settings.warmup,
        max_batch_cost_configured="max_batch_cost" in overrides,
    )


def make_runner(task: AnyTask, served: ServedModel, cores: CoreShare | None = None) -> Any:
    """The batch function the inference threads run. On the CPU, with ``cores`` (the runtime's CoreShare),
    each forward pass takes its share of the cores that decoding has recently left: torch's intra-op
    threads otherwise spin against the decode threads and against the other batches running."""
    if cores is None or served.model.device.type != "cpu":

        def run(payloads: Sequence[Any]) -> list[Any]:
            with torch.inference_mode():
                return task.predict(served.model, payloads)

        return run

    share = cores

    def run_shared(payloads: Sequence[Any]) -> list[Any]:
        with share.lane() as threads:
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)  # this thread's intra-op threads (per thread under OpenMP)
            with torch.inference_mode():
                return task.predict(served.model, payloads)

    return run_shared


def _timed(run: Any, payloads: list[Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run(payloads)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _fastest(run: Any, payloads: list[Any], device: torch.device) -> float:
    times: list[float] = []
    while len(times) < AUTO_TIMED_RUNS and sum(times) < AUTO_TIMING_BUDGET_S:
        times.append(_timed(run, payloads, device))
    return min(times)


def choose_batch_size(task: AnyTask, served: ServedModel, budget_ms: float) -> None:
    """max_batch_size=auto: the largest power of two whose per-item time still improves (by AUTO_MIN_GAIN)
    and whose forward pass stays within the latency budget, measured on this model and this machine.

    Measured on the task's first warm-up payload (the smallest shape bucket). Runs on the inference thread.
    """
    if not served.batch_size_auto:
        return
    started = time.monotonic()
    run = make_runner(task, served)
    payload = task.warmup_payloads(served.model.config)[0]
    device = served.model.device
    best, best_item = 1, float("inf")
    gc.collect()
    gc.disable()  # a full collection inside a timed run would end the search early
    try:
        for size in _batch_sizes(served.max_batch_size):
            batch = [payload] * size
            seconds = _timed(run, batch, device)  # first call at this shape: allocations, kernel selection
            if seconds < AUTO_SLOW_FIRST_RUN_S:
                seconds = _fastest(run, batch, device)
            served.per_item_ms[size] = round(seconds / size * 1000, 3)
            if seconds * 1000 > budget_ms or seconds / size > best_item * (1 - AUTO_MIN_GAIN):
                break
            best, best_item = size, seconds / size
            if 2 * seconds * (1 - AUTO_MIN_GAIN) * 1000 > budget_ms:
                break  # twice the batch could only fit the budget by gaining far more than AUTO_MIN_GAIN per item
    finally:
        gc.enable()
    served.max_batch_size = best
    served.warmup_s += time.monotonic() - started
    if not served.max_batch_cost_configured:
        served.max_batch_cost = TASKS[served.task].default_max_batch_cost(best)
    log.info("%s: max_batch_size=auto chose %d (per-item ms by size: %s)", served.name, best, served.per_item_ms)


def maybe_enable_graphs(settings: Settings, served: ServedModel) -> None:
    if not settings.cuda_graphs or served.model.device.type != "cuda":
        return
    if TASKS[served.task].cuda_graphs:
        sizes = _batch_sizes(served.max_batch_size)
        enable_cuda_graphs(served.model, sizes)
        log.info("CUDA graphs on for %s (batch sizes %s)", served.name, sizes)


def warm_up(task: AnyTask, served: ServedModel) -> None:
    """Every shape bucket at every power-of-two batch size up to the maximum (inference thread).

    The first bucket's sizes that max_batch_size=auto already ran are not run again, except on CUDA, where
    CUDA graphs (enabled after the search) capture on their first run.
    """
    started = time.monotonic()
    run = make_runner(task, served)
    already_run = set(served.per_item_ms) if served.model.device.type == "cpu" else set()
    for i, payload in enumerate(task.warmup_payloads(served.model.config)):
        for size in _batch_sizes(served.max_batch_size):
            if i == 0 and size in already_run:
                continue
            run([payload] * size)
    if served.model.device.type == "cuda":
        torch.cuda.synchronize()
    served.warmup_s += time.monotonic() - started
    log.info("warmed %s in %.1fs (batch sizes measured and warmed)", served.name, served.warmup_s)


def expected_batch_s(served: ServedModel) -> float | None:
    """A full batch's forward time as measured at warm-up (max_batch_size=auto), to admit by time from the
    first request on; None until the batcher has timed a batch of its own."""
    per_item = served.per_item_ms.get(served.max_batch_size)
    return None if per_item is None else per_item * served.max_batch_size / 1000


def attach_batcher(runtime: Runtime, served: ServedModel) -> None:
    task = TASKS[served.task]
    labels = {"task": served.task, "model": served.name}
    metrics = runtime.metrics

    class _Observer:
        def batch(self, size: int, cost: int, inference_s: float) -> None:
            metrics.batch_size.labels(**labels).observe(size)
            metrics.batch_cost.labels(**labels).observe(cost)
            metrics.batches.labels(**labels).inc()

        def depth(self, depth: int) -> None:
            metrics.queue_depth.labels(**labels).set(depth)

    on_oom = torch.cuda.empty_cache if served.model.device.type == "cuda" else None
    served.batcher = Batcher(
        make_runner(task, served, runtime.core_share()),
        runtime.lanes() if runtime.uses_lanes(served) else runtime.inference_executor,
        max_batch_size=served.max_batch_size,
        max_delay_s=served.max_delay_ms / 1000,
        max_batch_cost=served.max_batch_cost,
        max_queue=runtime.settings.max_queue_size,
        max_queue_delay_s=None if (delay := runtime.settings.max_queue_delay_ms) is None else delay / 1000,
        observer=_Observer(),
        on_oom=on_oom,
        oom_errors=(MemoryError, torch.OutOfMemoryError),
        expected_batch_s=expected_batch_s(served),
    )
    served.batcher.start()
