"""On CPU hosts the forward pass takes the cores that upload decoding leaves it (app.loading.CoreShare):
torch's intra-op threads otherwise spin against the decode threads on the same cores."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from app.cores import CoreShare
from app.metrics import Metrics
from app.runtime import Runtime
from app.settings import Settings

from .asyncutil import async_test


def test_threads_follow_the_recent_decoding_load() -> None:
    clock, busy = [0.0], [0.0]
    share = CoreShare(2, lambda: busy[0], lambda: clock[0])
    assert share.threads() == 2  # nothing decoded yet
    for _ in range(4):  # decoding keeps one core busy: the forward pass gets the other
        clock[0] += 1.0
        busy[0] += 1.0
        last = share.threads()
    assert last == 1
    for _ in range(4):  # decoding stops: both cores again
        clock[0] += 1.0
        last = share.threads()
    assert last == 2
    clock[0] += 1.0
    busy[0] += 10.0  # more decoding than cores: still one thread
    assert share.threads() == 1


def test_threads_leave_the_cores_other_processes_keep_busy() -> None:
    """Two busy loops of another process on a 2-core machine: one thread, not two that wait for each other at
    every barrier while the scheduler parks one; both again once they stop. Decoding and others add up."""
    clock, decoding, others = [0.0], [0.0], [0.0]
    share = CoreShare(4, lambda: decoding[0], lambda: clock[0], others_busy_s=lambda: others[0])
    assert share.threads() == 4
    for _ in range(4):
        clock[0] += 1.0
        others[0] += 2.0  # two cores' worth of someone else's work each second
        last = share.threads()
    assert last == 2
    for _ in range(4):
        clock[0] += 1.0
        others[0] += 2.0
        decoding[0] += 1.0  # and decoding one more
        last = share.threads()
    assert last == 1
    for _ in range(6):
        clock[0] += 1.0
        last = share.threads()
    assert last == 4


def test_other_processes_busy_time_is_read_from_the_machine() -> None:
    """Half a second of CPU in another process shows up in other_processes_busy_s (whatever else runs too)."""
    import subprocess
    import sys

    from app.cores import other_processes_busy_s

    before = other_processes_busy_s()
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    assert other_processes_busy_s() - before >= 0.45


class WorkClock:
    """The decode timer: it moves only while a decode works, by the seconds that decode takes."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float) -> str:
        self.now += seconds
        return "decoded"


@async_test
async def test_decode_counts_the_time_spent_decoding_not_waiting_for_a_worker() -> None:
    runtime = Runtime(Settings(decode_workers=1), Metrics())
    clock = runtime.decode_timer = WorkClock()
    try:
        results = await asyncio.gather(*(runtime.decode(time.monotonic() + 30, clock.work, 0.05) for _ in range(4)))
        assert results == ["decoded"] * 4
        # four decodes of 50 ms on one worker: 200 ms of decoding; timed from when each was queued, the three
        # that waited for the worker (50, 100 and 150 ms by this clock) would add 300 ms
        assert runtime.decode_busy_s == pytest.approx(0.2)
    finally:
        runtime.shutdown_executors()


def test_never_more_threads_than_cores_when_the_busy_time_reads_lower() -> None:
    """Other processes' busy time is the machine's less this process's, read at two moments; it can come out
    lower the second time. That is no load, and never more threads than cores (it gave a pass 3 on 2)."""
    clock, others = [0.0], [5.0]
    share = CoreShare(2, lambda: 0.0, lambda: clock[0], others_busy_s=lambda: others[0])
    for _ in range(4):
        clock[0] += 1.0
        others[0] -= 1.5
        assert share.threads() == 2


def test_a_core_another_process_keeps_busy_is_left_to_it_when_passes_come_milliseconds_apart() -> None:
    """/proc/stat counts in 10 ms ticks. Read at each pass, a few ms apart, a busy loop on one of 2 cores read as 0
    or 2-3 cores by turns, and a quarter of the passes were given both cores: each waited at every barrier for
    the thread the scheduler had parked (a 4 ms pass took up to 0.8 s, p99 0.79 s against 12 ms on one thread).
    The load is read over 0.2 s or more, and a core busy a quarter of the time is left to the other process."""
    clock = [0.0]
    ticks = lambda: math.floor(clock[0] / 0.01 + 1e-9) * 0.01  # noqa: E731 - one core's worth, counted in ticks
    share = CoreShare(2, lambda: 0.0, lambda: clock[0], others_busy_s=ticks)
    given = []
    for _ in range(400):  # passes 3.7 ms apart for 1.5 s
        clock[0] += 0.0037
        given.append(share.threads())
    assert set(given[60:]) == {1}  # from the first reading on (0.2 s), one thread
    quarter = CoreShare(2, lambda: 0.0, lambda: clock[0], others_busy_s=lambda: clock[0] * 0.3)
    for _ in range(10):
        clock[0] += 0.25
        last = quarter.threads()
    assert last == 1  # another process on 30% of a core: its core is left to it
