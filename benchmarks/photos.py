"""Real-photo JPEGs at phone and camera sizes, for benchmarks and tolerance tests.

The two sample photos (451x300 and 640x427-ish) are tiled into a mosaic of the asked size, each tile
upscaled with a high-quality filter and flipped by position, then saved as a quality-90 JPEG (4:2:0),
as a phone would. Mosaics keep the statistics of real photos (edges, textures, smooth sky) that noise
lacks, so decoders and resamplers are measured on what users send.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

from PIL import Image

MEDIA = Path(__file__).resolve().parents[1] / "tests" / "media"
SIZES = {"small": (451, 300), "hd": (1920, 1080), "phone": (4032, 3024)}


@cache
def photo_jpeg(width: int, height: int, quality: int = 90) -> bytes:
    """A width x height JPEG made of the sample photos."""
    photos = [Image.open(MEDIA / name).convert("RGB") for name in ("cat.jpg", "coffee.jpg")]
    if (width, height) == photos[0].size:
        return (MEDIA / "cat.jpg").read_bytes()
    canvas = Image.new("RGB", (width, height))
    cols = max(1, round(width / 1400))
    rows = max(1, round(height / 1000))
    tile_w, tile_h = -(-width // cols), -(-height // rows)
    for r in range(rows):
        for c in range(cols):
            tile = photos[(r + c) % 2].resize((tile_w, tile_h), Image.Resampling.LANCZOS)
            if (r + c) % 3 == 1:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas.paste(tile, (c * tile_w, r * tile_h))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def parse_size(text: str) -> tuple[int, int]:
    """'phone', 'hd', 'small' or 'WxH'."""
    if text in SIZES:
        return SIZES[text]
    w, _, h = text.lower().partition("x")
    return int(w), int(h)
