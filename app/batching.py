"""The dynamic batcher: one per model, knows nothing of HTTP or Perceiver.

A batch is cut when it is full (``max_batch_size`` requests or ``max_batch_cost`` input elements) or
when the oldest queued request has waited ``max_delay_s``. Only requests of the oldest request's bucket
(same shape class) join its batch; other buckets wait their turn, oldest first. Batches run on the
executor given, off the event loop: one at a time, or up to ``lanes`` side by side (CPU models, whose
forward passes scale better side by side on a core each than one at a time on all cores; a GPU takes one
at a time). Cancelled or expired requests are dropped
when a batch is formed, before they reach the model. A batch that runs out of memory is split in halves
and retried; any other exception fails that batch's requests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

P = TypeVar("P")
R = TypeVar("R")
log = logging.getLogger("perceiver.batching")
EWMA_WEIGHT = 0.2  # of the newest batch in the service-time estimates
ADMISSION_MARGIN = 1.2  # forward times vary: admit only what the estimate finishes with 20% to spare


_running = threading.local()  # the tickets of the batch running on this executor thread, by payload id


def still_wanted(payloads: Sequence[object]) -> list[bool]:
    """For each payload of the batch running on this thread: does a client still wait for it (not cancelled,
    deadline not passed)? Forward passes made of several chunks check between chunks and skip the work of
    requests that have ended. True for payloads run outside a batcher."""
    tickets: dict[int, Ticket[object, object]] = getattr(_running, "tickets", {})
    now = time.monotonic()
    return [
        (t := tickets.get(id(p))) is None or (not t.cancelled and (t.deadline is None or now < t.deadline))
        for p in payloads
    ]


class QueueFull(Exception):
    """The bounded queue is full, or the request would wait past its deadline; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Expired(Exception):
    """The request's deadline passed before it reached the model."""


class Cancelled(Exception):
    """The request was cancelled (client gone) before it reached the model."""


class BatchError(Exception):
    """The forward pass raised; ``__cause__`` holds the original exception."""


class Observer(Protocol):
    def batch(self, size: int, cost: int, inference_s: float) -> None: ...
    def depth(self, depth: int) -> None: ...


@dataclass(eq=False)
class Ticket(Generic[P, R]):
    payload: P
    cost: int
    bucket: Hashable
    deadline: float | None
    future: asyncio.Future[R]
    enqueued_at: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        """Drop the request if it has not reached the model yet."""
        self.cancelled = True


class Lanes:
    """Single-thread executors on which batches (of any model) run side by side, at most one per lane.

    The lowest free lane is taken first, so that one batch at a time always runs on the same thread: each
    thread that runs torch keeps its own OpenMP team, and a team left idle spins for a while after its last
    parallel region, against the team in use (alternating two threads made small forward passes 15% slower).
    """

    def __init__(self, count: int, prefix: str = "inference-lane") -> None:
        self.executors = [ThreadPoolExecutor(1, thread_name_prefix=f"{prefix}-{i}") for i in range(count)]
        self._busy = [False] * count
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self.executors)

    def acquire(self) -> int | None:
        """The lowest free lane, now taken; None when every lane is busy."""
        for lane, busy in enumerate(self._busy):
            if not busy:
                self._busy[lane] = True
                return lane
        return None

    def release(self, lane: int) -> None:
        self._busy[lane] = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def freed(self) -> None:
        """Returns when a lane is released (every waiter wakes and tries again)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    @property
    def running(self) -> int:
        return sum(self._busy)

    def shutdown(self) -> None:
        for executor in self.executors:
            executor.shutdown(wait=True, cancel_futures=True)


class Batcher(Generic[P, R]):
    def __init__(
        self,
        run: Callable[[Sequence[P]], Sequence[R]],
        executor: Executor | Lanes,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_batch_cost: int | None = None,
        max_queue: int = 256,
        max_queue_delay_s: float | None = None,
        observer: Observer | None = None,
        on_oom: Callable[[], None] | None = None,
        oom_errors: tuple[type[BaseException], ...] = (MemoryError,),
        expected_batch_s: float | None = None,
    ) -> None:
        self._run = run
        # Lanes: batches side by side, each on the lowest free lane; an executor: one batch at a time.
        self._lanes: Lanes | None = executor if isinstance(executor, Lanes) else None
        self._executor: Executor | None = None if isinstance(executor, Lanes) else executor
        self.lanes = len(executor) if isinstance(executor, Lanes) else 1
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_batch_cost = max_batch_cost
        self.max_queue = max_queue
        self.max_queue_delay_s = max_queue_delay_s
        self._observer = observer
        self._on_oom = on_oom
        self._oom_errors = oom_errors  # by type: an error that merely mentions memory is not an OOM
        self._queue: deque[Ticket[P, R]] = deque()
        self._arrival = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lane_tasks: set[asyncio.Task[None]] = set()
        # Service-time estimates (exponentially weighted over recent batches), for admission by time.
        self._batch_s = expected_batch_s  # one batch's run time, at the sizes recently run (warm-up: full)
        self._batch_items = float(max_batch_size) if expected_batch_s is not None else 1.0  # requests per batch
        self._running: dict[int, float] = {}  # batches running: id → start (monotonic)

    # ------------------------------------------------------------------ client side
    def submit(
        self, payload: P, *, cost: int = 1, bucket: Hashable = None, deadline: float | None = None
    ) -> Ticket[P, R]:
        """Queue one request (raises QueueFull); await ``ticket.future`` for its result."""
        self.admit(deadline)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        ticket: Ticket[P, R] = Ticket(payload, cost, bucket, deadline, future)
        self._queue.append(ticket)
        self._arrival.set()
        self._report_depth()
        return ticket

    def admit(self, deadline: float | None) -> None:
        """Refuse at the door (QueueFull) a request that the queue cannot hold or could not finish in time.

        Admission is by time as well as by count: a request whose estimated wait plus its own forward pass
        exceeds its remaining deadline would only expire in the queue (a 504 after using a slot), so it
        gets a 429 at once with an honest Retry-After: when the queue ahead will have drained enough. A
        queue-delay target (``max_queue_delay_s``, as CoDel keeps a target for the standing queue) keeps
        the queue short even when deadlines are long: a standing queue adds latency and no throughput.
        """
        if len(self._queue) >= self.max_queue:
            raise QueueFull(
                f"queue holds {len(self._queue)} requests (max_queue_size {self.max_queue})",
                max(1.0, self.estimated_wait_s()),
            )
        if self._batch_s is None:
            return
        wait = self.estimated_wait_s()
        if self.max_queue_delay_s is not None and wait > self.max_queue_delay_s:
            raise QueueFull(
                f"estimated queue wait {wait:.2f} s exceeds max_queue_delay ({self.max_queue_delay_s:.2f} s)",
                max(1.0, wait - self.max_queue_delay_s),
            )
        if deadline is None:
            return
        finish = (wait + self._batch_s) * ADMISSION_MARGIN
        budget = deadline - time.monotonic()
        if finish > budget:
            raise QueueFull(
                f"estimated wait {finish:.2f} s exceeds the request's remaining deadline {max(budget, 0):.2f} s",
                max(1.0, finish - budget),
            )

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._running

    def estimated_wait_s(self) -> float:
        """Seconds before a request queued now starts: until a lane is free (the soonest running batch's
        rest, when every lane is busy), then the batches ahead, shared between the lanes."""
        if self._batch_s is None:
            return 0.0
        rest = 0.0
        busy = self._lanes.running if self._lanes is not None else len(self._running)
        if busy >= self.lanes and self._running:
            now = time.monotonic()
            rest = max(0.0, min(self._batch_s - (now - started) for started in self._running.values()))
        per_batch = max(1.0, min(self._batch_items, float(self.max_batch_size)))
        return rest + len(self._queue) / per_batch * self._batch_s / self.lanes

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for task in [self._task, *self._lane_tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        while self._queue:
            ticket = self._queue.popleft()
            if not ticket.future.done():
                ticket.future.set_exception(Cancelled("server shutting down"))

    # ------------------------------------------------------------------ worker side
    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            lane = None
            if self._lanes is not None:
                lane = self._lanes.acquire()
                if lane is None:
                    await self._lanes.freed()
                    continue
            oldest = self._queue[0]
            # Wait for company until the batch is full or the oldest request's delay bound is reached.
            while not self._full(oldest.bucket):
                remaining = oldest.enqueued_at + self.max_delay_s - time.monotonic()
                if remaining <= 0 or oldest.cancelled:
                    break
                self._arrival.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (stop()).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._arrival.wait()
            batch = self._take(oldest.bucket)
            self._report_depth()
            if self._lanes is not None and lane is not None:
                if not batch:
                    self._lanes.release(lane)
                    continue
                running = asyncio.get_running_loop().create_task(self._execute(batch, lane))
                self._lane_tasks.add(running)
                running.add_done_callback(self._lane_tasks.discard)
            elif batch:
                await self._execute(batch)

    def _full(self, bucket: Hashable) -> bool:
        size = cost = 0
        for ticket in self._queue:
            if ticket.bucket != bucket:
                continue
            size += 1
            cost += ticket.cost
            if size >= self.max_batch_size or (self.max_batch_cost is not None and cost >= self.max_batch_cost):
                return True
        return False

    def _take(self, bucket: Hashable) -> list[Ticket[P, R]]:
        """FIFO tickets of ``bucket`` that fit the size and cost caps; drops dead ones on the way.

        A request that can no longer finish before its deadline (now plus the estimated batch time) is
        dropped here, before it takes a place in the batch: its answer would only be thrown away.

        First in, first out, also under overload. Admission by time (``admit``) keeps only the work that
        can finish within its deadline in the queue, so FIFO serves every admitted request in time.
        Serving newest first (adaptive LIFO) was measured here and starved admitted requests into 504s.
        """
        now = time.monotonic()
        finish = now + (self._batch_s or 0.0)
        batch: list[Ticket[P, R]] = []
        cost = 0
        keep: deque[Ticket[P, R]] = deque()
        while self._queue:
            ticket = self._queue.popleft()
            if ticket.cancelled or ticket.future.done():
                self._drop(ticket, Cancelled("request cancelled before inference"))
                continue
            if ticket.deadline is not None and finish >= ticket.deadline:
                self._drop(ticket, Expired("the request could not finish before its deadline"))
                continue
            fits = len(batch) < self.max_batch_size and (
                not batch or self.max_batch_cost is None or cost + ticket.cost <= self.max_batch_cost
            )
            if ticket.bucket == bucket and fits:
                batch.append(ticket)
                cost += ticket.cost
            else:
                keep.append(ticket)
        self._queue = keep
        return batch

    def _drop(self, ticket: Ticket[P, R], exc: Exception) -> None:
        """Fail a ticket that will not run; its request's handler reports it (and counts the rejection)."""
        if not ticket.future.done():
            ticket.future.set_exception(exc)

    async def _execute(self, batch: list[Ticket[P, R]], lane: int | None = None) -> None:
        key = id(batch)
        self._running[key] = time.monotonic()
        executor = self._lanes.executors[lane] if self._lanes is not None and lane is not None else self._executor
        try:
            ran, results, elapsed = await asyncio.get_running_loop().run_in_executor(executor, self._run_live, batch)
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            error = BatchError(str(exc))
            error.__cause__ = exc
            for ticket in batch:
                if not ticket.future.done():
                    ticket.future.set_exception(error)
            return
        finally:
            del self._running[key]
            if self._lanes is not None and lane is not None:
                self._lanes.release(lane)
        if ran:
            self._observe(len(ran), elapsed)
        for ticket in batch:
            if ticket not in ran:
                if ticket.cancelled:
                    self._drop(ticket, Cancelled("request cancelled before inference"))
                else:
                    self._drop(ticket, Expired("deadline passed while waiting for the device"))
        if not ran:
            return
        if self._observer is not None:
            self._observer.batch(len(ran), sum(t.cost for t in ran), elapsed)
        for ticket, result in zip(ran, results, strict=True):
            ticket.inference_s = elapsed
            ticket.batch_size = len(ran)
            if not ticket.future.done():
                ticket.future.set_result(result)

    def _run_live(self, batch: list[Ticket[P, R]]) -> tuple[list[Ticket[P, R]], list[R], float]:
        """On the executor thread: skip tickets cancelled or expired while the batch waited for the device."""
        started = time.monotonic()
        live = [t for t in batch if not t.cancelled and (t.deadline is None or started < t.deadline)]
        for ticket in live:
            ticket.queue_s = started - ticket.enqueued_at
        _running.tickets = {id(t.payload): t for t in live}
        try:
            results = self._run_split([t.payload for t in live]) if live else []
        finally:
            _running.tickets = {}
        return live, results, time.monotonic() - started

    def _run_split(self, payloads: Sequence[P]) -> list[R]:
        """Run a batch; on out-of-memory, free the cache and run each half (down to single requests)."""
        try:
            results = list(self._run(payloads))
        except Exception as exc:
            if not isinstance(exc, self._oom_errors) or len(payloads) == 1:
                raise
            log.warning("out of memory on a batch of %d; splitting", len(payloads))
            if self._on_oom is not None:
                self._on_oom()
            half = len(payloads) // 2
            return self._run_split(payloads[:half]) + self._run_split(payloads[half:])
        if len(results) != len(payloads):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(payloads)} requests")
        return results

    def _observe(self, size: int, elapsed: float) -> None:
        """Fold one batch's size and run time into the estimates (recent batches weigh most)."""
        if self._batch_s is None:
            self._batch_s, self._batch_items = elapsed, float(size)
            return
        self._batch_s += EWMA_WEIGHT * (elapsed - self._batch_s)
        self._batch_items += EWMA_WEIGHT * (size - self._batch_items)

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.depth(len(self._queue))
