"""PERCEIVER_COMPILE=latent: the server compiles before warm-up times anything, never while serving, and answers
as the eager model does."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from torch._dynamo.utils import counters

from app import loading
from perceiver_core import compiled

from .conftest import LiveServer
from .test_lifecycle import Server

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
    server = LiveServer(  # five at once, with the queue-delay target off: a busy machine's estimates refuse none
        demo_tasks=["classify-text"], warmup=True, compile="latent", max_queue_delay_ms=None
    ).start(timeout=600)
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


def test_without_a_c_compiler_the_server_serves_eagerly_and_says_why(tmp_path: Path) -> None:
    """The project's image has no C compiler unless built with COMPILER=true, and Inductor needs one for its CPU
    kernels. A server whose compiler is missing (CXX names none) and whose cache is empty fails to compile for
    real, comes up eager all the same, and /v1/models and the log say so."""
    env = {
        "CXX": str(tmp_path / "no-such-c++"),
        "PERCEIVER_DEMO_TASKS": '["classify-text", "fill-mask"]',
        "PERCEIVER_COMPILE": "latent",
        "PERCEIVER_COMPILE_CACHE": str(tmp_path / "cache"),
        "PERCEIVER_API_PROCESSES": "0",
    }
    server = Server(tmp_path / "log.jsonl", env)
    try:
        server.wait_ready(timeout=600)
        models = httpx.get(server.url + "/v1/models", timeout=30).json()["models"]
        r = httpx.post(server.url + "/v1/classify-text", json={"text": "eager after all"}, timeout=60)
        assert server.terminate() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert [m["compile"] for m in models] == ["off", "off"]
    assert r.status_code == 200, r.text
    failures = [
        json.loads(line)["msg"]
        for line in server.log.read_text().splitlines()
        if line.startswith("{") and "latent block failed" in line
    ]
    assert len(failures) == 1, failures  # said once; the second model is not tried
    assert "serving it and every model loaded after it eagerly" in failures[0], failures
    assert "compiler" in failures[0].lower(), failures  # names what is missing


def test_a_head_known_to_crash_compiled_is_served_eagerly_and_the_log_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """compiled.KNOWN_CRASHES names heads whose compiled latent block crashed the process on a device type (the
    MLM on CUDA, run 11): the server does not compile them there, serves them eagerly, says why, and still
    compiles its other models. Here the MLM is entered for the CPU, so that the gate runs on this machine."""
    monkeypatch.setitem(compiled.KNOWN_CRASHES, ("PerceiverForMaskedLM", "cpu"), "seen crashing in this test")
    seen: dict[str, int] = {}
    _observe_compiles(monkeypatch, "maybe_compile", seen)
    with caplog.at_level("WARNING", logger="perceiver.loading"):
        server = LiveServer(demo_tasks=["fill-mask"], compile="latent").start(timeout=600)
    try:
        with server.client() as client:
            (model,) = client.get("/v1/models").json()["models"]
            r = client.post("/v1/fill-mask", json={"text": "The capital of France is [MASK]."})
        assert not compiled.compiled(server.runtime.engine_for("fill-mask").model)
    finally:
        server.stop()
    assert model["compile"] == "off"
    assert r.status_code == 200, r.text
    assert seen["maybe_compile"] == 0  # nothing was compiled
    said = [rec.getMessage() for rec in caplog.records if "eagerly" in rec.getMessage()]
    assert said == ["PERCEIVER_COMPILE=latent: serving fill-mask eagerly: seen crashing in this test"], said
    assert loading._compile_failed is None  # the next model would be compiled
