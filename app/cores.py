"""How a CPU model's forward passes share the cores: with upload decoding, and with each other.

torch's intra-op threads spin against whatever else runs on their cores: the decode threads, and other
forward passes running side by side (``PERCEIVER_CPU_LANES``). Before each pass its runner asks for its
share, so the threads in use match the cores free.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class CoreShare:
    """Intra-op threads for the next forward pass: the cores less those decoding kept busy on average since
    the last pass (smoothed over passes), at least one, shared equally by the batches running then."""

    def __init__(
        self, cores: int, decode_busy_s: Callable[[], float], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cores, self.decode_busy_s, self.clock = cores, decode_busy_s, clock
        self.at, self.busy, self.load = clock(), decode_busy_s(), 0.0
        self.running = 0
        self._lock = threading.Lock()

    def threads(self) -> int:
        with self._lock:
            now, busy = self.clock(), self.decode_busy_s()
            if now > self.at:
                self.load = 0.5 * self.load + 0.5 * (busy - self.busy) / (now - self.at)
            self.at, self.busy = now, busy
            return max(1, (self.cores - round(self.load)) // max(1, self.running))

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
