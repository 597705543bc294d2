"""The allocator policy (app/memory.py): a forward pass reuses the memory the last one freed instead of
faulting in fresh pages, and the kept memory goes back to the kernel when asked (and once idle)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app import memory

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20

# Run in a fresh process: one arena must be in place before torch starts a thread, and pytest's process has
# run everything else first (and may have turned keep_freed_memory on). A worker thread (as the inference
# lanes are) runs the input side of the image classifier 20 times on a new image each time: the pixels joined
# with their position features (50,176 x 261 floats, 52 MB), a LayerNorm and a projection. The page faults of
# each pass are printed.
PASSES = """
import resource, sys, threading
import app  # one arena for every thread
import torch
from app import memory

if sys.argv[1] == "keep":
    memory.keep_freed_memory()

torch.set_num_threads(1)
faults = []

def passes():
    torch.manual_seed(0)
    pos = torch.randn(50176, 258)
    net = torch.nn.Sequential(torch.nn.LayerNorm(261), torch.nn.Linear(261, 64))
    with torch.inference_mode():
        for _ in range(20):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            net(torch.cat([torch.rand(50176, 3), pos], dim=1)).mean(0)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

thread = threading.Thread(target=passes)
thread.start()
thread.join()
print(" ".join(map(str, faults)))
"""

# The case the bound is for: each "pass" frees a 64 MiB block but keeps a small allocation made after it, so
# no freed block can be reused (torch's blocks are 64-byte aligned, which glibc cannot carve from a freed block
# of the same size) and the heap grows by 64 MiB a pass. MemoryKeeper, polled after each pass as the server
# polls it each second, keeps the resident part of that growth within its bound (256 MiB here).
BOUND = """
import sys
import app
import torch
from app import memory

memory.keep_freed_memory()

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def heap():
    info = memory._glibc().mallinfo2()
    return info.arena + info.hblkhd

torch.set_num_threads(1)
keeper = memory.MemoryKeeper(keep=256 << 20, after_s=float("inf"))
start, start_heap, kept, trims = rss(), heap(), [], 0
first_free, most_free = memory.free_bytes(), 0
for i in range(24):
    x = torch.ones(64 << 18)
    kept.append(torch.ones(100 + i))
    del x
    most_free = max(most_free, memory.free_bytes() - first_free)
    if sys.argv[1] == "keeper" and keeper.poll(False, i, memory.free_bytes()):
        trims += memory.trim()
print(rss() - start, trims, heap() - start_heap, most_free)
"""

TRIM = """
import app
import torch
from app import memory

memory.keep_freed_memory()

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

x = torch.ones(256 << 18)  # 256 MiB
del x
kept = rss()
assert memory.trim()
print(kept, rss())
"""

needs_glibc = pytest.mark.skipif(not memory.share_one_arena(), reason="the policy applies to glibc only")


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


@needs_glibc
def test_a_pass_reuses_the_memory_the_last_one_freed() -> None:
    pages = 50176 * 261 * 4 // 4096  # one 52 MB activation
    with_policy = [int(n) for n in run(PASSES, "keep").split()]
    without = [int(n) for n in run(PASSES, "default").split()]
    assert min(without[-5:]) >= pages, f"glibc's default faults in fresh activations every pass: {without}"
    assert max(with_policy[-5:]) < pages // 20, f"a pass should reuse the last one's activations: {with_policy}"


@needs_glibc
def test_memory_kept_for_reuse_stays_within_its_bound() -> None:
    # Without the keeper the pattern grows the heap (the premise of the bound). In about 1 run in 75 on the
    # development VM it did not (RSS +199 MiB once, against 1,473-1,543 MiB in 74 others; cause not found),
    # so the premise gets three tries, each reporting the allocator's own heap size beside the RSS.
    premise = []
    for _ in range(3):
        grown, _, heap, _ = (int(v) for v in run(BOUND, "plain").split())
        premise.append(f"RSS +{grown / MIB:.0f} MiB, heap +{heap / MIB:.0f} MiB")
        if grown >= 1200 * MIB:
            break
    assert grown >= 1200 * MIB, f"without the keeper this pattern should grow the heap: {premise}"
    # The same anomaly can strike the run with the keeper: the freed blocks are then reused, free memory never
    # passes the bound and there is nothing to trim (a clean-clone CI run, 2026-12-03: no trim, RSS within the
    # bound). That run proves nothing about the keeper, so it gets the same three tries; the keeper must act in
    # a run whose free memory passed the bound.
    tries = []
    for _ in range(3):
        grown, trims, _, most_free = (int(v) for v in run(BOUND, "keeper").split())
        tries.append(f"RSS +{grown / MIB:.0f} MiB, {trims} trims, free memory up to +{most_free / MIB:.0f} MiB")
        if most_free > 256 * MIB:
            break
    assert most_free > 256 * MIB, f"free memory never passed the keeper's bound: {tries}"
    assert trims >= 3, tries
    assert grown <= (256 + 2 * 64 + 32) * MIB, f"RSS grew {grown / MIB:.0f} MiB with a 256 MiB bound"


@needs_glibc
def test_trim_gives_the_kept_memory_back() -> None:
    kept, after = (int(v) for v in run(TRIM).split())
    assert kept - after >= 200 * MIB, f"RSS {kept / MIB:.0f} MiB before trim, {after / MIB:.0f} MiB after"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_idle_trim_waits_for_a_quiet_spell_after_work_and_trims_once() -> None:
    clock = Clock()
    policy = memory.MemoryKeeper(keep=1 << 30, after_s=30.0, clock=clock)
    assert not policy.poll(idle=True, work_seen=0), "nothing ran yet: nothing to give back"
    clock.now = 100.0
    assert not policy.poll(idle=True, work_seen=0)
    assert not policy.poll(idle=False, work_seen=1), "busy"
    clock.now = 110.0
    assert not policy.poll(idle=True, work_seen=1), "idle for 0 s"
    clock.now = 139.0
    assert not policy.poll(idle=True, work_seen=1), "idle for 29 s"
    clock.now = 140.0
    assert policy.poll(idle=True, work_seen=1), "idle for 30 s after work"
    clock.now = 400.0
    assert not policy.poll(idle=True, work_seen=1), "already given back, and no work since"


def test_idle_trim_counts_work_that_came_and_went_between_polls() -> None:
    clock = Clock()
    policy = memory.MemoryKeeper(keep=1 << 30, after_s=30.0, clock=clock)
    assert not policy.poll(idle=True, work_seen=0)
    clock.now = 50.0
    assert not policy.poll(idle=True, work_seen=3), "3 requests served between two polls: the quiet spell restarts"
    clock.now = 79.0
    assert not policy.poll(idle=True, work_seen=3)
    clock.now = 80.0
    assert policy.poll(idle=True, work_seen=3)


def test_the_keeper_trims_when_free_memory_grows_past_its_bound_above_the_least_seen() -> None:
    clock = Clock()
    keeper = memory.MemoryKeeper(keep=100, after_s=float("inf"), clock=clock)
    assert not keeper.poll(idle=False, work_seen=1, free=50)
    assert not keeper.poll(idle=False, work_seen=2, free=20), "the least seen is now 20"
    assert not keeper.poll(idle=False, work_seen=3, free=120), "100 above the least: within the bound"
    assert keeper.poll(idle=False, work_seen=4, free=121)
    assert not keeper.poll(idle=False, work_seen=5, free=200), "a trim leaves free blocks counted: 121 is the floor"
    assert keeper.poll(idle=False, work_seen=6, free=222)


# Which models turn keep_freed_memory on: warm-up measures the fresh memory one pass faults in.
DECIDE = """
import app
from app.loading import build_models, decide_policy, warm_up
from app.settings import Settings

settings = Settings(demo_tasks=["classify", "classify-text"], max_batch_size=1)
for loaded in build_models(settings):
    if loaded.variant in ("learned", "default"):
        policy, _ = decide_policy(loaded, settings)
        print(loaded.task.name, warm_up(loaded, policy).faulted_bytes)
"""


@needs_glibc
def test_warm_up_measures_what_a_pass_faults_in_and_only_the_image_classifier_passes_the_bar() -> None:
    faulted = {name: int(n) for name, n in (line.split() for line in run(DECIDE).splitlines())}
    assert faulted["classify"] > memory.FAULTED_BYTES_TO_KEEP, faulted  # 50,176 inputs x 261 features, and more
    assert faulted["classify-text"] < memory.FAULTED_BYTES_TO_KEEP, faulted
