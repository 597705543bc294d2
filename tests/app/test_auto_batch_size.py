"""max_batch_size=auto: each model's batch size is measured at warm-up and reported in /v1/models."""

from __future__ import annotations

import functools
import itertools
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app import loading
from app.engine import BatchPolicy
from app.loading import (
    AUTO_COSTLIER_FACTOR,
    AUTO_FASTER_TOLERANCE,
    AUTO_UNMEASURED_BATCH_SIZE,
    LoadedModel,
    decide_batch_size,
    warm_service_time,
    warm_up,
)
from app.tasks import TASKS

from .conftest import LiveServer

NEAR_BEST = 0.10


def batching(**settings: Any) -> dict[str, Any]:
    server = LiveServer(demo_tasks=["classify-text"], warmup=True, **settings).start()
    try:
        with server.client() as client:
            (model,) = client.get("/v1/models").json()["models"]
        assert server.runtime.engine_for("classify-text").batcher.max_batch_size == model["batching"]["max_batch_size"]
        return dict(model["batching"])
    finally:
        server.stop()


ROUNDING = 0.001  # ms: each of two rounded values is off by at most half of it


def test_auto_picks_the_smallest_size_near_the_best_and_shows_why() -> None:
    """Real timings on this machine, as /v1/models reports them. Whether they let the search decide depends on
    the machine (a busy one can leave a contradiction after every re-measurement; the decision on given timings
    is tested below), so the report must be true to its own figures either way."""
    chosen = batching()
    per_item = {int(k): v for k, v in chosen["per_item_ms"].items()}
    size = chosen["max_batch_size"]
    sizes = sorted(per_item)
    assert sizes == [2**i for i in range(len(sizes))] and len(sizes) >= 2
    fitting = {s: v for s, v in per_item.items() if v * s <= 500}
    # per_item_ms is rounded to 0.001 ms; the decision compared unrounded times.
    if chosen["max_batch_size_source"] == "auto":
        # The choice is within NEAR_BEST of the best per-item time of every size within the 500 ms budget, and
        # no smaller size is.
        assert size in per_item
        best = min(fitting.values())
        assert per_item[size] <= best * (1 + NEAR_BEST) + ROUNDING
        assert all(per_item[s] > best * (1 + NEAR_BEST) - ROUNDING for s in sizes if s < size)
    else:
        assert chosen["max_batch_size_source"] == "auto-fallback"
        # A fallback only where two neighbouring sizes still contradict each other, and then the safe default.
        slack = ROUNDING * 64
        totals = {s: v * s for s, v in per_item.items()}
        assert any(
            totals[b] < totals[a] * (1 - AUTO_FASTER_TOLERANCE) + slack
            or totals[b] > totals[a] * (b / a) * AUTO_COSTLIER_FACTOR / 2 - slack
            for a, b in itertools.pairwise(sizes)
        ), per_item
        assert size == min(AUTO_UNMEASURED_BATCH_SIZE, max(fitting)), per_item


def test_the_latency_budget_bounds_the_choice() -> None:
    chosen = batching(batch_latency_budget_ms=0.001)  # no forward pass fits: batches of one
    assert chosen["max_batch_size"] == 1


def test_a_number_overrides_auto() -> None:
    chosen = batching(max_batch_size=3)
    assert (chosen["max_batch_size"], chosen["max_batch_size_source"], chosen["per_item_ms"]) == (3, "configured", {})


# The decision itself, on given timings: what the search does with a noisy measurement never depends on how
# busy the machine running the test is.

# Per item: 10, 6, 4, 3, 2.5, 2.44, 2.44 ms: 16 is within 10% of the best (32 and 64 gain 2.5% more).
CLEAN_MS = {1: 10.0, 2: 12.0, 4: 16.0, 8: 24.0, 16: 40.0, 32: 78.0, 64: 156.0}


def timings(table: dict[int, float], noisy: dict[int, list[float]] | None = None) -> Any:
    """``measure(size, again)`` from a table in ms; ``noisy[size]`` gives that size's first measurements."""
    noisy = {k: list(v) for k, v in (noisy or {}).items()}
    calls: list[int] = []

    def measure(size: int, again: bool) -> float:
        calls.append(size)
        queue = noisy.get(size)
        return (queue.pop(0) if queue else table[size]) / 1000

    measure.calls = calls  # type: ignore[attr-defined]
    return measure


def test_the_choice_is_the_smallest_size_near_the_best() -> None:
    measure = timings(CLEAN_MS)
    choice = decide_batch_size(measure, 64, budget_s=0.5)
    assert (choice.size, choice.reliable, choice.remeasured) == (16, True, [])
    assert choice.per_item_s[16] == pytest.approx(0.0025)
    assert measure.calls.count(1) == 3  # every size in three rounds: the fastest counts


def test_a_timing_implausible_against_its_neighbours_is_measured_again() -> None:
    # A busy moment made size 2 take 40x its time (too slow to be run in every round): it contradicts size 4.
    choice = decide_batch_size(timings(CLEAN_MS, {2: [500.0]}), 64, budget_s=0.5)
    assert (choice.size, choice.reliable) == (16, True)
    assert 2 in choice.remeasured
    # ... and one that lasted all three rounds (size 8 slower than 16 in total) is measured again too.
    choice = decide_batch_size(timings(CLEAN_MS, {8: [60.0, 60.0, 60.0]}), 64, budget_s=0.5)
    assert (choice.size, choice.reliable) == (16, True) and 8 in choice.remeasured


def test_one_reading_too_fast_does_not_pin_a_size() -> None:
    # One thread's CPU time errs both ways on a shared core. A clean-clone CI run read size 2 at 2.43 ms in
    # total against 2.85 ms for size 1 (both around 3 ms elsewhere in the run): kept as the fastest, that reading
    # contradicted size 1 through every re-measurement, and the search fell back. The median outvotes it.
    choice = decide_batch_size(timings(CLEAN_MS, {2: [8.0]}), 64, budget_s=0.5)
    assert (choice.size, choice.reliable) == (16, True)
    assert choice.per_item_s[2] == pytest.approx(0.006)


def test_timings_that_stay_contradictory_fall_back_to_a_safe_default() -> None:
    # Size 4 always measures faster in total than size 2: no curve explains it, however often it is measured.
    contradictory = {**CLEAN_MS, 4: 5.0}
    choice = decide_batch_size(timings(contradictory), 64, budget_s=0.5)
    assert not choice.reliable
    assert choice.size == AUTO_UNMEASURED_BATCH_SIZE
    # The fallback still respects the budget as measured, and the configured cap.
    assert decide_batch_size(timings(contradictory), 8, budget_s=0.5).size == 8
    slow = {k: v * 20 for k, v in contradictory.items()}  # 8 items take 480 ms: 16 would be over 500 ms
    assert decide_batch_size(timings(slow), 64, budget_s=0.5).size == 8


def test_the_latency_budget_bounds_the_decision() -> None:
    assert decide_batch_size(timings(CLEAN_MS), 64, budget_s=0.035).size == 8  # 16 would take 40 ms
    assert decide_batch_size(timings(CLEAN_MS), 64, budget_s=0.001).size == 1


def test_a_fallback_is_said_in_models_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """The demo text classifier, its timings replaced by contradictory ones: /v1/models says auto-fallback."""
    import app.loading as loading

    real = loading.decide_batch_size

    def contradicted(measure: Any, limit: int, budget_s: float, fallback: int = 16) -> Any:
        return real(timings({**CLEAN_MS, 4: 5.0}), limit, budget_s, fallback)

    loading.decide_batch_size = contradicted  # type: ignore[assignment]
    try:
        with caplog.at_level("WARNING", logger="perceiver.loading"):
            chosen = batching()
    finally:
        loading.decide_batch_size = real
    assert (chosen["max_batch_size"], chosen["max_batch_size_source"]) == (16, "auto-fallback")
    assert any("could not decide" in r.getMessage() for r in caplog.records)


class FakePasses:
    """A model's passes on a clock of their own: the first at each batch size takes ``first_s`` an item (allocation,
    kernel choice), every later one ``later_s``."""

    def __init__(self, first_s: float, later_s: float) -> None:
        self.first_s, self.later_s, self.now, self.seen = first_s, later_s, 0.0, set[int]()

    def run(self, payloads: list[Any], *_: Any) -> list[Any]:
        size = len(payloads)
        self.now += size * (self.later_s if size in self.seen else self.first_s)
        self.seen.add(size)
        return [None] * size

    def clock(self) -> float:
        return self.now


def warm_seeds(passes: FakePasses, monkeypatch: pytest.MonkeyPatch, per_item_ms: dict[int, float]) -> dict[str, float]:
    """The per-item ms by size class that admission starts from, for a classify-text model whose passes are
    ``passes``, after a search that read ``per_item_ms`` (empty: max_batch_size was configured) and warm-up."""
    task = TASKS["classify-text"]
    config = next(iter(task.demo_configs.values()))
    model = SimpleNamespace(device=torch.device("cpu"), config=config)
    loaded = LoadedModel(task, "default", model, "demo", "random-init", "float32", 8, 0.0)  # type: ignore[arg-type]
    monkeypatch.setattr(loading, "make_runner", lambda *_: passes.run)
    passes.seen.update(per_item_ms)  # the search ran these sizes
    policy = BatchPolicy(8, "auto" if per_item_ms else "configured", 0.0, None, per_item_ms)
    return warm_service_time(policy, warm_up(loaded, policy, clock=passes.clock)).summary()


def test_admissions_first_estimates_are_not_a_first_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A configured batch size: warm-up's first pass at each size allocates and chooses kernels (the demo's Fourier
    image classifier's first pass took 2.3x its second), so each size is timed on its second."""
    seeds = warm_seeds(FakePasses(first_s=0.020, later_s=0.002), monkeypatch, {})
    assert seeds == {"1": 2.0, "2": 2.0, "4": 2.0, "8": 2.0}


class StallsOnce(FakePasses):
    """... whose first warmed pass at ``size`` stalls: on a busy 2-core machine one pass in several was given both
    cores and waited half a second at a barrier."""

    def __init__(self, first_s: float, later_s: float, size: int, stall_s: float) -> None:
        super().__init__(first_s, later_s)
        self.size, self.stall_s = size, stall_s

    def run(self, payloads: list[Any], *_: Any) -> list[Any]:
        if len(payloads) == self.size and self.size in self.seen and self.stall_s:
            self.now, self.stall_s = self.now + self.stall_s, 0.0
        return super().run(payloads)


def test_one_stalled_pass_does_not_set_admissions_first_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed once, a stalled pass seeded its size at 200x its passes (review: fill-mask's batches of 2 at 250 ms an
    item, and an idle server refused a burst of five). Short passes are timed three times and the median kept."""
    seeds = warm_seeds(StallsOnce(first_s=0.004, later_s=0.002, size=8, stall_s=0.5), monkeypatch, {})
    assert seeds == {"1": 2.0, "2": 2.0, "4": 2.0, "8": 2.0}


def test_admissions_first_estimates_are_warm_ups_wall_times_not_the_searchs_one_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search reads one thread's CPU time, a pass on one thread where serving gives it the free cores: the
    demo's learned image classifier read 2.6x its passes on 2 quiet cores, and at an idle server two of five
    concurrent 1 s requests were refused on it. Warm-up times each size as the batcher times its batches."""
    search = {1: 9.0, 2: 6.0, 4: 4.0, 8: 3.0}
    assert warm_seeds(FakePasses(first_s=0.020, later_s=0.002), monkeypatch, search) == {
        "1": 2.0,
        "2": 2.0,
        "4": 2.0,
        "8": 2.0,
    }
    # A pass of a second or more keeps the search's reading: timing it again would add as much to start-up.
    slow = {1: 1200.0, 2: 700.0, 4: 400.0, 8: 300.0}
    assert warm_seeds(FakePasses(first_s=0.020, later_s=0.002), monkeypatch, slow) == {
        str(k): v for k, v in slow.items()
    }
    # Unless a larger batch's pass was shorter: a batch of one takes no longer than a batch of two (timed: 4 ms).
    assert warm_seeds(FakePasses(first_s=0.020, later_s=0.002), monkeypatch, {1: 1200.0, 2: 400.0})["1"] == 4.0


def test_warm_up_says_when_other_work_kept_a_core_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its figures are then a busy machine's, and the batcher times a pass again once the machine is quiet
    (``Batcher.reseed``); a quiet warm-up's stand."""
    from app.cores import CoreShare

    task = TASKS["classify-text"]
    config = next(iter(task.demo_configs.values()))
    model = SimpleNamespace(device=torch.device("cpu"), config=config)
    loaded = LoadedModel(task, "default", model, "demo", "random-init", "float32", 8, 0.0)  # type: ignore[arg-type]
    policy = BatchPolicy(8, "configured", 0.0, None, {})
    for others_per_s, busy in ((1.0, True), (0.0, False)):  # another process on one core of two, or none
        passes = FakePasses(first_s=0.020, later_s=0.002)
        others = functools.partial(lambda p, r: p.now * r, passes, others_per_s)  # CPU seconds so far
        share = CoreShare(2, lambda: 0.0, passes.clock, others_busy_s=others)

        def runner(*_: Any, share: CoreShare = share, passes: FakePasses = passes) -> Any:
            def run(payloads: list[Any], *rest: Any) -> list[Any]:
                share.threads()  # as the real runner asks before each pass
                return passes.run(payloads, *rest)

            return run

        monkeypatch.setattr(loading, "make_runner", runner)
        assert warm_up(loaded, policy, share, clock=passes.clock).busy is busy
