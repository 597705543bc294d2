"""The batcher's prepare stage (prepare_ahead): each batch is prepared on a thread of its own while the batch
before it runs, one batch ahead at most, and everything the batcher promises still holds for it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batching import EVERY, Batch, Batcher, BatchError, ServiceTime

from .asyncutil import async_test

pytestmark = pytest.mark.timeout(30)
WAIT_S = 10  # what a blocked thread waits for an event that never comes before the test fails (never reached)


class Stages:
    """A prepare stage and a forward pass that record what ran, and may be held until the test lets them go."""

    def __init__(self, fail_on: object = None, hold: bool = False) -> None:
        self.prepared: list[list[object]] = []
        self.ran: list[list[object]] = []
        self.fail_on = fail_on
        self.second_prepared = threading.Event()  # set when the second batch's preparation starts
        self.release_first = threading.Event()  # the first forward pass waits for this, if the test sets hold
        self.hold = hold
        self.overlapped = False  # the second batch was prepared while the first one ran

    def prepare(self, payloads: Sequence[object]) -> list[object]:
        self.prepared.append(list(payloads))
        if len(self.prepared) == 2:
            self.second_prepared.set()
        if self.fail_on in payloads:
            raise ValueError("no decoder reads this batch")
        return [f"prepared:{p}" for p in payloads]

    async def second_batch_prepared(self) -> None:
        """Returns once the second batch's preparation has started and the batcher's loop has had its turns."""
        await asyncio.get_running_loop().run_in_executor(None, self.second_prepared.wait, WAIT_S)
        for _ in range(20):  # the loop has nothing to wait for but the event loop's turns
            await asyncio.sleep(0)

    def run(self, payloads: Sequence[object], batch: Batch = EVERY) -> list[object]:
        self.ran.append(list(payloads))
        if len(self.ran) == 1:
            self.overlapped = self.second_prepared.wait(WAIT_S)
            if self.hold:
                self.release_first.wait(WAIT_S)
        return [f"result:{p}" for p in payloads]


def pipeline(
    run: Callable[[Sequence[object], Batch], list[object]],
    prepare: Callable[[Sequence[object]], list[object]],
    **kwargs: object,
) -> Batcher[object, object]:
    """A batcher with a prepare stage ahead, in batches of two cut at once."""
    options: dict[str, object] = dict(max_batch_size=2, max_delay_s=0.0, max_queue=100)
    options.update(kwargs)
    return Batcher(run, ThreadPoolExecutor(1), prepare=prepare, prepare_executor=ThreadPoolExecutor(1), **options)  # type: ignore[arg-type]


def make(stages: Stages, **kwargs: object) -> Batcher[object, object]:
    return pipeline(stages.run, stages.prepare, **kwargs)


@async_test
async def test_the_next_batch_is_prepared_while_the_one_before_runs() -> None:
    stages = Stages()
    batcher = make(stages)
    batcher.start()
    tickets = [batcher.submit(p) for p in "abcd"]
    results = await asyncio.gather(*(t.future for t in tickets))
    assert results == [f"result:prepared:{p}" for p in "abcd"]  # the forward pass takes the prepared payloads
    assert stages.overlapped  # the first forward pass saw the second batch's preparation start
    assert stages.prepared == [["a", "b"], ["c", "d"]]
    assert stages.ran == [["prepared:a", "prepared:b"], ["prepared:c", "prepared:d"]]
    await batcher.stop()


@async_test
async def test_one_batch_at_most_is_prepared_ahead_and_admission_counts_it() -> None:
    stages = Stages(hold=True)
    batcher = make(stages, service_time=ServiceTime({1: 0.5, 2: 0.5}))
    batcher.start()
    tickets = [batcher.submit(p, deadline=None) for p in "abcdef"]
    await stages.second_batch_prepared()
    assert len(stages.prepared) == 2  # the first batch runs, the second is ready, the third waits in the queue
    assert batcher.depth == 2 and not batcher.idle
    state = batcher.admission_state()
    assert not state.idle and state.queue_len == 4  # the queued pair and the pair prepared ahead
    assert state.queued_s == pytest.approx(4 * 0.5)  # their four units, at batch size 2's per-unit time
    stages.release_first.set()
    assert await asyncio.gather(*(t.future for t in tickets)) == [f"result:prepared:{p}" for p in "abcdef"]
    assert batcher.idle and batcher.admission_state().idle
    await batcher.stop()


@async_test
async def test_a_request_that_ends_while_its_batch_is_prepared_never_reaches_the_model() -> None:
    stages = Stages(hold=True)
    batcher = make(stages)
    batcher.start()
    first = [batcher.submit(p) for p in "ab"]
    second = [batcher.submit(p) for p in "cd"]
    await stages.second_batch_prepared()
    second[0].cancel()  # the client left after its batch was prepared, before it ran
    stages.release_first.set()
    await asyncio.gather(*(t.future for t in first))
    assert await second[1].future == "result:prepared:d"
    assert stages.ran[1] == ["prepared:d"]
    with pytest.raises(Exception, match="cancelled"):
        await second[0].future
    await batcher.stop()


@async_test
async def test_a_preparation_that_fails_fails_only_its_batch() -> None:
    stages = Stages(fail_on="bad")
    batcher = make(stages)
    batcher.start()
    tickets = [batcher.submit(p) for p in ["a", "b", "bad", "c", "d", "e"]]
    results = await asyncio.gather(*(t.future for t in tickets), return_exceptions=True)
    assert results[:2] == ["result:prepared:a", "result:prepared:b"]
    assert all(isinstance(r, BatchError) for r in results[2:4])
    assert results[4:] == ["result:prepared:d", "result:prepared:e"]
    await batcher.stop()


@async_test
async def test_stopping_fails_the_batch_prepared_ahead_instead_of_leaving_it_waiting() -> None:
    stages = Stages(hold=True)
    batcher = make(stages)
    batcher.start()
    tickets = [batcher.submit(p) for p in "abcd"]
    await stages.second_batch_prepared()
    await batcher.stop()
    stages.release_first.set()
    for ticket in tickets:  # the batch running and the one prepared ahead: none is left waiting
        with pytest.raises(Exception, match="shutting down"):
            await ticket.future


@async_test
async def test_a_batch_whose_preparation_runs_out_of_memory_is_prepared_by_its_forward_pass() -> None:
    """The prepare stage's out-of-memory frees the cache and hands the payloads on as they came: the forward pass
    decodes them itself, under its own halving on out-of-memory, instead of failing the batch."""
    freed: list[bool] = []

    def prepare(payloads: Sequence[object]) -> list[object]:
        raise MemoryError("CUDA out of memory: tried to allocate 2.00 GiB")

    ran: list[list[object]] = []

    def run(payloads: Sequence[object], batch: Batch = EVERY) -> list[object]:
        ran.append(list(payloads))
        return [f"result:{p}" for p in payloads]

    batcher = pipeline(run, prepare, on_oom=lambda: freed.append(True))
    batcher.start()
    tickets = [batcher.submit(p) for p in "ab"]
    assert await asyncio.gather(*(t.future for t in tickets)) == ["result:a", "result:b"]
    assert ran == [["a", "b"]] and freed == [True]
    await batcher.stop()


@async_test
async def test_a_batch_that_ends_in_an_error_after_its_answers_does_not_stall_the_batch_ahead() -> None:
    """Whatever ends the batch before (here a metrics observer that raises), the batch prepared ahead still runs."""

    class Failing:
        def batch(self, size: int, cost: int, inference_s: float) -> None:
            raise RuntimeError("a metrics backend went away")

        def depth(self, depth: int) -> None:
            pass

    stages = Stages()
    batcher = make(stages, observer=Failing())
    batcher.start()
    tickets = [batcher.submit(p) for p in "abcd"]
    _, pending = await asyncio.wait([t.future for t in tickets], timeout=WAIT_S)
    assert not pending and [t.future.result() for t in tickets] == [f"result:prepared:{p}" for p in "abcd"]
    await batcher.stop()


@async_test
async def test_admission_learns_the_pipelines_pace_not_a_preparation_that_waited_for_the_gpu() -> None:
    """On one GPU the next batch's preparation queues behind the forward pass running: a small batch's preparation
    then lasts about that whole pass. A batch is timed from the later of the batch before's end and its own
    preparation's start, to its end; the clock is the test's, so the times are exact."""
    now = [0.0]
    first_prepared, second_preparing, first_answered = threading.Event(), threading.Event(), threading.Event()

    def prepare(payloads: Sequence[object]) -> list[object]:
        if payloads[0] == "a":
            first_prepared.set()
        elif payloads[0] == "b":  # ahead of "a"'s forward pass: its kernels wait for that pass to end
            second_preparing.set()
            first_answered.wait(WAIT_S)
            now[0] += 0.005
        else:  # "d", with nothing running: the pipeline was idle
            now[0] += 0.020
        return list(payloads)

    def run(payloads: Sequence[object], batch: Batch = EVERY) -> list[object]:
        if payloads[0] == "a":
            second_preparing.wait(WAIT_S)
            now[0] += 0.100
        else:
            now[0] += 0.010
        return list(payloads)

    batcher = pipeline(run, prepare, clock=lambda: now[0])
    batcher.start()
    loop = asyncio.get_running_loop()
    first = batcher.submit("a")
    await loop.run_in_executor(None, first_prepared.wait, WAIT_S)
    second = [batcher.submit(p) for p in "bc"]  # taken while "a" runs, and prepared ahead
    await first.future
    first_answered.set()
    await asyncio.gather(*(t.future for t in second))
    last = batcher.submit("d")
    await last.future
    samples = batcher.service_time.samples
    # "b" and "c": the 5 ms of preparation left after "a" ended, then their 10 ms pass, not the 105 ms the
    # preparation lasted (52.5 ms a unit, 7 times the pipeline's 7.5)
    assert list(samples[2]) == pytest.approx([0.015 / 2])
    # "a" and "d" each found the pipeline idle: their preparation and their pass (0 + 100 ms, 20 + 10 ms)
    assert list(samples[1]) == pytest.approx([0.100, 0.030])
    await batcher.stop()
