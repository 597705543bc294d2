"""The C allocator's policy for the server process: keep the memory a forward pass frees for the next one,
up to a bound, and give it back when over the bound or idle.

A forward pass on the CPU allocates its activations and frees them when it ends; the image classifier's
input side alone is several tensors of ~50 MB. glibc's malloc serves every allocation over 32 MiB with a
fresh ``mmap`` and returns it with ``munmap``, and each thread's own arena returns whole heaps as they empty.
So every pass faulted in, and the kernel zeroed, ~250 MB of new pages: on the 2-core development VM, 200,000
page faults a second per lane, and 45% of the lanes' CPU time spent in the kernel
(docs/performance-history.md, "Allocator").

Three of glibc's ``mallopt`` parameters change that (the ones its ``GLIBC_TUNABLES`` environment variable
sets, but that one is read only at process start):

- one arena for every thread (``M_ARENA_MAX``, ``share_one_arena``), so a lane's freed tensors are there for
  the next pass whichever thread runs it. This must happen before torch starts its first thread, so
  ``app/__init__.py`` calls it; on its own it changes no measured speed;
- no ``mmap`` for large blocks (``M_MMAP_MAX``): they come from that heap and go back to it;
- up to ``keep_bytes()`` of free memory at the top of the heap stays (``M_TRIM_THRESHOLD``) rather than going
  back to the kernel after every ``free``.

The last two (``keep_freed_memory``) are turned on at start-up only when a model's warm-up pass faulted in
more than ``FAULTED_BYTES_TO_KEEP`` of fresh pages (``faulted_bytes``): the image classifier's 250 MB a pass
ran 1.6-1.8x faster with them (docs/performance-history.md), but fill-mask, whose blocks fit glibc's default,
ran ~10% slower.

Kept memory needs a bound that ``M_TRIM_THRESHOLD`` alone does not give: torch asks for 64-byte aligned
blocks, which glibc cannot carve from a freed block of exactly the same size, so a block freed below a
long-lived small allocation can stay unused in the middle of the heap. ``MemoryKeeper`` checks the heap's
free bytes about once a second and gives every free page back (``malloc_trim``, which also releases pages in
the middle of the heap) when they pass ``keep_bytes()``, and after ``IDLE_TRIM_S`` of idleness.

jemalloc and tcmalloc (which PyTorch's CPU tuning guide suggests) do this by design, but they must be
preloaded with ``LD_PRELOAD`` before the process starts, and neither ships with Python; glibc is already
there. Elsewhere than glibc 2.33+ (musl, macOS) all of this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_MAX_BYTES = 1 << 30  # free memory kept for reuse: at most this, and at most KEEP_SHARE of the memory
KEEP_SHARE = 1 / 16
FAULTED_BYTES_TO_KEEP = 32 << 20  # a warm-up pass that faults in more fresh memory turns keep_freed_memory on
IDLE_TRIM_S = 30.0  # after this long with nothing queued or running, what is kept goes back to the kernel


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not all(hasattr(libc, fn) for fn in ("mallopt", "malloc_trim", "mallinfo2")):  # glibc 2.33+
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


@functools.cache
def keep_bytes() -> int:
    """The most free memory kept for reuse: KEEP_MAX_BYTES, or KEEP_SHARE of the memory this process may use
    (its cgroup's limit, else the machine's) where that is less."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text().strip()))  # "max": no limit
    return min(KEEP_MAX_BYTES, int(total * KEEP_SHARE))


@functools.cache
def share_one_arena() -> bool:
    """Every thread allocates from one arena (call before torch starts a thread); False where not glibc."""
    libc = _glibc()
    return libc is not None and libc.mallopt(M_ARENA_MAX, 1) == 1


@functools.cache
def keep_freed_memory() -> bool:
    """Large blocks from the heap, and up to ``keep_bytes()`` of freed memory kept there (once per process);
    False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, keep_bytes())))


def faulted_bytes(fn: Callable[[], object]) -> int:
    """Fresh memory the process faulted in while ``fn`` ran (minor page faults, every thread)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * os.sysconf("SC_PAGE_SIZE")


def free_bytes() -> int:
    """Free memory the heap holds (``mallinfo2().fordblks``); 0 where there is no glibc."""
    libc = _glibc()
    return 0 if libc is None else int(libc.mallinfo2().fordblks)


def trim() -> bool:
    """Give the kernel back every free page of the heap (``malloc_trim(0)``); False where there is no glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


@dataclass
class MemoryKeeper:
    """Decides when to ``trim``. ``poll(idle, work_seen, free)`` is called about once a second with whether
    the server is idle now, a count that grows with every request it has taken, and ``free_bytes()``; it
    answers whether to trim now:

    - when the heap's free bytes are more than ``keep`` above the least they have been since the last trim
      (a trim releases the pages of free blocks but leaves them in the heap's count, so the count itself
      would stay high);
    - once the server has been idle ``after_s`` since it last had work, if there was work since the last trim.

    The clock is a parameter so that tests need not wait."""

    keep: int = field(default_factory=keep_bytes)
    after_s: float = IDLE_TRIM_S
    clock: Callable[[], float] = time.monotonic
    _seen: int = 0
    _idle_since: float | None = None
    _dirty: bool = False
    _floor: int | None = None

    def poll(self, idle: bool, work_seen: int, free: int = 0) -> bool:
        now = self.clock()
        self._floor = free if self._floor is None else min(self._floor, free)
        if free - self._floor > self.keep:
            return self._trimmed(free)
        if work_seen != self._seen or not idle:
            self._seen = work_seen
            self._dirty = True
            self._idle_since = None if not idle else now
            return False
        if self._idle_since is None:
            self._idle_since = now
        if self._dirty and now - self._idle_since >= self.after_s:
            return self._trimmed(free)
        return False

    def _trimmed(self, free: int) -> bool:
        self._dirty = False
        self._floor = free
        return True
