"""Every endpoint over HTTP against a live server running the demo profile, with real media."""

from __future__ import annotations

import io
import json

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import MEDIA, LiveServer, make_mp4, shifted_pair


@pytest.mark.parametrize("photo", ["cat.jpg", "coffee.jpg"])
@pytest.mark.parametrize("variant", [None, "learned", "fourier", "conv"])
def test_classify_sample_photos(client: httpx.Client, photo: str, variant: str | None) -> None:
    data = {"top_k": "3"} | ({"model": variant} if variant else {})
    r = client.post("/v1/classify", files={"image": (photo, (MEDIA / photo).read_bytes(), "image/jpeg")}, data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == f"classify/{variant or 'learned'}"
    assert body["weights"] == "random-init"
    assert len(body["predictions"]) == 3
    scores = [p["score"] for p in body["predictions"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert {"label", "index", "score"} <= set(body["predictions"][0])
    for header in ("x-request-id", "x-queue-time-ms", "x-inference-time-ms"):
        assert header in r.headers


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_classify_accepts_every_listed_format(client: httpx.Client, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.open(MEDIA / "cat.jpg").convert("RGBA" if fmt == "PNG" else "RGB").save(buffer, format=fmt)
    r = client.post("/v1/classify", files={"image": (f"cat.{fmt.lower()}", buffer.getvalue())})
    assert r.status_code == 200, r.text


def test_exif_orientation_is_honoured(client: httpx.Client) -> None:
    """A portrait photo stored sideways with an EXIF rotation classifies like the upright photo."""
    upright = Image.open(MEDIA / "cat.jpg")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 CW to display
    tagged, plain = io.BytesIO(), io.BytesIO()
    sideways.save(tagged, format="PNG", exif=exif)
    upright.save(plain, format="PNG")
    a = client.post("/v1/classify", files={"image": ("a.png", tagged.getvalue())}, data={"top_k": "10"}).json()
    b = client.post("/v1/classify", files={"image": ("b.png", plain.getvalue())}, data={"top_k": "10"}).json()
    assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
    assert np.allclose([p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]], atol=1e-4)


def test_fill_mask(client: httpx.Client) -> None:
    r = client.post("/v1/fill-mask", json={"text": "Hello w[MASK]rld and caf[MASK][MASK]!", "top_k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["byte_offset"] for m in body["masks"]] == [7, 19, 20]
    assert all(len(m["candidates"]) == 4 for m in body["masks"])
    text = body["text"]
    assert text.startswith("Hello w") and "[MASK]" not in text
    best = bytes(m["candidates"][0]["byte"] for m in body["masks"])
    filled = b"Hello w" + best[:1] + b"rld and caf" + best[1:] + b"!"
    assert text == filled.decode("utf-8", errors="replace")


def test_classify_text(client: httpx.Client) -> None:
    r = client.post("/v1/classify-text", json={"text": "Ünïcödé is fine: 日本語 🚀", "top_k": 2})
    assert r.status_code == 200, r.text
    labels = {p["label"] for p in r.json()["predictions"]}
    assert labels == {"negative", "positive"}


@pytest.mark.parametrize("fmt", ["json", "npy", "flo", "png"])
def test_optical_flow_formats(demo_server: LiveServer, fmt: str) -> None:
    """Shape and format only: the demo flow weights are untrained, so the values mean nothing."""
    first, second = shifted_pair(3, -2, size=(380, 500))
    with demo_server.client() as client:
        r = client.post(
            "/v1/optical-flow", files={"frame1": ("a.png", first), "frame2": ("b.png", second)}, data={"format": fmt}
        )
    assert r.status_code == 200, r.text
    if fmt == "json":
        body = r.json()
        assert (body["height"], body["width"], body["tiles"]) == (380, 500, 4)
        assert np.asarray(body["flow"]).shape == (380, 500, 2)
    elif fmt == "npy":
        assert np.load(io.BytesIO(r.content), allow_pickle=False).shape == (380, 500, 2)
    elif fmt == "flo":
        header = np.frombuffer(r.content[:12], dtype="<f4", count=1)[0], np.frombuffer(r.content[4:12], "<i4")
        assert header[0] == np.float32(202021.25) and list(header[1]) == [500, 380]
        assert len(r.content) == 12 + 380 * 500 * 2 * 4
    else:
        assert Image.open(io.BytesIO(r.content)).size == (500, 380)
    assert json.loads(r.headers["x-flow-shape"]) == [380, 500, 2]


def test_autoencode_mp4_with_aac_track(client: httpx.Client) -> None:
    r = client.post("/v1/autoencode", files={"video": ("clip.mp4", make_mp4(), "video/mp4")}, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["audio_source"] == "video" and len(body["predictions"]) == 3


def test_autoencode_silent_video_and_separate_audio(client: httpx.Client) -> None:
    silent = make_mp4(with_audio=False)
    r = client.post("/v1/autoencode", files={"video": ("clip.mp4", silent)})
    assert r.status_code == 200 and r.json()["audio_source"] == "silence"
    r = client.post("/v1/autoencode", files={"video": ("clip.mp4", silent), "audio": ("tone.mp4", make_mp4())})
    assert r.status_code == 200 and r.json()["audio_source"] == "upload"


@pytest.mark.parametrize("kind", ["npz", "mp4"])
def test_autoencode_reconstruction(client: httpx.Client, kind: str) -> None:
    r = client.post("/v1/autoencode", files={"video": ("clip.mp4", make_mp4())}, data={"reconstruction": kind})
    assert r.status_code == 200, r.text
    assert len(json.loads(r.headers["x-predictions"])) == 5
    if kind == "npz":
        arrays = np.load(io.BytesIO(r.content), allow_pickle=False)
        assert arrays["video"].shape == (16, 56, 56, 3) and arrays["audio"].shape == (30720,)
    else:
        with av.open(io.BytesIO(r.content)) as container:
            assert {s.type for s in container.streams} == {"video", "audio"}
            assert sum(1 for _ in container.decode(video=0)) == 16


def test_models_lists_every_task_and_says_random_init(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["demo"] is True
    names = {m["name"] for m in body["models"]}
    assert names == {
        "classify/learned",
        "classify/fourier",
        "classify/conv",
        "fill-mask",
        "classify-text",
        "optical-flow",
        "autoencode",
    }
    for model in body["models"]:
        assert model["weights"] == "random-init"
        assert {"architecture", "source", "dtype", "device", "batching"} <= set(model)


def test_health_readiness_docs_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/fill-mask", "/v1/classify-text", "/v1/optical-flow", "/v1/autoencode"} <= set(
        spec["paths"]
    )
    client.post("/v1/classify-text", json={"text": "metrics"})
    client.get("/no/such/path")
    text = client.get("/metrics").text
    for name in (
        "perceiver_request_duration_seconds_bucket",
        "perceiver_request_queue_duration_seconds_bucket",
        "perceiver_request_inference_duration_seconds_bucket",
        "perceiver_batch_size_bucket",
        "perceiver_batch_cost_bucket",
        "perceiver_queue_depth",
        "perceiver_requests_total",
    ):
        assert name in text
    assert 'perceiver_requests_total{model="classify-text",status="200",task="classify-text"}' in text
    assert 'perceiver_requests_total{model="",status="404",task="none"}' in text
