"""max_batch_size=auto: each model's batch size is measured at warm-up and reported in /v1/models."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from app.loading import AUTO_UNMEASURED_BATCH_SIZE, decide_batch_size

from .conftest import LiveServer

MIN_GAIN = 0.05


def batching(**settings: Any) -> dict[str, Any]:
    server = LiveServer(demo_tasks=["classify-text"], warmup=True, **settings).start()
    try:
        with server.client() as client:
            (model,) = client.get("/v1/models").json()["models"]
        assert server.runtime.model_for("classify-text").batcher.max_batch_size == model["batching"]["max_batch_size"]  # type: ignore[union-attr]
        return dict(model["batching"])
    finally:
        server.stop()


ROUNDING = 0.001  # ms: each of two rounded values is off by at most half of it


def test_auto_picks_the_largest_size_that_still_pays_and_shows_why() -> None:
    chosen = batching()
    assert chosen["max_batch_size_source"] == "auto"
    per_item = {int(k): v for k, v in chosen["per_item_ms"].items()}
    size = chosen["max_batch_size"]
    sizes = sorted(per_item)
    assert sizes == [2**i for i in range(len(sizes))] and size in per_item
    # Every step up to the choice cut the per-item time by at least MIN_GAIN (per_item_ms is rounded to
    # 0.001 ms, the search compared unrounded times: 0.345 against 0.363 * 0.95 = 0.34485 is a pass) ...
    for small, large in itertools.pairwise(sizes):
        if large <= size:
            assert per_item[large] <= per_item[small] * (1 - MIN_GAIN) + ROUNDING
    # ... and the next size measured (if any) did not, or the search stopped at the cap.
    after = [s for s in sizes if s > size]
    assert after or size == 64
    if after:
        assert per_item[after[0]] > per_item[size] * (1 - MIN_GAIN) - ROUNDING or per_item[after[0]] * after[0] > 500


def test_the_latency_budget_bounds_the_choice() -> None:
    chosen = batching(batch_latency_budget_ms=0.001)  # no forward pass fits: batches of one
    assert chosen["max_batch_size"] == 1


def test_a_number_overrides_auto() -> None:
    chosen = batching(max_batch_size=3)
    assert (chosen["max_batch_size"], chosen["max_batch_size_source"], chosen["per_item_ms"]) == (3, "configured", {})


# The decision itself, on given timings: what the search does with a noisy measurement never depends on how
# busy the machine running the test is.

CLEAN_MS = {1: 10.0, 2: 12.0, 4: 16.0, 8: 24.0, 16: 40.0, 32: 78.0, 64: 156.0}  # 32 gains 2.5% a item on 16


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


def test_the_choice_is_the_largest_size_that_gains_enough() -> None:
    choice = decide_batch_size(timings(CLEAN_MS), 64, budget_s=0.5)
    assert (choice.size, choice.reliable, choice.remeasured) == (16, True, [])
    assert choice.per_item_s[16] == pytest.approx(0.0025) and 64 not in choice.per_item_s  # stopped at 32


def test_a_timing_implausible_against_its_neighbours_is_measured_again() -> None:
    # A busy moment made size 2 take 50x its time: it looked like batching stopped paying after size 1.
    choice = decide_batch_size(timings(CLEAN_MS, {2: [500.0]}), 64, budget_s=0.5)
    assert (choice.size, choice.reliable) == (16, True)
    assert 2 in choice.remeasured
    # ... and one that made a larger batch look free (size 8 slower than 16 in total) is caught as well.
    choice = decide_batch_size(timings(CLEAN_MS, {8: [60.0]}), 64, budget_s=0.5)
    assert (choice.size, choice.reliable) == (16, True) and 8 in choice.remeasured


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
