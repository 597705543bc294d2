"""max_batch_size=auto: each model's batch size is measured at warm-up and reported in /v1/models."""

from __future__ import annotations

import itertools
from typing import Any

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
