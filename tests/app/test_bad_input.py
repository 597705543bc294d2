"""A corpus of bad uploads and bodies: each gets a 4xx JSON error, and the server stays ready."""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from typing import Any

import httpx
import pytest
from PIL import Image

from .conftest import MEDIA, make_mp4

CAT = (MEDIA / "cat.jpg").read_bytes()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG that declares 10^10 pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def small_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_corrupt() -> bytes:
    buffer = io.BytesIO()
    Image.open(MEDIA / "cat.jpg").save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    return bytes(data[: len(data) // 3])


MP4 = make_mp4(seconds=0.5)
GZIP = {"content-encoding": "gzip"}
GZIP_JSON = {**GZIP, "content-type": "application/json"}

# (id, method, path, request kwargs, acceptable statuses)
CORPUS: list[tuple[str, str, str, dict[str, Any], set[int]]] = [
    ("truncated-jpeg", "post", "/v1/classify", {"files": {"image": ("c.jpg", CAT[: len(CAT) // 2])}}, {422}),
    ("zero-bytes-image", "post", "/v1/classify", {"files": {"image": ("c.jpg", b"")}}, {422}),
    ("text-as-image", "post", "/v1/classify", {"files": {"image": ("c.jpg", b"just some text\n" * 20)}}, {415}),
    ("png-decompression-bomb", "post", "/v1/classify", {"files": {"image": ("b.png", png_bomb())}}, {413}),
    ("oversize-body", "post", "/v1/classify", {"files": {"image": ("big.jpg", b"\xff" * (5 * 1024 * 1024))}}, {413}),
    ("wrong-field-name", "post", "/v1/classify", {"files": {"file": ("c.jpg", CAT)}}, {422}),
    ("top-k-zero", "post", "/v1/classify", {"files": {"image": ("c.jpg", CAT)}, "data": {"top_k": "0"}}, {422}),
    ("top-k-huge", "post", "/v1/classify", {"files": {"image": ("c.jpg", CAT)}, "data": {"top_k": "5000"}}, {422}),
    ("top-k-not-int", "post", "/v1/classify", {"files": {"image": ("c.jpg", CAT)}, "data": {"top_k": "many"}}, {422}),
    ("unknown-variant", "post", "/v1/classify", {"files": {"image": ("c.jpg", CAT)}, "data": {"model": "vit"}}, {404}),
    ("corrupt-tiff", "post", "/v1/classify", {"files": {"image": ("c.tiff", tiff_corrupt())}}, {422}),
    ("json-to-multipart-endpoint", "post", "/v1/classify", {"json": {"image": "cat.jpg"}}, {422}),
    ("flow-one-frame", "post", "/v1/optical-flow", {"files": {"frame1": ("a.jpg", CAT)}}, {422}),
    (
        "flow-different-sizes",
        "post",
        "/v1/optical-flow",
        {"files": {"frame1": ("a.png", small_png((64, 48))), "frame2": ("b.png", small_png((60, 48)))}},
        {422},
    ),
    (
        "flow-bad-format",
        "post",
        "/v1/optical-flow",
        {"files": {"frame1": ("a.jpg", CAT), "frame2": ("b.jpg", CAT)}, "data": {"format": "jpg"}},
        {422},
    ),
    (
        "flow-too-many-windows",
        "post",
        "/v1/optical-flow",
        {"files": {"frame1": ("a.png", small_png((4000, 2000))), "frame2": ("b.png", small_png((4000, 2000)))}},
        {413},
    ),
    ("corrupt-mp4", "post", "/v1/autoencode", {"files": {"video": ("v.mp4", MP4[: len(MP4) // 3])}}, {415, 422}),
    ("random-bytes-video", "post", "/v1/autoencode", {"files": {"video": ("v.mp4", bytes(range(256)) * 40)}}, {415}),
    ("image-as-video", "post", "/v1/autoencode", {"files": {"video": ("v.mp4", CAT)}}, {415, 422}),
    ("empty-video", "post", "/v1/autoencode", {"files": {"video": ("v.mp4", b"")}}, {422}),
    (
        "text-as-audio",
        "post",
        "/v1/autoencode",
        {"files": {"video": ("v.mp4", MP4), "audio": ("a.wav", b"not audio at all" * 50)}},
        {415, 422},
    ),
    (
        "bad-reconstruction",
        "post",
        "/v1/autoencode",
        {"files": {"video": ("v.mp4", MP4)}, "data": {"reconstruction": "gif"}},
        {422},
    ),
    (
        "non-utf8-text",
        "post",
        "/v1/classify-text",
        {"content": b'{"text": "caf\xe9 \xff\xfe"}', "headers": {"content-type": "application/json"}},
        {400, 422},
    ),
    (
        "not-json",
        "post",
        "/v1/classify-text",
        {"content": b"text=hello", "headers": {"content-type": "application/json"}},
        {422},
    ),
    ("over-long-text", "post", "/v1/classify-text", {"json": {"text": "x" * 5000}}, {422}),
    ("empty-text", "post", "/v1/classify-text", {"json": {"text": ""}}, {422}),
    ("missing-text", "post", "/v1/classify-text", {"json": {"top_k": 3}}, {422}),
    ("text-top-k-negative", "post", "/v1/classify-text", {"json": {"text": "hi", "top_k": -1}}, {422}),
    ("fill-mask-without-mask", "post", "/v1/fill-mask", {"json": {"text": "no masks here"}}, {422}),
    ("fill-mask-over-long", "post", "/v1/fill-mask", {"json": {"text": "[MASK]" + "é" * 33_000}}, {413}),
    (
        "autoencode-too-many-clips",
        "post",
        "/v1/autoencode",
        {"files": {"video": ("v.mp4", MP4)}, "data": {"clips": "99"}},
        {413},
    ),
    (
        "autoencode-clips-zero",
        "post",
        "/v1/autoencode",
        {"files": {"video": ("v.mp4", MP4)}, "data": {"clips": "0"}},
        {422},
    ),
    (
        "flow-video-and-frames",
        "post",
        "/v1/optical-flow",
        {"files": {"frame1": ("a.jpg", CAT), "video": ("v.mp4", MP4)}},
        {422},
    ),
    ("flow-image-as-video", "post", "/v1/optical-flow", {"files": {"video": ("v.mp4", CAT)}}, {415, 422}),
    (
        "flow-truncated-video",
        "post",
        "/v1/optical-flow",
        {"files": {"video": ("v.mp4", MP4[: len(MP4) // 3])}},
        {415, 422},
    ),
    ("classify-text-bad-long-text", "post", "/v1/classify-text", {"json": {"text": "hi", "long_text": "cut"}}, {422}),
    ("fill-mask-top-k-out-of-range", "post", "/v1/fill-mask", {"json": {"text": "a[MASK]", "top_k": 999}}, {422}),
    ("unknown-path", "get", "/v1/segment", {}, {404}),
    ("wrong-method", "get", "/v1/classify", {}, {405}),
    (
        "gzipped-json",
        "post",
        "/v1/classify-text",
        {"content": gzip.compress(b'{"text": "hi"}'), "headers": GZIP_JSON},
        {415},
    ),
    ("gzipped-upload", "post", "/v1/classify", {"files": {"image": ("c.jpg", CAT)}, "headers": GZIP}, {415}),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "statuses"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_bad_input_gets_a_json_4xx(
    client: httpx.Client, method: str, path: str, kwargs: dict[str, Any], statuses: set[int]
) -> None:
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"type", "message"} and error["type"] and error["message"]
    assert "Traceback" not in r.text
    assert client.get("/readyz").status_code == 200


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 20


def test_a_compressed_body_is_a_415_that_says_to_send_it_uncompressed(client: httpx.Client) -> None:
    """Bodies are read as sent. A gzipped body was refused for what its bytes looked like: JSON "not UTF-8
    encoded", an image "not an image", multipart "Invalid multipart data"."""
    for r in (
        client.post("/v1/classify-text", content=gzip.compress(b'{"text": "hi"}'), headers=GZIP_JSON),
        client.post("/v1/classify", files={"image": ("c.jpg", CAT)}, headers=GZIP),
    ):
        assert r.status_code == 415 and "send the request uncompressed" in r.json()["error"]["message"], r.text
    assert client.post("/v1/classify-text", json={"text": "hi"}, headers={"content-encoding": "identity"}).is_success
    # Several Content-Encoding lines are one list (RFC 9110): only the first was read, and identity then gzip was
    # taken as uncompressed, a 422 "not UTF-8 encoded JSON" (audit).
    lines = [("content-type", "application/json"), ("content-encoding", "identity"), ("content-encoding", "gzip")]
    r = client.post("/v1/classify-text", content=gzip.compress(b'{"text": "hi"}'), headers=lines)
    assert r.status_code == 415 and "Content-Encoding 'gzip' is not supported" in r.json()["error"]["message"], r.text


def test_rejections_are_counted_by_reason(client: httpx.Client) -> None:
    client.post("/v1/classify", files={"image": ("c.jpg", b"")})
    text = client.get("/metrics").text
    assert 'perceiver_rejections_total{model="classify/learned",reason="invalid_input",task="classify"}' in text
