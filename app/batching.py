"""The dynamic batcher: one per model, knows nothing of HTTP or Perceiver.

A batch is cut when it is full (``max_batch_size`` requests or ``max_batch_cost`` input elements) or
when the oldest queued request has waited ``max_delay_s``. Only requests of the oldest request's bucket
(same shape class) join its batch; other buckets wait their turn, oldest first. Batches run on the
executor given (one thread per device), off the event loop. Cancelled or expired requests are dropped
when a batch is formed, before they reach the model. A batch that runs out of memory is split in halves
and retried; any other exception fails that batch's requests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

P = TypeVar("P")
R = TypeVar("R")
log = logging.getLogger("perceiver.batching")


class QueueFull(Exception):
    """The bounded queue is full."""


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


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


class Batcher(Generic[P, R]):
    def __init__(
        self,
        run: Callable[[Sequence[P]], Sequence[R]],
        executor: Executor,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_batch_cost: int | None = None,
        max_queue: int = 256,
        observer: Observer | None = None,
        on_oom: Callable[[], None] | None = None,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_batch_cost = max_batch_cost
        self.max_queue = max_queue
        self._observer = observer
        self._on_oom = on_oom
        self._queue: deque[Ticket[P, R]] = deque()
        self._arrival = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy = False

    # ------------------------------------------------------------------ client side
    def submit(
        self, payload: P, *, cost: int = 1, bucket: Hashable = None, deadline: float | None = None
    ) -> Ticket[P, R]:
        """Queue one request (raises QueueFull); await ``ticket.future`` for its result."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"queue holds {len(self._queue)} requests (max_queue_size {self.max_queue})")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        ticket: Ticket[P, R] = Ticket(payload, cost, bucket, deadline, future)
        self._queue.append(ticket)
        self._arrival.set()
        self._report_depth()
        return ticket

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    def estimated_wait_s(self) -> float:
        """A rough Retry-After: batches ahead times the delay bound, at least one second."""
        batches = len(self._queue) / max(1, self.max_batch_size)
        return max(1.0, batches * max(self.max_delay_s, 0.05))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
            if batch:
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
        """FIFO tickets of ``bucket`` that fit the size and cost caps; drops dead ones on the way."""
        now = time.monotonic()
        batch: list[Ticket[P, R]] = []
        cost = 0
        keep: deque[Ticket[P, R]] = deque()
        while self._queue:
            ticket = self._queue.popleft()
            if ticket.cancelled or ticket.future.done():
                self._drop(ticket, Cancelled("request cancelled before inference"))
                continue
            if ticket.deadline is not None and now >= ticket.deadline:
                self._drop(ticket, Expired("deadline passed while queued"))
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

    async def _execute(self, batch: list[Ticket[P, R]]) -> None:
        self._busy = True
        try:
            ran, results, elapsed = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_live, batch
            )
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            error = BatchError(str(exc))
            error.__cause__ = exc
            for ticket in batch:
                if not ticket.future.done():
                    ticket.future.set_exception(error)
            return
        finally:
            self._busy = False
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
        results = self._run_split([t.payload for t in live]) if live else []
        return live, results, time.monotonic() - started

    def _run_split(self, payloads: Sequence[P]) -> list[R]:
        """Run a batch; on out-of-memory, free the cache and run each half (down to single requests)."""
        try:
            results = list(self._run(payloads))
        except Exception as exc:
            if not is_out_of_memory(exc) or len(payloads) == 1:
                raise
            log.warning("out of memory on a batch of %d; splitting", len(payloads))
            if self._on_oom is not None:
                self._on_oom()
            half = len(payloads) // 2
            return self._run_split(payloads[:half]) + self._run_split(payloads[half:])
        if len(results) != len(payloads):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(payloads)} requests")
        return results

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.depth(len(self._queue))
