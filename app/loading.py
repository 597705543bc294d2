"""Start-up, up to each model's engine: load the configured checkpoints (or the demo profile), decide each
model's batch policy (max_batch_size=auto measures it), warm every bucket, and build the engine."""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import perceiver_core
from perceiver_core import compiled
from perceiver_core.graphs import enable_cuda_graphs

from . import memory
from .batching import ServiceTime
from .cores import SHARED_CORE_LOAD, CoreShare
from .engine import BatchPolicy, Engine, build_engine, make_runner, served_name
from .settings import Settings
from .tasks import TASKS, Task

if TYPE_CHECKING:
    from .runtime import Runtime

AnyTask = Task[Any, Any, Any]

log = logging.getLogger("perceiver.loading")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded; start-up fails (the CLI exits 1)."""


AUTO_MAX_BATCH_SIZE = 64  # largest size max_batch_size=auto tries
AUTO_UNMEASURED_BATCH_SIZE = 16  # max_batch_size=auto with warm-up off (nothing measured), or no reliable timing
# The chosen size's per-item time is within this share of the best size's: the rest would add latency for less.
AUTO_NEAR_BEST = 0.10
AUTO_TIMED_RUNS = 3  # per size, after one untimed run; the fastest counts (runs back to back
# share one moment, and a spike within it, an interrupt or a page fault, only adds time)
# ...unless the timed runs already took this long: a forward pass of seconds is measured well enough by one
# run, and repeating it would add seconds to start-up (the demo's optical flow: 2 s a pass on 2 cores).
AUTO_TIMING_BUDGET_S = 0.3
# A first run this slow is the measurement: it already warmed the shape (allocations, kernel choice), and more
# passes would add as much again to start-up for a few percent of accuracy (an overestimate, so admission
# errs on the safe side until the batcher has timed real batches, and a larger batch must win by more).
AUTO_SLOW_FIRST_RUN_S = 0.25
# Warm-up times each size on a warmed pass for admission's first estimates (``warm_up``), except a pass this
# long: its first pass or the search's reading stands (the demo's optical flow: 3 s on one thread), rather than
# seconds more start-up.
SEED_TIMING_LIMIT_S = 1.0
# ... and times it three times where the passes are this short together (text models: milliseconds), once or
# twice where they are longer (start-up would grow by as much again, and the seeds bound each other: ServiceTime).
SEED_RETIME_BUDGET_S = 0.25
# Plausibility: doubling a batch cannot make its pass faster (beyond this share), nor cost more than twice as
# much (beyond this factor). A pair that breaks either is measured again, up to AUTO_REMEASURES times; if it
# still does, the measurements cannot decide and the choice falls back to AUTO_UNMEASURED_BATCH_SIZE.
AUTO_FASTER_TOLERANCE = 0.10
AUTO_COSTLIER_FACTOR = 4.0  # twice the items at twice the per-item cost: caches can do 1.3x, not that
AUTO_REMEASURES = 3
# Rounds over every size the search measured: each size's median of all its readings counts (the lower of the
# two middle ones for an even count, so one or two readings give the fastest).
# One round measured sizes in turn, so a slow spell (page faults, another process's cache traffic) fell on a
# few neighbouring sizes only and bent the curve: the demo's fill-mask chose 2, 4, 16 or 32 from start to start.
# The fastest of all rounds was kept once, but one thread's CPU time errs both ways on a shared core (the same
# pass read 1.8 to 4.0 ms within one quiet start, the other hyperthread and the clock deciding): one fast
# reading pinned a size below its neighbour for good, and the timings could never stop contradicting.
AUTO_ROUNDS = 3


def _batch_sizes(limit: int) -> list[int]:
    sizes = {limit}
    size = 1
    while size < limit:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


@dataclass
class LoadedModel:
    """A model on its device, with what was asked of its batching (the policy is decided from it)."""

    task: AnyTask
    variant: str
    model: perceiver_core.PerceiverHead
    source: str
    weights: str  # "pretrained" or "random-init"
    dtype: str
    max_batch_size: int | str  # as configured: a size, or "auto"
    max_delay_ms: float
    max_batch_cost: int | None = None  # None: the task's default for the batch size decided
    own_max_batch_size: bool = False  # set in the model's own spec: the task's cap does not apply
    load_s: float = 0.0

    @property
    def name(self) -> str:
        return served_name(self.task.name, self.variant)


def demo_tasks(settings: Settings) -> list[Task]:
    """The tasks the demo profile serves: every one, or those PERCEIVER_DEMO_TASKS names."""
    return [t for t in TASKS.values() if settings.demo_tasks is None or t.name in settings.demo_tasks]


def build_models(settings: Settings) -> list[LoadedModel]:
    """Load every configured model (or the demo profile) onto the device, in eval mode."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PERCEIVER_DEVICE is cuda but no CUDA device is available")
    loaded: list[LoadedModel] = []
    if settings.demo:
        dtype_name = settings.resolved_dtype()
        tasks = demo_tasks(settings)
        log.warning(
            "demo profile: no models configured, serving small RANDOMLY INITIALISED models for %s; "
            "their predictions are meaningless (set PERCEIVER_MODELS or --config to serve real checkpoints)",
            "every task" if settings.demo_tasks is None else ", ".join(t.name for t in tasks),
        )
        for task in tasks:
            for variant, config in task.demo_configs.items():
                started = time.monotonic()
                torch.manual_seed(0)
                model = perceiver_core.build_model(config).to(device=device, dtype=DTYPES[dtype_name]).eval()
                loaded.append(
                    LoadedModel(
                        task,
                        variant,
                        model,
                        "demo",
                        "random-init",
                        dtype_name,
                        max_batch_size=settings.max_batch_size,
                        max_delay_ms=settings.max_delay_ms,
                        load_s=time.monotonic() - started,
                    )
                )
        return loaded
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
        if spec.residual_dtype != "auto":
            model.residual_dtype = torch.float32 if spec.residual_dtype == "float32" else None
        if spec.revision != "main" and Path(spec.source).expanduser().is_dir():
            log.warning(
                "model %s/%s: revision %r is not checked out: %s is a local directory, served as it is "
                "(a revision selects a Hub snapshot; here it is only reported in the model's metadata)",
                spec.task,
                spec.variant,
                spec.revision,
                spec.source,
            )
        log.info("loaded %s/%s from %s in %.1fs", spec.task, spec.variant, spec.source, time.monotonic() - started)
        loaded.append(
            LoadedModel(
                task,
                spec.variant,
                model,
                spec.source,
                "pretrained",
                dtype_name,
                max_batch_size=settings.max_batch_size if spec.max_batch_size is None else spec.max_batch_size,
                max_delay_ms=settings.max_delay_ms if spec.max_delay_ms is None else spec.max_delay_ms,
                max_batch_cost=spec.max_batch_cost,
                own_max_batch_size=spec.max_batch_size is not None,
                load_s=time.monotonic() - started,
            )
        )
    return loaded


def _timed(run: Any, payloads: list[Any], device: torch.device, clock: Callable[[], float] = time.thread_time) -> float:
    """Seconds ``run(payloads)`` takes. On the CPU by ``clock``: by default this thread's CPU time (the search runs
    torch on this thread alone), which another process taking the cores does not inflate; warm-up passes the wall
    clock, as the batcher times its batches. On CUDA: wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        started = time.perf_counter()
        run(payloads)
        torch.cuda.synchronize()
        return time.perf_counter() - started
    started = clock()
    run(payloads)
    return clock() - started


@dataclass
class BatchSizeChoice:
    size: int
    per_item_s: dict[int, float]  # size → the median reading's forward time per item
    reliable: bool  # False: the timings contradicted each other even when measured again
    remeasured: list[int]  # sizes measured again because they were implausible against a neighbour


def decide_batch_size(
    measure: Callable[[int, bool], float], limit: int, budget_s: float, fallback: int = AUTO_UNMEASURED_BATCH_SIZE
) -> BatchSizeChoice:
    """The smallest power of two up to ``limit`` whose per-item time is within AUTO_NEAR_BEST of the best
    per-item time of any size whose forward pass fits ``budget_s``: larger batches would add latency for
    less than that. ``measure(size, again)`` gives one size's forward seconds (at first, its fastest of a few runs).

    A decision taken from measurements must survive a noisy one. Every size is measured in AUTO_ROUNDS
    rounds and the median of its readings counts (noise errs both ways); the choice compares each size with
    the best of all (one flat step in a noisy curve used to end a step-by-step search early). Times that
    contradict their neighbours (a larger batch faster in total, or more than AUTO_COSTLIER_FACTOR times as
    costly for twice the items) are measured again; a contradiction that remains falls back to ``fallback``,
    within the budget as measured.
    """
    readings: dict[int, list[float]] = {}
    seconds: dict[int, float] = {}  # size → the median of its readings
    remeasured: list[int] = []

    def timed(size: int) -> float:
        readings.setdefault(size, []).append(measure(size, size in readings))
        seconds[size] = statistics.median_low(readings[size])
        return seconds[size]

    def implausible(small: int, large: int) -> bool:
        a, b = seconds[small], seconds[large]
        return b < a * (1 - AUTO_FASTER_TOLERANCE) or b > a * (large / small) * AUTO_COSTLIER_FACTOR / 2

    def contradictions() -> list[tuple[int, int]]:
        return [(a, b) for a, b in itertools.pairwise(sorted(seconds)) if implausible(a, b)]

    def decide() -> int:
        fitting = {s: t / s for s, t in seconds.items() if t <= budget_s}
        if not fitting:
            return 1
        best = min(fitting.values())
        return min(s for s, per_item in fitting.items() if per_item <= best * (1 + AUTO_NEAR_BEST))

    def explore() -> None:
        """Measure the sizes not measured yet, in order, up to the first one over the budget (as measured)."""
        for size in _batch_sizes(limit):
            elapsed = seconds[size] if size in seconds else timed(size)
            if elapsed > budget_s or (size < limit and elapsed * 2 * (1 - AUTO_NEAR_BEST) > budget_s):
                break  # twice the batch could only fit the budget by gaining far more per item than it can

    explore()
    for _ in range(AUTO_ROUNDS - 1):
        for size in sorted(seconds):
            if seconds[size] < AUTO_SLOW_FIRST_RUN_S:  # a pass this slow is measured well enough by one run
                timed(size)
        explore()
    for _ in range(AUTO_REMEASURES):
        pairs = contradictions()
        if not pairs:
            break
        for size in sorted({s for pair in pairs for s in pair}):
            remeasured.append(size)
            timed(size)
        explore()
    reliable = not contradictions()
    best = decide()
    if not reliable:

        def fits(size: int) -> bool:  # unmeasured sizes: the largest measured below, at its per-item time
            if size in seconds:
                return seconds[size] <= budget_s
            below = max(s for s in seconds if s < size)
            return seconds[below] * size / below <= budget_s

        best = max((s for s in _batch_sizes(min(fallback, limit)) if fits(s)), default=1)
    return BatchSizeChoice(best, {s: t / s for s, t in seconds.items()}, reliable, remeasured)


def decide_policy(loaded: LoadedModel, settings: Settings) -> tuple[BatchPolicy, float]:
    """The model's batch policy and the seconds deciding it took. max_batch_size=auto (with warm-up on)
    runs ``decide_batch_size`` on this model and this machine, measured on the task's first warm-up payload
    (the smallest shape bucket), on the inference thread. On the CPU the search runs torch on one thread and
    counts that thread's CPU time: per-item times compare the same way, and a busy machine (another process on
    the cores) does not change them, where wall-clock times on every core swung by 100x and flipped the
    choice between 1 and 16 from one start to the next."""
    task = loaded.task
    auto = loaded.max_batch_size == "auto"
    if auto:
        limit = AUTO_MAX_BATCH_SIZE if settings.warmup else AUTO_UNMEASURED_BATCH_SIZE
    else:
        limit = int(loaded.max_batch_size)
    if task.max_batch_size_cap is not None and (auto or not loaded.own_max_batch_size):
        limit = min(limit, task.max_batch_size_cap)

    def policy(size: int, source: str, per_item_ms: dict[int, float]) -> BatchPolicy:
        cost = task.default_max_batch_cost(size) if loaded.max_batch_cost is None else loaded.max_batch_cost
        return BatchPolicy(size, source, loaded.max_delay_ms, cost, per_item_ms)

    if not (auto and settings.warmup):
        return policy(limit, "configured", {}), 0.0
    started = time.monotonic()
    run = make_runner(task, loaded.model)
    payload = task.warmup_payloads(loaded.model.config)[0]
    device = loaded.model.device

    def measure(size: int, again: bool) -> float:
        batch = [payload] * size
        if again:  # a later round: one run (the rounds, not the runs within one, keep a slow spell out)
            return _timed(run, batch, device)
        seconds = _timed(run, batch, device)  # first call at this shape: allocations, kernel selection
        if seconds < AUTO_SLOW_FIRST_RUN_S:
            times: list[float] = []
            while len(times) < AUTO_TIMED_RUNS and sum(times) < AUTO_TIMING_BUDGET_S:
                times.append(_timed(run, batch, device))
            seconds = min(times)
        return seconds

    threads = torch.get_num_threads()
    gc.collect()
    gc.disable()  # a full collection inside a timed run would end the search early
    try:
        if device.type == "cpu":
            torch.set_num_threads(1)
        choice = decide_batch_size(measure, limit, settings.batch_latency_budget_ms / 1000)
    finally:
        gc.enable()
        if device.type == "cpu":
            torch.set_num_threads(threads)
    per_item_ms = {size: round(s * 1000, 3) for size, s in sorted(choice.per_item_s.items())}
    if choice.reliable:
        log.info(
            "%s: max_batch_size=auto chose %d (per-item ms by size: %s%s)",
            loaded.name,
            choice.size,
            per_item_ms,
            f"; measured again: {choice.remeasured}" if choice.remeasured else "",
        )
    else:
        log.warning(
            "%s: max_batch_size=auto could not decide (timings contradict each other even measured again: "
            "per-item ms by size %s); falling back to %d. Set max_batch_size to choose.",
            loaded.name,
            per_item_ms,
            choice.size,
        )
    source = "auto" if choice.reliable else "auto-fallback"
    return policy(choice.size, source, per_item_ms), time.monotonic() - started


def maybe_enable_graphs(settings: Settings, loaded: LoadedModel, policy: BatchPolicy) -> None:
    if not settings.cuda_graphs or loaded.model.device.type != "cuda":
        return
    if loaded.task.cuda_graphs:
        sizes = _batch_sizes(policy.max_batch_size)
        enable_cuda_graphs(loaded.model, sizes)
        log.info("CUDA graphs on for %s (batch sizes %s)", loaded.name, sizes)


def _warmed_pass_s(
    run: Any, batch: list[Any], device: torch.device, clock: Callable[[], float], before_s: float
) -> float:
    """A warmed pass's seconds, for admission's first estimates: the median of three timed passes where three of
    the fastest add up to ``SEED_RETIME_BUDGET_S`` or less (else the fastest of two, or the one). On a busy 2-core
    machine one pass in several was given both cores and stalled half a second at a barrier: read once, that pass
    seeded fill-mask's batches of 2 at 250 ms an item, 200x its passes, and an idle server refused a burst of five
    on it (review). The fastest pass so far decides whether to time again (``before_s``: the size's first pass, or
    the search's reading), not the last: a stalled pass is why to."""
    readings = [_timed(run, batch, device, clock)]
    while len(readings) < 3 and min(before_s, *readings) * (len(readings) + 1) <= SEED_RETIME_BUDGET_S:
        readings.append(_timed(run, batch, device, clock))
    return statistics.median(readings) if len(readings) == 3 else min(readings)


@dataclass
class WarmUp:
    per_item_s: dict[int, float] = field(default_factory=dict)  # the first bucket's, by batch size (wall time)
    bucket_per_item_s: dict[Hashable, dict[int, float]] = field(default_factory=dict)  # every other bucket's
    busy: bool = False  # other work kept a core busy while the first bucket was timed (the core share's reading)
    seconds: float = 0.0
    faulted_bytes: int = 0  # fresh memory one more pass of the first bucket faulted in (CPU; app/memory.py)


def warm_up(
    loaded: LoadedModel,
    policy: BatchPolicy,
    cores: CoreShare | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> WarmUp:
    """Every shape bucket at every power-of-two batch size up to the maximum (inference thread), and the first
    bucket's per-item wall times on every core, admission's first estimates (``warm_service_time``).

    A size's first pass at a shape is not its time: it allocates and chooses kernels (and on CUDA captures its
    graph); on 2 cores the demo's Fourier image classifier's first pass took 2.3x its second. So a size is timed
    on a later pass: the search's sizes (run already on the CPU) once, others on their second. Except a pass over
    ``SEED_TIMING_LIMIT_S``: its first pass, or the search's reading, stands (an overestimate of a few tenths,
    where timing it again would add seconds to start-up).

    On the CPU the passes run as serving runs them, on the threads ``cores`` (the runtime's CoreShare) gives a
    pass now: on every core regardless, with two busy loops on 2 cores, passes stalled at every barrier, and
    warm-up timed classify-text's at 420 ms an item, 200x its passes. A machine busy at start-up still makes
    the figures slower than a quiet one would (2x with two busy loops): the batcher's own batches replace them.
    """
    started = time.monotonic()
    task, model = loaded.task, loaded.model
    run = make_runner(task, model, cores)
    device = model.device
    warm = WarmUp()
    already_run = set(policy.per_item_ms) if device.type == "cpu" else set()
    for i, payload in enumerate(task.warmup_payloads(model.config)):
        for size in _batch_sizes(policy.max_batch_size):
            batch = [payload] * size
            if i > 0:  # a longer text's bucket: its own estimates, from the faster of its first two passes
                seconds = _timed(run, batch, device, clock)
                if seconds < SEED_TIMING_LIMIT_S:
                    seconds = min(seconds, _timed(run, batch, device, clock))
                warm.bucket_per_item_s.setdefault(task.bucket(payload), {})[size] = seconds / size
            elif size in already_run:
                searched_s = policy.per_item_ms[size] * size / 1000
                if searched_s < SEED_TIMING_LIMIT_S:
                    warm.per_item_s[size] = _warmed_pass_s(run, batch, device, clock, searched_s) / size
            else:
                seconds = _timed(run, batch, device, clock)
                if seconds < SEED_TIMING_LIMIT_S:
                    seconds = _warmed_pass_s(run, batch, device, clock, seconds)
                warm.per_item_s[size] = seconds / size
            if i == 0 and cores is not None:
                warm.busy = warm.busy or cores.load >= SHARED_CORE_LOAD
        if i == 0 and device.type == "cpu":
            warm.faulted_bytes = memory.faulted_bytes(functools.partial(run, [payload]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm.seconds = time.monotonic() - started
    log.info("warmed %s in %.1fs (every bucket at every batch size)", loaded.name, warm.seconds)
    return warm


def warm_bucket_times(warm: WarmUp) -> dict[Hashable, ServiceTime]:
    """Admission's first estimates for the buckets after the first (longer texts: a 2,048-byte window took 5x a
    64-byte one in batches of 8 on the demo models), from warm-up's wall times."""
    return {bucket: ServiceTime(seed) for bucket, seed in warm.bucket_per_item_s.items()}


def warm_service_time(policy: BatchPolicy, warm: WarmUp) -> ServiceTime:
    """Admission's estimates, seeded per batch size with warm-up's wall time where it timed the size (what the
    batcher measures of its own batches, on a warmed shape), else max_batch_size=auto's reading (one thread's CPU
    time, a pass on one thread where serving gives it the free cores: on 2 quiet cores the demo's learned image
    classifier read 2.6x its passes). Without warm-up nothing is known until the batcher has timed a batch."""
    seed = {size: ms / 1000 for size, ms in policy.per_item_ms.items() if size <= policy.max_batch_size}
    seed.update(warm.per_item_s)
    return ServiceTime(seed)


_compile_failed: str | None = None  # why compiling failed in this process: the later models are not tried


def maybe_compile(settings: Settings, loaded: LoadedModel, cores: int) -> float:
    """compile=latent: compile the model's latent block and run each of its graphs once, before
    max_batch_size=auto or warm-up time a pass: a pass that compiles takes seconds, and a timing that held one
    would bend the batch size and admission's first estimates. Dynamo makes a graph for batch 1 and one for every
    larger batch, per torch thread count (it guards on it: Inductor's CPU kernels are built for one), so a CPU
    model gets both at every count its core share can give a pass, 1 to ``cores``: start-up grows with the
    cores. The latent block sees [B, latents, width] whatever the input's shape, so these graphs serve every
    bucket.

    Compiling needs a C compiler at run time (Inductor's CPU kernels, Triton's launcher on CUDA), which the
    project's image leaves out unless built with COMPILER=true. Where compiling fails (that, an op Inductor
    cannot lower, the recompile limit), the log says why once, and this model and every one loaded after it are
    served eagerly (/v1/models shows compile "off"). Returns the seconds taken."""
    global _compile_failed
    if settings.compile == "off" or _compile_failed is not None:
        return 0.0
    model, task = loaded.model, loaded.task
    sizes = (1,) if task.max_batch_size_cap == 1 else (1, 2)
    threads = torch.get_num_threads()
    counts = range(1, cores + 1) if model.device.type == "cpu" else [threads]
    started = time.monotonic()
    reason = compiled.known_crash(model, model.device)
    if reason is not None:  # this model only: the others are compiled as asked
        log.warning("PERCEIVER_COMPILE=latent: serving %s eagerly: %s", loaded.name, reason)
        return 0.0
    try:
        if settings.compile_cache:
            compiled.use_cache_dir(settings.compile_cache)
        compiled.compile_latent_block(model)
        for count in counts:
            torch.set_num_threads(count)
            compiled.warm_compiled(model, sizes)
    except Exception as exc:  # eager is correct, only slower
        if compiled.compiled(model):
            compiled.uncompile(model)
        first_line = str(exc).strip().split("\n", 1)[0]  # torch appends lines of advice for its own developers
        _compile_failed = f"{type(exc).__name__}: {first_line[:300]}"
        log.warning(
            "PERCEIVER_COMPILE=latent: compiling %s's latent block failed (%s); serving it and every model loaded "
            "after it eagerly",
            loaded.name,
            _compile_failed,
        )
    else:
        log.info("compiled %s's latent block (torch threads: %s)", loaded.name, list(counts))
    finally:
        torch.set_num_threads(threads)
    return time.monotonic() - started


async def start_engine(runtime: Runtime, loaded: LoadedModel) -> Engine:
    """Compile (compile=latent), decide the batch policy, warm up (all on the inference thread), then build the
    engine."""
    loop = asyncio.get_running_loop()
    settings = runtime.settings
    compile_s = await loop.run_in_executor(runtime.inference_executor, maybe_compile, settings, loaded, runtime.cores)
    policy, deciding_s = await loop.run_in_executor(runtime.inference_executor, decide_policy, loaded, settings)
    maybe_enable_graphs(settings, loaded, policy)
    warm = WarmUp()
    if settings.warmup:
        warm = await loop.run_in_executor(runtime.inference_executor, warm_up, loaded, policy, runtime.core_share())
    if warm.faulted_bytes > memory.FAULTED_BYTES_TO_KEEP and memory.keep_freed_memory():
        log.info(
            "a pass of %s faulted in %.0f MiB of fresh memory: freed memory is kept for the next pass "
            "(up to %.0f MiB; app/memory.py)",
            loaded.name,
            warm.faulted_bytes / 2**20,
            memory.keep_bytes() / 2**20,
        )
    # The first warm-up payload's bucket is the one ``warm_service_time`` estimates (warm-up or not).
    first = next(iter(loaded.task.warmup_payloads(loaded.model.config)), None)
    engine = build_engine(
        runtime,
        loaded.task,
        loaded.variant,
        loaded.model,
        source=loaded.source,
        weights=loaded.weights,
        dtype=loaded.dtype,
        policy=policy,
        service_time=warm_service_time(policy, warm),
        bucket_times=warm_bucket_times(warm),
        home_bucket=None if first is None else loaded.task.bucket(first),
        load_s=loaded.load_s,
        warmup_s=compile_s + deciding_s + warm.seconds,
    )
    # Its first estimates are a busy machine's: timed again once the machine is quiet and the model idle (a pass
    # of a second or more would hold a request that came meanwhile: not those).
    share = runtime.core_share()
    if (
        warm.busy
        and first is not None
        and share is not None
        and engine.batcher.service_time.batch_s(1) < SEED_TIMING_LIMIT_S
    ):

        def quiet() -> bool:
            share.threads()  # reads the load, when its window has passed
            return share.load < SHARED_CORE_LOAD

        engine.batcher.reseed(first, quiet)
    return engine
