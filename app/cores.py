"""How a CPU model's forward passes share the cores: with upload decoding, with each other, and with other
processes on the machine.

torch's intra-op threads spin against whatever else runs on their cores: the decode threads, other forward
passes running side by side (``PERCEIVER_CPU_LANES``), and other processes. Before each pass its runner asks
for its share, so the threads in use match the cores free. Other processes matter most: with two busy loops
on two cores, a pass on two threads waited at every operator's barrier for the thread the scheduler had
parked, and a one-window optical-flow pass took over 30 s instead of 4; on one thread it only runs at the
speed of the core share it gets.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# The load is read over at least this long: /proc/stat counts in ticks (10 ms), and passes a few ms apart read
# each other process's core as 0 or 2-3 cores busy by turns; with a busy loop on one of 2 cores, a quarter of
# the passes were given both cores and stalled (a 4 ms pass took up to 0.8 s).
LOAD_WINDOW_S = 0.2
# A core that other work keeps busy this share of the time or more is left to it: a pass on a core that another
# process shares waits at every operator's barrier (p99 0.8 s against 18 ms on one thread), while a pass on one
# thread that could have had two is at most 2x slower.
SHARED_CORE_LOAD = 0.25


def other_processes_busy_s() -> float:
    """CPU seconds that the cores this process may run on have spent busy for other processes, since boot:
    their busy time in /proc/stat, less this process's own. 0 where /proc/stat is not there (not Linux)."""
    try:
        with open("/proc/stat", "rb") as stat:
            lines = stat.read().split(b"\n")
    except OSError:
        return 0.0
    allowed = {f"cpu{c}".encode() for c in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    busy = 0
    for line in lines[1:]:
        fields = line.split()
        if not fields or not fields[0].startswith(b"cpu"):
            break
        if allowed is None or fields[0] in allowed:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
            busy += user + nice + system + irq + softirq + steal
    return max(0.0, busy / _TICK - time.process_time())


class CoreShare:
    """Intra-op threads for the next forward pass: the cores less those that decoding and other processes kept
    busy (``SHARED_CORE_LOAD`` of a core or more: its share, rounded up) on average over the last
    ``LOAD_WINDOW_S`` or more (smoothed), at least one, shared equally by the batches running then.
    ``others_busy_s`` is cumulative CPU seconds of other processes (``other_processes_busy_s``)."""

    def __init__(
        self,
        cores: int,
        decode_busy_s: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
        others_busy_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.cores, self.clock = cores, clock
        self._decode_busy_s, self._others_busy_s = decode_busy_s, others_busy_s
        self.at, self.busy, self.load = clock(), self.unavailable_s(), 0.0
        self.running = 0
        self._lock = threading.Lock()

    def unavailable_s(self) -> float:
        """CPU seconds so far that the forward passes could not have: decoding's and other processes'."""
        return self._decode_busy_s() + self._others_busy_s()

    def threads(self) -> int:
        with self._lock:
            now = self.clock()
            if now - self.at >= LOAD_WINDOW_S:
                busy = self.unavailable_s()
                # Never below 0: the other processes' time is the machine's busy time less this process's, read
                # at two moments, and can come out lower the second time; a negative load gave a pass more
                # threads than there are cores (3 on 2).
                self.load = 0.5 * self.load + 0.5 * max(0.0, busy - self.busy) / (now - self.at)
                self.at, self.busy = now, busy
            kept = max(0, math.ceil(self.load - SHARED_CORE_LOAD))  # cores other work keeps
            return max(1, (self.cores - kept) // max(1, self.running))

    @contextlib.contextmanager
    def lane(self) -> Iterator[int]:
        """Count this batch as running while it runs; yields its threads."""
        with self._lock:
            self.running += 1
        try:
            yield self.threads()
        finally:
            with self._lock:
                self.running -= 1
