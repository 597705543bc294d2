"""PERCEIVER_COMPILE=latent: the server compiles before warm-up times anything, never while serving, and answers
as the eager model does."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from torch._dynamo.utils import counters

from app import loading

from .conftest import LiveServer

TEXTS = ["a compiled latent block", "Ünïcödé is fine: 日本語 🚀", "x" * 300, "short", "the same answers, faster"]


def _graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return int(counters["stats"]["unique_graphs"])


def _observe_compiles(monkeypatch: pytest.MonkeyPatch, name: str, seen: dict[str, int]) -> None:
    real = getattr(loading, name)

    def observed(*args: Any) -> Any:
        before = _graphs()
        try:
            return real(*args)
        finally:
            seen[name] = seen.get(name, 0) + _graphs() - before

    monkeypatch.setattr(loading, name, observed)


def _scores(client: Any) -> list[list[float]]:
    def one(text: str) -> list[float]:
        r = client.post("/v1/classify-text", json={"text": text, "top_k": 2})
        assert r.status_code == 200, r.text
        return [p["score"] for p in sorted(r.json()["predictions"], key=lambda p: p["label"])]

    with ThreadPoolExecutor(len(TEXTS)) as pool:  # together, so that batches of several form too
        return list(pool.map(one, TEXTS))


def test_compiled_server_compiles_before_timing_and_answers_as_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, int] = {}
    for name in ("maybe_compile", "decide_policy", "warm_up"):
        _observe_compiles(monkeypatch, name, seen)
    server = LiveServer(demo_tasks=["classify-text"], warmup=True, compile="latent").start(timeout=600)
    try:
        with server.client() as client:
            (model,) = client.get("/v1/models").json()["models"]
            assert model["compile"] == "latent"
            # max_batch_size=auto's timings and warm-up's ran compiled graphs, none of them compiling one.
            assert seen["maybe_compile"] >= 1 and seen["decide_policy"] == 0 and seen["warm_up"] == 0, seen
            ready = _graphs()
            compiled_scores = _scores(client)
            assert _graphs() == ready  # serving compiled nothing
            server.runtime.engine_for("classify-text").model.encoder.layer_call = None  # the same weights, eager
            eager_scores = _scores(client)
    finally:
        server.stop()
    for ours, eager in zip(compiled_scores, eager_scores, strict=True):
        assert ours == pytest.approx(eager, abs=1e-5)
