"""perceiver_client (client/) against live servers on loopback: every method with real media, typed results, the
server's errors, deadlines passed through as x-request-timeout-ms, and Retry-After honoured on 429 with bounded
retries, sync and async. Also: the package installs with httpx alone."""

from __future__ import annotations

import asyncio
import email.utils
import http.server
import io
import itertools
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from perceiver_client import (
    APIError,
    AsyncClient,
    Classification,
    Client,
    ConnectionFailed,
    DeadlineExceeded,
    FilledText,
    OverloadedError,
    PerceiverError,
    Prediction,
)

from ..app.conftest import MEDIA, LiveServer, until

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    server = LiveServer().start()  # the demo profile: every task
    yield server
    server.stop()


def test_every_method_answers_with_typed_results(server: LiveServer) -> None:
    with Client(server.url) as client:
        assert client.ready()
        cat = client.classify(MEDIA / "cat.jpg", top_k=3, model="fourier")
        assert isinstance(cat, Classification) and cat.model == "classify/fourier" and cat.weights == "random-init"
        assert len(cat.predictions) == 3 and all(isinstance(p, Prediction) for p in cat.predictions)
        assert [p.score for p in cat.predictions] == sorted((p.score for p in cat.predictions), reverse=True)
        with open(MEDIA / "cat.jpg", "rb") as file:  # a path, bytes or an open file: the same image
            assert client.classify(file, top_k=3, model="fourier") == cat
        both = client.classify_many([MEDIA / "cat.jpg", (MEDIA / "coffee.jpg").read_bytes()], top_k=1)
        assert [b.model for b in both] == ["classify/learned"] * 2 and all(len(b.predictions) == 1 for b in both)
        text = client.classify_text("What a wonderful day!", top_k=1)
        assert text.model == "classify-text" and text.predictions[0].label in ("positive", "negative")
        filled = client.fill_mask("The sky is [MASK][MASK].", top_k=2)
        assert isinstance(filled, FilledText) and [m.byte_offset for m in filled.masks] == [11, 12]
        assert all(len(m.candidates) == 2 for m in filled.masks) and len(filled.text.encode()) == 14
        video = client.autoencode(EXAMPLES / "clip.mp4", top_k=2)
        assert (
            video.model == "autoencode" and video.audio_source in ("video", "silence") and len(video.predictions) == 2
        )
        names = {m.name for m in client.models()}
        assert {"classify/learned", "fill-mask", "optical-flow", "autoencode"} <= names


@pytest.mark.slow
def test_optical_flow(server: LiveServer) -> None:
    with Client(server.url) as client:
        flow = client.optical_flow(EXAMPLES / "frame1.png", EXAMPLES / "frame2.png")
    assert (flow.height, flow.width) == (360, 480) and len(flow.flow) == 360 and len(flow.flow[0][0]) == 2


def test_the_servers_errors_are_raised_with_their_type_and_request_id(server: LiveServer) -> None:
    with Client(server.url) as client:
        with pytest.raises(APIError) as caught:
            client.fill_mask("no mask here")
        assert caught.value.status_code == 422 and caught.value.error_type == "invalid_input"
        assert "[MASK]" in caught.value.message and caught.value.request_id and caught.value.attempts == 1
        with pytest.raises(APIError) as caught:
            client.classify(MEDIA / "cat.jpg", model="nope")
        assert caught.value.status_code == 404 and "learned" in caught.value.message


def test_an_api_key_is_sent_as_a_bearer_token() -> None:
    server = LiveServer(demo_tasks=["classify-text"], api_keys="sesame").start()
    try:
        with Client(server.url) as anonymous, pytest.raises(APIError) as caught:
            anonymous.classify_text("hi")
        assert caught.value.status_code == 401
        with Client(server.url, api_key="sesame") as client:
            assert client.classify_text("hi").model == "classify-text"
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- overload


@pytest.fixture
def busy() -> Iterator[LiveServer]:
    """A text model whose queue holds one request: with the model busy and that one queued, the next gets 429."""
    server = LiveServer(demo_tasks=["classify-text"], max_batch_size=1, max_delay_ms=0, max_queue_size=1).start()
    yield server
    server.stop()


def occupy(server: LiveServer) -> tuple[threading.Event, list[threading.Thread]]:
    """Hold the inference thread until the returned gate is set and fill the queue, as real load would: one
    request taken into a batch (waiting for the thread), and one queued behind it."""
    batcher = server.runtime.engine_for("classify-text").batcher
    gate = server.hold_inference()
    fillers = []
    for ready in (lambda: batcher.running == 1, lambda: batcher.depth == 1):
        post = {"json": {"text": "filler"}, "timeout": 60}
        fillers.append(threading.Thread(target=httpx.post, args=(server.url + "/v1/classify-text",), kwargs=post))
        fillers[-1].start()
        until(ready, "the filler taken in")
    return gate, fillers


def release(gate: threading.Event, fillers: list[threading.Thread]) -> None:
    gate.set()
    for filler in fillers:
        filler.join()


class Seen:
    """Every response the client received (an httpx event hook): status and Retry-After."""

    def __init__(self, then: Callable[[], object] | None = None) -> None:
        self.responses: list[tuple[int, float | None]] = []
        self.then = then  # called on every response after it is recorded

    def __call__(self, response: httpx.Response) -> None:
        header = response.headers.get("retry-after")
        self.responses.append((response.status_code, None if header is None else float(header)))
        if self.then is not None:
            self.then()

    async def hook(self, response: httpx.Response) -> None:
        self(response)

    def waited_at_least(self) -> float:
        return sum(r or 0 for status, r in self.responses if status == 429)


def test_a_429_is_retried_after_retry_after_until_it_succeeds(busy: LiveServer) -> None:
    gate, fillers = occupy(busy)
    seen = Seen(then=gate.set)  # the model frees up once the client has been refused
    started = time.monotonic()
    try:
        with Client(busy.url, max_retries=6, event_hooks={"response": [seen]}) as client:
            result = client.classify_text("patience", top_k=1)
        elapsed = time.monotonic() - started
    finally:
        release(gate, fillers)
    statuses = [s for s, _ in seen.responses]
    assert statuses[0] == 429 and statuses[-1] == 200 and set(statuses[:-1]) == {429}, seen.responses
    assert all(r is not None and r >= 1 for s, r in seen.responses if s == 429)
    assert elapsed >= seen.waited_at_least()  # it waited as long as the server asked, every time
    assert result.model == "classify-text" and len(result.predictions) == 1


def test_retries_are_bounded_and_then_raise_a_clear_error(busy: LiveServer) -> None:
    gate, fillers = occupy(busy)
    seen = Seen()
    started = time.monotonic()
    try:
        with (
            Client(busy.url, max_retries=1, event_hooks={"response": [seen]}) as client,
            pytest.raises(OverloadedError) as caught,
        ):
            client.classify_text("impatient")
        elapsed = time.monotonic() - started
    finally:
        release(gate, fillers)
    assert [s for s, _ in seen.responses] == [429, 429]  # the first try and one retry
    assert elapsed >= seen.waited_at_least() - seen.responses[-1][1]  # type: ignore[operator]
    error = caught.value
    assert error.status_code == 429 and error.attempts == 2 and error.retry_after_s is not None
    assert "gave up after 2 attempts" in str(error) and "overloaded" in str(error)


def test_a_retry_after_longer_than_the_deadline_is_not_waited_for(busy: LiveServer) -> None:
    gate, fillers = occupy(busy)
    seen = Seen()
    try:
        with (
            Client(busy.url, max_retries=5, event_hooks={"response": [seen]}) as client,
            pytest.raises(OverloadedError) as caught,
        ):
            client.classify_text("in a hurry", timeout_ms=500)  # Retry-After is at least 1 s
    finally:
        release(gate, fillers)
    assert caught.value.attempts == 1 and [s for s, _ in seen.responses] == [429]  # no retry, so no wait for one


def test_the_deadline_reaches_the_server(busy: LiveServer) -> None:
    """x-request-timeout-ms: the server gives up at the client's deadline (504), not at its own 30 s: the forward
    pass it waits for lasts until the answer is in."""
    gate = busy.hold_inference()
    try:
        with Client(busy.url, max_retries=0) as client, pytest.raises(APIError) as caught:
            client.classify_text("waiting", timeout_ms=300)
    finally:
        gate.set()
    assert caught.value.status_code == 504 and caught.value.error_type == "deadline_exceeded"


def test_the_async_client_retries_the_same_way(busy: LiveServer) -> None:
    gate, fillers = occupy(busy)
    seen = Seen(then=gate.set)

    async def call() -> tuple[Classification, float]:
        started = time.monotonic()
        async with AsyncClient(busy.url, max_retries=6, event_hooks={"response": [seen.hook]}) as client:
            result = await client.classify_text("async patience", top_k=2)
        return result, time.monotonic() - started

    try:
        result, elapsed = asyncio.run(call())
    finally:
        release(gate, fillers)
    statuses = [s for s, _ in seen.responses]
    assert statuses[0] == 429 and statuses[-1] == 200 and set(statuses[:-1]) == {429}, seen.responses
    assert elapsed >= seen.waited_at_least() and len(result.predictions) == 2


# ---------------------------------------------------------------------------------------------- the network


class Scripted:
    """A plain HTTP server on loopback that answers each request with the next (status, headers, body) of its
    script, and notes when each came: what perceiver-serve never sends (a past Retry-After date, a 200 that is
    not JSON), from a real socket."""

    def __init__(self, *replies: tuple[int, dict[str, str], bytes]) -> None:
        self.replies, self.times = list(replies), []  # type: list[tuple[int, dict[str, str], bytes]], list[float]
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.times.append(time.monotonic())
                status, headers, body = outer.replies.pop(0)
                self.send_response(status)
                for name, value in {**headers, "content-length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Scripted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_server_that_cannot_be_reached_is_retried_then_raised_as_the_clients_own_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    tries: list[float] = []
    with Client(url, max_retries=2, event_hooks={"request": [lambda r: tries.append(time.monotonic())]}) as client:
        assert client.ready() is False  # a starting server: a loop may wait on ready()
        with pytest.raises(ConnectionFailed) as caught:
            client.classify_text("anyone?")
    assert isinstance(caught.value, PerceiverError) and isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.attempts == 3 and "cannot reach the server" in str(caught.value)
    assert len(tries) == 4 and tries[3] - tries[1] >= 0.5 + 1.0  # ready(), then the call and two backed-off retries

    async def call() -> bool:
        async with AsyncClient(url, max_retries=0) as client:
            with pytest.raises(ConnectionFailed):
                await client.classify_text("anyone?")
            return await client.ready()

    assert asyncio.run(call()) is False


def test_a_server_that_never_answers_ends_in_deadline_exceeded_not_an_httpx_error() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with Client(url, max_retries=3) as client, pytest.raises(DeadlineExceeded) as caught:
            client.classify_text("hello?", timeout_ms=300)
    assert "deadline passed" in str(caught.value) and isinstance(caught.value.__cause__, httpx.ReadTimeout)


def test_a_retry_after_of_zero_or_a_date_past_backs_off_instead_of_retrying_at_once() -> None:
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    busy = b'{"error": {"type": "overloaded", "message": "busy"}}'
    with Scripted((429, {"retry-after": past}, busy), (503, {"retry-after": "0"}, busy), (429, {}, busy)) as server:
        with Client(server.url, max_retries=2) as client, pytest.raises(OverloadedError) as caught:
            client.classify_text("again")
        gaps = [b - a for a, b in itertools.pairwise(server.times)]
    assert caught.value.attempts == 3 and gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps  # 0.5 s, then 1 s


def test_a_200_whose_body_is_not_the_answer_is_a_clients_error() -> None:
    not_json = (200, {"content-type": "application/json"}, b"<html>proxy</html>")
    with Scripted(not_json, (200, {}, b"{}")) as server, Client(server.url) as client:
        for _ in range(2):
            with pytest.raises(PerceiverError, match="the server's 200 answer could not be read"):
                client.classify_text("hi")


def test_classify_many_refuses_one_image_given_alone() -> None:
    with Client("http://127.0.0.1:9") as client:  # refused before anything is sent
        for one in (str(MEDIA / "cat.jpg"), MEDIA / "cat.jpg", b"\xff\xd8", bytearray(b"\xff"), io.BytesIO(b"\xff")):
            with pytest.raises(TypeError, match="for one image, call classify"):
                client.classify_many(one)


# ---------------------------------------------------------------------------------------------- packaging


def test_the_package_depends_on_httpx_alone_and_imports_without_torch(tmp_path: Path) -> None:
    source, out = tmp_path / "client", tmp_path / "metadata"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out.mkdir()
    build = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", build, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = (out / result.stdout.strip().splitlines()[-1] / "METADATA").read_text().splitlines()
    assert "Name: perceiver-client" in metadata
    assert [line for line in metadata if line.startswith("Requires-Dist:")] == ["Requires-Dist: httpx>=0.27"]
    blocked = (
        "import sys; sys.modules.update(torch=None, numpy=None, app=None, perceiver_core=None); import perceiver_client"
    )
    run = subprocess.run([sys.executable, "-c", blocked], cwd=source, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
