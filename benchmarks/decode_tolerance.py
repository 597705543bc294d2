"""How far each image-decoding path is from the reference preprocessing, in pixels and in logits.

    python benchmarks/decode_tolerance.py --markdown benchmarks/results/decode-tolerance-cpu.md

Paths: ``scaled`` (PIL with libjpeg DCT scaling, PERCEIVER_IMAGE_DECODER=auto on CPU hosts), and
``device`` (torchvision's batched decode_jpeg plus the tensor crop and antialiased bicubic resize; on
CUDA that is nvJPEG, PERCEIVER_IMAGE_DECODER=auto on GPU hosts; on the CPU the same calls run on
libjpeg-turbo). Uploads: the sample photo (451x300) and mosaics of the sample photos at 1920x1080 and
4032x3024 (benchmarks/photos.py). Logits: each demo classifier (random weights, so the numbers show how
far inputs move a network, not accuracy) on the reference crop and on the path's crop; the figure is
max |difference| / max |reference logit|. Times are per image, one at a time, on one core.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from app.media import decode_image  # noqa: E402
from app.tasks.classify import SCALED_MIN_SHORT_SIDE, TASK  # noqa: E402
from benchmarks.photos import SIZES, photo_jpeg  # noqa: E402
from perceiver_core.processing import jpeg  # noqa: E402
from perceiver_core.processing.image import normalize_pixels, resize_image  # noqa: E402


def timed(fn, reps: int = 5):  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(reps):
        started = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {}
    for name, config in TASK.demo_configs.items():
        torch.manual_seed(0)
        models[name] = perceiver_core.build_model(config).eval()
    paths: dict[str, object] = {
        "scaled (CPU)": lambda d: resize_image(decode_image(d, 10**9, SCALED_MIN_SHORT_SIDE)),
    }
    if jpeg.available():
        paths["device path, CPU (libjpeg-turbo)"] = lambda d: jpeg.crop_resize(jpeg.decode_jpegs([d], "cpu")[0]).numpy()
        if torch.cuda.is_available():
            paths[f"device path, {torch.cuda.get_device_name()} (nvJPEG)"] = lambda d: (
                jpeg.crop_resize(jpeg.decode_jpegs([d], "cuda")[0]).cpu().numpy()
            )
    rows = [
        "| upload | path | ms / image | reference ms / image | mean abs diff (of 255) | max abs diff "
        "| logits: max rel. diff (learned / fourier / conv) |",
        "|---|---|---|---|---|---|---|",
    ]
    for width, height in SIZES.values():
        data = photo_jpeg(width, height)
        exact, exact_s = timed(lambda: resize_image(Image.open(io.BytesIO(data))))  # noqa: B023
        for label, path in paths.items():
            crop, seconds = timed(lambda: path(data))  # type: ignore[operator]  # noqa: B023
            diff = np.abs(crop.astype(np.int16) - exact.astype(np.int16))
            pixels = normalize_pixels(torch.from_numpy(np.stack([exact, crop])))
            rel = []
            with torch.inference_mode():
                for model in models.values():
                    logits = model(inputs=pixels).logits
                    rel.append(float((logits[0] - logits[1]).abs().max() / logits[0].abs().max()))
            rows.append(
                f"| {width}x{height} | {label} | {seconds * 1000:.1f} | {exact_s * 1000:.1f} | {diff.mean():.2f} "
                f"| {diff.max()} | {' / '.join(f'{r:.1e}' for r in rel)} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(rows)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
