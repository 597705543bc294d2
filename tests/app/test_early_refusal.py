"""Under overload, a request whose model is known before its body is parsed is refused unparsed: parsing
the upload of every refused request was a tenth of the event loop's work at 30x overload."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import httpx
import pytest

from .conftest import MEDIA, LiveServer, occupy, until

CAT = (MEDIA / "cat.jpg").read_bytes()


@pytest.fixture(scope="module")
def busy() -> Iterator[LiveServer]:
    """Demo classify (learned, fourier, conv); learned is busy with a batch it estimates at 100 s, so it
    refuses every request by time, while the other two variants are idle."""
    server = LiveServer(demo_tasks=["classify"]).start()
    occupy(server.runtime.engine_for("classify", "learned"), 100.0)
    yield server
    server.stop()


def test_a_request_for_the_busy_default_is_refused_before_its_upload_is_parsed(busy: LiveServer) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="c.jpg"\r\n\r\n' + CAT  # no end
    headers = {"content-type": "multipart/form-data; boundary=b"}
    with busy.client() as client:
        r = client.post("/v1/classify", content=body, headers=headers)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # parsed, it would be a 400
        assert r.json()["error"]["type"] == "overloaded" and "classify/learned" in r.json()["error"]["message"]
        r = client.post("/v1/classify", content=body, headers=headers, params={"model": "learned"})
        assert r.status_code == 429
        complete = client.post("/v1/classify", files={"image": ("c.jpg", CAT)})
        assert complete.status_code == 429


def test_when_every_variant_refuses_the_one_the_query_names_is_the_one_refused() -> None:
    """Every classify variant busy: a request whose query names conv was refused under the task's default model
    (its metrics, its message), as if it had asked for that one; one naming no model known to the task is its
    404, as when they are idle."""
    server = LiveServer(demo_tasks=["classify"]).start()
    try:
        for variant in ("learned", "fourier", "conv"):
            occupy(server.runtime.engine_for("classify", variant), 100.0)
        labels = {"task": "classify", "model": "classify/conv", "reason": "queue_full"}
        with server.client() as client:
            before = server.metric("perceiver_rejections_total", **labels)
            r = client.post("/v1/classify", files={"image": ("c.jpg", CAT)}, params={"model": "conv"})
            assert r.status_code == 429 and "classify/conv" in r.json()["error"]["message"], r.text
            assert server.metric("perceiver_rejections_total", **labels) == before + 1
            r = client.post("/v1/classify", files={"image": ("c.jpg", CAT)}, params={"model": "nonesuch"})
            assert r.status_code == 404, r.text
    finally:
        server.stop()


def test_a_body_that_may_name_another_model_is_parsed_and_served(busy: LiveServer) -> None:
    with busy.client() as client:
        r = client.post("/v1/classify", files={"image": ("c.jpg", CAT)}, data={"model": "conv"})
        assert r.status_code == 200 and r.json()["model"] == "classify/conv"
        r = client.post("/v1/classify", files={"image": ("c.jpg", CAT)}, params={"model": "fourier"})
        assert r.status_code == 200 and r.json()["model"] == "classify/fourier"


def test_a_body_read_at_the_door_reaches_the_route_whole(busy: LiveServer) -> None:
    """The door reads the body to look for ``model``; the route must then get every byte of it, here a
    PNG of about 1 MB that arrives in several messages, with the field that names the idle variant last."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    assert buffer.tell() > 1_000_000
    with busy.client() as client:
        r = client.post("/v1/classify", files={"image": ("noise.png", buffer.getvalue())}, data={"model": "conv"})
    assert r.status_code == 200 and r.json()["model"] == "classify/conv"


def test_refusals_are_logged_once_a_second_with_the_count_left_out(
    busy: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of 429s writes one log line a second, the next saying how many it left out; /metrics
    still counts every refusal."""
    import time

    def refusal_lines() -> list[dict[str, object]]:
        return [
            r.fields  # type: ignore[attr-defined]
            for r in caplog.records
            if r.name == "perceiver.server" and r.getMessage() == "request" and r.fields["status"] == 429  # type: ignore[attr-defined]
        ]

    def refused_total(client: object) -> float:
        text = client.get("/metrics").text  # type: ignore[attr-defined]
        lines = [line for line in text.splitlines() if line.startswith("perceiver_requests_total{")]
        return sum(float(line.split()[-1]) for line in lines if 'status="429"' in line and "classify" in line)

    clock = [time.monotonic() + 10]  # past the next line any earlier test's refusals allowed
    busy.runtime.log_clock = lambda: clock[0]
    try:
        with caplog.at_level(logging.INFO, logger="perceiver.server"), busy.client() as client:
            before = refused_total(client)
            for _ in range(20):  # within one second by the log's clock: one line, 19 left out
                assert client.post("/v1/classify", files={"image": ("c.jpg", CAT)}).status_code == 429
            clock[0] += 1.0
            assert client.post("/v1/classify", files={"image": ("c.jpg", CAT)}).status_code == 429
            lines = refusal_lines()  # each written before its answer's last byte went out
            assert refused_total(client) - before == 21
    finally:
        busy.runtime.log_clock = time.monotonic
    # The first line also counts what earlier tests' refusals left out; the second counts the 19 after it.
    assert len(lines) == 2, lines
    assert lines[1]["refusals_not_logged"] == 19, lines


def test_the_log_throttle_writes_one_line_per_interval_and_counts_the_rest() -> None:
    from app.accesslog import LogThrottle

    throttle = LogThrottle(interval_s=1.0)
    assert throttle.admit(100.0) == 0
    assert [throttle.admit(100.0 + i / 10) for i in range(1, 10)] == [None] * 9
    assert throttle.admit(101.0) == 9  # the interval has passed: written, with the 9 left out
    assert throttle.admit(101.5) is None
    assert throttle.admit(250.0) == 1


def test_the_refusals_the_log_left_out_are_written_at_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """A burst of refusals that ended the run: the throttle's one line a second left 26 of 27 out, and they were
    never written (audit). The server writes what it left out as it stops. The log's clock stands still here, so
    every refusal after the first is left out, however long the burst takes."""
    server = LiveServer(demo_tasks=["classify-text"]).start()
    with caplog.at_level(logging.INFO, logger="perceiver.server"):
        try:
            server.runtime.access.clock = lambda: 100.0
            occupy(server.runtime.engine_for("classify-text"), 100.0)  # every request refused by time
            with server.client() as client:
                for _ in range(5):
                    timeout = {"x-request-timeout-ms": "1000"}
                    assert client.post("/v1/classify-text", json={"text": "hi"}, headers=timeout).status_code == 429
        finally:
            server.stop()
    fields = [r.fields for r in caplog.records if r.name == "perceiver.server" and hasattr(r, "fields")]
    assert [f.get("refusals_not_logged", 0) for f in fields if f.get("status") == 429] == [0, 4], fields


def test_refusals_past_the_pace_wait_before_they_are_sent() -> None:
    """Clients that retry a 429 at once, ignoring Retry-After: past REFUSAL_PACE_PER_S refusals a second, each
    is held REFUSAL_PAUSE_S, so each connection is refused at most a few times a second."""
    from app.admission import RefusalPacer

    pacer = RefusalPacer(per_s=3, pause_s=0.25)
    assert [pacer.pause(10.0 + i / 100) for i in range(5)] == [0.0, 0.0, 0.0, 0.25, 0.25]
    assert pacer.pause(11.05) == 0.0  # a new second: answered at once again


def test_uploads_waiting_for_a_decode_thread_count_as_queued_work() -> None:
    """The decode threads are a queue in front of the model's: with them all busy, the uploads that wait there
    count against max_queue_size, so the third of four is refused at once, not decoded and then refused at the
    model's queue (under 30x overload autoencode's refusals came 6-12 s late, and its answers waited 13 s)."""
    server = LiveServer(demo_tasks=["classify"], max_queue_size=2).start()
    gate = threading.Event()
    try:
        runtime = server.runtime
        for _ in range(runtime.settings.decode_workers):  # every decode thread busy until the gate opens
            runtime.decode_executor.submit(gate.wait, 60)
        engine = runtime.engine_for("classify", "learned")
        answers: list[httpx.Response] = []

        def post() -> None:
            answers.append(httpx.post(server.url + "/v1/classify", files={"image": ("c.jpg", CAT)}, timeout=60))

        threads = [threading.Thread(target=post) for _ in range(4)]
        for thread in threads:
            thread.start()
        until(lambda: len(answers) == 2, "two refused while the decode threads are held")
        assert [r.status_code for r in answers] == [429, 429] and engine.batcher.admission_state().queue_len == 2
        assert "queue holds 2 requests" in answers[0].json()["error"]["message"]
        gate.set()
        for thread in threads:
            thread.join()
        assert sorted(r.status_code for r in answers) == [200, 200, 429, 429]
        until(lambda: engine.batcher.admission_state().queue_len == 0, "nothing left counted")  # none leaked
        broken = httpx.post(server.url + "/v1/classify", files={"image": ("c.jpg", CAT[:500])}, timeout=60)
        assert broken.status_code == 422  # a decode that fails leaves nothing counted either (released once
        until(lambda: engine.batcher.admission_state().idle, "the failed decode no longer counted")  # answered)
    finally:
        gate.set()
        server.stop()


def test_a_request_refused_as_it_joins_the_queue_is_not_a_failure_in_the_statistics() -> None:
    """Twenty images at a busy classifier, 0.5 s to answer: admitted on one image's pass at the door and the route,
    refused as they join the queue, on all twenty passes (10 rounds on two lanes). A refusal at the door was no
    failure in Triton's statistics and this one was: the same 429 counted or not by which check refused it (audit)."""
    server = LiveServer(demo_tasks=["classify"], cpu_lanes=2).start()
    try:
        engine = server.runtime.engine_for("classify", "learned")
        occupy(engine, 0.05)  # both lanes busy for 0.05 s; 0.05 s an image
        cat = ("image", ("c.jpg", CAT, "image/jpeg"))
        with server.client() as client:
            r = client.post("/v1/classify", files=[cat] * 20, headers={"x-request-timeout-ms": "500"})
        assert r.status_code == 429 and "estimated wait" in r.json()["error"]["message"], r.text
        assert (engine.statistics.success.count, engine.statistics.fail.count) == (0, 0)
        assert (
            server.metric(
                "perceiver_rejections_total", task="classify", model="classify/learned", reason="would_miss_deadline"
            )
            == 1
        )
    finally:
        server.stop()
