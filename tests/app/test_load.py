"""Batching under concurrency, backpressure, deadlines, client disconnects and failing batches."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import LiveServer

TEXTS = [f"request number {i:02d} says something different" for i in range(12)]


@pytest.fixture(scope="module")
def text_server() -> Iterator[LiveServer]:
    server = LiveServer(demo_tasks=["classify-text"], max_batch_size=16, max_delay_ms=300, max_queue_size=12).start()
    yield server
    server.stop()


def block_inference(server: LiveServer, seconds: float) -> None:
    server.block_inference(seconds)


def post_text(client: httpx.Client, text: str, **kwargs: Any) -> httpx.Response:
    return client.post("/v1/classify-text", json={"text": text, "top_k": 2}, **kwargs)


def test_concurrent_requests_share_forward_passes_and_get_their_own_results(text_server: LiveServer) -> None:
    with text_server.client() as client:
        alone = {t: post_text(client, t).json()["predictions"] for t in TEXTS}
        before = text_server.metric("perceiver_batches_total", task="classify-text", model="classify-text")
        with ThreadPoolExecutor(len(TEXTS)) as pool:
            responses = list(pool.map(lambda t: post_text(client, t), TEXTS))
        after = text_server.metric("perceiver_batches_total", task="classify-text", model="classify-text")
    assert all(r.status_code == 200 for r in responses)
    assert after - before < len(TEXTS) / 2, f"{after - before} forward passes for {len(TEXTS)} requests"
    assert max(int(r.headers["x-batch-size"]) for r in responses) > 1
    for text, response in zip(TEXTS, responses, strict=True):  # each answer belongs to its own request
        got = response.json()["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in alone[text]]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in alone[text]], atol=1e-4)


def test_full_queue_answers_429_with_retry_after(text_server: LiveServer) -> None:
    block_inference(text_server, 1.5)
    time.sleep(0.05)
    with text_server.client() as client, ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: post_text(client, f"text {i}"), range(24)))
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in responses)
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "overloaded" for r in refused)
    assert text_server.metric(
        "perceiver_rejections_total", task="classify-text", model="classify-text", reason="queue_full"
    ) >= len(refused)


def test_deadline_from_client_header_gives_504(text_server: LiveServer) -> None:
    block_inference(text_server, 1.0)
    time.sleep(0.05)
    started = time.monotonic()
    with text_server.client() as client:
        r = post_text(client, "in a hurry", headers={"x-request-timeout-ms": "200"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded"
    assert time.monotonic() - started < 0.9  # answered at the deadline, not after the blocked pass
    time.sleep(1.0)
    with text_server.client() as client:
        assert client.get("/readyz").status_code == 200


def test_a_disconnected_client_never_reaches_the_model(text_server: LiveServer) -> None:
    labels = {"task": "classify-text", "model": "classify-text"}
    block_inference(text_server, 1.2)
    time.sleep(0.05)
    batches = text_server.metric("perceiver_batches_total", **labels)
    body = b'{"text": "nobody will read this answer", "top_k": 1}'
    request = (
        b"POST /v1/classify-text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with socket.create_connection(("127.0.0.1", text_server.settings.port)) as sock:
        sock.sendall(request)
        time.sleep(0.3)  # the request is queued behind the busy inference thread
    time.sleep(1.5)  # the thread frees up and the batcher forms its next batch
    assert text_server.metric("perceiver_batches_total", **labels) == batches
    assert text_server.metric("perceiver_rejections_total", **labels, reason="cancelled") >= 1


def test_an_exception_fails_only_that_batch_with_a_json_500(text_server: LiveServer) -> None:
    served = text_server.runtime.engine_for("classify-text")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated kernel failure")

    served.model.forward = broken  # type: ignore[method-assign]
    try:
        with text_server.client() as client:
            r = post_text(client, "this batch fails")
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "inference_failed"
        assert "simulated" not in r.text and "Traceback" not in r.text
    finally:
        del served.model.forward
    with text_server.client() as client:
        assert post_text(client, "and this one works").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_threads_are_not_leaked() -> None:
    assert threading.active_count() < 64
