"""The dynamic batcher: one per model, knows nothing of HTTP or Perceiver.

A batch is cut when it is full (``max_batch_size`` requests or ``max_batch_cost`` input elements) or
when the oldest queued request has waited ``max_delay_s``. Only requests of the oldest request's bucket
(same shape class) join its batch; other buckets wait their turn, oldest first. Batches run on the
executor given, off the event loop: one at a time, or up to ``lanes`` side by side (CPU models, whose
forward passes scale better side by side on a core each than one at a time on all cores; a GPU takes one
at a time). Requests are served first in, first out, but for a large one (``takes_turns``), which takes turns
with the others, a batch a turn (``_take``). Cancelled or expired requests are dropped
when a batch is formed, before they reach the model. A batch that runs out of memory is split in halves
and retried; any other exception fails that batch's requests only.

Admission is by time (``admit``): from ``ServiceTime``, robust estimates of the seconds per unit of work
that correct themselves from every batch. An idle model admits every request: nothing it has measured can
then make it refuse, so no noisy timing can lock a model out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

P = TypeVar("P")
R = TypeVar("R")
log = logging.getLogger("perceiver.batching")
ADMISSION_MARGIN = 1.2  # forward times vary: admit only what the estimate finishes with 20% to spare, at least
MAX_MARGIN = 4.0  # however late admitted requests ran, an estimate is not multiplied by more (Lateness)
# A request whose own passes, at their fastest measured per-unit times, take more than this times its remaining
# deadline is answered 504 at once (Batcher.admit): twice, so that a slow spell the estimates measured cannot
# refuse what the model would finish.
HOPELESS_FACTOR = 2.0
IDLE_DECAY_STEP_S = 0.5  # while idle, the estimates and the margin decay in steps of at least this (Batcher)
# Own passes past which a request of several batches takes turns with the others, with no queue-delay target
LONG_REQUEST_S = 0.5
# A batch past its estimate is taken to run on for this share of the time it has run so far (``left_s``).
OVERRUN_SHARE = 0.5
Clock = Callable[[], float]


class QueueFull(Exception):
    """The request is refused: the bounded queue is full or its wait is over the target (reason
    ``queue_full``), or it could not finish before its deadline (``deadline``); retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float, reason: str = "queue_full") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


def size_class(units: float) -> int:
    """The power of two at or below ``units`` (at least 1): batches of similar size share an estimate."""
    return 1 << max(0, int(units).bit_length() - 1)


class ServiceTime:
    """Seconds per unit of work (an image, a text window, a flow window, a clip), by batch size class.

    Each class keeps the per-unit times of its last ``window`` batches and answers their median, so that
    no single outlier (a 10,000-mask request, a pass slowed by another process) can make an estimate stick.
    A class starts from the warm-up figure, counted ``seed_weight`` times: two outliers in a row cannot move
    the median, and a real change of speed moves it within a few batches. Its first batch, if faster, replaces
    that figure outright (a busy start's figure is slow; nothing makes a pass faster than the model). While the
    model is idle, every class decays toward its long-run figure, the median of its last ``history`` per-unit
    times (warm-up's seeds among them until real batches replace them), half of the gap per ``half_life_s``:
    what the last burst taught says less and less about the next request, and the long run more. Not toward
    the warm-up figure itself: timed on a busy machine it was 2x the model's speed, and every idle spell brought
    it back. A class that no batch has reached yet is bounded by those that have (``_bound_unseen``).
    """

    def __init__(
        self,
        warm: dict[int, float] | None = None,  # size class → per-unit seconds measured at warm-up
        *,
        window: int = 9,
        seed_weight: int = 3,
        half_life_s: float = 30.0,
        history: int = 64,
    ) -> None:
        seeds = {size_class(k): v for k, v in (warm or {}).items()}
        # A batch's pass is no longer than a larger batch's: a seed taken on a stalled pass (one in several on a
        # busy 2-core machine: fill-mask's batches of 2 at 250 ms an item beside 2 ms for 1 and 4) is cut to that.
        seeds = {k: min([v, *(seeds[m] * m / k for m in seeds if m > k)]) for k, v in seeds.items()}
        self.window, self.half_life_s, self.seed_weight = window, half_life_s, seed_weight
        self.samples: dict[int, deque[float]] = {k: deque([v] * seed_weight, maxlen=window) for k, v in seeds.items()}
        self.history: dict[int, deque[float]] = {k: deque([v] * seed_weight, maxlen=history) for k, v in seeds.items()}
        self._history_len = history
        self.seeds = seeds
        self._unseen = set(seeds)  # classes no batch has reached yet: the reached ones bound their seeds
        # Each class's median and fastest sample, kept up to date as samples come: admission asks on every
        # request (three times: the door, the route, the queue), and a median per ask cost the event loop.
        self._median: dict[int, float] = {}
        self._fastest: dict[int, float] = {}
        for klass in self.samples:
            self._refresh(klass)

    def _refresh(self, klass: int) -> None:
        samples = self.samples[klass]
        self._median[klass] = statistics.median(samples)
        self._fastest[klass] = min(samples)

    @property
    def known(self) -> bool:
        return bool(self.samples)

    def observe(self, units: int, seconds: float) -> None:
        """A batch of ``units`` ran in ``seconds``."""
        if units <= 0 or seconds < 0:
            return
        klass, per_unit = size_class(units), seconds / units
        if klass in self._unseen and per_unit < self._median[klass]:
            # The class's first batch, and faster than warm-up's figure: that figure was a busy start's (a pass
            # slowed by other work; nothing makes a pass faster than the model), so the batch replaces it,
            # counted as the seeds were. Slower, it joins them: two slow passes in a row still cannot move it.
            self.samples[klass] = deque([per_unit] * self.seed_weight, maxlen=self.window)
            self.history[klass] = deque([per_unit] * self.seed_weight, maxlen=self._history_len)
        else:
            self.samples.setdefault(klass, deque(maxlen=self.window)).append(per_unit)
            self.history.setdefault(klass, deque(maxlen=self._history_len)).append(per_unit)
        self._refresh(klass)
        if self._unseen:
            self._unseen.discard(klass)
            self._bound_unseen()

    def _bound_unseen(self) -> None:
        """A class no batch has reached yet is estimated at most as the reached ones allow: per-unit times fall as
        batches grow, and doubling a batch does not make its pass shorter. So its per-unit time is at most a
        smaller reached class's, and at most a larger one's times the ratio of their sizes. Its seed stood before:
        warm-up on a busy machine timed fill-mask's batches of 2 at 145 ms an item, 100x their passes, and real
        traffic seldom makes one."""
        seen = [k for k in self._median if k not in self._unseen]
        for klass in self._unseen:
            bound = min((self._median[k] * (1.0 if k < klass else k / klass) for k in seen), default=math.inf)
            figure = min(self.seeds[klass], bound)
            if figure != self._median[klass]:
                self.samples[klass] = deque([figure] * self.seed_weight, maxlen=self.window)
                self.history[klass] = deque([figure] * self.seed_weight, maxlen=self._history_len)
                self._refresh(klass)

    def long_run(self, klass: int) -> float:
        """The class's long-run per-unit time: the median of its last ``history`` samples and seeds."""
        return statistics.median(self.history[klass])

    def per_unit(self, units: float) -> float | None:
        """Seconds per unit in a batch of about ``units``: its class's median, else the nearest smaller class
        known (per-unit times fall as batches grow: an overestimate), else the nearest larger one."""
        klass = self._class_of(units)
        return None if klass is None else self._median[klass]

    def measured(self, units: float) -> bool:
        """Whether the class that estimates a batch of ``units`` has timed a batch of its own (not warm-up's
        figure alone)."""
        klass = self._class_of(units)
        return klass is not None and klass not in self._unseen

    def least_per_unit(self, units: float, largest: int) -> float | None:
        """The fastest per-unit time a timed batch of ``units`` or more has taken (of ``largest`` or more, where
        ``units`` is larger: no pass is), or None where no such class has timed one. A smaller class's figure is
        no bound: per-unit times fall as batches grow (a 32-item request judged on one item's time was answered
        504 for "at least 0.7 s" and ran 0.22 s; review)."""
        need = size_class(min(units, max(largest, 1)))
        found = [self._fastest[k] for k in self._median if k >= need and k not in self._unseen]
        return min(found) if found else None

    def floor_s(self, units: float) -> float:
        """The least a batch of ``units`` is likely to take: its class's fastest recent per-unit time."""
        klass = self._class_of(units)
        return 0.0 if klass is None else self._fastest[klass] * max(units, 1.0)

    def _class_of(self, units: float) -> int | None:
        """The class whose samples estimate a batch of ``units``: its own, else the nearest known below, else
        the nearest known above; None when nothing is known."""
        if not self.samples:
            return None
        klass = size_class(units)
        if klass in self.samples:
            return klass
        below = [k for k in self.samples if k <= klass]
        return max(below) if below else min(self.samples)

    def batch_s(self, units: float) -> float:
        """Seconds a batch of ``units`` is expected to run (0 when nothing is known yet)."""
        per_unit = self.per_unit(units)
        return 0.0 if per_unit is None else per_unit * max(units, 1.0)

    def decay(self, idle_s: float) -> None:
        """The model was idle for ``idle_s``: move every class toward its long-run figure."""
        if idle_s <= 0:
            return
        keep = 0.5 ** (idle_s / self.half_life_s)
        for klass, samples in self.samples.items():
            target = self.long_run(klass)
            decayed = [target + (x - target) * keep for x in samples]
            samples.clear()
            samples.extend(decayed)
            self._refresh(klass)

    def summary(self) -> dict[str, float]:
        """Per-unit milliseconds by size class, as admission uses them now (for /v1/models)."""
        return {str(k): round(self._median[k] * 1000, 3) for k in sorted(self.samples)}


class Lateness:
    """How much longer admitted requests took than admission estimated, and so the margin it multiplies its
    estimates by: the ``quantile`` of the last ``window`` ratios (the time from queueing to the answer, or to the
    drop of one that expired, over the estimate it was admitted on), never under ``floor`` nor over ``ceiling``,
    and never the largest alone: up to 100 ratios that is the second largest (the 98th percentile of a full
    window of 64).

    Only requests whose estimate was at least ``at_risk`` of their remaining budget count: one that had time to
    spare says nothing about the deadlines admission protects (a small estimate missed by a GIL pause is a large
    ratio of no consequence). A ratio counts at most ``ceiling`` and for ``horizon_s``: a high margin admits few
    requests that could count (none at 4x), so it must not outlive what set it; one that expired is as late as
    when it was dropped, and tells nothing when that is still within its estimate (admitted by an idle model).

    The median per-unit time is right on average, and forward passes spread: with two busy loops coming and going
    on 2 cores, passes took up to 2.5x their median, and at a fixed 20% 15-22% of the requests admitted at 30x
    overload with 1 s deadlines expired (1.6-3.3% with this margin). While the model is idle the ratios decay
    toward 1 with the estimates (``decay``): the next burst may find the machine quiet.
    """

    def __init__(
        self,
        *,
        floor: float = ADMISSION_MARGIN,
        ceiling: float = MAX_MARGIN,
        window: int = 64,
        quantile: float = 0.98,
        least: int = 8,
        at_risk: float = 0.25,
        horizon_s: float = 60.0,
    ) -> None:
        self.floor, self.ceiling, self.quantile, self.least, self.at_risk = floor, ceiling, quantile, least, at_risk
        self.horizon_s = horizon_s
        self.ratios: deque[tuple[float, float]] = deque(maxlen=window)  # (when, ratio)
        self.margin = floor

    def observe(
        self, estimated_s: float, budget_s: float | None, took_s: float, now: float, expired: bool = False
    ) -> None:
        """An admitted request estimated at ``estimated_s`` of its ``budget_s`` (None: no deadline) took ``took_s``
        (``expired``: at least that; it was dropped)."""
        if budget_s is None or estimated_s <= 0 or estimated_s < self.at_risk * budget_s:
            return
        if expired and took_s <= estimated_s:
            return
        self.ratios.append((now, min(self.ceiling, took_s / estimated_s)))
        self._refresh()

    def margin_at(self, now: float) -> float:
        """The margin, once ratios older than ``horizon_s`` have gone."""
        if self.ratios and now - self.ratios[0][0] > self.horizon_s:
            while self.ratios and now - self.ratios[0][0] > self.horizon_s:
                self.ratios.popleft()
            self._refresh()
        return self.margin

    def _refresh(self) -> None:
        if len(self.ratios) < self.least:
            self.margin = self.floor
            return
        ordered = sorted(r for _, r in self.ratios)  # never the largest alone: one outlier cannot set the margin
        found = ordered[min(len(ordered) - 2, int(self.quantile * len(ordered)))]
        self.margin = min(self.ceiling, max(self.floor, found))

    def decay(self, keep: float) -> None:
        """An idle spell: every ratio keeps ``keep`` of its distance from 1."""
        self.ratios = deque(((t, 1.0 + (r - 1.0) * keep) for t, r in self.ratios), maxlen=self.ratios.maxlen)
        self._refresh()


@dataclass(frozen=True)
class AdmissionState:
    """What admission decides from: taken by ``Batcher.admission_state``, and read by front-end processes from
    the model process's shared table (app/channel.py), where ``rest_s`` is then as of when it was written."""

    idle: bool  # nothing queued and a lane free: every request is admitted
    queue_len: int
    known: bool  # any per-unit estimate yet
    rest_s: float  # until a lane frees, when every lane is busy: the soonest running batch's rest
    queued_s: float  # the queued work, shared between the lanes
    batch_s: float  # a batch of one item
    unit_s: float = 0.0  # one more queued unit's share of the queued work, at the full batch's per-unit time
    margin: float = ADMISSION_MARGIN  # what estimates are multiplied by (Lateness)
    free_units: int = 0  # lanes the work ahead leaves free: while any is, a request starts at once (no queue wait)
    beside_s: float = 0.0  # a request of several batches: the other requests' batches between its first and last

    def with_decoding(self, units: int) -> AdmissionState:
        """As if ``units`` more were admitted and decoding ahead (a front end's door: the decodes of every front
        end, which the model process does not see). Each costs ``unit_s``: the per-unit time of a full batch, the
        cheapest, so the door never refuses what the model process would admit on that count; with the same
        per-unit time at every batch size it is exactly what ``Batcher.reserve`` adds in one process."""
        if units <= 0:
            return self
        return replace(
            self,
            idle=False,
            queue_len=self.queue_len + units,
            queued_s=self.queued_s + units * self.unit_s,
            free_units=max(0, self.free_units - units),  # each holds a free lane
        )

    @property
    def queue_wait_s(self) -> float:
        """The queued work's share of the wait: none while the work ahead leaves a lane free."""
        return 0.0 if self.free_units else self.queued_s

    @property
    def wait_s(self) -> float:
        return self.rest_s + self.queue_wait_s

    def refusal(
        self,
        deadline: float | None,
        now: float,
        max_queue: int,
        max_queue_delay_s: float | None,
        rest: float | None = None,
        own_s: float | None = None,
    ) -> tuple[str, float, str] | None:
        """None (admit), or why not: (message, retry-after seconds, reason). ``rest`` replaces ``rest_s``;
        ``own_s``, the request's own forward pass once its size is known, replaces one item's ``batch_s``."""
        if self.idle:
            return None
        wait = (self.rest_s if rest is None else rest) + self.queue_wait_s
        if self.queue_len >= max_queue:
            return f"queue holds {self.queue_len} requests (max_queue_size {max_queue})", max(1.0, wait), "queue_full"
        if not self.known:
            return None
        if max_queue_delay_s is not None and wait > max_queue_delay_s:
            return (
                f"estimated queue wait {wait:.2f} s exceeds max_queue_delay ({max_queue_delay_s:.2f} s)",
                max(1.0, wait - max_queue_delay_s),
                "queue_full",
            )
        if deadline is None:
            return None
        own = self.batch_s if own_s is None else own_s
        finish = (wait + self.beside_s + own) * self.margin
        budget = deadline - now
        if finish > budget:
            message = f"estimated wait {finish:.2f} s exceeds the request's remaining deadline {max(budget, 0):.2f} s"
            if own * self.margin > budget:  # no wait would do: a client retrying it as it is never gets in (audit)
                message += (
                    f"; its own forward passes alone take about {own:.2f} s, so send it with a longer deadline "
                    "(x-request-timeout-ms, or the gRPC call's)"
                )
            return message, max(1.0, finish - budget), "deadline"
        return None


@dataclass
class Flows:
    """The queue by flow, as admission reads it (``Batcher._flows``)."""

    costs: list[int]  # the short requests' tickets' costs, a new one-item request's last
    buckets: list[Hashable]  # and their shape buckets
    short_s: float = 0.0  # the short requests' queued work
    short_batch_s: float = 0.0  # their next batch
    # each large request's batches in the order they will run (seconds each), and its deadline
    large: dict[int, tuple[list[float], float | None]] = field(default_factory=dict)
    rounds: int = 0  # the short requests' batches, a new one-item request's the last
    # each large request with a deadline: (deadline, its work and the others' before its last batch, its batches,
    # its next batch)
    promised: list[tuple[float, float, int, float]] = field(default_factory=list)


class Batch:
    """A batch as its forward pass sees it while it runs: which of its requests still wait for an answer.

    Forward passes made of several passes (long texts, flow windows, video clips) and answers that take long
    to build check between steps and skip the work of requests that have ended (deadline passed, client
    gone): their answer would be thrown away. ``Batch()`` (warm-up, benchmarks) has every request wanted.
    """

    def __init__(self, tickets: Sequence[Ticket[Any, Any]] = (), clock: Clock = time.monotonic) -> None:
        self.tickets, self._clock = tickets, clock

    def ended(self, index: int) -> bool:
        """Whether request ``index`` of the batch has ended (False outside a batcher)."""
        if index >= len(self.tickets):
            return False
        ticket = self.tickets[index]
        return ticket.cancelled or (ticket.deadline is not None and self._clock() >= ticket.deadline)

    def passes(self, owners: Sequence[int], per_pass: int) -> Iterator[list[int]]:
        """Indices of ``owners`` (the request of each unit of work), ``per_pass`` at a time, in order; before
        each pass, the units of requests that have ended are left out (a pass left empty is skipped)."""
        for first in range(0, len(owners), per_pass):
            ended = {i for i in set(owners[first : first + per_pass]) if self.ended(i)}
            chunk = [j for j in range(first, min(first + per_pass, len(owners))) if owners[j] not in ended]
            if chunk:
                yield chunk


EVERY = Batch()  # outside a batcher: every request is wanted


class Hopeless(Exception):
    """The request could not finish within its deadline even at the model's fastest measured speed."""


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
    enqueued_at: float
    units: int = 1  # forward-pass items: what admission's time estimates count
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0
    cancelled: bool = False
    estimated_s: float = 0.0  # admission's estimate of its time to the answer (0: not the item admission asked)
    budget_s: float | None = None  # the time left before its deadline when it was queued
    timing: bool = False  # the batcher's own pass (``reseed``), no request's: in no metric
    flow: int = 0  # whose turns it runs in: 0, every request but the large ones (first in, first out); else its own
    seq: int = 0  # its place in the order tickets were queued
    on_cancel: Callable[[], None] | None = None  # the batcher's, once queued: what it reads of its queue is stale

    def cancel(self) -> None:
        """Drop the request if it has not reached the model yet."""
        if not self.cancelled and self.on_cancel is not None:
            self.on_cancel()
        self.cancelled = True


def left_s(started: float, expected_s: float, now: float) -> float:
    """The seconds a batch that started at ``started``, estimated at ``expected_s``, has still to run: the rest of
    its estimate, and at least ``OVERRUN_SHARE`` of the time it has run so far. Past its estimate it is still
    running, and the longer it has overrun the longer it is likely to run on: read as ending now, a heavy batch
    2.5-4x over its estimate (two side by side on two cores) let short requests in behind it for seconds, and
    they expired after admission (audit: 15 and 17 x 504 in 45 s)."""
    elapsed = max(0.0, now - started)
    return max(expected_s - elapsed, OVERRUN_SHARE * elapsed)


class Lanes:
    """Single-thread executors on which batches (of any model) run side by side, at most one per lane.

    The lowest free lane is taken first, so that one batch at a time always runs on the same thread: each
    thread that runs torch keeps its own OpenMP team, and a team left idle spins for a while after its last
    parallel region, against the team in use (alternating two threads made small forward passes 15% slower).

    A lane released while batchers wait is handed to the one that has waited longest: first come, first served
    between models. When every waiter woke to race for it, the batcher that won re-registered first each time (it
    runs on without yielding), and kept the lanes for as long as it had a backlog: another model's requests
    waited until they expired. Each lane also notes when its batch should end, so that a model's admission
    counts the lanes that other models' batches hold.
    """

    def __init__(self, count: int, prefix: str = "inference-lane") -> None:
        self.executors = [ThreadPoolExecutor(1, thread_name_prefix=f"{prefix}-{i}") for i in range(count)]
        self._busy = [False] * count
        # each lane's batch: when it started and its estimated seconds (its batcher's clock)
        self._batches: list[tuple[float, float] | None] = [None] * count
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()

    def __len__(self) -> int:
        return len(self.executors)

    def acquire(self) -> int | None:
        """The lowest free lane, now taken; None when every lane is busy or others wait for one already."""
        if any(not w.done() for w in self._waiters):
            return None  # theirs first
        for lane, busy in enumerate(self._busy):
            if not busy:
                self._busy[lane] = True
                return lane
        return None

    def release(self, lane: int) -> None:
        """Hand the lane to the longest waiter, or free it."""
        self._batches[lane] = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(lane)  # still busy: it is the waiter's now
                return
        self._busy[lane] = False

    async def turn(self) -> int:
        """A lane, once one is handed to this caller (after those who asked before it)."""
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:  # stop() while waiting: a lane handed over meanwhile goes to the next
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise

    def note_batch(self, lane: int, started: float, expected_s: float) -> None:
        self._batches[lane] = (started, expected_s)

    def rest(self, now: float) -> float:
        """Until the first lane frees, when every lane is busy: the soonest end among the lanes' batches, of
        any model (0 when a lane is free, or one holds no batch yet; ``left_s`` past an estimate)."""
        if not all(self._busy):
            return 0.0
        batches = [batch for batch in self._batches if batch is not None]
        if len(batches) < len(self._batches):
            return 0.0
        return min(left_s(started, expected, now) for started, expected in batches)

    @property
    def running(self) -> int:
        return sum(self._busy)

    def shutdown(self) -> None:
        for executor in self.executors:
            executor.shutdown(wait=True, cancel_futures=True)


class SharedThread:
    """The batches of several models that one executor thread runs one after another (the inference thread: GPU
    models, and CPU models off the lanes), as each model's admission must count them.

    A model sees its own batches only. While another model's long batch held the thread, it looked idle, admitted
    every request, and its batches then waited behind that one in the executor's queue: with a flow client at one
    request at a time, 59-85% of fill-mask's requests with 0.3-1 s deadlines expired (audit). Each batch is noted
    here from when it is handed to the thread (its expected seconds) and from when it starts; the others' work
    left is ahead of a model's next batch, and a model is idle only while no other model's batch holds the thread.
    """

    def __init__(self) -> None:
        self._work: dict[int, list[Any]] = {}  # batch key → [its batcher, expected seconds, started at or None]

    def add(self, key: int, owner: object, expected_s: float) -> None:
        self._work[key] = [owner, expected_s, None]

    def start(self, key: int, now: float) -> None:
        """On the thread, as the batch starts (one store: the event loop reads the list as a whole)."""
        entry = self._work.get(key)
        if entry is not None:
            entry[2] = now

    def remove(self, key: int) -> None:
        self._work.pop(key, None)

    def others(self, owner: object, now: float) -> tuple[bool, float]:
        """Whether batches of models other than ``owner`` hold or wait for the thread, and their seconds left."""
        busy, left = False, 0.0
        for who, expected, started in list(self._work.values()):
            if who is not owner:
                busy = True
                left += expected if started is None else left_s(started, expected, now)
        return busy, left


class Batcher(Generic[P, R]):
    def __init__(
        self,
        run: Callable[[Sequence[P], Batch], Sequence[R]],
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
        service_time: ServiceTime | None = None,
        bucket_times: dict[Hashable, ServiceTime] | None = None,
        home_bucket: Hashable = None,
        clock: Clock = time.monotonic,
        on_change: Callable[[], None] | None = None,
        prepare: Callable[[Sequence[P]], Sequence[P]] | None = None,
        prepare_executor: Executor | None = None,
        shared: SharedThread | None = None,
    ) -> None:
        self._run = run
        # the executor's one thread is other models' too (not with lanes, which count every model's batches)
        self._shared = shared if not isinstance(executor, Lanes) else None
        # A stage ahead of the forward pass (one executor only, not lanes): each batch's inputs are prepared (a
        # batch's JPEGs decoded on the GPU) on ``prepare_executor`` while the batch before it runs.
        self._prepare = prepare if prepare_executor is not None and not isinstance(executor, Lanes) else None
        self._prepare_executor = prepare_executor
        self._ahead: list[Ticket[P, R]] = []  # the batch taken and preparing while the one before it runs
        self._ahead_units = 0
        self._ahead_bucket: Hashable = None
        self._current: asyncio.Task[None] | None = None  # the batch running (or waiting for its preparation)
        self._pipeline_end: float | None = None  # when the last batch prepared ahead ended its forward pass
        self.on_change = on_change  # after every change of what admission decides from (app/channel.py)
        self._pending = 0  # requests admitted that are still reading or decoding their inputs (``reserve``)
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
        self._clock = clock
        self._queue: deque[Ticket[P, R]] = deque()
        self._queued_by_bucket: dict[Hashable, int] = {}  # the queued units of each shape bucket
        # Turns: batches form in turn for the requests of one batch or less (flow 0, first in, first out) and for
        # each request of more (a flow of its own), a batch each (``flow``).
        self._turns: deque[int] = deque()  # the flows with queued tickets, the next batch's first
        self._flow_tickets: dict[int, int] = {}  # queued tickets of each flow
        self._flow_ids = itertools.count(1)
        self._last_turn: int | None = None  # the flow whose batch formed last
        self._seq = itertools.count()
        self._flow_since: dict[int, int] = {}  # each large request's first ticket's ``seq``
        # each large request's shape buckets of which a whole batch of its own has run and been timed
        self._flow_timed: dict[int, set[Hashable]] = {}
        self._version = 0  # moves with the queue and the estimates: ``_flows`` is read again only then
        self._view: tuple[tuple[int, int], Flows] | None = None
        self._arrival = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lane_tasks: set[asyncio.Task[None]] = set()
        # Admission by time: the estimates of the shape bucket warm-up timed first (``home_bucket``: the shortest
        # texts), and each other bucket's (``bucket_times``: longer texts, autoencode's reconstructions), seeded by
        # warm-up and learned from its batches. One table for all costed a 2,048-byte text window as a 64-byte
        # one: a request of 4,000 such windows was estimated at 2.2 s and ran 12 s (audit).
        self.service_time = service_time or ServiceTime()
        self.bucket_times: dict[Hashable, ServiceTime] = dict(bucket_times or {})
        self.home_bucket = home_bucket
        self._hopeless_probe = -math.inf  # when an idle model last ran a request its estimates called hopeless
        self._reseed_task: asyncio.Task[None] | None = None
        self.lateness = Lateness()  # how late what it admitted ran: admission's margin
        self._running: dict[int, tuple[float, float]] = {}  # batches running: id → (start, expected seconds)
        self._idle_since: float | None = clock()

    # ------------------------------------------------------------------ client side
    def submit(
        self,
        payload: P,
        *,
        cost: int = 1,
        bucket: Hashable = None,
        deadline: float | None = None,
        units: int = 1,
        admit: bool = True,
        items: Sequence[int] | None = None,
        item_buckets: Sequence[Hashable] | None = None,
        item_costs: Sequence[int] | None = None,
        flow: int | None = None,
    ) -> Ticket[P, R]:
        """Queue one request (raises QueueFull); await ``ticket.future`` for its result. ``admit=False``: the
        request was admitted already (the second and later items of one request are not asked again); ``items``:
        the units of each item of the request this one begins, when it has several (its own passes are theirs),
        and ``item_buckets`` and ``item_costs`` their shape buckets and costs. ``flow``: the first item's (the
        later items of a request run in its turns); None: the request this one begins takes turns of its own if it
        is a large one (``takes_turns``)."""
        units_ = items or [max(1, units)]
        buckets = item_buckets or [bucket] * len(units_)
        turns = self.takes_turns(units_, buckets, item_costs or [cost] * len(units_)) if flow is None else 0
        # joining the queue now: the requests still decoding will join it after this one
        estimated = 0.0
        if admit:
            estimated = self.admit(deadline, decoding_ahead=False, units=units_, buckets=buckets, turns=turns)
        if flow is None:
            flow = next(self._flow_ids) if turns else 0
        self._wake()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        now = self._clock()
        ticket: Ticket[P, R] = Ticket(payload, cost, bucket, deadline, future, now, max(1, units), flow=flow)
        ticket.estimated_s, ticket.budget_s = estimated, None if deadline is None else deadline - now
        self._enqueue(ticket)
        self._report_depth()
        return ticket

    def _enqueue(self, ticket: Ticket[P, R]) -> None:
        ticket.seq = next(self._seq)
        ticket.on_cancel = self._changed
        self._version += 1
        self._queue.append(ticket)
        self._queued_by_bucket[ticket.bucket] = self._queued_by_bucket.get(ticket.bucket, 0) + ticket.units
        if not self._flow_tickets.get(ticket.flow):
            if ticket.flow:  # a large request: behind every flow, and after the requests queued before it
                self._flow_since[ticket.flow] = ticket.seq
                self._turns.append(ticket.flow)
            else:  # the requests of one batch: before the flow whose batch ran last
                last = len(self._turns) - 1 if self._turns and self._turns[-1] == self._last_turn else len(self._turns)
                self._turns.insert(last, 0)
        self._flow_tickets[ticket.flow] = self._flow_tickets.get(ticket.flow, 0) + 1
        self._arrival.set()

    def _changed(self) -> None:
        self._version += 1

    def reserve(self, units: int = 1) -> Callable[[], None]:
        """An admitted request whose inputs wait for a decode thread or decode: it counts as ``units`` of queued
        work until it is queued (or ends), when the returned function is called (once; later calls do nothing).
        Only from when its body is in: an upload still arriving holds nothing (slow clients would otherwise
        refuse everyone else for as long as they trickle).

        Uncounted, a burst of uploads was all admitted while the queue was short, then waited for the decode
        threads in a queue no estimate saw: at 30x autoencode's capacity its answers took 13 s (0.5 s of it in
        the batcher's queue), and the 429s of those it refused once decoded came after 6-12 s."""
        self._pending += units
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._pending -= units

        return release

    def admit(
        self,
        deadline: float | None,
        decoding_ahead: bool = True,
        units: Sequence[int] | None = None,
        buckets: Sequence[Hashable] | None = None,
        turns: int = 0,
    ) -> float:
        """Refuse at the door (QueueFull) a request that the queue cannot hold or could not finish in time; else
        return the estimate it is admitted on (seconds until its answer, before the margin).
        ``decoding_ahead``: the requests still decoding (``reserve``) count as ahead of this one, as they are of
        one that is yet to decode; not of one that joins the queue now, before them. ``units``: the units of each of
        its items, once decoded (its own passes are then estimated at that size, not at one item's),
        ``buckets`` their shape buckets (a long text's windows at the long texts' per-unit time), and ``turns`` the
        batches of a large request (``takes_turns``: it takes turns with the others, and waits as they make it).

        A request whose own passes, at the fastest per-unit times its size classes have measured, would take more
        than ``HOPELESS_FACTOR`` times its remaining deadline is answered 504 at once (``Hopeless``), idle model or
        not: run, it held the model until its deadline for a 504 all the same, while every other request was
        refused (audit: a client looping 4,000-window requests with 5 s deadlines, 0 answered, 68% of the
        others refused). Measured only: warm-up's figures alone never refuse a request at an idle model, and an
        idle model runs one such request every half-life all the same (the measurements could be stale).

        An idle model (nothing queued, and a lane free) admits every request: it would start at once, so
        the worst that can happen is its own 504, and no estimate, however wrong, can refuse it.

        Otherwise admission is by time as well as by count: a request whose estimated wait plus its own
        forward pass exceeds its remaining deadline would only expire in the queue (a 504 after using a
        slot), so it gets a 429 at once with an honest Retry-After: when the queue ahead will have drained
        enough. A queue-delay target (``max_queue_delay_s``, as CoDel keeps a target for the standing
        queue) keeps the queue short even when deadlines are long: a standing queue adds latency and no
        throughput. The arithmetic is ``AdmissionState.refusal``'s, which front-end processes run on a
        snapshot of this state. Its margin is learned (``Lateness``): how much longer than their estimates the
        requests it admitted took.
        """
        self._decay_idle()
        own = None if units is None else self.own_s(units, buckets)
        if units is not None and deadline is not None:
            least = self.least_s(units, buckets)
            now = self._clock()
            budget = deadline - now
            if least is not None and least > HOPELESS_FACTOR * budget:
                # An idle model still runs one such request a half-life: measured on a busy machine, the fastest
                # times could be several times the model's, and with nothing run nothing would correct them.
                if self._idle_now(decoding_ahead) and now - self._hopeless_probe >= self.service_time.half_life_s:
                    self._hopeless_probe = now
                else:
                    raise Hopeless(
                        f"this request needs at least {least:.1f} s of the model ({sum(units)} forward-pass items), "
                        f"more than twice its remaining deadline ({max(budget, 0.0):.1f} s); send it with a longer "
                        "deadline (x-request-timeout-ms, or the gRPC call's; up to the server's request timeout) or in "
                        "smaller requests"
                    )
        if self._idle_now(decoding_ahead):
            return self.service_time.batch_s(1) if own is None else own
        state = self.admission_state(decoding_ahead, turns)
        refusal = state.refusal(deadline, self._clock(), self.max_queue, self.max_queue_delay_s, own_s=own)
        if refusal is not None:
            raise QueueFull(*refusal)
        endangered = self._endangers(
            state.batch_s if own is None else own, turns, self._pending if decoding_ahead else 0
        )
        if endangered is not None:
            raise QueueFull(*endangered)
        return state.wait_s + state.beside_s + (state.batch_s if own is None else own)

    def own_s(self, items: Sequence[int], buckets: Sequence[Hashable] | None = None) -> float:
        """The forward passes of a request of ``items`` (each item's units; ``buckets``, their shape buckets): one
        item's units run in its batch's passes; several items fill batches of up to max_batch_size, side by side on
        the lanes, a batch for each bucket. A 32-image request was admitted on one image's pass (0.15 s, against
        2 s on two lanes) and expired (audit)."""
        own = self._own(items, buckets, floor=False)
        assert own is not None
        return own

    def least_s(self, items: Sequence[int], buckets: Sequence[Hashable] | None = None) -> float | None:
        """``own_s`` at the fastest per-unit times recently measured; None where a size class it needs has only
        warm-up's figure."""
        return self._own(items, buckets, floor=True)

    def _own(self, items: Sequence[int], buckets: Sequence[Hashable] | None, *, floor: bool) -> float | None:
        groups: dict[Hashable, list[int]] = {}
        for item, bucket in zip(items, buckets or [self.home_bucket] * len(items), strict=True):
            groups.setdefault(bucket, []).append(item)
        total = 0.0
        for bucket, group in groups.items():
            table = self.times(bucket)
            batches = -(-len(group) // self.max_batch_size)
            rounds = -(-batches // self.lanes)
            per_batch = (sum(group) or 1) / batches
            if floor:
                per_unit = table.least_per_unit(per_batch, self.max_batch_size)
                if per_unit is None:
                    return None
                total += rounds * per_unit * per_batch
            else:
                total += rounds * table.batch_s(per_batch)
        return total

    def times(self, bucket: Hashable) -> ServiceTime:
        """The estimates for batches of ``bucket``: its own once it has any, else the home bucket's."""
        table = self.bucket_times.get(bucket) if bucket != self.home_bucket else None
        return self.service_time if table is None or not table.known else table

    def _learner(self, bucket: Hashable) -> ServiceTime:
        """The table a batch of ``bucket`` teaches: its own (made at its first batch), the home bucket's for it."""
        if bucket == self.home_bucket:
            return self.service_time
        table = self.bucket_times.get(bucket)
        if table is None:
            home = self.service_time
            table = self.bucket_times[bucket] = ServiceTime(
                window=home.window, seed_weight=home.seed_weight, half_life_s=home.half_life_s
            )
        return table

    def _tables(self) -> list[ServiceTime]:
        return [self.service_time, *self.bucket_times.values()]

    def admission_state(self, decoding_ahead: bool = True, turns: int = 0) -> AdmissionState:
        """What admission decides from, now (``decoding_ahead``: as ``admit``'s). ``turns``: for a large request
        (``takes_turns``) of that many batches, what the others' queued turns add between its first batch and its
        last (``beside_s``); the rest is every request's (the door's view). The short requests still to come cannot
        make it late: they are refused once they would (``_endangers``)."""
        self._decay_idle()
        idle = self._idle_now(decoding_ahead)
        pending = self._pending if decoding_ahead else 0
        now = self._clock()
        rest, others_busy = self._rest_s(now)
        free = 0 if others_busy else self.lanes - self._busy_lanes()
        # a batch preparing is still work ahead of a new request, and so is one still decoding (``reserve``), each
        # bucket's units at its own per-unit time; the queue's as the turns will run it (``_ahead_s``)
        queued = sum(self._queued_by_bucket.values()) + self._ahead_units + pending
        queued_s = beside_s = 0.0
        if queued:
            queued_s, beside_s = self._ahead_s(pending, turns)
        # Lanes the work ahead leaves free (each unit ahead taken to hold one): a request then starts at once,
        # beside it. Shared out over the lanes instead, one flow request decoding made the next wait half a
        # window's time (0.7-1.7 s, over the queue-delay target): at an idle server the second of two flow
        # requests was always refused (audit).
        return AdmissionState(
            idle,
            len(self._queue) + len(self._ahead) + pending,
            self.service_time.known,
            rest,
            queued_s / self.lanes,
            self.service_time.batch_s(1),
            (self.service_time.per_unit(self.max_batch_size) or 0.0) / self.lanes,
            self.lateness.margin_at(now),
            max(0, free - queued) if self._prepare is None else 0,
            beside_s / self.lanes,
        )

    def _rest_s(self, now: float) -> tuple[float, bool]:
        """Seconds before a lane is free for this model's next batch, and whether other models' batches hold or
        wait for its thread (they go first)."""
        rest, others_busy = 0.0, False
        if self._lanes is not None:  # the lanes are every CPU model's: another's batches hold them too
            rest = self._lanes.rest(now)
        elif self._busy_lanes() >= self.lanes and self._running:
            rest = min(left_s(started, expected, now) for started, expected in self._running.values())
        if self._shared is not None:  # the thread is other models' too: their batches first
            others_busy, others_left = self._shared.others(self, now)
            rest += others_left
        return rest, others_busy

    def _work_s(self, work: dict[Hashable, int]) -> float:
        """Seconds of queued work: each bucket's units in batches of up to max_batch_size, at their per-unit time."""
        return sum(
            units * (self.times(bucket).per_unit(min(units, self.max_batch_size)) or 0.0)
            for bucket, units in work.items()
            if units > 0
        )

    def _ahead_s(self, pending: int, turns: int = 0) -> tuple[float, float]:
        """The work ahead of a new request in the turns ``_take`` gives, and (``turns``: a large request of that
        many batches) the other flows' batches between its first batch and its last, queued now.

        The requests of one batch take their turns together, first in, first out: a new one waits for them all,
        and for a batch of each large request per batch of theirs (one fewer for a large request whose turn comes
        after theirs). A large request's first batch waits for as much (it goes after the requests queued before
        it), then each of its batches for one of each other large request."""
        ahead = {self._ahead_bucket: self._ahead_units} if self._ahead_units else {}
        if not turns and not self._large_queued():  # first in, first out
            work = dict(self._queued_by_bucket)
            for bucket, units in [*ahead.items(), (self.home_bucket, pending)]:
                work[bucket] = work.get(bucket, 0) + units
            return self._work_s(work), 0.0
        view = self._flows(pending)
        rounds = view.rounds  # the short ones' batches, a new one's the last
        order = [f for f in self._turns if self._flow_tickets.get(f)]
        if 0 not in order:  # where the short ones' turn would come: before the flow whose batch ran last
            order.insert(len(order) - 1 if order and order[-1] == self._last_turn else len(order), 0)
        before = set(order[: order.index(0)])
        queued = self._work_s(ahead) + view.short_s
        beside = 0.0
        for flow, (times, _) in view.large.items():
            ahead_of_it = rounds if flow in before else rounds - 1  # its batches before the new request's
            queued += sum(times[:ahead_of_it])
            beside += sum(times[ahead_of_it : ahead_of_it + max(0, turns - 1)])
        return queued, beside if turns else 0.0

    def _flows(self, pending: int) -> Flows:
        """The queue by flow, for admission: the short requests' work (``pending`` units decoding among them) and
        their costs and buckets with a new one-item request's last; each large request's work, next batch and
        deadline. Kept until the queue or the estimates change: under overload most requests are refused, and
        the queue they were refused on is the next one's (0.2 ms a request with a large one queued, read anew)."""
        if self._view is not None and self._view[0] == (self._version, pending):
            return self._view[1]
        view = Flows([1] * (pending + 1), [self.home_bucket] * (pending + 1))
        short: dict[Hashable, int] = {self.home_bucket: pending}
        first: list[Any] | None = None  # the short requests' next batch: [bucket, tickets, cost, units]
        tickets: dict[int, list[Ticket[P, R]]] = {}  # each large request's, in queue order
        oldest = None  # the first short request's place in the queue
        for ticket in self._queue:
            if ticket.future.done() or ticket.cancelled:
                continue
            if ticket.flow:
                tickets.setdefault(ticket.flow, []).append(ticket)
                continue
            if oldest is None:
                oldest = ticket.seq
            short[ticket.bucket] = short.get(ticket.bucket, 0) + ticket.units
            view.costs.append(ticket.cost)
            view.buckets.append(ticket.bucket)
            if first is None:
                first = [ticket.bucket, 0, 0, 0]
            if ticket.bucket == first[0] and self._fits(first[1], first[2], ticket.cost):
                first[1], first[2], first[3] = first[1] + 1, first[2] + ticket.cost, first[3] + ticket.units
        bucket, _, _, units = first or [self.home_bucket, 0, 0, min(pending, 1)]
        view.short_s = self._work_s(short)
        view.short_batch_s = self.times(bucket).batch_s(units) if units else 0.0
        for flow, queued in tickets.items():
            view.large[flow] = (self._batch_times(queued), queued[0].deadline)
        view.rounds = sum(self._batch_counts(view.costs, view.buckets).values())
        # each large request's remaining work and the others' before its last batch: all the short requests' while
        # its turns have not begun (they go first, ``_head``), else one of their batches per batch of its own
        for flow, (times, deadline) in view.large.items():
            if deadline is None or not times:
                continue
            batches = len(times)
            waiting = oldest is not None and self._flow_since.get(flow, -1) > oldest
            shorts = view.short_s if waiting else min(view.short_s, batches * view.short_batch_s)
            others = sum(sum(other[:batches]) for f, (other, _) in view.large.items() if f != flow)
            view.promised.append((deadline, sum(times) + shorts + others, batches, times[0]))
        self._view = ((self._version, pending), view)
        return view

    def _batch_times(self, tickets: Sequence[Ticket[P, R]]) -> list[float]:
        """The estimated seconds of each batch one flow's tickets make, in the order ``_take`` forms them: the
        first ticket's bucket, with the tickets of that bucket that fit, then again. Each large request's batches
        were all taken to cost its next one's: with a 10 ms batch next and a 1 s one after it, a short request was
        admitted on 0.05 s and expired (review)."""
        times: list[float] = []
        left = list(tickets)
        while left:
            bucket, size, cost, units = left[0].bucket, 0, 0, 0
            rest: list[Ticket[P, R]] = []
            for at, ticket in enumerate(left):
                if size >= self.max_batch_size:  # full: the others wait for the next batches
                    rest += left[at:]
                    break
                if ticket.bucket == bucket and self._fits(size, cost, ticket.cost):
                    size, cost, units = size + 1, cost + ticket.cost, units + ticket.units
                else:
                    rest.append(ticket)
            times.append(self.times(bucket).batch_s(units))
            left = rest
        return times

    def _large_queued(self) -> bool:
        return any(n for flow, n in self._flow_tickets.items() if flow)

    def _endangers(self, own: float, turns: int, pending: int) -> tuple[str, float] | None:
        """Why a new request would make a large request admitted before it miss its deadline (and when to retry),
        or None. Admitted, a large request was promised its deadline; first in, first out kept the promise, turns
        keep it only while it has time to spare: a request that would take the last of it is refused (review: a
        large request with 4 s of passes and a 6 s deadline, admitted at an idle model, was held past its deadline
        by the short requests that came after it). ``own``, ``turns``: the new request's passes and, for a large
        one, its number of batches; ``pending``: the units decoding ahead of it (as ``admission_state``'s)."""
        if not self._large_queued():
            return None
        now = self._clock()
        margin = self.lateness.margin_at(now)
        view = self._flows(pending)
        # before its next batch: the batch running (other models' on a shared thread too) and the one prepared ahead
        ahead = self._work_s({self._ahead_bucket: self._ahead_units}) if self._ahead_units else 0.0
        rest = self._rest_s(now)[0] + ahead / self.lanes
        for deadline, work, batches, batch_s in view.promised:
            if turns:  # a large one: a batch of it per batch of this one
                added = min(own, batches * own / turns)
            else:  # a short one: in the short requests' turns, if they reach it before this one ends
                added = min(view.short_s + own, batches * max(view.short_batch_s, own)) - min(
                    view.short_s, batches * view.short_batch_s
                )
            budget = deadline - now
            finish = rest + work / self.lanes
            # protected while it can still finish, even if not with the margin to spare (review: given up once past
            # its deadline with the margin, a request admitted at an idle model with 1-1.2x its passes left missed it)
            if finish <= budget < (finish + added / self.lanes) * margin:
                return (
                    f"a large request admitted before it has {budget:.2f} s left for about {finish:.2f} s of work: "
                    "this one would make it miss its deadline",
                    max(1.0, batch_s),  # each of its batches gives some time back
                )
        return None

    @property
    def prepares_ahead(self) -> bool:
        return self._prepare is not None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Batches in their forward pass now."""
        return len(self._running)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._running and not self._ahead

    def _idle_now(self, decoding_ahead: bool = True) -> bool:
        """A request queued now would start at once: nothing queued, preparing or (``decoding_ahead``) decoding,
        and a lane free."""
        decoding = self._pending if decoding_ahead else 0
        if self._queue or self._ahead or decoding or self._busy_lanes() >= self.lanes:
            return False
        return self._shared is None or not self._shared.others(self, self._clock())[0]

    def _busy_lanes(self) -> int:
        return self._lanes.running if self._lanes is not None else len(self._running)

    def estimated_wait_s(self) -> float:
        """Seconds before a request queued now starts: until a lane is free (the soonest running batch's
        rest, when every lane is busy), then the work queued ahead, shared between the lanes. The queue's
        units run in batches of up to max_batch_size, at those batches' per-unit time."""
        return self.admission_state().wait_s

    def _wake(self) -> None:
        """Leaving idleness: what the last burst measured decays toward the long run for the time spent idle."""
        self._decay_idle(0.0)
        self._idle_since = None

    def _decay_idle(self, least_s: float = IDLE_DECAY_STEP_S) -> None:
        """While idle: the decay for the time idle so far, once it is ``least_s`` or more (decays compose: 10 s
        then 20 s is 30 s). Admission reads the estimates and the margin before the request that ends the idle
        spell is queued, at the front ends' doors too: decayed only then, the first request after a quiet minute
        was refused on the margin of the burst before it (2.5, against 1.75 decayed; review)."""
        if self._idle_since is not None:
            now = self._clock()
            idle_s = now - self._idle_since
            if idle_s >= least_s:
                for table in self._tables():
                    table.decay(idle_s)
                self.lateness.decay(0.5 ** (max(0.0, idle_s) / self.service_time.half_life_s))
                self._idle_since = now

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def reseed(self, payload: P, quiet: Callable[[], bool], every_s: float = 1.0) -> None:
        """Warm-up ran on a busy machine: its figures are what passes took then (the learned classifier at 2-5x
        its quiet passes), and an idle server refused bursts on them for as long as no traffic came (audit: 3 of
        5 after 90 s idle). Once the model is idle and ``quiet()`` says the machine is, one batch of ``payload``
        runs as any batch, and a batch of one replaces the figure if faster (``ServiceTime.observe``); until
        then, every ``every_s``."""

        async def retime() -> None:
            while not self.service_time.measured(1):
                await asyncio.sleep(every_s)
                if not self._idle_now() or not quiet():  # not ahead of a request still decoding
                    continue
                future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
                self._enqueue(Ticket(payload, 1, self.home_bucket, None, future, self._clock(), timing=True))
                with contextlib.suppress(Exception):
                    await future

        self._reseed_task = asyncio.get_running_loop().create_task(retime())

    async def stop(self) -> None:
        if self._reseed_task is not None:
            self._reseed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reseed_task
        for task in [self._task, *self._lane_tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        for ticket in [*self._queue, *self._ahead]:
            if not ticket.future.done():
                ticket.future.set_exception(Cancelled("server shutting down"))
        self._queue.clear()
        self._ahead, self._ahead_units = [], 0
        self._queued_by_bucket.clear()
        self._turns.clear()
        self._flow_tickets.clear()
        self._flow_since.clear()
        self._flow_timed.clear()
        self._version += 1
        if self._prepare_executor is not None:
            self._prepare_executor.shutdown(wait=False, cancel_futures=True)

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
                    lane = await self._lanes.turn()
                    if not self._queue:  # dropped while waiting for the lane: pass it on
                        self._lanes.release(lane)
                        self._maybe_idle()
                        continue
            head = self._head()
            try:
                # Wait for company until the batch is full or its first request's delay bound is reached (a
                # request of several batches brought all its company with it).
                while head.flow == 0 and not self._full(head.bucket):
                    remaining = head.enqueued_at + self.max_delay_s - self._clock()
                    if remaining <= 0 or head.cancelled:
                        break
                    self._arrival.clear()
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (stop()).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._arrival.wait()
            except asyncio.CancelledError:  # stopped while it held a shared lane: the other models' lane still
                if self._lanes is not None and lane is not None:
                    self._lanes.release(lane)
                raise
            batch = self._take(head.bucket, head.flow)
            self._report_depth()
            if self._lanes is not None and lane is not None:
                if not batch:
                    self._lanes.release(lane)
                    self._maybe_idle()
                    continue
                running = asyncio.get_running_loop().create_task(self._execute(batch, lane))
                self._lane_tasks.add(running)
                running.add_done_callback(self._lane_tasks.discard)
            elif batch and self._prepare is not None:
                await self._pipeline(batch)
            elif batch:
                await self._execute(batch)
            else:
                self._maybe_idle()

    def _head(self) -> Ticket[P, R]:
        """The first queued ticket of the flow whose turn it is: the next batch is its bucket's, and its flow's. A
        large request's turns begin once the requests queued before it have been taken: they were admitted on
        the wait first in, first out gave them (review: a 10-batch request cut ahead of shorter ones queued before
        it, and one expired)."""
        while self._turns and not self._flow_tickets.get(self._turns[0]):
            self._turns.popleft()
        if len(self._turns) <= 1:  # one flow: first in, first out
            return next((t for t in self._queue if not self._turns or t.flow == self._turns[0]), self._queue[0])
        oldest = next((t.seq for t in self._queue if not t.flow), None)  # the first short request still queued
        heads: dict[int, Ticket[P, R]] = {}
        for ticket in self._queue:
            heads.setdefault(ticket.flow, ticket)
        for flow in self._turns:
            if flow in heads and (not flow or oldest is None or self._flow_since.get(flow, -1) < oldest):
                return heads[flow]
        return self._queue[0]

    def _full(self, bucket: Hashable) -> bool:
        size = cost = 0
        for ticket in self._queue:
            if ticket.bucket != bucket or ticket.flow != 0:
                continue
            size += 1
            cost += ticket.cost
            if size >= self.max_batch_size or (self.max_batch_cost is not None and cost >= self.max_batch_cost):
                return True
        return False

    def _batch_counts(self, costs: Sequence[int], buckets: Sequence[Hashable]) -> dict[Hashable, int]:
        """How many batches items of these costs and shape buckets make, by themselves, in each bucket."""
        counts: dict[Hashable, int] = {}
        filling: dict[Hashable, tuple[int, int]] = {}
        for cost, bucket in zip(costs, buckets, strict=True):
            size, total = filling.get(bucket, (0, 0))
            if not size or not self._fits(size, total, cost):
                counts[bucket], size, total = counts.get(bucket, 0) + 1, 0, 0
            filling[bucket] = (size + 1, total + cost)
        return counts

    def takes_turns(self, units: Sequence[int], buckets: Sequence[Hashable] | None, costs: Sequence[int]) -> int:
        """How many batches a request of these items' units, shape buckets and costs runs in if it is a large one,
        else 0. A large request takes turns of its own with the others, a batch a turn (``_take``): more than one batch
        in all, in one shape bucket or several, and its own passes longer than the queue-delay target
        (``LONG_REQUEST_S`` without one). Run back to back, they would make every request behind them wait longer
        than the target allows. A request of two images on a model that batches one at a time is no such request
        (review: with turns of their own, pairs cut ahead of the single images by turns and 6-7 of those expired).
        One batch in each of several buckets counts as much as several in one (review: such a request was never
        large, however long, and its batches ran back to back)."""
        batches = sum(self._batch_counts(costs, buckets or [self.home_bucket] * len(costs)).values())
        large = batches > 1 and self.own_s(units, buckets) > (self.max_queue_delay_s or LONG_REQUEST_S)
        return batches if large else 0

    def _fits(self, size: int, cost: int, more: int) -> bool:
        """Whether a ticket costing ``more`` joins a batch of ``size`` tickets costing ``cost`` (the first always
        does)."""
        return not size or (
            size < self.max_batch_size and (self.max_batch_cost is None or cost + more <= self.max_batch_cost)
        )

    def _take(self, bucket: Hashable, flow: int = 0) -> list[Ticket[P, R]]:
        """FIFO tickets of ``bucket`` and ``flow`` that fit the size and cost caps; drops dead ones on the way.

        A request that can no longer finish before its deadline, even at the fastest per-unit time recently
        measured, is dropped here while more than a batch of work waits for the slot: its answer would only
        be thrown away. When the queue fits in one batch it runs: it costs no one anything, and an estimate,
        however wrong, never keeps an idle model from running (and so from measuring itself again).

        First in, first out within a flow, also under overload. Admission by time (``admit``) keeps only the
        work that can finish within its deadline in the queue, so FIFO serves every admitted request in time.
        Serving newest first (adaptive LIFO) was measured here and starved admitted requests into 504s.

        Between flows, turns: the requests that are not large ones (flow 0) and each large request (a flow of
        its own, ``takes_turns``) take a batch each in turn, and the flow that ran goes to the back (flow 0,
        starting to queue again, goes before it; a large request's turns begin after the requests queued before
        it, ``_head``). A large request's batch with room takes the others' tickets of its bucket. Run first in,
        first out, a request of 4,000 long text windows held the model for its dozens of passes back to back while
        every other request waited for all of them or was refused: two clients looping such requests left 5 of 147
        ordinary ones served (audit).
        """
        now = self._clock()
        batch: list[Ticket[P, R]] = []
        cost = 0
        keep: deque[Ticket[P, R]] = deque()
        for ticket in list(self._queue):
            if ticket.cancelled or ticket.future.done():
                self._drop(ticket, Cancelled("request cancelled before inference"))
            elif ticket.deadline is not None and now >= ticket.deadline:
                self._drop(ticket, Expired("the request's deadline passed while it was queued"))
        self._queue = deque(t for t in self._queue if not t.future.done())
        contended = len(self._queue) > self.max_batch_size  # more than one batch of work: others wait for the slot
        beyond = self._beyond_reach(now) if contended and self._flow_timed else {}
        while self._queue:
            ticket = self._queue.popleft()
            if ticket.flow in beyond:
                self._drop(ticket, Expired(beyond[ticket.flow]))
                continue
            least = self.times(ticket.bucket).floor_s(ticket.units)
            hopeless = ticket.deadline is not None and now + least >= ticket.deadline
            if contended and hopeless:
                self._drop(ticket, Expired("the request could not finish before its deadline"))
                continue
            if ticket.bucket == bucket and ticket.flow == flow and self._fits(len(batch), cost, ticket.cost):
                batch.append(ticket)
                cost += ticket.cost
            else:
                keep.append(ticket)
        if flow and self._fits(len(batch), cost, 0):  # a large request's batch with room: the others' tickets fill it
            rest: deque[Ticket[P, R]] = deque()
            for ticket in keep:
                if ticket.bucket == bucket and self._fits(len(batch), cost, ticket.cost):
                    batch.append(ticket)
                    cost += ticket.cost
                else:
                    rest.append(ticket)
            keep = rest
        self._queue = keep
        self._version += 1
        self._queued_by_bucket, self._flow_tickets = {}, {}
        for ticket in keep:
            self._queued_by_bucket[ticket.bucket] = self._queued_by_bucket.get(ticket.bucket, 0) + ticket.units
            self._flow_tickets[ticket.flow] = self._flow_tickets.get(ticket.flow, 0) + 1
        # the flow that ran goes to the back of the turns; a flow that starts queueing joins as _enqueue says
        turns = [f for f in self._turns if f != flow and self._flow_tickets.get(f)]
        placed = {*turns, flow}
        turns += [f for f in self._flow_tickets if f not in placed]
        self._turns = deque([*turns, flow] if self._flow_tickets.get(flow) else turns)
        self._flow_since = {f: since for f, since in self._flow_since.items() if self._flow_tickets.get(f)}
        self._flow_timed = {f: timed for f, timed in self._flow_timed.items() if f in self._flow_since}
        self._last_turn = flow
        return batch

    def _beyond_reach(self, now: float) -> dict[int, str]:
        """The large requests whose queued batches cannot all run before their deadline, even at the fastest
        per-unit times recently measured, and why (their 504's message). Each batch of theirs could, so they ran
        to the end of their time and their 504 (audit: 64 texts of 65,000 bytes with 5 s deadlines, each batch to
        the last one run for nothing, beside the requests that needed the model).

        A request is judged only on the shape buckets a batch of its own has been timed in, and its work there
        spread over every lane: a lower bound, what it needs at least. An idle model admits any request, and
        runs one that needs up to twice its deadline (``admit``), because the measurements it would be refused on
        could be stale; a batch of it measures the model again (review: judged on a bucket its first batch had not
        measured, a request of short and long texts was dropped on the long ones' stale figure every time, and
        they never ran to correct it)."""
        left: dict[int, dict[Hashable, list[int]]] = {}
        deadlines: dict[int, float] = {}
        for ticket in self._queue:
            timed = self._flow_timed.get(ticket.flow)
            if timed and ticket.bucket in timed and ticket.deadline is not None and not ticket.cancelled:
                left.setdefault(ticket.flow, {}).setdefault(ticket.bucket, []).append(ticket.units)
                deadlines[ticket.flow] = ticket.deadline
        beyond = {}
        for flow, groups in left.items():
            least = 0.0
            for bucket, units in groups.items():
                batches = -(-len(units) // self.max_batch_size)
                per_unit = self.times(bucket).least_per_unit(sum(units) / batches, self.max_batch_size)
                least += (per_unit or 0.0) * sum(units)
            least /= self.lanes
            deadline = deadlines[flow]
            if least > 0 and now + least >= deadline:
                items = sum(len(units) for units in groups.values())
                beyond[flow] = (
                    "the request could not finish before its deadline: what was left of it needed at least "
                    f"{least:.2f} s of the model ({items} items) with {max(deadline - now, 0.0):.2f} s left; send it "
                    "with a longer deadline (x-request-timeout-ms, or the gRPC call's; up to the server's request "
                    "timeout) or in smaller requests"
                )
        return beyond

    async def _pipeline(self, batch: list[Ticket[P, R]]) -> None:
        """Start preparing ``batch`` now, run it once the batch before it has ended, and return as soon as it
        runs: the loop then forms and prepares the next batch while this one runs. One batch at most is ahead."""
        loop = asyncio.get_running_loop()
        prepared = loop.run_in_executor(self._prepare_executor, self._prepare_live, batch)
        prepared.add_done_callback(_retrieve_exception)  # read by _execute, unless stop() came first
        units = sum(t.units for t in batch)
        self._ahead, self._ahead_units, self._ahead_bucket = batch, units, batch[0].bucket
        if self.on_change is not None:
            self.on_change()  # the front ends' door sees the batch ahead
        try:
            if self._current is not None and not self._current.done():
                await asyncio.wait({self._current})  # raises nothing, whatever ended the batch before
        except asyncio.CancelledError:  # stop(): the batch will not run
            _fail(batch, Cancelled("server shutting down"))
            raise
        finally:
            self._ahead, self._ahead_units = [], 0
        # running from now on, for admission too (``_execute`` starts on the loop's next turn), this model's and
        # the others' on its thread, before the front ends' records are written from them
        self._running[id(batch)] = (self._clock(), self.times(batch[0].bucket).batch_s(units))
        if self._shared is not None:
            self._shared.add(id(batch), self, self._running[id(batch)][1])
        if self.on_change is not None:
            self.on_change()
        running = loop.create_task(self._execute(batch, prepared=prepared))
        self._current = running
        self._lane_tasks.add(running)
        running.add_done_callback(self._lane_tasks.discard)
        running.add_done_callback(_log_failure)

    def _prepare_live(self, batch: list[Ticket[P, R]]) -> tuple[list[P], float]:
        """On the prepare executor: the batch's payloads as its forward pass takes them, and when preparing
        them began. Requests that ended while the batch formed keep their payload unprepared (they will not
        run)."""
        assert self._prepare is not None
        started = self._clock()
        live = [i for i, t in enumerate(batch) if not t.cancelled and (t.deadline is None or started < t.deadline)]
        payloads = [t.payload for t in batch]
        if live:
            try:
                ready = list(self._prepare([payloads[i] for i in live]))
            except self._oom_errors:  # the forward pass prepares them itself, split in halves if it must
                log.warning("out of memory preparing a batch of %d; the forward pass prepares it", len(live))
                if self._on_oom is not None:
                    self._on_oom()
                return payloads, started
            if len(ready) != len(live):
                raise RuntimeError(f"prepare returned {len(ready)} payloads for {len(live)}")
            for i, payload in zip(live, ready, strict=True):
                payloads[i] = payload
        return payloads, started

    def _drop(self, ticket: Ticket[P, R], exc: Exception) -> None:
        """Fail a ticket that will not run; its request's handler reports it (and counts the rejection). One
        whose deadline has passed (expired, or cancelled by its request's own timeout) ran late: ``Lateness``
        counts it, at least as late as now."""
        now = self._clock()
        if not ticket.flow and ticket.deadline is not None and (isinstance(exc, Expired) or now >= ticket.deadline):
            took = max(now, ticket.deadline) - ticket.enqueued_at
            self.lateness.observe(ticket.estimated_s, ticket.budget_s, took, now, expired=True)
        if not ticket.future.done():
            ticket.future.set_exception(exc)

    def _maybe_idle(self) -> None:
        if self.idle and self._idle_since is None:
            self._idle_since = self._clock()

    async def _execute(
        self,
        batch: list[Ticket[P, R]],
        lane: int | None = None,
        prepared: asyncio.Future[tuple[list[P], float]] | None = None,
    ) -> None:
        key = id(batch)
        before_ended = self._pipeline_end  # prepared ahead: when the batch before this one ended
        if key not in self._running:  # prepared ahead, _pipeline registered it already
            self._running[key] = (self._clock(), self.times(batch[0].bucket).batch_s(sum(t.units for t in batch)))
            if self._shared is not None:  # before on_change: the other models' records count it
                self._shared.add(key, self, self._running[key][1])
            if self._lanes is not None and lane is not None:
                started, expected = self._running[key]
                self._lanes.note_batch(lane, started, expected)
            if self.on_change is not None:
                self.on_change()
        executor = self._lanes.executors[lane] if self._lanes is not None and lane is not None else self._executor
        prepare_started: float | None = None
        finished: float | None = None  # when the forward pass ended, once it has
        try:
            payloads = None
            if prepared is not None:
                payloads, prepare_started = await prepared
            ran, results, started, ended, whole = await asyncio.get_running_loop().run_in_executor(
                executor, self._run_live, batch, payloads
            )
            finished = ended
        except asyncio.CancelledError:  # stop() while the batch ran: its requests are not left waiting
            _fail(batch, Cancelled("server shutting down"))
            raise
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            error = BatchError(str(exc))
            error.__cause__ = exc
            for ticket in batch:
                if not ticket.future.done():
                    ticket.future.set_exception(error)
            return
        finally:
            if prepared is not None:  # the next batch's time in the pipeline starts here at the earliest
                self._pipeline_end = finished if finished is not None else self._clock()
            del self._running[key]
            if self._shared is not None:
                self._shared.remove(key)
            if self._lanes is not None and lane is not None:
                self._lanes.release(lane)
            self._maybe_idle()
            if self.on_change is not None:
                self.on_change()
        elapsed = ended - started
        if ran and whole:  # a batch cut short by its requests' ending says nothing of the time a whole one takes
            held = elapsed
            if prepare_started is not None:
                # Prepared ahead, the pipeline's pace: from the later of the batch before's end and this batch's
                # preparation's start, to this batch's end. Not the longer stage's own time: on one GPU the
                # preparation's kernels queue behind the forward pass before it, so a small batch's preparation
                # lasts about a whole large forward pass, and its per-unit time would be several times its share.
                held = ended - (prepare_started if before_ended is None else max(prepare_started, before_ended))
            self._learner(batch[0].bucket).observe(sum(t.units for t in ran), held)
            for flow in {t.flow for t in ran if t.flow and self._flow_tickets.get(t.flow)}:
                self._flow_timed.setdefault(flow, set()).add(batch[0].bucket)
            self._version += 1
            if self.on_change is not None:
                self.on_change()
        ran_ids = {id(t) for t in ran}
        for ticket in batch:
            if id(ticket) not in ran_ids:
                if ticket.cancelled:
                    self._drop(ticket, Cancelled("request cancelled before inference"))
                else:
                    self._drop(ticket, Expired("deadline passed while waiting for the device"))
        if not ran:
            return
        for ticket, result in zip(ran, results, strict=True):
            ticket.inference_s = elapsed
            ticket.batch_size = len(ran)
            if ticket.cancelled:  # its request ended during the pass, which then skipped it: a partial result
                self._drop(ticket, Cancelled("request cancelled during inference"))
            elif ticket.deadline is not None and ended >= ticket.deadline:  # the same, had its timeout not yet
                self._drop(ticket, Expired("the request's deadline passed during inference"))  # come round
            elif not ticket.future.done():
                ticket.future.set_result(result)
                # A large request is later than its estimate by the turns of the requests that came after it, by
                # design and within its deadline (``_endangers``): counted, its 1.4-1.6x raised every request's
                # margin (review).
                if not ticket.flow:
                    self.lateness.observe(ticket.estimated_s, ticket.budget_s, ended - ticket.enqueued_at, ended)
        counted = [t for t in ran if not t.timing]
        if self._observer is not None and counted:  # after the answers: a failing metric must not keep them waiting
            self._observer.batch(len(counted), sum(t.cost for t in counted), elapsed)

    def _run_live(
        self, batch: list[Ticket[P, R]], payloads: Sequence[P] | None = None
    ) -> tuple[list[Ticket[P, R]], list[R], float, float, bool]:
        """On the executor thread: skip tickets cancelled or expired while the batch waited for the device.
        Returns the requests run, their results, when the pass started and ended, and whether every request it
        ran was still wanted when it ended (its time is then a whole batch's).
        ``payloads``: the batch's payloads as the prepare stage left them (default: the tickets')."""
        started = self._clock()
        if self._shared is not None:
            self._shared.start(id(batch), started)
        items = list(zip(batch, payloads if payloads is not None else [t.payload for t in batch], strict=True))
        alive = [(t, p) for t, p in items if not t.cancelled and (t.deadline is None or started < t.deadline)]
        live = [t for t, _ in alive]
        for ticket in live:
            ticket.queue_s = started - ticket.enqueued_at
        context = Batch(live, self._clock)
        results = self._run_split([p for _, p in alive], context) if live else []
        ended = self._clock()
        whole = not any(context.ended(i) for i in range(len(live)))
        return live, results, started, ended, whole

    def _run_split(self, payloads: Sequence[P], context: Batch) -> list[R]:
        """Run a batch; on out-of-memory, free the cache and run each half (down to single requests)."""
        try:
            results = list(self._run(payloads, context))
        except Exception as exc:
            if not isinstance(exc, self._oom_errors) or len(payloads) == 1:
                raise
            log.warning("out of memory on a batch of %d; splitting", len(payloads))
            if self._on_oom is not None:
                self._on_oom()
            half = len(payloads) // 2
            tickets = context.tickets
            first = self._run_split(payloads[:half], Batch(tickets[:half], self._clock))
            return first + self._run_split(payloads[half:], Batch(tickets[half:], self._clock))
        if len(results) != len(payloads):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(payloads)} requests")
        return results

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.depth(len(self._queue))
        if self.on_change is not None:
            self.on_change()


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _fail(batch: Sequence[Ticket[Any, Any]], exc: Exception) -> None:
    for ticket in batch:
        if not ticket.future.done():
            ticket.future.set_exception(exc)


def _log_failure(task: asyncio.Task[None]) -> None:
    """A batch's bookkeeping that raised after its answers (a metrics observer, say): logged, not lost."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("a batch's bookkeeping failed after its answers", exc_info=exc)
