"""A live uvicorn server on loopback, in a thread of the test process, so tests can reach its runtime."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import torch
import uvicorn

from app.batching import ServiceTime
from app.cli import uvicorn_config
from app.engine import Engine
from app.loading import LoadedModel, build_models
from app.main import create_app
from app.runtime import Runtime
from app.settings import Settings
from benchmarks.serve_load import free_port
from perceiver_core import PerceiverHead

MEDIA = Path(__file__).parents[1] / "media"


BUSY = -1  # the key of the stand-in batch ``occupy`` puts among a batcher's running ones


class JustStarted(float):
    """The start of a stand-in batch that has always just started: however long the test takes to ask, the time
    since is 0, and its rest is all of its estimate (a real start would age by the request's travel time)."""

    def __rsub__(self, now: float) -> float:  # type: ignore[override]
        return 0.0


def occupy(engine: Engine, seconds: float) -> None:
    """Make ``engine`` busy, as if a batch that its estimates say takes ``seconds`` had just started (every lane
    of a CPU model's lanes is then taken): admission refuses by time, deterministically, whenever it is asked.
    ``release`` ends it."""
    batcher = engine.batcher
    batcher.service_time = ServiceTime({1: seconds})
    batcher._running[BUSY] = (JustStarted(), seconds)
    if batcher._lanes is not None:  # every lane, each ending ``seconds`` from whenever admission asks
        lanes = batcher._lanes
        taken = 0

        def take() -> bool:  # one that another test's batch still holds (the server is shared) once it ends
            nonlocal taken
            while (lane := lanes.acquire()) is not None:
                lanes.note_batch(lane, JustStarted(), seconds)
                taken += 1
            return taken == len(lanes)

        until(take, "every lane taken")


def release(engine: Engine) -> None:
    batcher = engine.batcher
    del batcher._running[BUSY]
    if batcher._lanes is not None:
        for lane in range(len(batcher._lanes)):
            batcher._lanes.release(lane)


def schemathesis(schema: str, cwd: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """schemathesis run on ``schema`` (a URL or a file), one worker, 60 s a request; the run and its summary."""
    options = ("--request-timeout", "60", *options)
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", schema, *("--workers", "1"), *options],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        cwd=cwd,  # schemathesis keeps a cache in its working directory
    )
    return run, run.stdout[run.stdout.find("SUMMARY") :]


Swap = Callable[[PerceiverHead], torch.nn.Module]


def swapping(swap: Mapping[str, Swap]) -> Callable[[Settings], list[LoadedModel]]:
    """``build_models``, with each named task's model replaced by ``swap[task](model)`` before its engine is
    built: a model whose answers the test knows, run through the real server."""

    def load(settings: Settings) -> list[LoadedModel]:
        loaded = build_models(settings)
        for model in loaded:
            if model.task.name in swap:
                model.model = swap[model.task.name](model.model)  # type: ignore[assignment]
        return loaded

    return load


class LiveServer:
    def __init__(self, swap: Mapping[str, Swap] | None = None, **settings: Any) -> None:
        settings.setdefault("warmup", False)
        self.settings = Settings(host="127.0.0.1", port=free_port(), **settings)
        self.app = create_app(self.settings, swapping(swap or {}))
        config = uvicorn_config(self.app, self.settings)  # the server perceiver-serve runs, on loopback
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.grpc_target = f"127.0.0.1:{self.settings.grpc_port}"  # when the test gave it a grpc_port

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    def start(self, timeout: float = 120) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.runtime.load_error:
                raise RuntimeError(self.runtime.load_error)
            time.sleep(0.1)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def hold_inference(self) -> threading.Event:
        """Occupy every thread a forward pass may run on (the inference thread and, on CPU, the lanes) until the
        returned event is set (60 s at most, a guard against a test that never sets it): a forward pass that lasts
        exactly as long as the test needs."""
        gate = threading.Event()
        for executor in self._inference_executors():
            executor.submit(gate.wait, 60)
        return gate

    def _inference_executors(self) -> list[Any]:
        runtime = self.runtime
        executors: list[Any] = [runtime.inference_executor]
        if runtime.cpu_lanes() > 1:
            executors += runtime.lanes().executors
        return executors

    def metric(self, name: str, **labels: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)


def until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Wait for ``condition``; ``timeout`` guards against a hang and bounds nothing the test asserts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError(what)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels, across the processes /metrics combined."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="session")
def demo_server() -> Iterator[LiveServer]:
    """The demo profile (every task, random-init weights), batching with a short delay; gRPC on too."""
    server = LiveServer(max_delay_ms=20, max_body_bytes=4 * 1024 * 1024, grpc_port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def client(demo_server: LiveServer) -> Iterator[httpx.Client]:
    with demo_server.client() as c:
        yield c


def make_mp4(seconds: float = 1.0, with_audio: bool = True, size: tuple[int, int] = (320, 240)) -> bytes:
    """An H.264 (or MPEG-4) video of a moving bar, with an AAC 440 Hz tone, made with PyAV."""
    buffer = io.BytesIO()
    width, height = size
    frames = int(seconds * 25)
    with av.open(buffer, "w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        video = container.add_stream(codec, rate=25)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=48_000) if with_audio else None
        if audio is not None:
            audio.layout = "mono"
        for i in range(frames):
            frame = np.zeros((height, width, 3), np.uint8)
            x = (i * 8) % (width - 40)
            frame[:, x : x + 40] = (255, 128, 0)
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            n = int(seconds * 48_000)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 48_000)).astype(np.float32)[None]
            for start in range(0, n, 1024):
                piece = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(tone[:, start : start + 1024]), format="flt", layout="mono"
                )
                piece.sample_rate, piece.pts = 48_000, start
                for packet in audio.encode(piece):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return buffer.getvalue()


def shifted_pair(dx: int, dy: int, size: tuple[int, int] = (420, 560)) -> tuple[bytes, bytes]:
    """Two PNG crops of the coffee photo; in the second, the content has moved by (+dx, +dy) pixels."""
    from PIL import Image

    photo = np.asarray(Image.open(MEDIA / "coffee.jpg").convert("RGB").resize((640, 480)))
    h, w = size[0], size[1]
    m = 20
    first = photo[m : m + h, m : m + w]
    second = photo[m - dy : m - dy + h, m - dx : m - dx + w]
    out = []
    for array in (first, second):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out[0], out[1]
