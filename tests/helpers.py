"""Small helpers more than one test module needs (one copy of each)."""

from __future__ import annotations

import io
import wave

import numpy as np


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, in levels of 255."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def pcm16_wav(samples: np.ndarray, rate: int) -> bytes:
    """A mono 16-bit PCM WAV file of ``samples`` in [-1, 1]."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.asarray(samples) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()
