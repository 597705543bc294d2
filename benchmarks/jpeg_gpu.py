"""nvJPEG next to the model on one GPU: where the time of a batch of JPEG uploads goes.

    python benchmarks/jpeg_gpu.py --markdown benchmarks/results/gpu/jpeg-gpu.md

Per image, batches of 64 JPEGs (the sample photo at 451x300, mosaics of the sample photos at 1920x1080
and 4032x3024, benchmarks/photos.py), on the CUDA device:
- batched: one ``decode_jpeg`` call for the batch, then the crop and resize of each image (what
  ``Classify.predict`` does on CUDA today, before the forward pass);
- threads: 8 threads, each with its own CUDA stream, decoding one image per call;
- model: the image-learned forward alone (published config, random weights, bf16, batch 64);
- overlapped: the batched decode of the next batch on a side stream, in a second thread, while the
  forward runs; against decode + forward one after the other.
Best of 3 timed repetitions after one warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from benchmarks.models import PUBLISHED  # noqa: E402
from benchmarks.photos import SIZES, photo_jpeg  # noqa: E402
from perceiver_core.checkpoint import config_from_dict  # noqa: E402
from perceiver_core.processing import jpeg  # noqa: E402

BATCH = 64
THREADS = 8


def best_s(fn: Callable[[], Any], reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if not (torch.cuda.is_available() and jpeg.available()):
        sys.exit("needs a CUDA device and a working torchvision")
    device = torch.device("cuda")
    config = config_from_dict(
        {**PUBLISHED["image-learned"], "architectures": ["PerceiverForImageClassificationLearned"]}
    )
    torch.manual_seed(0)
    model = perceiver_core.build_model(config).to(device, torch.bfloat16).eval()
    pixels = torch.randn(BATCH, 3, 224, 224, device=device, dtype=torch.bfloat16)
    pool = ThreadPoolExecutor(THREADS)
    streams = [torch.cuda.Stream() for _ in range(THREADS)]
    side = torch.cuda.Stream()

    def forward() -> None:
        with torch.inference_mode():
            model(inputs=pixels)

    forward_s = best_s(forward)
    rows = [
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; batches of {BATCH}; ms per image",
        "",
        "| upload | batched decode + crop/resize | 8 threads, 1 image per call | model forward "
        "| decode then forward | decode overlapped with forward | overlap saves |",
        "|---|---|---|---|---|---|---|",
    ]
    for width, height in SIZES.values():
        data = [photo_jpeg(width, height)] * BATCH

        def batched(data: list[bytes] = data) -> list[torch.Tensor]:
            return [jpeg.crop_resize(image) for image in jpeg.decode_jpegs(data, device)]

        def one_thread(k: int, data: list[bytes] = data) -> None:
            with torch.cuda.stream(streams[k]):
                for d in data[k::THREADS]:
                    jpeg.crop_resize(jpeg.decode_jpegs([d], device)[0])
            streams[k].synchronize()

        def threads() -> None:
            list(pool.map(one_thread, range(THREADS)))

        def on_side() -> None:
            with torch.cuda.stream(side):
                batched()
            side.synchronize()

        def overlapped() -> None:
            pending = pool.submit(on_side)
            forward()
            pending.result()

        cells = []
        for fn in (batched, threads):
            try:
                cells.append(best_s(fn) / BATCH * 1000)
            except Exception as exc:  # a failing path is reported, the others still measured
                print(f"{width}x{height} {fn.__name__}: {type(exc).__name__}: {exc}", flush=True)
                cells.append(float("nan"))
        serial = cells[0] + forward_s / BATCH * 1000
        try:
            overlap = best_s(overlapped) / BATCH * 1000
        except Exception as exc:
            print(f"{width}x{height} overlapped: {type(exc).__name__}: {exc}", flush=True)
            overlap = float("nan")
        rows.append(
            f"| {width}x{height} | {cells[0]:.2f} | {cells[1]:.2f} | {forward_s / BATCH * 1000:.2f} | {serial:.2f} "
            f"| {overlap:.2f} | {100 * (1 - overlap / serial):.0f}% |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
