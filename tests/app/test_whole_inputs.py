"""Whole inputs, not their first window: every clip of a video, the flow along a video, texts of any length.

Real media made here with PyAV and PIL from the sample photos. Where the demo's random weights would make an
answer meaningless (flow), a stand-in model whose output the test controls takes the model's place.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import app.media
from app.errors import InvalidInput, PayloadTooLarge
from app.tasks.base import text_ids
from perceiver_core.heads import PerceiverForMultimodalAutoencoding
from perceiver_core.processing import tokenizer
from tests.helpers import pcm16_wav

from .conftest import MEDIA, LiveServer
from .test_endpoints import PhaseCorrelationFlow

ROOT = Path(__file__).resolve().parents[2]
RATE = 48_000
CLIP_FRAMES, CLIP_SAMPLES = 16, 30_720  # one clip of the multimodal model: 0.64 s at 25 fps, at 48 kHz
WINDOW = 2046  # bytes the text models read at once (2,048 positions less [CLS] and [SEP])


# ---------------------------------------------------------------------------------------------- media


def pan(photo: str, frames: int, size: tuple[int, int] = (320, 240), step: int = 4) -> list[np.ndarray]:
    """Frames of a slow pan across one of the sample photos, uint8 [H, W, 3] each."""
    w, h = size
    image = np.asarray(Image.open(MEDIA / photo).convert("RGB").resize((w + frames * step, h)))
    return [np.ascontiguousarray(image[:, i * step : i * step + w]) for i in range(frames)]


def tone(freq: float, samples: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(samples) / RATE)).astype(np.float32)


def lossless_mkv(frames: list[np.ndarray], audio: np.ndarray) -> bytes:
    """Matroska with FFV1 video and 16-bit PCM audio: every frame and sample comes back exactly as given,
    so a clip of a long video and a short video of just that clip decode to the same pixels and samples."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        video = container.add_stream("ffv1", rate=25)
        video.width, video.height, video.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
        sound = container.add_stream("pcm_s16le", rate=RATE)
        sound.layout = "mono"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        pcm = (audio * 32767).astype(np.int16)[None]
        for start in range(0, pcm.shape[1], 1024):
            piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start : start + 1024]), "s16", "mono")
            piece.sample_rate, piece.pts = RATE, start
            for packet in sound.encode(piece):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    return buffer.getvalue()


def h264(frames: list[np.ndarray] | Iterator[np.ndarray], size: tuple[int, int], **options: str) -> bytes:
    """An H.264 MP4 at 25 fps of the given frames (width, height = size)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=25, options=options)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    return buffer.getvalue()


def shifting_photo(steps: list[tuple[int, int]], size: tuple[int, int] = (420, 560)) -> list[np.ndarray]:
    """Crops of the coffee photo; from each frame to the next the content moves by the next (dx, dy) of steps."""
    photo = np.asarray(Image.open(MEDIA / "coffee.jpg").convert("RGB").resize((640, 480)))
    (h, w), m = size, 20
    x = y = 0
    frames = [photo[m : m + h, m : m + w]]
    for dx, dy in steps:
        x, y = x + dx, y + dy  # content at (u, v) in frame 0 is at (u + x, v + y) now
        frames.append(photo[m - y : m - y + h, m - x : m - x + w])
    return [np.ascontiguousarray(f) for f in frames]


@pytest.fixture(scope="module")
def long_video() -> bytes:
    """40 s at 25 fps (1,000 frames of 160x120, a pan around the cat photo, 0.3 MB): decoding all of it, or
    running the model on all of it, takes seconds."""
    photo = np.asarray(Image.open(MEDIA / "cat.jpg").convert("RGB").resize((160, 120)))
    return h264((np.roll(photo, i, axis=1) for i in range(1000)), (160, 120), preset="ultrafast")


class DecodingSpy:
    """Counts calls that decode frames or tokenize text, in the server's process (it runs in this one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("sample", "every"):
            original = getattr(app.media.VideoReader, name)
            monkeypatch.setattr(app.media.VideoReader, name, self._wrap(name, original))
        monkeypatch.setattr(tokenizer, "encode", self._wrap("tokenize", tokenizer.encode))

    def _wrap(self, name: str, original: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return original(*args, **kwargs)

        return spy


def scores(predictions: list[dict[str, Any]]) -> dict[int, float]:
    return {p["index"]: p["score"] for p in predictions}


# ---------------------------------------------------------------------------------------------- video clips


def test_uniform_clips_see_each_half_of_a_video_and_average_their_answers(client: httpx.Client) -> None:
    """Two halves of 16 frames (a pan over the cat photo with a 440 Hz tone, then over the coffee photo with
    880 Hz): each clip answers as the half sent alone (clips=first), and the answer is their mean."""
    cat, coffee = pan("cat.jpg", CLIP_FRAMES), pan("coffee.jpg", CLIP_FRAMES)
    low, high = tone(440, CLIP_SAMPLES), tone(880, CLIP_SAMPLES)
    first_half, second_half = lossless_mkv(cat, low), lossless_mkv(coffee, high)
    whole = lossless_mkv(cat + coffee, np.concatenate([low, high]))

    def ask(video: bytes, **options: str) -> dict[str, Any]:
        r = client.post("/v1/autoencode", files={"video": ("v.mkv", video)}, data={"top_k": "700", **options})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    both = ask(whole, clips="uniform", per_clip="true")
    alone = [scores(ask(half, clips="first")["predictions"]) for half in (first_half, second_half)]
    assert both["num_clips"] == 2 and both["audio_source"] == "video"
    assert [c["start_s"] for c in both["per_clip"]] == [0.0, 0.64]
    per_clip = [scores(c["predictions"]) for c in both["per_clip"]]
    assert all(len(c) == 700 for c in per_clip)
    # The halves answer differently (by far more than the 6-decimal rounding), and each clip as its half.
    assert max(abs(per_clip[0][i] - per_clip[1][i]) for i in range(700)) > 2e-5
    for clip, half in zip(per_clip, alone, strict=True):
        assert max(abs(clip[i] - half[i]) for i in range(700)) <= 1.5e-6
    averaged = scores(both["predictions"])
    assert max(abs(averaged[i] - (alone[0][i] + alone[1][i]) / 2) for i in range(700)) <= 1.5e-6
    ranked = [p["score"] for p in both["predictions"]]
    assert ranked == sorted(ranked, reverse=True)


class LoudnessAutoencoder(PerceiverForMultimodalAutoencoding):
    """A multimodal "model" whose answer the test controls (the demo's random weights barely hear the audio):
    class 0's logit is 10 x the mean absolute amplitude of the clip's audio, every other logit 0."""

    def encode(self, inputs: dict[str, torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return inputs["audio"].abs().mean(dim=(1, 2))[:, None, None]  # [B, 1, 1]

    def decode(
        self, z: torch.Tensor, audio_points: torch.Tensor, image_points: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        logits = torch.zeros(z.shape[0], self.config.num_labels)
        logits[:, 0] = 10 * z[:, 0, 0]
        return {"label": logits}


def wav(samples: np.ndarray) -> bytes:
    return pcm16_wav(samples, RATE)


def test_each_clip_hears_its_own_part_of_the_audio() -> None:
    """Silence, then a tone: the first clip hears nothing, the second the tone, from the video's own track
    and from a separate audio upload alike."""
    swap = {"autoencode": lambda demo: LoudnessAutoencoder(demo.config).eval()}
    server = LiveServer(demo_tasks=["autoencode"], swap=swap).start()
    try:
        loud = tone(100, CLIP_SAMPLES)
        level = np.abs(np.round(loud * 32767) / 32768).mean()  # 16-bit PCM as written, as FFmpeg reads it back
        expected = [1 / 700, math.exp(10 * level) / (math.exp(10 * level) + 699)]  # softmax of [10 x level, 0, ...]
        track = np.concatenate([np.zeros(CLIP_SAMPLES, np.float32), loud])
        frames = pan("cat.jpg", 2 * CLIP_FRAMES)
        with server.client() as client:
            for files in (
                {"video": ("v.mkv", lossless_mkv(frames, track))},
                {"video": ("v.mkv", lossless_mkv(frames, np.zeros(1024, np.float32))), "audio": ("a.wav", wav(track))},
            ):
                r = client.post("/v1/autoencode", files=files, data={"clips": "uniform", "per_clip": "true"})
                assert r.status_code == 200, r.text
                heard = [scores(clip["predictions"])[0] for clip in r.json()["per_clip"]]
                assert heard == pytest.approx(expected, abs=2e-6)
    finally:
        server.stop()


def test_clip_counts_starts_and_defaults(client: httpx.Client) -> None:
    """examples/clip.mp4 lasts 1 s: uniform is ceil(1 / 0.64) = 2 clips, the last one ending with the video
    (frame 9 of 25: 0.36 s); N clips are spread the same way; first is today's answer."""
    clip = (ROOT / "examples" / "clip.mp4").read_bytes()

    def ask(**options: str) -> dict[str, Any]:
        r = client.post("/v1/autoencode", files={"video": ("clip.mp4", clip)}, data={"per_clip": "true", **options})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    default, first = ask(), ask(clips="first")
    assert default == first and first["num_clips"] == 1 and first["per_clip"][0]["start_s"] == 0.0
    assert first["per_clip"][0]["predictions"] == first["predictions"]
    assert [c["start_s"] for c in ask(clips="uniform")["per_clip"]] == [0.0, 0.36]
    assert [c["start_s"] for c in ask(clips="4")["per_clip"]] == [0.0, 0.12, 0.24, 0.36]
    assert ask(clips="1") == first
    r = client.post("/v1/autoencode", files={"video": ("clip.mp4", clip)}, data={"clips": "all"})
    assert r.status_code == 422 and "first, uniform or a number" in r.json()["error"]["message"]


def test_multi_clip_reconstructions_stay_per_clip(client: httpx.Client) -> None:
    clip = (ROOT / "examples" / "clip.mp4").read_bytes()
    r = client.post(
        "/v1/autoencode",
        files={"video": ("clip.mp4", clip)},
        data={"clips": "uniform", "reconstruction": "npz", "per_clip": "true", "top_k": "3"},
    )
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["x-clip-starts"]) == [0.0, 0.36]
    arrays = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arrays["video"].shape == (2, 16, 56, 56, 3) and arrays["audio"].shape == (2, CLIP_SAMPLES)
    assert arrays["clip_labels"].shape == (2, 3) and list(arrays["starts"]) == pytest.approx([0.0, 0.36])
    assert not np.array_equal(arrays["video"][0], arrays["video"][1])
    r = client.post("/v1/autoencode", files={"video": ("clip.mp4", clip)}, data={"clips": "2", "reconstruction": "mp4"})
    assert r.status_code == 200, r.text
    with av.open(io.BytesIO(r.content)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2 * 16  # the clips one after another


def test_all_clips_of_a_request_are_one_unit_costed_by_its_clips(demo_server: LiveServer, client: httpx.Client) -> None:
    labels = {"task": "autoencode", "model": "autoencode"}
    before = {
        name: demo_server.metric(name, **labels)
        for name in (
            "perceiver_units_per_request_sum",
            "perceiver_units_per_request_count",
            "perceiver_batch_cost_sum",
            "perceiver_batch_size_sum",
        )
    }
    clip = (ROOT / "examples" / "clip.mp4").read_bytes()
    r = client.post("/v1/autoencode", files={"video": ("clip.mp4", clip)}, data={"clips": "3"})
    assert r.status_code == 200 and r.headers["x-batch-size"] == "1"
    after = {name: demo_server.metric(name, **labels) for name in before}
    assert after["perceiver_units_per_request_sum"] - before["perceiver_units_per_request_sum"] == 3
    assert after["perceiver_units_per_request_count"] - before["perceiver_units_per_request_count"] == 1
    assert after["perceiver_batch_cost_sum"] - before["perceiver_batch_cost_sum"] == 3  # 3 clips
    assert after["perceiver_batch_size_sum"] - before["perceiver_batch_size_sum"] == 1  # in one request


def test_more_clips_than_allowed_is_a_413_before_anything_is_decoded(
    client: httpx.Client, long_video: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = DecodingSpy(monkeypatch)
    r = client.post("/v1/autoencode", files={"video": ("long.mp4", long_video)}, data={"clips": "9"})
    assert r.status_code == 413, r.text
    assert "limit of 8 clips" in r.json()["error"]["message"]
    assert spy.calls == []
    # The most clips allowed, spread over the 40 s: the clips' frames are decoded (and 8 clips run).
    r = client.post("/v1/autoencode", files={"video": ("long.mp4", long_video)}, data={"clips": "uniform"})
    assert r.status_code == 200 and r.json()["num_clips"] == 8 and spy.calls == ["sample"]


# ---------------------------------------------------------------------------------------------- video flow

STEPS = [(3, -2), (5, 1), (-4, 3), (2, 2)]  # content motion (dx, dy) from each frame to the next


@pytest.fixture(scope="module")
def flow_server() -> Iterator[LiveServer]:
    """Optical flow whose model is phase correlation (tests/app/test_endpoints.py): its answer is the shift."""
    swap = {"optical-flow": lambda _: PhaseCorrelationFlow((368, 496))}
    server = LiveServer(demo_tasks=["optical-flow"], max_flow_frames=8, swap=swap).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shifting_video() -> bytes:
    return h264(shifting_photo(STEPS), (560, 420), crf="12")


def test_the_flow_of_a_video_recovers_the_shift_of_every_pair(flow_server: LiveServer, shifting_video: bytes) -> None:
    """560x420 frames: 4 windows per pair, blended; 4 pairs, one payload."""
    with flow_server.client() as client:
        r = client.post("/v1/optical-flow", files={"video": ("v.mp4", shifting_video)}, data={"format": "npz"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-npz"
        arrays = np.load(io.BytesIO(r.content), allow_pickle=False)
        flow = arrays["flow"]
        assert flow.shape == (len(STEPS), 420, 560, 2) and flow.dtype == np.float32
        assert list(arrays["times"]) == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16])
        for pair, (dx, dy) in zip(flow, STEPS, strict=True):
            assert np.allclose(pair[..., 0], dx, atol=1e-4) and np.allclose(pair[..., 1], dy, atol=1e-4)

        r = client.post("/v1/optical-flow", files={"video": ("v.mp4", shifting_video)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["frames"], body["stride"], body["tiles"], body["height"], body["width"]) == (5, 1, 4, 420, 560)
        got = [(p["mean_dx"], p["mean_dy"], p["start_s"], p["end_s"]) for p in body["pairs"]]
        assert got == [(dx, dy, 0.04 * i, 0.04 * (i + 1)) for i, (dx, dy) in enumerate(STEPS)]
        for pair, (dx, dy) in zip(body["pairs"], STEPS, strict=True):
            assert pair["mean_magnitude"] == pytest.approx(math.hypot(dx, dy), abs=1e-4)

        # Every second frame: pairs (0, 2) and (2, 4), whose shifts are the sums of two steps.
        r = client.post("/v1/optical-flow", files={"video": ("v.mp4", shifting_video)}, data={"stride": "2"})
        assert r.status_code == 200, r.text
        assert [(p["mean_dx"], p["mean_dy"]) for p in r.json()["pairs"]] == [(8, -1), (-2, 5)]


def test_a_video_flow_as_mp4_is_a_colour_wheel_frame_per_pair(flow_server: LiveServer) -> None:
    """Middlebury's wheel: no motion is white, and opposite motions get different hues."""
    steps = [(0, 0), (4, 0), (-4, 0)]
    video = h264(shifting_photo(steps, size=(300, 400)), (400, 300), crf="12")
    with flow_server.client() as client:
        r = client.post("/v1/optical-flow", files={"video": ("v.mp4", video)}, data={"format": "mp4"})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as container:
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (300, 400, 3)
    still, right, left = (f[50:-50, 50:-50].reshape(-1, 3).mean(0) for f in frames)
    assert (still > 245).all()  # white
    assert np.abs(right - left).max() > 100 and (right.min() < 128) and (left.min() < 128)


def test_video_frames_over_the_flow_limit_are_a_413_before_any_is_decoded(
    flow_server: LiveServer, long_video: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = DecodingSpy(monkeypatch)
    with flow_server.client() as client:
        r = client.post("/v1/optical-flow", files={"video": ("long.mp4", long_video)})
        assert r.status_code == 413, r.text
        message = r.json()["error"]["message"]
        assert "1000 frames" in message and "limit is 8 frames" in message and "stride of at least 125" in message
        assert spy.calls == []
        # At the stride the message asks for, the same video is within the limit (8 frames, 7 pairs).
        r = client.post("/v1/optical-flow", files={"video": ("long.mp4", long_video)}, data={"stride": "125"})
        assert r.status_code == 200, r.text
        assert r.json()["frames"] == 8 and spy.calls == ["every"]


def test_flow_windows_of_all_pairs_count_as_the_requests_units(flow_server: LiveServer, shifting_video: bytes) -> None:
    labels = {"task": "optical-flow", "model": "optical-flow"}
    before = flow_server.metric("perceiver_units_per_request_sum", **labels)
    cost = flow_server.metric("perceiver_batch_cost_sum", **labels)
    with flow_server.client() as client:
        r = client.post("/v1/optical-flow", files={"video": ("v.mp4", shifting_video)}, data={"format": "npy"})
    assert r.status_code == 200 and json.loads(r.headers["x-flow-shape"]) == [4, 420, 560, 2]
    assert flow_server.metric("perceiver_units_per_request_sum", **labels) - before == 4 * 4  # pairs x windows
    assert flow_server.metric("perceiver_batch_cost_sum", **labels) - cost == 16


@pytest.mark.parametrize(
    ("files", "data", "said"),
    [
        ({"frame1": "a.png"}, {}, "frame2: file required"),
        ({}, {}, "or video instead of frame1 and frame2"),
        ({"frame1": "a.png", "frame2": "b.png", "video": "v.mp4"}, {}, "not both"),
        ({"video": "v.mp4"}, {"format": "png"}, "a video answers json, npz, npy, mp4"),
        ({"frame1": "a.png", "frame2": "b.png"}, {"format": "mp4"}, "a frame pair answers json, npy, flo, png"),
        ({"frame1": "a.png", "frame2": "b.png"}, {"stride": "2"}, "stride is for a video"),
        ({"video": "v.mp4"}, {"stride": "0"}, "stride"),
    ],
)
def test_a_pair_or_a_video_and_what_each_answers_are_told_apart(
    client: httpx.Client, shifting_video: bytes, files: dict[str, str], data: dict[str, str], said: str
) -> None:
    frame = (ROOT / "examples" / "frame1.png").read_bytes()
    uploads = {name: (filename, shifting_video if name == "video" else frame) for name, filename in files.items()}
    if uploads:
        r = client.post("/v1/optical-flow", files=uploads, data=data)
    else:  # a form with an option and no file
        r = client.post("/v1/optical-flow", data={"format": "json"})
    assert r.status_code == 422, r.text
    assert said in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- long text


def prose(size: int) -> str:
    """ASCII prose of about ``size`` bytes: this project's own documentation."""
    text = " ".join((ROOT / "docs" / name).read_text() for name in ("architecture.md", "performance.md"))
    text = "".join(c if 32 <= ord(c) < 127 else " " for c in text)
    assert len(text) >= size
    return text[:size]


def windows_of(length: int) -> list[int]:
    """The README's rule: windows of 2,046 bytes, evenly spaced at most 1,023 apart, first at 0, last at the end."""
    if length <= WINDOW:
        return [0]
    count = math.ceil((length - WINDOW) / (WINDOW // 2)) + 1
    return [round(i * (length - WINDOW) / (count - 1)) for i in range(count)]


def test_each_mask_of_a_long_text_is_answered_by_the_window_where_it_is_most_central(client: httpx.Client) -> None:
    """A 10 kB text with masks near window edges and centres: each mask's answer is the one a request of just
    that window's bytes gives at the same place."""
    length = 10_000
    at = [5, 700, 1100, 1600, 2500, 4000, 5100, 7000, 9000, 9995]
    chars = list(prose(length))
    for offset in at:
        chars[offset] = "[MASK]"  # one byte, in the filled text
    r = client.post("/v1/fill-mask", json={"text": "".join(chars), "top_k": 5})
    assert r.status_code == 200, r.text
    masks = r.json()["masks"]
    assert [m["byte_offset"] for m in masks] == at
    grid = windows_of(length)
    used: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for mask in masks:
        offset, (start, end) = mask["byte_offset"], mask["window"]
        assert start in grid and end == start + WINDOW
        margins = [min(offset - s, s + WINDOW - 1 - offset) for s in grid if s <= offset < s + WINDOW]
        assert min(offset - start, end - 1 - offset) == max(margins)  # no window holds it more centrally
        used.setdefault((start, end), []).append(mask)
    assert len(used) >= 4
    for (start, end), found in used.items():
        alone = client.post("/v1/fill-mask", json={"text": "".join(chars[start:end]), "top_k": 5})
        assert alone.status_code == 200, alone.text
        by_offset = {m["byte_offset"]: m for m in alone.json()["masks"]}
        assert "window" not in next(iter(by_offset.values()))  # it fits the model: no windows
        for mask in found:
            expected = by_offset[mask["byte_offset"] - start]["candidates"]
            assert [c["byte"] for c in mask["candidates"]] == [c["byte"] for c in expected]
            assert np.allclose([c["score"] for c in mask["candidates"]], [c["score"] for c in expected], atol=2e-6)
    filled = bytearray("".join(prose(length)).encode())
    for mask in masks:
        filled[mask["byte_offset"]] = mask["candidates"][0]["byte"]
    assert r.json()["text"] == filled.decode("utf-8", errors="replace")


def classify(client: httpx.Client, text: str, **options: str) -> dict[int, float]:
    r = client.post("/v1/classify-text", json={"text": text, "top_k": 2, **options})
    assert r.status_code == 200, r.text
    return scores(r.json()["predictions"])


def test_classify_text_long_text_options(client: httpx.Client) -> None:
    text = prose(5000)
    r = client.post("/v1/classify-text", json={"text": text})
    assert r.status_code == 422 and "long_text=windows" in r.json()["error"]["message"]
    assert classify(client, text, long_text="truncate") == classify(client, text[:WINDOW])
    grid = windows_of(len(text))
    assert len(grid) == 4
    alone = [classify(client, text[s : s + WINDOW]) for s in grid]
    averaged = classify(client, text, long_text="windows")
    for label, score in averaged.items():
        assert score == pytest.approx(sum(a[label] for a in alone) / len(alone), abs=2e-6)
    assert len({round(a[0], 6) for a in alone}) > 1  # the windows answer differently: the mean is not one of them
    short = "What a wonderful day!"
    assert classify(client, short, long_text="windows") == classify(client, short)


def test_text_windows_count_as_units(demo_server: LiveServer, client: httpx.Client) -> None:
    labels = {"task": "classify-text", "model": "classify-text"}
    before = demo_server.metric("perceiver_units_per_request_sum", **labels)
    classify(client, prose(5000), long_text="windows")
    assert demo_server.metric("perceiver_units_per_request_sum", **labels) - before == 4


@pytest.mark.parametrize("path", ["/v1/fill-mask", "/v1/classify-text"])
def test_text_over_the_byte_limit_is_a_413_before_it_is_tokenized(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    spy = DecodingSpy(monkeypatch)
    text = "[MASK]" + "é" * 33_000  # 66,006 bytes in 33,006 characters
    body = {"text": text, **({"long_text": "windows"} if path == "/v1/classify-text" else {})}
    r = client.post(path, json=body)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["message"] == "text is 66006 UTF-8 bytes; the server's limit is 65536; send a shorter text"
    assert spy.calls == []
    r = client.post(path, json={"text": "x" * 70_000})
    assert r.status_code == 413 and "over 65536 UTF-8 bytes" in r.json()["error"]["message"]


def test_text_bounds_are_checked_on_the_text_as_sent() -> None:
    assert text_ids("a[MASK]é", 9) == [ord("a") + 6, tokenizer.MASK, 0xC3 + 6, 0xA9 + 6]  # 9 bytes, 4 ids
    with pytest.raises(PayloadTooLarge, match="text is 9 UTF-8 bytes; the server's limit is 8"):
        text_ids("a[MASK]é", 8)
    with pytest.raises(InvalidInput, match="not valid Unicode at character 1"):
        text_ids("a\ud800", 100)  # a lone surrogate: JSON can carry one, UTF-8 cannot
