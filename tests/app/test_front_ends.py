"""PERCEIVER_API_PROCESSES=2: two front-end processes and one model process behind one port (docs/front-ends.md).

Everything users have with one process must hold: the same answers, batches filling from both front ends,
refusals at the door with Retry-After, deadlines, work that stops once its request has ended, drain on SIGTERM
with nothing lost, metrics and statistics summed across processes, API keys, /v2, gRPC and the playground.
Conditions are awaited (the model's queue as /v1/models reports it), never slept for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import MEDIA, LiveServer, free_port, metric, shifted_pair, until
from .test_grpc import _infer_raw, _text_request
from .test_lifecycle import STARTED, Server

KEY = "front-end-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def front_ends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "PERCEIVER_API_PROCESSES": "2",
        "PERCEIVER_DEMO_TASKS": '["classify-text", "classify"]',
        "PERCEIVER_WARMUP": "false",
        "PERCEIVER_MAX_DELAY_MS": "20",
        "PERCEIVER_MAX_QUEUE_DELAY_MS": "null",  # sixteen clients at once: estimates as slow as the machine refuse none
        "PERCEIVER_MAX_BODY_BYTES": str(4 * 1024 * 1024),
        "PERCEIVER_API_KEYS": KEY,
        "PERCEIVER_GRPC_PORT": str(free_port()),
        "OTEL_TRACES_EXPORTER": "console",  # spans as JSON on stdout: the server's log
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    server = Server(tmp_path_factory.mktemp("front-ends") / "log.jsonl", env)
    server.grpc_target = f"127.0.0.1:{env['PERCEIVER_GRPC_PORT']}"  # type: ignore[attr-defined]
    try:
        server.wait_ready()
        yield server
        assert server.terminate() == 0
    finally:
        stop(server)


def same_answer(got: object, expected: object) -> bool:
    """Equal, except that a score may differ by one unit in the 6th decimal the JSON keeps: two forward passes
    of the same input can differ in the 7th digit, which rounding can carry into the 6th (once in CI: 0.108003
    against 0.108004 for the conv head). A batch's shapes move those bits (the same row alone and among others:
    1.5e-7 on the conv head); each server's CPU passes also run on as many threads as the cores free then
    (app/cores.py), though 1 against 2 threads moved no bit of the demo heads on this VM. Everything else,
    labels and their order included, must be identical."""
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same_answer(got[k], expected[k]) for k in got)
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(same_answer(a, b) for a, b in zip(got, expected, strict=True))
    if isinstance(got, float) and isinstance(expected, float):
        return abs(got - expected) <= 1.5e-6
    return type(got) is type(expected) and got == expected


def test_same_answers_as_one_process(front_ends: Server, demo_server: LiveServer) -> None:
    """The demo models are the same (seeded) in both: every interface answers as the one-process server."""
    image = (MEDIA / "cat.jpg").read_bytes()
    v2_body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a test"]}]}
    with httpx.Client(base_url=front_ends.url, timeout=60, headers=AUTH) as ours, demo_server.client() as one:
        for path, kwargs in (
            ("/v1/classify-text", {"json": {"text": ["hello", "world"], "top_k": 2}}),
            ("/v1/classify", {"files": {"image": ("cat.jpg", image)}, "data": {"model": "conv"}}),
            ("/v2/models/classify-text/infer", {"json": v2_body}),
        ):
            got, expected = ours.post(path, **kwargs), one.post(path, **kwargs)
            assert got.status_code == expected.status_code == 200, got.text
            answer = got.json()
            answer.pop("id", None)
            reference = expected.json()
            reference.pop("id", None)
            assert same_answer(answer, reference), (answer, reference)
        bad = ours.post("/v1/classify", files={"image": ("cat.jpg", image[:500])})
        assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_input"
        assert httpx.post(front_ends.url + "/v1/classify-text", json={"text": "x"}).status_code == 401
        assert ours.get("/").status_code == 200  # the playground
        assert ours.get("/v2/models/classify-text/ready").status_code == 200
    ours_grpc = _infer_raw(front_ends.grpc_target, _text_request(), timeout=60, metadata=[("x-api-key", KEY)])  # type: ignore[attr-defined]
    one_grpc = _infer_raw(demo_server.grpc_target, _text_request(), timeout=60)
    assert [(o.name, o.datatype) for o in ours_grpc.outputs] == [(o.name, o.datatype) for o in one_grpc.outputs]
    for output, got, expected in zip(
        ours_grpc.outputs, ours_grpc.raw_output_contents, one_grpc.raw_output_contents, strict=True
    ):
        if output.datatype == "FP32":  # scores: the thread count's last bits, as in same_answer
            assert np.allclose(np.frombuffer(got, "<f4"), np.frombuffer(expected, "<f4"), rtol=0, atol=1e-6)
        else:
            assert got == expected, output.name


def test_batches_fill_from_both_front_ends_and_metrics_sum_them(front_ends: Server) -> None:
    """Sixteen clients on fresh connections (the kernel spreads them over both front ends) share batches of
    the one model process; /metrics on either front end counts every request and every batch."""

    def ask(i: int) -> tuple[int, int]:
        with httpx.Client(base_url=front_ends.url, timeout=60, headers=AUTH) as fresh:
            r = fresh.post("/v1/classify-text", json={"text": f"request number {i}"})
            return r.status_code, int(r.headers.get("x-batch-size", 0))

    labels = {"task": "classify-text", "model": "classify-text"}
    with httpx.Client(base_url=front_ends.url, timeout=60, headers=AUTH) as client:

        def count(name: str, **more: str) -> float:
            return metric(client.get("/metrics").text, name, **labels, **more)

        def successes() -> int:
            stats = client.get("/v2/models/classify-text/stats").json()["model_stats"][0]
            return int(stats["inference_stats"]["success"]["count"])

        served, rows, succeeded = (
            count("perceiver_requests_total", status="200"),
            count("perceiver_batch_size_sum"),
            successes(),
        )
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(48)))
        # A front end counts a request once its answer is sent, and reports it to the model process then: the
        # last of them may land just after the client has its answer.
        until(lambda: count("perceiver_requests_total", status="200") >= served + 48, "every request counted")
        until(lambda: successes() >= succeeded + 48, "every request in the model's statistics")
        assert count("perceiver_requests_total", status="200") == served + 48
        assert count("perceiver_batch_size_sum") == rows + 48  # the model process's batches held each once
        assert successes() == succeeded + 48  # reported by both front ends to the model process
        models = client.get("/v1/models").json()["models"]
    assert {status for status, _ in answers} == {200}
    assert max(size for _, size in answers) > 1  # one forward pass served several requests
    assert {m["name"] for m in models} >= {"classify-text", "classify/learned"}
    assert all(m["batching"]["queue_depth"] == 0 for m in models)
    log = front_ends.log.read_text()
    assert log.count("joined the model process") == 2 and log.count("connected") >= 2


def test_a_trace_spans_the_front_end_and_the_model_process(front_ends: Server) -> None:
    """The caller's trace continues in the front end's request span, with the decode and encode done there and
    the queue and inference spans timed by the model process under it."""
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    with httpx.Client(base_url=front_ends.url, timeout=60, headers=AUTH) as client:
        answer = client.post("/v1/classify-text", json={"text": "traced"}, headers={"traceparent": traceparent})
    assert answer.status_code == 200
    span = re.compile(r'"name": "([^"]+)",\s*"context": \{\s*"trace_id": "0x' + trace_id)

    def names() -> set[str]:
        return set(span.findall(front_ends.log.read_text()))

    # the request's span ends last, after its answer is written, and may be exported in a later batch than the rest
    every = {"POST /v1/classify-text", "decode", "queue", "inference", "encode"}
    until(lambda: every <= names(), "the spans exported")


# ------------------------------------------------------------------------------------ one slow model


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Server]:
    """Optical flow (seconds a pass here), one batch at a time of one pair, at most one request queued, and
    deadlines far beyond any estimate: whether a request is refused depends on the queue alone."""
    env = {
        "PERCEIVER_API_PROCESSES": "2",
        "PERCEIVER_DEMO_TASKS": '["optical-flow"]',
        "PERCEIVER_WARMUP": "false",
        "PERCEIVER_MAX_BATCH_SIZE": "1",
        "PERCEIVER_CPU_LANES": "1",
        "PERCEIVER_MAX_QUEUE_SIZE": "1",
        "PERCEIVER_MAX_QUEUE_DELAY_MS": "600000",  # only the queue's bound refuses: no timing decides
        "PERCEIVER_REQUEST_TIMEOUT_S": "600",
        "PERCEIVER_DRAIN_TIMEOUT_S": "120",
        "PERCEIVER_GRPC_PORT": "0",
    }
    server = Server(tmp_path / "log.jsonl", env)
    try:
        server.wait_ready()
        yield server
    finally:
        stop(server)


def stop(server: Server) -> None:
    """Whatever a test left: the supervisor killed, and its children with it (they die with their parent)."""
    if server.proc.poll() is None:
        server.proc.kill()
    server.proc.wait(timeout=60)
    STARTED.remove(server.proc)


def queue_depth(server: Server) -> int:
    return int(httpx.get(server.url + "/v1/models", timeout=30).json()["models"][0]["batching"]["queue_depth"])


def in_pass(server: Server) -> bool:
    """One batch in its forward pass, nothing queued: the model process's own state, via /v1/models."""
    batching = httpx.get(server.url + "/v1/models", timeout=30).json()["models"][0]["batching"]
    return bool(batching["running"] == 1 and batching["queue_depth"] == 0)


def batches(server: Server) -> float:
    return metric(httpx.get(server.url + "/metrics", timeout=30).text, "perceiver_batches_total")


def flow(server: Server, timeout_ms: int | None = None, client_timeout: float = 300) -> httpx.Response:
    first, second = shifted_pair(2, 1, size=(96, 128))
    headers = {} if timeout_ms is None else {"x-request-timeout-ms": str(timeout_ms)}
    return httpx.post(
        server.url + "/v1/optical-flow",
        files={"frame1": ("a.png", first), "frame2": ("b.png", second)},
        headers=headers,
        timeout=client_timeout,
    )


def one_running_one_queued(pool: ThreadPoolExecutor, server: Server) -> tuple[Future[httpx.Response], ...]:
    """Two flow requests: the first in its forward pass, then the second in the queue behind it."""
    running = pool.submit(flow, server)
    until(lambda: in_pass(server), "a pass running")
    queued = pool.submit(flow, server)
    until(lambda: queue_depth(server) == 1, "a request queued behind it")
    return running, queued


def test_refusals_deadlines_and_ended_work_across_processes(slow: Server) -> None:
    with ThreadPoolExecutor(4) as pool:
        running, queued = one_running_one_queued(pool, slow)
        refused = flow(slow)  # the queue holds one: the door (or the model process) refuses
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "overloaded" and int(refused.headers["retry-after"]) >= 1
        assert running.result().status_code == 200 and queued.result().status_code == 200
    until(lambda: queue_depth(slow) == 0, "idle")
    done = batches(slow)
    assert done == 2

    # A request whose client leaves while it is queued never reaches the model.
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(flow, slow)
        until(lambda: in_pass(slow), "a pass running")
        with leaving_request(slow):
            until(lambda: queue_depth(slow) == 1, "the leaving request queued")
        assert running.result().status_code == 200
    until(lambda: queue_depth(slow) == 0, "idle")
    text = httpx.get(slow.url + "/metrics", timeout=30).text
    assert metric(text, "perceiver_batches_total") == done + 1  # the one that stayed, not the one that left
    assert metric(text, "perceiver_rejections_total", reason="cancelled") >= 1

    # A deadline shorter than a pass: admitted (the model is idle), answered 504 at the deadline.
    started = time.monotonic()
    late = flow(slow, timeout_ms=300)
    assert late.status_code == 504 and late.json()["error"]["type"] == "deadline_exceeded"
    assert time.monotonic() - started < 60


@contextlib.contextmanager
def leaving_request(server: Server) -> Iterator[None]:
    """A flow request sent whole on a socket of its own, which is closed (the client leaves) on exit."""
    first, second = shifted_pair(2, 1, size=(96, 128))
    request = httpx.Request(
        "POST", server.url + "/v1/optical-flow", files={"frame1": ("a.png", first), "frame2": ("b.png", second)}
    )
    body = request.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    host, port = request.url.host, request.url.port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"POST /v1/optical-flow HTTP/1.1\r\n{head}\r\n".encode() + body)
        yield


def test_sigterm_drains_both_front_ends_then_the_model_with_nothing_lost(slow: Server) -> None:
    with ThreadPoolExecutor(2) as pool:
        running, queued = one_running_one_queued(pool, slow)
        slow.proc.send_signal(signal.SIGTERM)
        # each front end turns readiness off on its own SIGTERM: both, before a late request may land on either
        until(lambda: slow.log.read_text().count("draining: readiness off") >= 2, "both front ends draining")
        assert httpx.get(slow.url + "/readyz", timeout=5).status_code == 503
        late = httpx.post(slow.url + "/v1/optical-flow", timeout=30)
        assert late.status_code == 503 and late.json()["error"]["type"] == "draining"
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert slow.proc.wait(timeout=120) == 0
    lines = [json.loads(line) for line in slow.log.read_text().splitlines() if line.startswith("{")]
    assert any("model process drained" in line["msg"] for line in lines)


def test_when_the_model_process_dies_requests_get_503_and_the_group_stops(slow: Server) -> None:
    """No hang and no half-alive server: the request in flight is answered 503 with Retry-After, and the
    supervisor takes the front ends down and exits 1, for the orchestrator to restart it."""
    found = re.search(r"model process (\d+) ready", slow.log.read_text())
    assert found is not None
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(flow, slow)
        until(lambda: in_pass(slow), "a pass running")
        os.kill(int(found[1]), signal.SIGKILL)
        answer = running.result()
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    with contextlib.suppress(httpx.TransportError):  # unless the group is already down
        assert httpx.get(slow.url + "/v2/health/ready", timeout=5).status_code != 200
    assert slow.proc.wait(timeout=120) == 1


def test_a_request_after_the_model_process_has_gone_is_told_so() -> None:
    """In the moment before the group goes down, a new request was told "models are still loading; retry when
    /readyz answers 200" (audit): readiness is off then, and the reason is the front end's load_error, which the
    connection's close sets."""
    from app.errors import NotReady
    from app.metrics import Metrics
    from app.runtime import Runtime
    from app.settings import Settings

    runtime = Runtime(Settings(demo_tasks=["classify-text"], api_processes=2), Metrics())
    with pytest.raises(NotReady, match="models are still loading"):
        runtime.check_ready("/readyz")
    runtime.load_error = "the model process has exited"  # as remote.ModelClient.close sets it, ready off
    with pytest.raises(NotReady, match=r"^the model process has exited; retry on another replica$"):
        runtime.check_ready("/readyz")


def test_a_stuck_model_process_fails_liveness_and_readiness_and_requests_get_503(slow: Server) -> None:
    """A model process whose event loop stops (SIGSTOP here; a deadlock alike): the front ends stop seeing its
    heartbeat and, past MODEL_STALL_S, say so. /healthz and /v2/health/live fail (the pod is restarted), readiness
    fails, a task request is a 503 at once, and /v1/models gives up. Each answered 200 for ever: the front ends
    answered the probes themselves, admitted every request into a 504 at its deadline, and /v1/models hung."""
    found = re.search(r"model process (\d+) ready", slow.log.read_text())
    assert found is not None
    model = int(found[1])
    # both front ends joined (ready answers from one of them; the other, still waiting for its hand-shake, would
    # say "loading" throughout)
    until(lambda: slow.log.read_text().count("joined the model process") == 2, "both front ends joined")
    os.kill(model, signal.SIGSTOP)
    try:
        until(lambda: httpx.get(slow.url + "/healthz", timeout=30).status_code == 503, "liveness fails")
        health = httpx.get(slow.url + "/healthz", timeout=30).json()
        assert health["status"] == "unresponsive" and "the model process has not run for" in health["error"]
        assert httpx.get(slow.url + "/v2/health/live", timeout=30).json() == {"live": False}
        assert httpx.get(slow.url + "/readyz", timeout=30).json()["status"] == "failed"
        refused = flow(slow, client_timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready", refused.text
        models = httpx.get(slow.url + "/v1/models", timeout=60)
        assert models.status_code == 503 and "did not answer within" in models.json()["error"]["message"]
    finally:
        os.kill(model, signal.SIGCONT)
    until(lambda: httpx.get(slow.url + "/healthz", timeout=30).status_code == 200, "live again")
    assert flow(slow).status_code == 200


def test_a_stuck_front_end_takes_the_group_down(slow: Server) -> None:
    """A front end whose event loop stops (SIGSTOP here; a deadlock alike) while the other answers every probe:
    /healthz stayed 200 for ever, and the gRPC health checks the kernel gave the stopped one timed out (audit).
    Past Heartbeats.STALL_S without a beat, the supervisor says which, kills it, drains the others and exits 1,
    for the orchestrator to restart the pod."""
    found = re.search(r"model process (\d+) ready", slow.log.read_text())
    assert found is not None
    until(lambda: slow.log.read_text().count("joined the model process") == 2, "both front ends joined")
    children = Path(f"/proc/{slow.proc.pid}/task/{slow.proc.pid}/children").read_text().split()
    fronts = [
        int(pid)
        for pid in children
        if int(pid) != int(found[1]) and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(fronts) == 2
    os.kill(fronts[1], signal.SIGSTOP)
    assert slow.proc.wait(timeout=120) == 1
    log = slow.log.read_text()
    assert re.search(r"front-end-\d has not run its event loop for 1\d s; stopping", log), log[-2000:]
    assert not Path(f"/proc/{fronts[1]}").exists() or b"State:\tZ" in Path(f"/proc/{fronts[1]}/status").read_bytes()


def test_sigterm_while_the_models_load_stops_the_group_between_two_steps(tmp_path: Path) -> None:
    """As one process does: the model process stops loading at its next step, and nothing is logged as an error
    (it finished loading and warming every model first, 11-13 s of the demo here and minutes of real checkpoints,
    and the front ends logged that they could not join it)."""
    env = {"PERCEIVER_API_PROCESSES": "2", "PERCEIVER_WARMUP": "true", "PERCEIVER_GRPC_PORT": "0"}
    server = Server(tmp_path / "log.jsonl", env)
    try:
        until(lambda: "max_batch_size=auto chose" in server.log.read_text(), "the first model loaded")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0
    finally:
        stop(server)
    log = server.log.read_text()
    assert "model process stopped while loading" in log and '"ERROR"' not in log, log[-2000:]


def test_a_model_that_fails_to_load_is_what_the_front_ends_and_the_supervisor_report(tmp_path: Path) -> None:
    """The model process closes on the front ends waiting for it: they said "could not join the model process:
    ConnectionResetError", and the supervisor blamed the first front end to exit."""
    models = json.dumps([{"task": "classify-text", "source": str(tmp_path)}])  # a directory without weights
    env = {"PERCEIVER_API_PROCESSES": "2", "PERCEIVER_MODELS": models, "PERCEIVER_GRPC_PORT": "0"}
    server = Server(tmp_path / "log.jsonl", env)
    try:
        assert server.proc.wait(timeout=120) == 1
    finally:
        stop(server)
    errors = [json.loads(line)["msg"] for line in server.log.read_text().splitlines() if '"ERROR"' in line]
    assert not any("could not join" in e or "front-end" in e for e in errors), errors
    assert any(e.startswith("the model process could not load the models (") for e in errors), errors


def test_auto_starts_front_ends_on_gpu_hosts_only() -> None:
    """auto follows the measurements: none on CPU hosts (docs/performance.md); with a GPU, CPUs less two, at most
    four; an explicit count wins; workers > 1 and front ends do not combine."""
    from app.settings import Settings

    assert Settings(device="cpu").front_end_processes(cores=16) == 0
    assert Settings(device="cuda").front_end_processes(cores=16) == 2
    assert Settings(device="cuda").front_end_processes(cores=3) == 1
    assert Settings(device="cuda").front_end_processes(cores=2) == 0
    assert Settings(device="cpu", api_processes=3).front_end_processes(cores=2) == 3
    assert Settings(device="cuda", workers=2).front_end_processes(cores=16) == 0
    with pytest.raises(ValueError, match="choose one"):
        Settings(workers=2, api_processes=2)


def test_a_child_dies_with_the_supervisor_it_names() -> None:
    """die_with_parent compares with the supervisor's pid, which may be 1 (a container's entrypoint): a child
    whose named parent is alive carries on; one whose named parent is gone stops (SIGTERM)."""
    code = "import sys; from app.cli import die_with_parent; die_with_parent(int(sys.argv[1])); print('alive')"
    alive = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True, check=False)
    assert alive.returncode == 0 and "alive" in alive.stdout, alive.stderr
    gone = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, check=False)
    assert gone.returncode == -signal.SIGTERM and "alive" not in gone.stdout
