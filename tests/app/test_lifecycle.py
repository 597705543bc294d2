"""The real command: settings from env and files, real checkpoints, and draining on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.cli import SAME_SIGNAL_S, _listen
from app.settings import Settings, load_settings

from .conftest import MEDIA, free_port, metric, until

STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def no_server_outlives_its_test() -> Iterator[None]:
    """A test that fails midway leaves no server running (nor a Popen for the collector to warn about)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


class Server:
    """``python -m app.cli`` in a child process, logging to a file (a pipe could fill up and block it)."""

    def __init__(self, log: Path, env: dict[str, str], *args: str) -> None:
        port = free_port()
        full = {**os.environ, **env, "PERCEIVER_PORT": str(port), "PERCEIVER_HOST": "127.0.0.1"}
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", *args], env=full, stdout=out, stderr=subprocess.STDOUT
            )
        STARTED.append(self.proc)
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise TimeoutError("not ready")

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def test_settings_come_from_env_with_exact_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEIVER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PERCEIVER_MAX_DELAY_MS", "2.5")
    monkeypatch.setenv("PERCEIVER_DEVICE", "cpu")
    settings = Settings()
    assert (settings.max_batch_size, settings.max_delay_ms, settings.device) == (7, 2.5, "cpu")
    assert settings.resolved_dtype() == "float32"
    assert Settings(device="cuda").resolved_dtype() == "bfloat16"


def test_config_file_with_per_model_overrides(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "max_batch_size: 8\n"
        "models:\n"
        "  - {task: classify, variant: learned, source: deepmind/vision-perceiver-learned, max_batch_size: 32}\n"
        "  - {task: fill-mask, source: /models/language-perceiver, dtype: float32, max_delay_ms: 1}\n"
    )
    settings = load_settings(path)
    assert settings.max_batch_size == 8 and not settings.demo
    assert settings.models[0].max_batch_size == 32 and settings.models[1].max_delay_ms == 1
    with pytest.raises(ValueError, match="configured twice"):
        Settings(models=[{"task": "classify", "source": "a"}, {"task": "classify", "source": "b"}])


def test_serving_a_real_checkpoint_from_a_directory(tmp_path: Path) -> None:
    """A non-demo deployment: a saved transformers checkpoint, served as pretrained with its labels."""
    from reference import save_small_image_classifier

    save_small_image_classifier(tmp_path / "fourier", ["tabby cat", "espresso", "daisy"])
    settings_file = tmp_path / "serve.json"
    settings_file.write_text(
        json.dumps(
            {
                "warmup": True,
                "max_batch_size": 2,
                "models": [{"task": "classify", "variant": "fourier", "source": str(tmp_path / "fourier")}],
            }
        )
    )
    server = Server(tmp_path / "log.jsonl", {}, "--config", str(settings_file))
    url = server.url
    try:
        server.wait_ready()
        models = httpx.get(url + "/v1/models").json()
        assert models["demo"] is False and models["models"][0]["weights"] == "pretrained"
        r = httpx.post(
            url + "/v1/classify",
            files={"image": ("cat.jpg", (MEDIA / "cat.jpg").read_bytes())},
            data={"top_k": "3"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert {p["label"] for p in r.json()["predictions"]} == {"tabby cat", "espresso", "daisy"}
        assert httpx.post(url + "/v1/fill-mask", json={"text": "a[MASK]"}).status_code == 404
    finally:
        assert server.terminate() == 0


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    """Requests in flight when SIGTERM arrives all finish with 200, their uploads still arriving; new ones get 503;
    exit code 0. Each upload holds back its last bytes until the server is draining, so that all eight are in
    flight at the signal and none can have finished (the server counts a request in flight from its headers on)."""
    env = {
        "PERCEIVER_DEMO_TASKS": '["classify"]',
        "PERCEIVER_WARMUP": "false",
        "PERCEIVER_MAX_BATCH_SIZE": "1",
        "PERCEIVER_DRAIN_TIMEOUT_S": "60",
        "PERCEIVER_MAX_QUEUE_DELAY_MS": "null",  # eight queued passes of a busy machine would pass the target: 429
    }
    server = Server(tmp_path / "log.jsonl", env)
    url, proc = server.url, server.proc
    server.wait_ready()
    image = (MEDIA / "cat.jpg").read_bytes()
    form = httpx.Request("POST", url, files={"image": ("cat.jpg", image)}, data={"model": "learned"})
    body, content_type = form.read(), form.headers["content-type"]
    release = threading.Event()

    def upload() -> Iterator[bytes]:
        yield body[:1000]
        release.wait(120)
        yield body[1000:]

    def classify(_: int) -> int:
        headers = {"content-type": content_type, "content-length": str(len(body))}
        return httpx.post(url + "/v1/classify", content=upload(), headers=headers, timeout=120).status_code

    def inflight() -> float:
        return metric(httpx.get(url + "/metrics", timeout=10).text, "perceiver_inflight_requests")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(classify, i) for i in range(8)]
        try:
            until(lambda: inflight() == 8, "eight requests in the server")
            proc.send_signal(signal.SIGTERM)
            until(lambda: httpx.get(url + "/readyz", timeout=5).status_code == 503, "readiness off")
            late = httpx.post(url + "/v1/classify", files={"image": ("cat.jpg", image)}, timeout=10)
            assert late.status_code == 503 and late.json()["error"]["type"] == "draining"
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        finally:
            release.set()
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 8
    assert proc.wait(timeout=60) == 0
    assert "drained" in server.log.read_text()


@pytest.mark.parametrize("fronts", ["0", "1"], ids=["one-process", "front-end"])
def test_the_drain_timeout_bounds_the_shutdown_and_a_request_it_cuts_gets_a_json_503(
    tmp_path: Path, fronts: str
) -> None:
    """A request whose body never ends is still in flight when the drain's time runs out: it gets a JSON 503
    `draining`, and the server exits 1 within the drain timeout. uvicorn's own graceful wait used to follow the
    drain's, and the model process drained after the front ends: up to three drain timeouts (a plain-text 500
    for the cut request)."""
    drain_s = 4
    env = {
        "PERCEIVER_DEMO_TASKS": '["classify-text"]',
        "PERCEIVER_WARMUP": "false",
        "PERCEIVER_DRAIN_TIMEOUT_S": str(drain_s),
        "PERCEIVER_API_PROCESSES": fronts,
    }
    server = Server(tmp_path / "log.jsonl", env)
    server.wait_ready()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: 99\r\n\r\n"
        sock.sendall(head + b'{"text": ')  # and never the rest
        until(lambda: b"perceiver_inflight_requests 1.0" in httpx.get(server.url + "/metrics").content, "in flight")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        code = server.proc.wait(timeout=60)
        took = time.monotonic() - signalled
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 503") and b"application/json" in head_part, answer[:300]
    assert json.loads(body)["error"]["type"] == "draining"
    # one drain's time (and the last answers), not two; exit 1: a request was cut, not a clean drain
    assert code == 1 and took < 2 * drain_s, (code, took)
    assert "with 1 requests in flight: they get 503 draining; exit 1" in server.log.read_text()


def test_a_second_signal_stops_at_once_says_so_and_exits_1(tmp_path: Path) -> None:
    env = {"PERCEIVER_DEMO_TASKS": '["classify-text"]', "PERCEIVER_WARMUP": "false", "PERCEIVER_DRAIN_TIMEOUT_S": "60"}
    server = Server(tmp_path / "log.jsonl", env)
    server.wait_ready()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # a request the drain would wait for
        sock.sendall(b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{")
        until(lambda: b"perceiver_inflight_requests 1.0" in httpx.get(server.url + "/metrics").content, "in flight")
        server.proc.send_signal(signal.SIGTERM)
        until(lambda: httpx.get(server.url + "/readyz", timeout=5).status_code == 503, "draining")
        time.sleep(SAME_SIGNAL_S)  # sooner, it is the first stop delivered twice (Ctrl-C, then the supervisor's)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 1
        answer = sock.recv(65536)
    log = server.log.read_text()
    assert "second signal: stopping now with 1 requests in flight" in log
    # cut by the second signal, and told so (it blamed the drain timeout, 60 s away: audit)
    assert answer.startswith(b"HTTP/1.1 503") and b"(a second signal); retry on another replica" in answer, answer
    assert "CancelledError" not in log  # uvicorn cancels the lifespan: Starlette logged it as a failed shutdown


def test_the_heartbeat_watch_goes_by_the_supervisors_own_watching() -> None:
    """A beat that has not moved for STALL_S of the supervisor's watching is a stuck process; one not yet written
    (loading, starting) never is. The beats' age is not the test: a group stopped and resumed together (Ctrl-Z,
    docker pause) has old beats, and a supervisor that looked before they moved again killed a healthy process
    (review: 6 runs of 8). A look long after the last means the supervisor was stopped too: the watch restarts."""
    import multiprocessing

    from app.cli import Heartbeats

    beats = Heartbeats(multiprocessing.get_context("spawn"), 2)
    beats.times[0] = 100.0  # as Beat writes it
    now = 100.0
    while now < 110.0:  # the supervisor looks every 0.2 s; the first process beats no more, the second never did
        assert beats.stalled(now) == []
        now += 0.2
    assert [i for i, _ in beats.stalled(110.3)] == [0]
    beats.times[0] = 110.4  # it runs again
    assert beats.stalled(110.5) == [] and beats.served(0) and not beats.served(1)
    # everything stopped for 30 s, the supervisor resuming first: its looks find the beat of before the stop
    now = 140.5
    while now < 150.5:
        assert beats.stalled(now) == [], now
        now += 0.2
    assert [i for i, _ in beats.stalled(150.7)] == [0]  # and the watch goes on: no beat since, 10 s watched


@pytest.mark.timeout(180)
def test_a_signal_while_a_process_starts_reaches_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's SIGTERM, handled as its second worker starts (before it has a pid), reached only the first:
    the second came up and served for ever (audit). Sent it once started, it stops, and the group exits 0."""
    import multiprocessing.context

    from app.cli import _supervise

    original = multiprocessing.context.SpawnProcess.start
    started: list[str] = []

    def start(self: multiprocessing.context.SpawnProcess) -> None:
        started.append(self.name)
        if len(started) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled here, in this (the main) thread, before the start
        original(self)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)
    environment = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    settings = Settings(
        workers=2, demo_tasks=["classify-text"], warmup=False, host="127.0.0.1", port=free_port(), grpc_port=0
    )
    try:
        assert _supervise(settings) == 0
    finally:
        for child in multiprocessing.active_children():  # none but where it failed: nothing left serving
            child.kill()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.environ.clear()
        os.environ.update(environment)
    assert started == ["worker-0", "worker-1"]


@pytest.mark.parametrize("setting", ["PERCEIVER_WORKERS", "PERCEIVER_API_PROCESSES"])
def test_a_signal_as_the_processes_start_stops_them_all_and_exits_0(tmp_path: Path, setting: str) -> None:
    """A SIGTERM that came while the supervisor started its processes reached only those already started: the
    others came up, answered ready, and never stopped (audit: 6 of 6, only SIGKILL ended it). A process the
    signal stops before its handlers are in place has served nothing: a clean stop. Sent as soon as the
    supervisor's first process exists (its second child: the resource tracker comes first)."""
    env = {"PERCEIVER_DEMO_TASKS": '["classify-text"]', "PERCEIVER_WARMUP": "false", setting: "2"}
    server = Server(tmp_path / "log.jsonl", env)
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    until(lambda: len(children.read_text().split()) >= 2, "the first process started", timeout=60)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=120) == 0, server.log.read_text()[-2000:]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_port_in_use_is_one_line_and_exit_3_with_one_process_or_several(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PERCEIVER_DEMO_TASKS": '["classify-text"]', "PERCEIVER_WORKERS": workers}
        server = Server(tmp_path / "log.jsonl", env, "--port", str(port))  # the flag beats the test's free port
        assert server.proc.wait(timeout=120) == 3
    errors = [json.loads(line) for line in server.log.read_text().splitlines() if '"ERROR"' in line]
    assert [e["msg"] for e in errors] == [f"cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.parametrize("processes", ["0", "2"])
def test_a_grpc_port_another_program_shares_is_one_line_and_exit_3(tmp_path: Path, processes: str) -> None:
    """Another program listens on the gRPC port with SO_REUSEPORT, as gRPC's servers do by default. With front
    ends (which share the port with SO_REUSEPORT among themselves) the server started and that program took part
    of its calls; one process failed only once its models were loaded, with a traceback."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = {"PERCEIVER_DEMO_TASKS": '["classify-text"]', "PERCEIVER_API_PROCESSES": processes}
        server = Server(tmp_path / "log.jsonl", {**env, "PERCEIVER_GRPC_PORT": str(port)})
        assert server.proc.wait(timeout=120) == 3
    errors = [json.loads(line) for line in server.log.read_text().splitlines() if '"ERROR"' in line]
    assert [e["msg"] for e in errors] == [f"gRPC cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """A container's soft limit of 1,024 let about 1,100 idle connections lock every client out (audit); the
    server raises it to the hard limit at start, before any process is spawned (they inherit it)."""
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))\n"
        "from app.cli import raise_open_files_limit\n"
        "raise_open_files_limit()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    soft, hard = map(int, done.stdout.split())
    assert soft == hard or (hard == resource.RLIM_INFINITY and soft == 1 << 20), done.stdout


def test_the_host_is_every_address_it_names() -> None:
    """As asyncio reads a host: "" is every interface of both stacks, "::" alone both stacks on one socket,
    an address itself; the sockets bound are those (an empty host was an error, a host name one of its addresses)."""
    families = {info[0] for info in socket.getaddrinfo(None, 80, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    for host, expected in (("", {("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6)}), ("127.0.0.1", None)):
        sockets = _listen(Settings(host=host, port=free_port()))
        try:
            bound = {(s.getsockname()[0], s.family) for s in sockets}
        finally:
            for sock in sockets:
                sock.close()
        if expected is None:
            assert bound == {("127.0.0.1", socket.AF_INET)}
        else:
            assert bound == {(a, f) for a, f in expected if f in families}, bound


def test_host_all_ipv6_addresses_answers_ipv4_too(tmp_path: Path) -> None:
    """``::`` is every address of both stacks, as nginx's and Docker's defaults read it: the image's
    HEALTHCHECK and a kubelet probe on the pod's IPv4 address reach it (asyncio's own socket was IPv6 only)."""
    try:  # an IPv6 loopback to reach the server on (a container may have IPv6 built in and turned off)
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    env = {"PERCEIVER_DEMO_TASKS": '["classify-text"]', "PERCEIVER_WARMUP": "false"}
    server = Server(tmp_path / "log.jsonl", env, "--host", "::")
    server.wait_ready()  # on 127.0.0.1
    port = server.url.rsplit(":", 1)[1]
    assert httpx.get(f"http://[::1]:{port}/healthz", timeout=10).json() == {"status": "ok"}
    assert server.terminate() == 0
    assert f"listening on :::{port}" in server.log.read_text()


def test_several_worker_processes_share_the_port_and_drain_together(tmp_path: Path) -> None:
    env = {"PERCEIVER_DEMO_TASKS": '["classify-text"]', "PERCEIVER_WARMUP": "false", "PERCEIVER_WORKERS": "2"}
    server = Server(tmp_path / "log.jsonl", env)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(24):  # new connections: the kernel spreads them over both workers
            with httpx.Client(base_url=server.url, timeout=60) as fresh:
                assert fresh.post("/v1/classify-text", json={"text": f"request {i}"}).status_code == 200
        metrics = client.get("/metrics").text
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('perceiver_requests_total{model="classify-text",status="200"')
    )
    assert total == 24, metrics[-2000:]  # samples of both processes, combined
    log = server.log.read_text()
    assert log.count('"msg": "ready ') == 2  # each worker loaded its models and logged its start-up times
    assert server.terminate() == 0


@pytest.mark.parametrize("present", [False, True])
def test_a_prometheus_multiproc_dir_from_the_environment_is_ignored(tmp_path: Path, present: bool) -> None:
    """Base images made for gunicorn set PROMETHEUS_MULTIPROC_DIR: a one-process server crashed at start on a
    missing folder (a 33-line traceback), or summed an older process's samples into its own /metrics (audit).
    It keeps its own metrics, and says the variable is ignored."""
    folder = tmp_path / "prom"
    if present:  # an older process's samples in it
        folder.mkdir()
        code = (
            "from prometheus_client import Counter; "
            "Counter('perceiver_requests', 'x', ['task', 'model', 'status']).labels('classify-text', "
            "'classify-text', '200').inc(1000)"
        )
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)})
        assert list(folder.iterdir())
    env = {
        "PERCEIVER_DEMO_TASKS": '["classify-text"]',
        "PERCEIVER_WARMUP": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
    }
    server = Server(tmp_path / "log.jsonl", env)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/v1/classify-text", json={"text": "hi"}).status_code == 200
        samples = client.get("/metrics").text
    assert metric(samples, "perceiver_requests_total", model="classify-text", status="200") == 1
    assert server.terminate() == 0
    assert f"PROMETHEUS_MULTIPROC_DIR={folder} from the environment is ignored" in server.log.read_text()


def test_decoding_in_processes(tmp_path: Path) -> None:
    """PERCEIVER_DECODE_PROCESSES moves upload decoding out of the server process: same answers."""
    env = {"PERCEIVER_DEMO_TASKS": '["classify"]', "PERCEIVER_WARMUP": "false", "PERCEIVER_DECODE_PROCESSES": "2"}
    server = Server(tmp_path / "log.jsonl", env)
    server.wait_ready()
    image = (MEDIA / "cat.jpg").read_bytes()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        first = client.post("/v1/classify", files={"image": ("cat.jpg", image)}, data={"model": "conv"})
        again = client.post("/v1/classify", files={"image": ("cat.jpg", image)}, data={"model": "conv"})
        bad = client.post("/v1/classify", files={"image": ("cat.jpg", image[:500])})
    assert first.status_code == 200 and first.json() == again.json()
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_input"  # errors cross processes
    assert server.terminate() == 0


def test_a_model_that_fails_to_load_fails_start_up_with_a_clear_message(tmp_path: Path) -> None:
    """Never a half-ready server: the process exits 1, readiness never turned 200, the log says why."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["PerceiverForImageClassificationFourier"]}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    models = json.dumps([{"task": "classify", "source": str(broken)}])
    server = Server(tmp_path / "log.jsonl", {"PERCEIVER_MODELS": models})
    ready_seen = False
    deadline = time.monotonic() + 120
    while server.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            ready_seen |= httpx.get(server.url + "/readyz", timeout=1).status_code == 200
        time.sleep(0.1)
    assert server.terminate() == 1
    assert not ready_seen
    log = server.log.read_text()
    assert "model loading failed" in log and str(broken) in log


def test_garbage_collection_never_takes_the_metrics_lock() -> None:
    """The gc callback queues its pause and /metrics records it: a collection that starts while
    prometheus_client holds its lock (multiprocess mode, inside labels()) once hung a worker for good."""
    import gc

    from app.metrics import Metrics

    metrics = Metrics()
    stop = metrics.watch_gc()
    try:
        observe = metrics.gc_pause.labels(generation="2").observe
        calls: list[float] = []
        metrics.gc_pause.labels(generation="2").observe = calls.append  # type: ignore[method-assign]
        gc.collect()
        assert calls == []  # nothing reached the histogram from inside the collector
        metrics.gc_pause.labels(generation="2").observe = observe  # type: ignore[method-assign]
        text = metrics.exposition().decode()
    finally:
        stop()
    assert 'perceiver_gc_pause_seconds_count{generation="2"} 1.0' in text


def test_every_answer_during_a_drain_closes_its_connection() -> None:
    """During a drain, answers kept their connection open: a client that sent its next request on it as the server
    stopped got a connection reset, and could not tell whether that request had run (audit: 2 in 3 runs). Every
    answer during the drain now says Connection: close, the 503 for new work and the others alike."""
    from .conftest import LiveServer

    server = LiveServer(demo_tasks=["classify-text"]).start()
    try:
        with server.client() as c:
            assert "close" not in c.get("/healthz").headers.get("connection", "")
            server.runtime.begin_drain()
            for r in [c.get("/healthz"), c.get("/readyz"), c.post("/v1/classify-text", json={"text": "late"})]:
                assert r.headers.get("connection") == "close", (r.status_code, r.headers)
            assert r.status_code == 503 and r.json()["error"]["type"] == "draining"
    finally:
        server.stop()
