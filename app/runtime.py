"""What the server holds while it runs: one engine per served model, the executors, and lifecycle state."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .accesslog import AccessLog
from .batching import Lanes, SharedThread
from .cores import CoreShare, other_processes_busy_s
from .engine import BatchPolicy, Engine
from .errors import DeadlineExceeded, ModelNotFound, NotReady
from .metrics import Metrics
from .settings import Settings

T = TypeVar("T")
AUTO_CPU_LANES = 2  # cpu_lanes=auto, for models that batching does not help: measured on 2 cores only
log = logging.getLogger("perceiver.runtime")


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    models: dict[str, dict[str, Engine]] = field(default_factory=dict)  # task → variant → engine
    ready: bool = False
    draining: bool = False
    inflight: int = 0
    taken: int = 0  # task requests taken so far (app/memory.py's idle trim watches it)
    decode_busy_s: float = 0.0  # seconds spent decoding uploads so far, summed over decodes (overlaps add up)
    decode_timer: Callable[[], float] = time.perf_counter  # times each decode where it runs (tests give a clock)
    log_clock: Callable[[], float] = time.monotonic  # what the refusal log's one line a second reads (tests: a clock)
    drain_started: float | None = None
    load_error: str | None = None
    forced: bool = False  # a second signal stopped the drain: what it cuts is cut by that, not by the timeout
    created: float = field(default_factory=time.monotonic)
    # Why the process that runs the models looks stuck, or None: a front end's watch on the model process's
    # heartbeat (app/remote.py); one process has nothing to watch (a stuck event loop answers nothing at all).
    unresponsive: Callable[[], str | None] = field(default=lambda: None)

    def __post_init__(self) -> None:
        self.limits = self.settings.limits()
        self.access = AccessLog(self.metrics, lambda: self.log_clock())  # every request's metrics and log line
        # Off the event loop: one thread for start-up and GPU models (their forward passes never overlap);
        # CPU models batch on lanes(), up to cpu_lanes passes side by side.
        self.inference_executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.inference_thread = SharedThread()  # its batches, of every model on it, for their admission
        self._cores = torch.get_num_threads()  # torch's default: the cores this process may use
        self._lanes: Lanes | None = None
        # Made now, so that the first pass (warm-up's) reads how busy the machine was while the models loaded: made
        # at the first pass, it had read nothing and gave that pass every core, which two busy loops then stalled.
        self._core_share: CoreShare | None = None
        if self._cores > 1:
            self._core_share = CoreShare(self._cores, lambda: self.decode_busy_s, others_busy_s=other_processes_busy_s)
        self.offload_executor = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode")
        self.decode_executor: Executor = self.offload_executor
        if self.settings.decode_processes > 0:  # uploads decoded outside this process's GIL
            self.decode_executor = ProcessPoolExecutor(
                self.settings.decode_processes, mp_context=multiprocessing.get_context("spawn")
            )

    @property
    def cores(self) -> int:
        """torch threads a CPU forward pass may use at most (its core share gives it 1 to this many)."""
        return self._cores

    def cpu_lanes(self) -> int:
        """Batches CPU models may run side by side: the setting (AUTO_CPU_LANES for auto), at most one per core."""
        wanted = AUTO_CPU_LANES if self.settings.cpu_lanes == "auto" else self.settings.cpu_lanes
        return max(1, min(wanted, self._cores))

    def uses_lanes(self, device: torch.device, policy: BatchPolicy) -> bool:
        """Whether a model on ``device`` batches on lanes(): a CPU model, when there are lanes, and with
        cpu_lanes=auto only if its max_batch_size=auto chose 1 (batching gains it nothing; side by side, two
        requests gain)."""
        if device.type != "cpu" or self.cpu_lanes() < 2:
            return False
        return self.settings.cpu_lanes != "auto" or (policy.source != "configured" and policy.max_batch_size == 1)

    def lanes(self) -> Lanes:
        """The threads CPU models' batches run on side by side (made when the first such model is attached)."""
        if self._lanes is None:
            self._lanes = Lanes(self.cpu_lanes())
        return self._lanes

    def core_share(self) -> CoreShare | None:
        """One for the whole process: the cores, less the recent load of decoding and of other processes, shared
        by the batches running."""
        return self._core_share

    def add(self, engine: Engine) -> None:
        self.models.setdefault(engine.task.name, {})[engine.variant] = engine

    def check_ready(self, probe: str) -> None:
        """503 (NotReady) while the models load; ``probe`` names the readiness path the client should watch."""
        if not self.ready and self.load_error is not None:  # the model process exited, or the models failed
            raise NotReady(f"{self.load_error}; retry on another replica", {"Retry-After": "1"})
        if not self.ready:
            raise NotReady(f"models are still loading; retry when {probe} answers 200", {"Retry-After": "1"})
        if (why := self.unresponsive()) is not None:
            raise NotReady(f"{why}; retry on another replica", {"Retry-After": "1"})

    def engine_for(self, task: str, variant: str | None = None) -> Engine:
        variants = self.models.get(task)
        if not variants:
            raise ModelNotFound(f"no model is configured for task {task!r}")
        if variant is None:
            return next(iter(variants.values()))
        # The served name works too: "classify/conv" for conv, "fill-mask" for the default variant.
        by_name = {engine.name: engine for engine in variants.values()}
        if variant in by_name:
            return by_name[variant]
        if variant not in variants:
            raise ModelNotFound(f"task {task!r} has no model {variant!r}; available: {', '.join(variants)}")
        return variants[variant]

    def engines(self) -> list[Engine]:
        return [e for variants in self.models.values() for e in variants.values()]

    async def decode(self, deadline: float, fn: Callable[..., T], *args: Any) -> T:
        """Decode an upload off the event loop: in threads, or in processes with decode_processes > 0. A decode
        that only gets a worker after its request's deadline is not started (504)."""
        loop = asyncio.get_running_loop()
        result, seconds = await loop.run_in_executor(
            self.decode_executor, _timed_call, deadline, self.decode_timer, fn, *args
        )
        self.decode_busy_s += seconds
        return result

    async def offload(self, deadline: float, fn: Callable[..., T], *args: Any) -> T:
        """CPU-heavy post-processing (blending, encoding responses) in threads, off the event loop; not started
        after the request's deadline (504)."""
        result, _ = await asyncio.get_running_loop().run_in_executor(
            self.offload_executor, _timed_call, deadline, time.perf_counter, fn, *args
        )
        return result

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()
            log.info("draining: readiness off, finishing accepted requests")

    def idle(self) -> bool:
        return self.inflight == 0 and all(e.idle for e in self.engines())

    def shutdown_executors(self) -> None:
        self.inference_executor.shutdown(wait=True, cancel_futures=True)
        if self._lanes is not None:
            self._lanes.shutdown()
        self.decode_executor.shutdown(wait=True, cancel_futures=True)
        self.offload_executor.shutdown(wait=True, cancel_futures=True)


def _timed_call(deadline: float, timer: Callable[[], float], fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """``fn(*args)`` and the seconds it ran by ``timer``, timed where it runs (not counting the wait for a free
    worker); DeadlineExceeded instead if the worker got it after ``deadline`` (monotonic: one clock for every
    process)."""
    if time.monotonic() >= deadline:
        raise DeadlineExceeded("the request's deadline passed before its turn in the worker pool")
    started = timer()
    result = fn(*args)
    return result, timer() - started


def release(state: dict[str, Any]) -> None:
    """A request whose inputs were counted as queued work while they decode (``Engine.reserve``, in the routes'
    pipeline once the body is in) is queued, or ends: they no longer count. Once only: the pipeline calls it
    before queueing, the HTTP middleware and the gRPC handler when the request ends."""
    reservation = state.pop("reservation", None)
    if reservation is not None:
        reservation()
