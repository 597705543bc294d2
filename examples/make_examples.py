"""Makes the sample inputs the README's examples use, from the two photos in tests/media.

    python examples/make_examples.py

- frame1.png, frame2.png: a 480x360 pair cut from the cat photo; in frame2 the content has moved 6 px
  right and 3 px down (so the true flow is (+6, +3) everywhere but the borders).
- clip.mp4: one second, 320x240 at 25 fps (H.264), a slow pan across the coffee photo, with a mono AAC
  track at 48 kHz: an A4 tone (440 Hz) for half a second, then A5 (880 Hz).

- long_text.json: a JSON body {"text", "top_k"} for /v1/fill-mask (and /v1/classify-text with
  long_text=windows): 100 numbered lines of a pangram, 5,514 bytes, longer than the 2,046 bytes the text
  models read at once, with a [MASK] for one byte in line 10, line 50 and line 95.

Deterministic: the same inputs give the same pixels and samples (the encoded bytes may differ between
FFmpeg builds).
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parent / "tests" / "media"
SHIFT = (6, 3)  # (dx, dy) in pixels, content motion from frame1 to frame2
FRAME_SIZE = (480, 360)  # width, height: one 368x496 optical-flow window
CLIP_SIZE, FPS, RATE = (320, 240), 25, 48_000


def frames() -> None:
    photo = np.asarray(Image.open(PHOTOS / "cat.jpg").convert("RGB").resize((512, 384), Image.Resampling.LANCZOS))
    (w, h), (dx, dy), m = FRAME_SIZE, SHIFT, 12
    first = photo[m : m + h, m : m + w]
    second = photo[m - dy : m - dy + h, m - dx : m - dx + w]  # pixel (x, y) of frame1 is at (x+dx, y+dy)
    Image.fromarray(np.ascontiguousarray(first)).save(HERE / "frame1.png", optimize=True)
    Image.fromarray(np.ascontiguousarray(second)).save(HERE / "frame2.png", optimize=True)


def clip() -> None:
    (w, h), n = CLIP_SIZE, FPS  # one second
    photo = np.asarray(
        Image.open(PHOTOS / "coffee.jpg").convert("RGB").resize((w + n * 2, h), Image.Resampling.LANCZOS)
    )
    with av.open(str(HERE / "clip.mp4"), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=FPS, options={"crf": "28", "preset": "veryslow"})
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = container.add_stream("aac", rate=RATE, bit_rate=48_000)
        audio.layout = "mono"
        for i in range(n):
            frame = np.ascontiguousarray(photo[:, 2 * i : 2 * i + w])
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        t = np.arange(RATE) / RATE
        tone = (0.3 * np.sin(2 * np.pi * np.where(t < 0.5, 440.0, 880.0) * t)).astype(np.float32)[None]
        for start in range(0, RATE, 1024):
            piece = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, start : start + 1024]), format="flt", layout="mono"
            )
            piece.sample_rate, piece.pts = RATE, start
            for packet in audio.encode(piece):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)


def long_text() -> None:
    lines = [f"Line {i:03}: the quick brown fox jumps over the lazy dog." for i in range(1, 101)]
    for number, word in ((10, "quick"), (50, "brown"), (95, "lazy")):  # its second letter becomes a [MASK]
        lines[number - 1] = lines[number - 1].replace(word, word[0] + "[MASK]" + word[2:])
    body = {"text": "\n".join(lines), "top_k": 2}
    (HERE / "long_text.json").write_text(json.dumps(body) + "\n")


if __name__ == "__main__":
    frames()
    clip()
    long_text()
