"""What one unit of a whole input costs: a video clip (autoencode), a flow pair (optical flow, one window per
pair) and a text window (fill-mask, classify-text), on the demo models, for docs/performance.md.

    python benchmarks/whole_inputs.py

Each task's ``decode`` (where it has one worth timing) and ``predict`` run as the server runs them, on
payloads of 1 and of n units; the cost per unit is the n-unit time divided by n (the best of a few runs:
noise only adds time). ``decode`` reads a synthetic video of 320x240 at 25 fps.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.tasks import TASKS  # noqa: E402
from app.tasks.base import DecodeContext  # noqa: E402

LIMITS = Settings().limits()  # the defaults (and any PERCEIVER_* in the environment), as the server has them


def best_of(fn: Callable[[], Any], reps: int) -> float:
    fn()  # first call at this shape: allocations, kernel choice
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def video(seconds: float, size: tuple[int, int] = (320, 240)) -> bytes:
    """A pan across the coffee photo, H.264 at 25 fps."""
    from PIL import Image

    w, h = size
    frames = int(seconds * 25)
    photo = np.asarray(Image.open(ROOT / "tests" / "media" / "coffee.jpg").convert("RGB").resize((w + frames, h)))
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(photo[:, i : i + w]), "rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def model_of(task: str) -> perceiver_core.PerceiverHead:
    torch.manual_seed(0)
    return perceiver_core.build_model(TASKS[task].demo_configs["default"]).eval()


def run(task: str, model: perceiver_core.PerceiverHead, payload: Any) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return TASKS[task].predict(model, [payload])

    return call


def row(what: str, unit: str, n: int, one: float, many: float) -> str:
    line = f"| {what} | {unit} | {one * 1000:.0f} | {n} | {many * 1000:.0f} | **{many / n * 1000:.0f}** |"
    print(line, flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rows: list[str] = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| what | unit | 1 unit, ms | n units | n units, ms | ms per unit |")
    print("|---|---|---|---|---|---|")

    # Video clips: decode (8 clips spread over 20 s) and the forward pass (label only, and reconstruction).
    task, model = TASKS["autoencode"], model_of("autoencode")
    ctx = DecodeContext(model.config, LIMITS)
    data = video(20.0)
    request = task.request_model

    def clips(n: int, reconstruction: str = "none") -> Any:
        return task.decode(request(clips=n, reconstruction=reconstruction), {"video": data}, ctx)

    one, eight = (best_of(lambda n=n: clips(n), args.reps) for n in (1, 8))
    rows.append(row("autoencode: decode (20 s video, 320x240)", "clip", 8, one, eight))
    for reconstruction in ("none", "npz"):
        one = best_of(run("autoencode", model, clips(1, reconstruction)), args.reps)
        eight = best_of(run("autoencode", model, clips(8, reconstruction)), args.reps)
        what = "label only" if reconstruction == "none" else "with reconstruction"
        rows.append(row(f"autoencode: forward, {what}", "clip", 8, one, eight))

    # Flow pairs: 480x360 frames are one window each; a video of 5 frames is 4 pairs.
    task, model = TASKS["optical-flow"], model_of("optical-flow")
    ctx = DecodeContext(model.config, LIMITS)
    data = video(1.0, (480, 360))
    short, long = (
        task.decode(task.request_model(stride=s), {"video": data}, ctx) for s in (24, 6)
    )  # frames 0, 24 (1 pair); 0, 6, 12, 18, 24 (4 pairs)
    rows.append(
        row(
            "optical flow: forward, 480x360 video",
            "pair (1 window)",
            long.pairs,
            best_of(run("optical-flow", model, short), 1),
            best_of(run("optical-flow", model, long), 1),
        )
    )

    # Text windows: 2,046-byte windows of a long text.
    text = (ROOT / "README.md").read_text().replace("[MASK]", "(mask)").encode("ascii", "replace").decode()[:12_000]
    for name in ("fill-mask", "classify-text"):
        task, model = TASKS[name], model_of(name)
        ctx = DecodeContext(model.config, LIMITS)
        masks = [200, 2200, 4200, 6200, 8200, 10_200]  # six masks, six windows apart
        chars = list(text)
        for at in masks:
            chars[at] = "[MASK]"
        options: dict[str, Any] = {"long_text": "windows"} if name == "classify-text" else {}
        long_payload = task.decode(task.request_model(text="".join(chars), **options), {}, ctx)
        single = task.decode(task.request_model(text="".join(chars[:2000]), **options), {}, ctx)
        units = task.units(long_payload)
        rows.append(
            row(
                f"{name}: forward, 2,046-byte windows",
                "window",
                units,
                best_of(run(name, model, single), args.reps),
                best_of(run(name, model, long_payload), args.reps),
            )
        )


if __name__ == "__main__":
    main()
