"""One engine per served model: everything about when and where its requests run, built once at start-up.

As in Triton's per-model scheduler, the task, the batch policy as decided, the runner and where it runs, and
the batcher with its estimates live together, and nothing changes them after start-up. Front ends (REST, the
Open Inference Protocol) only translate: they ask ``admit(deadline)`` and hand payloads to ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from perceiver_core import PerceiverHead
from perceiver_core.compiled import compiled

from .batching import EVERY, Batch, Batcher, BatchError, Cancelled, Expired, Hopeless, QueueFull, ServiceTime, Ticket
from .cores import CoreShare
from .errors import ClientClosedRequest, DeadlineExceeded, InferenceFailed, Overloaded
from .metrics import Metrics
from .tasks import Task

if TYPE_CHECKING:
    from .runtime import Runtime

AnyTask = Task[Any, Any, Any]


@dataclass(frozen=True)
class BatchPolicy:
    """How a model's requests are batched, as decided at start-up (configured, or measured by max_batch_size=auto)."""

    max_batch_size: int
    source: str  # configured; auto (measured); auto-fallback (measured, but the timings could not decide)
    max_delay_ms: float
    max_batch_cost: int | None
    per_item_ms: Mapping[int, float]  # auto: forward time per item by batch size, as the search measured it


@dataclass
class Duration:
    """A count and the nanoseconds it took in all (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class RequestTiming:
    """Where one successful request's time went, for Statistics."""

    input_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0


@dataclass
class Statistics:
    """Triton's per-model statistics (its statistics extension), kept on the event loop's thread: requests that
    succeeded and failed after admission with their time in the server, and per successful request the time
    queued, decoding (compute_input), in the forward pass (compute_infer) and encoding (compute_output)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # items (batch rows) inferred
    execution_count: int = 0  # forward passes
    last_inference_ms: int = 0  # wall clock, milliseconds since the epoch
    batches: dict[int, Duration] = field(default_factory=dict)  # forward passes and their time, by batch size

    def account(self, ok: bool, total_s: float, timing: RequestTiming | None) -> None:
        (self.success if ok else self.fail).add(total_s)
        if ok and timing is not None:
            self.compute_input.add(timing.input_s)
            self.queue.add(timing.queue_s)
            self.compute_infer.add(timing.infer_s)  # the forward pass of the request's batch
            self.compute_output.add(timing.output_s)

    def batch(self, size: int, seconds: float) -> None:
        self.execution_count += 1
        self.inference_count += size
        self.last_inference_ms = int(time.time() * 1000)
        self.batches.setdefault(size, Duration()).add(seconds)


@dataclass(frozen=True)
class Engine:
    """A served model with its batch policy, its runner and where that runs, and its batcher."""

    task: AnyTask
    variant: str
    model: PerceiverHead
    source: str
    weights: str  # "pretrained" or "random-init"
    dtype: str
    policy: BatchPolicy
    placement: str  # where batches run: "inference-thread" or "lanes" (CPU models side by side)
    batcher: Batcher[Any, Any]
    metrics: Metrics
    load_s: float  # building or reading the weights onto the device
    warmup_s: float  # measuring max_batch_size=auto and warming every bucket
    statistics: Statistics = field(default_factory=Statistics)  # counts since start-up, for /v2/.../stats

    # Read on every request: computed once (a head's device walks its parameters: 30 us a request).
    @functools.cached_property
    def name(self) -> str:
        return served_name(self.task.name, self.variant)

    @functools.cached_property
    def device(self) -> str:
        return str(self.model.device)

    @functools.cached_property
    def labels(self) -> dict[str, str]:
        return {"task": self.task.name, "model": self.name}

    # ------------------------------------------------------------------------------------------ admission

    def refusal(self, deadline: float) -> Overloaded | None:
        """The 429 this model would answer a request with this deadline now, or None (the door asks every
        variant on every request, so this returns rather than raises)."""
        try:
            self.batcher.admit(deadline)
        except QueueFull as exc:
            return self.overloaded(exc)
        return None

    def reserve(self, units: int) -> Callable[[], None]:
        """Count an admitted request as queued work while it decodes; call the result once it is queued."""
        return self.batcher.reserve(units)

    def admit(self, deadline: float) -> None:
        """429 (Overloaded) if this model could not finish a request with this deadline."""
        refusal = self.refusal(deadline)
        if refusal is not None:
            raise refusal

    def overloaded(self, exc: QueueFull) -> Overloaded:
        """The 429 for a batcher's refusal, labelled with its reason (queue full, or the deadline out of reach);
        Retry-After is the batcher's estimate of when the request would be admitted."""
        reason = "would_miss_deadline" if exc.reason == "deadline" else "queue_full"
        headers = {"Retry-After": str(math.ceil(exc.retry_after_s))}
        return Overloaded(f"{self.name} is overloaded: {exc}", headers, reason)

    # ------------------------------------------------------------------------------------------ running

    def submit(self, payloads: Sequence[Any], deadline: float) -> list[Ticket[Any, Any]]:
        """Queue the payloads of one request; admitted as one (its first item is asked, the rest come with it)."""
        tickets: list[Ticket[Any, Any]] = []
        task = self.task
        items = [task.units(p) for p in payloads]
        buckets = [task.bucket(p) for p in payloads]
        costs = [task.cost(p) for p in payloads]
        try:
            for payload, units, bucket, cost in zip(payloads, items, buckets, costs, strict=True):
                tickets.append(
                    self.batcher.submit(
                        payload,
                        cost=cost,
                        bucket=bucket,
                        deadline=deadline,
                        units=units,
                        admit=not tickets,
                        items=items if not tickets else None,
                        item_buckets=buckets if not tickets else None,
                        item_costs=costs if not tickets else None,
                        flow=tickets[0].flow if tickets else None,
                    )
                )
        except QueueFull as exc:
            for ticket in tickets:
                ticket.cancel()
            raise self.overloaded(exc) from exc
        except Hopeless as exc:  # asked first: nothing was queued
            raise DeadlineExceeded(str(exc)) from exc
        if len(tickets) > 1:  # the request's estimate is its last item's to check against: it ends last
            first, last = tickets[0], tickets[-1]
            last.estimated_s, last.budget_s, first.estimated_s = first.estimated_s, first.budget_s, 0.0
        for ticket in tickets:
            ticket.future.add_done_callback(_retrieve)  # the caller may have left (deadline, disconnect)
        return tickets

    async def wait(self, tickets: list[Ticket[Any, Any]], deadline: float) -> list[Any]:
        """The tickets' results, in order, or the error the request gets; the tickets not run are dropped."""
        gathered = asyncio.gather(*(t.future for t in tickets))
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                results = await asyncio.shield(gathered)
        except TimeoutError as exc:
            raise DeadlineExceeded("the request did not finish before its deadline") from exc
        except Expired as exc:
            raise DeadlineExceeded(str(exc)) from exc
        except Cancelled as exc:
            raise ClientClosedRequest(f"request dropped: {exc}") from exc
        except BatchError as exc:
            raise InferenceFailed(f"inference failed for this batch ({type(exc.__cause__).__name__})") from exc
        finally:
            for ticket in tickets:
                ticket.cancel()  # no-op for finished tickets; frees the queue of the rest
            if not gathered.done():  # the request stopped waiting: the tickets' errors are read here, not logged
                gathered.add_done_callback(_read_outcome)
        # Once per request, as the timing headers say it (its longest wait, its longest pass): once per item, a
        # request of three images in one pass counted that pass three times, more than the requests' whole time.
        labels = self.labels
        if tickets:
            self.metrics.queue_duration.labels(**labels).observe(max(t.queue_s for t in tickets))
            self.metrics.inference_duration.labels(**labels).observe(max(t.inference_s for t in tickets))
        self.metrics.units_per_request.labels(**labels).observe(sum(t.units for t in tickets))
        return list(results)

    @property
    def idle(self) -> bool:
        return self.batcher.idle

    async def stop(self) -> None:
        await self.batcher.stop()

    def account(self, ok: bool, total_s: float, timing: RequestTiming | None) -> None:
        """One request that ended after admission: Triton's per-model statistics."""
        self.statistics.account(ok, total_s, timing)

    async def statistics_now(self) -> Statistics:
        return self.statistics

    async def describe_now(self) -> dict[str, Any]:
        return self.describe()

    async def run(self, payloads: Sequence[Any], deadline: float) -> list[Any]:
        """``submit`` then ``wait``: the results of one admitted request's payloads."""
        return await self.wait(self.submit(payloads, deadline), deadline)

    def describe(self) -> dict[str, Any]:
        config = self.model.config
        policy = self.policy
        return {
            "name": self.name,
            "task": self.task.name,
            "variant": self.variant,
            "architecture": config.architecture,
            "source": self.source,
            "weights": self.weights,
            "dtype": self.dtype,
            "device": self.device,
            "compile": "latent" if compiled(self.model) else "off",
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **({"num_labels": config.num_labels} if self.task.labelled else {}),
            "batching": {
                "max_batch_size": policy.max_batch_size,
                "max_batch_size_source": policy.source,
                "per_item_ms": {str(k): v for k, v in policy.per_item_ms.items()},
                "admission_per_item_ms": self.batcher.service_time.summary(),
                "admission_per_item_ms_by_bucket": {
                    str(bucket): table.summary() for bucket, table in self.batcher.bucket_times.items() if table.known
                },
                "admission_margin": round(self.batcher.admission_state().margin, 3),
                "max_delay_ms": policy.max_delay_ms,
                "max_batch_cost": policy.max_batch_cost,
                "queue_depth": self.batcher.depth,
                "running": self.batcher.running,
                "placement": self.placement,
                "prepare_ahead": self.batcher.prepares_ahead,
            },
            "load_s": round(self.load_s, 3),
            "warmup_s": round(self.warmup_s, 3),
        }


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def make_runner(task: AnyTask, model: PerceiverHead, cores: CoreShare | None = None) -> Any:
    """The batch function the inference threads run. On the CPU, with ``cores`` (the runtime's CoreShare),
    each forward pass takes its share of the cores that decoding has recently left: torch's intra-op
    threads otherwise spin against the decode threads and against the other batches running."""
    if cores is None or model.device.type != "cpu":

        def run(payloads: Sequence[Any], batch: Batch = EVERY) -> list[Any]:
            with torch.inference_mode():
                return task.predict(model, payloads, batch)

        return run

    share = cores

    def run_shared(payloads: Sequence[Any], batch: Batch = EVERY) -> list[Any]:
        with share.lane() as threads:
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)  # this thread's intra-op threads (per thread under OpenMP)
            with torch.inference_mode():
                return task.predict(model, payloads, batch)

    return run_shared


def make_prepare(task: AnyTask, model: PerceiverHead) -> Any:
    """The prepare stage the batcher runs ahead of each forward pass (``Task.prepare``), on a CUDA stream of its
    own so that its kernels (nvJPEG, the crops) overlap the forward pass of the batch before; it waits for its
    stream before handing the batch on, so the forward pass reads finished inputs."""
    stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def prepare(payloads: Sequence[Any]) -> list[Any]:
        with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            ready = task.prepare(model, payloads)
        if stream is not None:
            stream.synchronize()  # releases the GIL while it waits
        return ready

    return prepare


def prepares_ahead(setting: bool, task: AnyTask, model: PerceiverHead, on_lanes: bool) -> bool:
    """Whether the batcher prepares each batch while the one before runs: where the task has a prepare stage
    (nvJPEG's decode) whose work can overlap a forward pass, i.e. on CUDA, one batch at a time. A seam:
    benchmarks/knobs.py's model of sleeps turns it on for the CPU."""
    return setting and task.prepares and model.device.type == "cuda" and not on_lanes


def served_name(task: str, variant: str) -> str:
    """A model's name in the API: its task, and its variant unless that is ``default`` (classify/learned)."""
    return task if variant == "default" else f"{task}/{variant}"


def _read_outcome(future: asyncio.Future[Any]) -> None:
    """Mark a future's error as read: asyncio logs an ERROR for every failed future no one read."""
    if not future.cancelled():
        future.exception()


def build_engine(
    runtime: Runtime,
    task: AnyTask,
    variant: str,
    model: PerceiverHead,
    *,
    source: str,
    weights: str,
    dtype: str,
    policy: BatchPolicy,
    service_time: ServiceTime,
    load_s: float,
    warmup_s: float,
    bucket_times: dict[Hashable, ServiceTime] | None = None,
    home_bucket: Hashable = None,
) -> Engine:
    """The engine of one loaded model, its batcher started (on the event loop's thread)."""
    labels = {"task": task.name, "model": task.name if variant == "default" else f"{task.name}/{variant}"}
    metrics = runtime.metrics

    statistics = Statistics()

    class _Observer:
        def batch(self, size: int, cost: int, inference_s: float) -> None:
            statistics.batch(size, inference_s)
            metrics.batch_size.labels(**labels).observe(size)
            metrics.batch_cost.labels(**labels).observe(cost)
            metrics.batches.labels(**labels).inc()

        def depth(self, depth: int) -> None:
            metrics.queue_depth.labels(**labels).set(depth)

    on_lanes = runtime.uses_lanes(model.device, policy)
    settings = runtime.settings
    ahead = prepares_ahead(settings.prepare_ahead, task, model, on_lanes)
    batcher: Batcher[Any, Any] = Batcher(
        make_runner(task, model, runtime.core_share()),
        runtime.lanes() if on_lanes else runtime.inference_executor,
        max_batch_size=policy.max_batch_size,
        max_delay_s=policy.max_delay_ms / 1000,
        max_batch_cost=policy.max_batch_cost,
        max_queue=settings.max_queue_size,
        max_queue_delay_s=None if (delay := settings.max_queue_delay_ms) is None else delay / 1000,
        observer=_Observer(),
        on_oom=torch.cuda.empty_cache if model.device.type == "cuda" else None,
        oom_errors=(MemoryError, torch.OutOfMemoryError),
        service_time=service_time,
        bucket_times=bucket_times,
        home_bucket=home_bucket,
        prepare=make_prepare(task, model) if ahead else None,
        prepare_executor=ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{labels['model']}") if ahead else None,
        shared=None if on_lanes else runtime.inference_thread,
    )
    batcher.start()
    return Engine(
        task=task,
        variant=variant,
        model=model,
        source=source,
        weights=weights,
        dtype=dtype,
        policy=policy,
        placement="lanes" if on_lanes else "inference-thread",
        batcher=batcher,
        metrics=metrics,
        load_s=load_s,
        warmup_s=warmup_s,
        statistics=statistics,
    )
