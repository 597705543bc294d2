"""CPU batches side by side (``PERCEIVER_CPU_LANES``): lanes shared by every model, the lowest free first,
and the cores split between the batches running."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
import torch

from app.batching import EVERY, AdmissionState, Batch, Batcher, Cancelled, Lanes, QueueFull, ServiceTime
from app.cores import CoreShare

from .asyncutil import async_test
from .conftest import MEDIA, LiveServer

pytestmark = pytest.mark.timeout(60)


class Clock:
    """The batchers' clock, moved by the test alone."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Meeting:
    """Each batch waits (up to 30 s: a guard against a hang, not a bound) until ``parties`` batches are running at
    once, and records its thread."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=30)
        self.threads: list[str] = []

    def __call__(self, payloads: Sequence[object], batch: Batch = EVERY) -> list[object]:
        self.threads.append(threading.current_thread().name)
        self.barrier.wait()
        return [f"result:{p}" for p in payloads]


def single(run: Any, executor: Any, per_unit_s: float, clock: Clock, **options: Any) -> Batcher[object, object]:
    """A model that batches one request at a time at ``per_unit_s`` a pass, as its estimates start."""
    service = ServiceTime({1: per_unit_s})
    return Batcher(run, executor, max_batch_size=1, max_delay_s=0.0, service_time=service, clock=clock, **options)


@async_test
async def test_two_lanes_run_two_batches_at_once_and_one_batch_alone_on_the_first_lane() -> None:
    lanes = Lanes(2, prefix="lane")
    try:
        meeting = Meeting(2)  # each of two batches of one returns only once the other is running too
        batcher = Batcher(meeting, lanes, max_batch_size=1, max_delay_s=0.0, max_queue=10)
        batcher.start()
        first, second = batcher.submit("a"), batcher.submit("b")
        assert await asyncio.gather(first.future, second.future) == ["result:a", "result:b"]
        assert sorted(meeting.threads) == ["lane-0_0", "lane-1_0"]
        await batcher.stop()

        alone = Meeting(1)
        batcher = Batcher(alone, lanes, max_batch_size=1, max_delay_s=0.0, max_queue=10)
        batcher.start()
        for payload in "cdef":  # one at a time: always the lowest lane, so one OpenMP team stays in use
            assert await batcher.submit(payload).future == f"result:{payload}"
        assert alone.threads == ["lane-0_0"] * 4
        await batcher.stop()
    finally:
        lanes.shutdown()


@async_test
async def test_a_model_waits_for_a_free_lane_when_others_hold_them_all() -> None:
    lanes = Lanes(1, prefix="lane")
    try:
        started: list[tuple[str, float]] = []

        def slow(payloads: Sequence[object], batch: Batch = EVERY) -> list[object]:
            started.append((str(payloads[0]), time.monotonic()))
            time.sleep(0.2)
            return list(payloads)

        a = Batcher(slow, lanes, max_batch_size=1, max_delay_s=0.0, max_queue=10)
        b = Batcher(slow, lanes, max_batch_size=1, max_delay_s=0.0, max_queue=10)
        a.start(), b.start()
        assert await asyncio.gather(a.submit("a").future, b.submit("b").future) == ["a", "b"]
        (_, t0), (_, t1) = started
        assert t1 - t0 >= 0.19  # one lane: the second model's batch started after the first ended
        await a.stop()
        await b.stop()
    finally:
        lanes.shutdown()


@async_test
async def test_a_model_stopped_while_it_waits_for_company_on_a_lane_gives_the_lane_back() -> None:
    """One lane; model a holds it while its batch waits for company (a 60 s delay bound), then is stopped alone
    (its requests get Cancelled): model b's request runs on the lane. It waited for ever."""
    lanes = Lanes(1, prefix="lane")
    try:
        a = Batcher(lambda p, batch=EVERY: list(p), lanes, max_batch_size=4, max_delay_s=60.0, max_queue=10)
        b = Batcher(lambda p, batch=EVERY: list(p), lanes, max_batch_size=1, max_delay_s=0.0, max_queue=10)
        a.start(), b.start()
        waiting = a.submit("a")
        while lanes.running < 1:  # a took the lane and waits for company
            await asyncio.sleep(0.001)
        await a.stop()
        assert isinstance(waiting.future.exception(), Cancelled)
        async with asyncio.timeout(30):  # guards against a hang; bounds nothing asserted
            assert await b.submit("b").future == "b"
        await b.stop()
    finally:
        lanes.shutdown()


@async_test
async def test_models_with_a_backlog_take_the_lanes_in_turn() -> None:
    """Two models, each with a backlog, one lane: a released lane goes to the model that has waited longest.
    When every waiter raced for it, the winner re-registered first each time (it runs on without yielding) and
    kept the lane while it had work: the other model's requests waited until they expired."""
    lanes = Lanes(1, prefix="lane")
    try:
        order: list[str] = []

        def run(payloads: Sequence[object], batch: Batch = EVERY) -> list[object]:
            order.append(str(payloads[0])[0])
            time.sleep(0.01)
            return list(payloads)

        a = Batcher(run, lanes, max_batch_size=1, max_delay_s=0.0, max_queue=10)
        b = Batcher(run, lanes, max_batch_size=1, max_delay_s=0.0, max_queue=10)
        a.start(), b.start()
        tickets = [a.submit(f"a{i}") for i in range(5)] + [b.submit(f"b{i}") for i in range(5)]
        await asyncio.gather(*(t.future for t in tickets))
        # a's loop waited for the lane before b's did, then they alternate (it was a five times, then b five times)
        assert order == list("aababababb"), order
        await a.stop()
        await b.stop()
    finally:
        lanes.shutdown()


@async_test
async def test_a_models_admission_counts_the_lanes_another_models_batches_hold() -> None:
    """One lane, held by a flow-like batch of another model (5 s by its estimate): a request for an idle model
    would wait for it, so the queue-delay target refuses it, with a Retry-After of that wait. It counted the
    model's own batches only: admitted at an estimated wait of 0, it waited out the other model's pass."""
    lanes = Lanes(1, prefix="lane")
    gate = threading.Event()
    try:

        def held(payloads: Sequence[object], batch: Batch = EVERY) -> list[object]:
            gate.wait(30)
            return list(payloads)

        clock = Clock()  # still: the flow batch's rest is all of its 5 s whenever admission asks
        flow = Batcher(held, lanes, max_batch_size=1, max_delay_s=0.0, service_time=ServiceTime({1: 5.0}), clock=clock)
        images = single(held, lanes, 0.1, clock, max_queue_delay_s=0.5)
        flow.start(), images.start()
        running = flow.submit("pair")
        until = time.monotonic() + 10
        while lanes.running == 0 or not flow.running:
            assert time.monotonic() < until
            await asyncio.sleep(0.01)
        assert images.admission_state().rest_s == 5.0
        with pytest.raises(QueueFull) as refused:
            images.admit(clock.now + 30)
        assert refused.value.retry_after_s == 4.5, refused.value  # the wait past the 0.5 s target
        gate.set()
        assert await running.future == "pair"
        images.admit(clock.now + 30)  # the lane free again: admitted
        await flow.stop()
        await images.stop()
    finally:
        gate.set()
        lanes.shutdown()


@async_test
async def test_models_on_the_one_inference_thread_count_each_others_batches() -> None:
    """The same on the inference thread (GPU models; CPU models off the lanes), one executor thread: a model looked
    idle while another's long batch held it, admitted everything, and its batches waited behind that one until
    they expired (59-85% of fill-mask's requests with 0.3-1 s deadlines, beside one flow client: audit)."""
    from concurrent.futures import ThreadPoolExecutor

    from app.batching import SharedThread

    thread, shared = ThreadPoolExecutor(1), SharedThread()
    gate = threading.Event()

    def held(payloads: Sequence[object], batch: Batch = EVERY) -> list[object]:
        gate.wait(30)
        return list(payloads)

    clock = Clock()
    flow = Batcher(
        held, thread, max_batch_size=1, max_delay_s=0.0, service_time=ServiceTime({1: 5.0}), clock=clock, shared=shared
    )
    text = Batcher(
        held,
        thread,
        max_batch_size=8,
        max_delay_s=0.0,
        service_time=ServiceTime({1: 0.01}),
        clock=clock,
        shared=shared,
    )
    # What the front ends' doors read: every model's record, written on each change of any (ModelServer.publish).
    # They were written before flow's batch was counted on the thread, and showed text idle while it ran.
    published: list[AdmissionState] = []
    flow.on_change = lambda: published.append(text.admission_state())
    try:
        flow.start(), text.start()
        running = flow.submit("pair")
        until = time.monotonic() + 10
        while not flow.running:
            assert time.monotonic() < until
            await asyncio.sleep(0.01)
        assert not text.admission_state().idle and text.admission_state().rest_s == 5.0
        assert not published[-1].idle and published[-1].rest_s == 5.0
        with pytest.raises(QueueFull) as refused:
            text.admit(clock.now + 1.0)
        assert refused.value.reason == "deadline" and "estimated wait 6.01 s" in str(refused.value)  # (5 + 0.01) x 1.2
        gate.set()
        assert await running.future == "pair"
        assert text.admission_state().idle  # the thread is free again: admitted
        text.admit(clock.now + 1.0)
    finally:
        gate.set()
        await flow.stop()
        await text.stop()
        thread.shutdown()


@async_test
async def test_a_request_ahead_that_leaves_a_lane_free_costs_no_wait() -> None:
    """Two lanes, flow at 1.4 s a window, a 0.5 s queue-delay target: while one request decodes (or is queued), a
    second starts at once on the other lane. Shared out over the lanes, the first made the second wait 0.7 s, and
    at an idle server the second of two concurrent flow requests was always refused (audit). A third would wait."""
    lanes = Lanes(2, prefix="lane")
    clock = Clock()
    flow = single(Meeting(1), lanes, 1.4, clock, max_queue_delay_s=0.5)
    try:
        first = flow.reserve()  # decoding
        flow.admit(clock.now + 30)  # admitted: a lane is free for it
        assert flow.admission_state().wait_s == 0.0
        second = flow.reserve()
        with pytest.raises(QueueFull):  # both lanes will be taken: 2 x 1.4 s over 2 lanes
            flow.admit(clock.now + 30)
        first(), second()
    finally:
        await flow.stop()
        lanes.shutdown()


@async_test
async def test_a_request_of_many_items_is_admitted_on_all_of_their_passes() -> None:
    """A 32-image request (0.125 s an image, two lanes, two images queued ahead) with a 1.5 s deadline: its own
    passes are 16 rounds of two, 2 s, so it is refused at once. It was admitted on one image's pass, held both
    lanes for 1.4 s and expired (audit). Four images (two rounds) fit."""
    lanes = Lanes(2, prefix="lane")
    clock = Clock()
    images = Batcher(
        Meeting(1), lanes, max_batch_size=1, max_delay_s=0.0, service_time=ServiceTime({1: 0.125}), clock=clock
    )
    try:
        for i in range(2):
            images.submit(f"ahead {i}", admit=False)
        assert images.own_s([1] * 32) == 2.0 and images.own_s([1] * 4) == 0.25
        with pytest.raises(QueueFull) as refused:
            images.submit("many", deadline=clock.now + 1.5, items=[1] * 32)
        assert "estimated wait 2.55 s" in str(refused.value)  # (0.125 queued + 2.0) x 1.2
        images.submit("few", deadline=clock.now + 1.5, items=[1] * 4)
    finally:
        await images.stop()
        lanes.shutdown()


def test_the_cores_are_split_between_the_batches_running() -> None:
    share = CoreShare(4, lambda: 0.0)
    with share.lane() as alone:
        assert alone == 4
        with share.lane() as second:
            assert second == 2
    with share.lane() as again:
        assert again == 4


def test_a_server_with_two_lanes_serves_concurrent_image_requests() -> None:
    # six at once, with the queue-delay target off: a busy machine's slow first pass refuses none of them
    server = LiveServer(demo_tasks=["classify"], cpu_lanes=2, max_queue_delay_ms=None).start()
    try:
        cat = (MEDIA / "cat.jpg").read_bytes()

        async def many() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(
                    *(client.post("/v1/classify", files={"image": ("c.jpg", cat)}) for _ in range(6))
                )

        responses = asyncio.run(many())
        assert [r.status_code for r in responses] == [200] * 6
        assert len({tuple(p["label"] for p in r.json()["predictions"]) for r in responses}) == 1  # same answer
        lanes = server.runtime.lanes()
        assert len(lanes) == min(2, torch.get_num_threads()) and lanes.running == 0  # one per core at most
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("setting", "budget_ms", "batch_size"),
    [("auto", 500.0, "auto"), ("auto", 1.0, "auto"), ("auto", 500.0, 1), (1, 500.0, "auto"), (2, 500.0, "auto")],
)
def test_which_models_batch_side_by_side(setting: str | int, budget_ms: float, batch_size: str | int) -> None:
    """auto: the CPU models whose max_batch_size=auto chose 1 (batching gains them nothing) get the lanes, the
    others run one batch at a time; a number applies to every CPU model. A 1 ms latency budget makes every
    model's measured choice 1; a configured max_batch_size of 1 was not measured, so it gets no lanes."""
    server = LiveServer(
        demo_tasks=["classify", "classify-text"],
        cpu_lanes=setting,
        warmup=True,
        batch_latency_budget_ms=budget_ms,
        max_batch_size=batch_size,
    ).start()
    try:
        lanes = min(2, torch.get_num_threads())
        engines = server.runtime.engines()
        chosen = {e.name: e.policy.max_batch_size for e in engines}
        if budget_ms == 1.0:
            assert set(chosen.values()) == {1}, chosen
        for engine in engines:
            by_choice = lanes if engine.policy.max_batch_size == 1 and batch_size == "auto" else 1
            expected = by_choice if setting == "auto" else min(int(setting), lanes)
            assert engine.batcher.lanes == expected, (engine.name, chosen)
            assert engine.placement == ("lanes" if expected > 1 else "inference-thread")
        with server.client() as client:
            r = client.post("/v1/classify", files={"image": ("c.jpg", (MEDIA / "cat.jpg").read_bytes())})
        assert r.status_code == 200
    finally:
        server.stop()
