"""Hostile media, generated here: decompression bombs, truncated and corrupt images, lying containers, bogus
audio headers, polyglots. Each gets a JSON 4xx in bounded time and memory, and the server stays ready.
The server runs in this process (conftest's LiveServer), so its memory and its stalls are measured here.

Where a file is a valid image carrying extra bytes (a polyglot, a zip appended), or a corruption that the
decoder conceals, a 200 is a legitimate answer too: the case id says ``200-or-4xx`` and only a 5xx fails it.
"""

from __future__ import annotations

import contextlib
import io
import random
import resource
import struct
import threading
import time
import wave
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import make_mp4
from .test_bad_input import CAT, MP4, png_bomb, small_png

GiB = 1 << 30
REQUEST_SECONDS = 20  # a hostile upload is refused long before a client would give up
STALL_SECONDS = 2  # longest the server may go without running Python (a C call holding the GIL)
REQUEST_RSS_GROWTH = 1 * GiB  # per request, above its starting RSS; the valid 6000x6000 PNG takes ~500 MiB
CORPUS_MAXRSS_GROWTH = 1.5 * GiB

FOURXX = set(range(400, 500))
OK_OR_4XX = FOURXX | {200}


# Images ---------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, idat: bytes, *extra: bytes) -> bytes:
    """An 8-bit RGB PNG with these IDAT bytes; ``extra`` chunks go between IHDR and IDAT."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    body = b"".join(extra) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + header + body


EMPTY_CHUNKS = [png_chunk(b"prVt", b"")] * 300_000  # 3.6 MB


def png_bad_crc() -> bytes:
    data = bytearray(small_png((32, 32)))
    data[29] ^= 0xFF  # the last byte of IHDR's CRC
    return bytes(data)


def png_ztxt_bomb() -> bytes:
    """A 1x1 PNG whose zTXt comment inflates to 256 MiB (Pillow stops at MAX_TEXT_CHUNK)."""
    compressor = zlib.compressobj(9)
    text = b"".join(compressor.compress(bytes(4 << 20)) for _ in range(64)) + compressor.flush()
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + text)
    return png(1, 1, zlib.compress(b"\x00" * 4), ztxt)


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid all-black PNG: ~100 KB that inflates to width x height x 3 bytes."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte + RGB
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png(width, height, idat)


def gif(screen: tuple[int, int], frames: int, tail: bytes = b"") -> bytes:
    """A GIF whose logical screen is ``screen``, holding ``frames`` copies of one 2x2 frame, then ``tail``."""
    buffer = io.BytesIO()
    Image.new("P", (2, 2), 1).save(buffer, format="GIF")
    made = buffer.getvalue()
    flags = made[10]
    table_end = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frame = made[table_end:-1]  # everything between the colour table and the trailer
    return b"GIF89a" + struct.pack("<HH", *screen) + made[10:table_end] + frame * frames + b";" + tail


def tiff_patched(tags: dict[int, int]) -> bytes:
    """An 8x8 uncompressed RGB TIFF written by Pillow, with these LONG tags' values overwritten."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in tags:
            if kind != 4:
                raise ValueError(f"tag {tag} has type {kind}, expected LONG (4)")
            struct.pack_into("<I", data, entry + 8, tags[tag])
    return bytes(data)


def jpeg_segment(data: bytes, marker: int) -> int:
    """Offset of the first segment with this marker (0xC0 SOF0, 0xC4 DHT, 0xDA SOS) before the scan."""
    i = 2
    while i + 4 <= len(data):
        if data[i + 1] == marker:
            return i
        if data[i + 1] == 0xDA:
            break
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    raise ValueError(f"no marker 0x{marker:02X} before the scan")


def jpeg_sized(width: int, height: int) -> bytes:
    """The cat photo with its SOF0 header claiming width x height."""
    data = bytearray(CAT)
    struct.pack_into(">HH", data, jpeg_segment(CAT, 0xC0) + 5, height, width)
    return bytes(data)


def jpeg_bad_huffman_table() -> bytes:
    """The first DHT's 16 code-length counts add up to 4080 codes (at most 256 exist): fatal in libjpeg."""
    data = bytearray(CAT)
    counts = jpeg_segment(CAT, 0xC4) + 5
    data[counts : counts + 16] = b"\xff" * 16
    return bytes(data)


def jpeg_cut_after_scan_header() -> bytes:
    sos = jpeg_segment(CAT, 0xDA)
    return CAT[: sos + 2 + struct.unpack_from(">H", CAT, sos + 2)[0]]


def flipped(data: bytes, start: int, count: int) -> bytes:
    """``data`` with ``count`` bytes inverted from ``start`` on."""
    out = bytearray(data)
    out[start : start + count] = bytes(b ^ 0xFF for b in out[start : start + count])
    return bytes(out)


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def bmp_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 54-byte BMP header declaring a 24-bit width x height bitmap, and no pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def zip_archive(name: str = "payload.html", text: bytes = b"<script>alert(1)</script>") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, text)
    return buffer.getvalue()


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000">'
    b'<rect width="100%" height="100%" fill="red"/><script>alert(1)</script></svg>'
)
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)
HTML = b"<html><body><script>document.write(document.cookie)</script></body></html>"


def multipart(*parts: bytes, end: bytes = b"--hostile--\r\n") -> dict[str, Any]:
    """Request kwargs for a hand-written multipart body (httpx cannot send a malformed one)."""
    body = b"".join(b"--hostile\r\n" + part + b"\r\n" for part in parts) + end
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=hostile"}}


def form_part(name: str, content: bytes, filename: str | None = "x.jpg") -> bytes:
    disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
    return f"Content-Disposition: {disposition}\r\nContent-Type: image/jpeg\r\n\r\n".encode() + content


def raw(data: bytes, content_type: str) -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": content_type}}


def image(data: bytes, filename: str = "upload.jpg") -> dict[str, Any]:
    return {"files": {"image": (filename, data)}}


# Video and audio ------------------------------------------------------------------------------------


def mp4_box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


FTYP = mp4_box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2avc1mp41")


def mp4_moov_claiming(size: int) -> bytes:
    """ftyp, then a moov box whose header claims ``size`` bytes (64-bit largesize above 32 bits)."""
    large = size >= 1 << 32
    header = struct.pack(">I4sQ", 1, b"moov", size) if large else struct.pack(">I4s", size, b"moov")
    return FTYP + header + mp4_box(b"mvhd", bytes(100)) + bytes(64)


def mp4_garbage_boxes(count: int = 400, seed: int = 0) -> bytes:
    """ftyp, then boxes of random (some real) types whose sizes lie: 0, 1 (largesize), huge, or short."""
    rng = random.Random(seed)
    kinds = [b"moov", b"trak", b"mdia", b"stbl", b"stsz", b"mdat", b"uuid", b"free"]
    boxes = [FTYP]
    for _ in range(count):
        kind = rng.choice(kinds) if rng.random() < 0.7 else rng.randbytes(4)
        payload = rng.randbytes(rng.randrange(0, 200))
        size = rng.choice([0, 1, 7, 8 + len(payload), 0xFFFFFFFF, rng.randrange(1 << 32)])
        boxes.append(struct.pack(">I", size) + kind + payload)
    return b"".join(boxes)


def mp4_patched(data: bytes, box: bytes, offset: int, value: int) -> bytes:
    """``data`` with the 32-bit field ``offset`` bytes into the first ``box`` box (from its type) set to value."""
    at = data.index(box)
    out = bytearray(data)
    struct.pack_into(">I", out, at + offset, value)
    return bytes(out)


def mp4_claiming_ten_hours() -> bytes:
    """A 1 s video whose mvhd (version 0) says it lasts 10 hours. FFmpeg trusts the sample tables, which
    say 1 s, so a 200 is right; the 10 hours that the sample tables do hold are mp4_of_frames'."""
    data = make_mp4(seconds=1.0, with_audio=False)
    timescale = struct.unpack_from(">I", data, data.index(b"mvhd") + 16)[0]
    return mp4_patched(data, b"mvhd", 20, 36_000 * timescale)


def mp4_of_frames(size: tuple[int, int], pts: Sequence[int], rate: int = 25, codec: str = "libx264") -> bytes:
    """Black frames at these presentation times (in 1/rate s), and no audio."""
    buffer = io.BytesIO()
    width, height = size
    with av.open(buffer, "w", format="mp4") as container:
        # A codec name that is not a literal types as any kind of stream.
        stream = cast(
            av.VideoStream, container.add_stream(codec if codec in av.codecs_available else "mpeg4", rate=rate)
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.start_encoding()  # writes the header even when no frame follows
        black = np.zeros((height, width, 3), np.uint8)
        for t in pts:
            frame = av.VideoFrame.from_ndarray(black, format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def m4a_audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48_000)
        stream.layout = "mono"
        for start in range(0, 24_000, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
            frame.sample_rate, frame.pts = 48_000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def wav(rate: int = 48_000, channels: int = 1, data_size: int | None = None) -> bytes:
    """0.5 s of a 16-bit mono tone, its header then patched to claim ``rate``, ``channels`` and ``data_size``."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48_000)
        out.writeframes((3000 * np.sin(np.arange(24_000) / 10)).astype("<i2").tobytes())
    data = bytearray(buffer.getvalue())
    struct.pack_into("<HIIH", data, 22, channels, rate, (rate * 2 * channels) & 0xFFFFFFFF, (2 * channels) & 0xFFFF)
    if data_size is not None:
        struct.pack_into("<I", data, 40, data_size)
    return bytes(data)


def video(data: bytes, audio: bytes | None = None) -> dict[str, Any]:
    files = {"video": ("upload.mp4", data)}
    if audio is not None:
        files["audio"] = ("upload.wav", audio)
    return {"files": files}


# The corpus -----------------------------------------------------------------------------------------

CAT_PNG = encoded(Image.open(io.BytesIO(CAT)), "PNG")
CAT_WEBP = encoded(Image.open(io.BytesIO(CAT)), "WEBP", quality=80)
SCAN = jpeg_segment(CAT, 0xDA) + 14  # first byte of entropy-coded data
BOMB = png_bomb(60_000, 60_000)

# Known server bugs: the case id and why it fails. Each is xfail(strict=True) and left out of the memory
# run below; fixing the bug turns it into an XPASS, and then the entry goes.
KNOWN_BUGS: dict[str, str] = {}  # none now: the two this corpus found (a WAV claiming 700 MHz, a multipart
# body without its closing boundary) are fixed in app/media.py and app/routes/requests.py

# (id, path, request kwargs, acceptable statuses)
CORPUS: list[tuple[str, str, dict[str, Any], set[int]]] = [
    # Decompression bombs: tiny files declaring billions of pixels.
    ("png-bomb-60000x60000-valid-crc", "/v1/classify", image(BOMB, "b.png"), {413}),
    ("gif-bomb-65535x65535", "/v1/classify", image(gif((65535, 65535), 1), "b.gif"), {413}),
    ("tiff-bomb-tags-100000x100000", "/v1/classify", image(tiff_patched({256: 100_000, 257: 100_000})), {413}),
    ("jpeg-bomb-sof-65500x65500", "/v1/classify", image(jpeg_sized(65_500, 65_500)), {413}),
    ("bmp-bomb-50000x50000", "/v1/classify", image(bmp_bomb(), "b.bmp"), {413}),
    ("ppm-bomb-100000x100000", "/v1/classify", image(b"P6\n100000 100000\n255\n" + bytes(64)), {413, 415}),
    ("png-6000x6000-idat-truncated", "/v1/classify", image(png(6000, 6000, zlib.compress(bytes(4096)))), {422}),
    ("png-ztxt-inflates-to-256mib", "/v1/classify", image(png_ztxt_bomb(), "z.png"), {422}),
    # Pillow walks chunks in Python: 2.5 million in 30 MB were 7 s of a decode thread (and a 200)
    ("png-300000-empty-chunks", "/v1/classify", image(png(1, 1, zlib.compress(b"\x00" * 4), *EMPTY_CHUNKS)), {413}),
    ("png-6000x6000-of-zeros-valid-200-or-4xx", "/v1/classify", image(png_of_zeros(6000, 6000)), OK_OR_4XX),
    ("gif-10000-frames-valid-200-or-4xx", "/v1/classify", image(gif((2, 2), 10_000), "many.gif"), OK_OR_4XX),
    # Truncated and corrupt images.
    ("png-bad-ihdr-crc", "/v1/classify", image(png_bad_crc(), "c.png"), {415, 422}),
    ("png-cut-in-signature", "/v1/classify", image(CAT_PNG[:6], "c.png"), {415}),
    ("png-cut-in-ihdr", "/v1/classify", image(CAT_PNG[:20], "c.png"), {415, 422}),
    ("png-cut-mid-idat", "/v1/classify", image(CAT_PNG[: len(CAT_PNG) // 2], "c.png"), {422}),
    ("png-cut-before-iend-200-or-4xx", "/v1/classify", image(CAT_PNG[:-12], "c.png"), OK_OR_4XX),
    ("jpeg-cut-in-app0", "/v1/classify", image(CAT[:12]), {415, 422}),
    ("jpeg-cut-after-scan-header", "/v1/classify", image(jpeg_cut_after_scan_header()), {422}),
    ("jpeg-cut-at-95-percent", "/v1/classify", image(CAT[: len(CAT) * 95 // 100]), {422}),
    ("jpeg-bad-huffman-table", "/v1/classify", image(jpeg_bad_huffman_table()), {422}),
    ("jpeg-sof-zero-height", "/v1/classify", image(jpeg_sized(451, 0)), {415, 422}),
    ("jpeg-scan-bytes-flipped-200-or-4xx", "/v1/classify", image(flipped(CAT, SCAN + 5000, 512)), OK_OR_4XX),
    ("webp-cut-in-riff-header", "/v1/classify", image(CAT_WEBP[:10], "c.webp"), {415, 422}),
    ("webp-cut-in-vp8-header", "/v1/classify", image(CAT_WEBP[:32], "c.webp"), {415, 422}),
    ("webp-cut-mid-bitstream", "/v1/classify", image(CAT_WEBP[: len(CAT_WEBP) // 2], "c.webp"), {415, 422}),
    (
        "webp-bitstream-flipped-200-or-4xx",
        "/v1/classify",
        image(flipped(CAT_WEBP, len(CAT_WEBP) // 2, 256), "c.webp"),
        OK_OR_4XX,
    ),
    ("tiff-strip-offset-past-end", "/v1/classify", image(tiff_patched({273: 0xFFFFFF00}), "c.tiff"), {422}),
    # Not images, or more than one thing at once.
    ("zip-renamed-jpg", "/v1/classify", image(zip_archive(), "photo.jpg"), {415}),
    ("svg", "/v1/classify", image(SVG, "x.svg"), {415}),
    ("pdf", "/v1/classify", image(PDF, "x.pdf"), {415}),
    ("ico-not-an-accepted-format", "/v1/classify", image(encoded(Image.new("RGB", (16, 16)), "ICO")), {415}),
    ("jpeg-magic-then-html", "/v1/classify", image(b"\xff\xd8\xff\xe0" + HTML), {415, 422}),
    ("gif-js-polyglot-200-or-4xx", "/v1/classify", image(gif((0x2A2F, 10), 1, b"*/=1;alert(1)//"), "p.gif"), OK_OR_4XX),
    ("jpeg-with-zip-appended-200-or-4xx", "/v1/classify", image(CAT + zip_archive()), OK_OR_4XX),
    ("png-with-zip-appended-200-or-4xx", "/v1/classify", image(CAT_PNG + zip_archive(), "c.png"), OK_OR_4XX),
    ("jpeg-with-html-appended-200-or-4xx", "/v1/classify", image(CAT + HTML), OK_OR_4XX),
    # Bodies: raw uploads and malformed multipart.
    ("raw-image-jpeg-0-bytes", "/v1/classify", raw(b"", "image/jpeg"), {422}),
    ("raw-image-jpeg-is-png-bomb", "/v1/classify", raw(BOMB, "image/jpeg"), {413}),
    ("raw-image-svg", "/v1/classify", raw(SVG, "image/svg+xml"), {415}),
    ("raw-octet-stream-zip", "/v1/classify", raw(zip_archive(), "application/octet-stream"), {415}),
    ("multipart-no-parts", "/v1/classify", multipart(), {422}),
    ("multipart-empty-part-empty-filename", "/v1/classify", multipart(form_part("image", b"", "")), {422}),
    ("multipart-image-as-text-field", "/v1/classify", multipart(form_part("image", CAT, None)), {422}),
    ("multipart-no-closing-boundary", "/v1/classify", multipart(form_part("image", CAT), end=b""), {400, 422}),
    ("multipart-part-without-headers", "/v1/classify", multipart(b"\r\n" + CAT), {400, 422}),
    # Optical flow: one hostile frame next to a good one.
    (
        "flow-frame1-png-bomb",
        "/v1/optical-flow",
        {"files": {"frame1": ("a.png", BOMB), "frame2": ("b.jpg", CAT)}},
        {413},
    ),
    (
        "flow-frame2-webp-cut",
        "/v1/optical-flow",
        {"files": {"frame1": ("a.jpg", CAT), "frame2": ("b.webp", CAT_WEBP[: len(CAT_WEBP) // 2])}},
        {415, 422},
    ),
    # Video containers that lie.
    ("mp4-moov-size-0xfffffff0", "/v1/autoencode", video(mp4_moov_claiming(0xFFFFFFF0)), {415, 422}),
    ("mp4-moov-largesize-2^63", "/v1/autoencode", video(mp4_moov_claiming((1 << 63) - 1)), {415, 422}),
    ("mp4-garbage-boxes", "/v1/autoencode", video(mp4_garbage_boxes()), {415, 422}),
    ("mp4-mvhd-claims-10-hours-200-or-413", "/v1/autoencode", video(mp4_claiming_ten_hours()), {200, 413}),
    ("mp4-3-frames-spanning-10-hours", "/v1/autoencode", video(mp4_of_frames((16, 16), [0, 1, 900_000])), {413}),
    ("mp4-video-stream-no-frames", "/v1/autoencode", video(mp4_of_frames((16, 16), [])), {422}),
    ("mp4-2000-frames-at-1000-fps", "/v1/autoencode", video(mp4_of_frames((16, 16), range(2000), 1000)), {413}),
    ("mp4-8000x6000-frame", "/v1/autoencode", video(mp4_of_frames((8000, 6000), [0], codec="mpeg4")), {413}),
    (
        "mp4-stsz-claims-2^29-samples",
        "/v1/autoencode",
        video(mp4_patched(make_mp4(0.5, with_audio=False), b"stsz", 12, 1 << 29)),
        {415, 422},
    ),
    ("m4a-audio-only", "/v1/autoencode", video(m4a_audio_only()), {422}),
    ("gif-as-video", "/v1/autoencode", video(gif((2, 2), 50)), {415}),
    ("wav-as-video", "/v1/autoencode", video(wav()), {415}),
    # A good video, and an audio upload whose header lies.
    ("audio-wav-rate-0", "/v1/autoencode", video(MP4, wav(rate=0)), {415, 422}),
    ("audio-wav-rate-4000000000", "/v1/autoencode", video(MP4, wav(rate=4_000_000_000)), {415, 422}),
    ("audio-wav-rate-700000001", "/v1/autoencode", video(MP4, wav(rate=700_000_001)), {413, 415, 422}),
    ("audio-wav-65535-channels", "/v1/autoencode", video(MP4, wav(channels=65535)), {415, 422}),
    ("audio-wav-data-claims-4gib-200-or-4xx", "/v1/autoencode", video(MP4, wav(data_size=0xFFFFFFF0)), OK_OR_4XX),
    ("audio-is-a-zip", "/v1/autoencode", video(MP4, zip_archive()), {415}),
]


def params() -> list[Any]:
    return [
        pytest.param(path, kwargs, statuses, id=name, marks=xfail_if_known(name))
        for name, path, kwargs, statuses in CORPUS
    ]


def xfail_if_known(name: str) -> list[pytest.MarkDecorator]:
    reason = KNOWN_BUGS.get(name)
    return [] if reason is None else [pytest.mark.xfail(strict=True, reason=reason)]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Start the process's peak RSS (VmHWM, which ru_maxrss reports) afresh; False where Linux does not let us."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def longest_stall(tick: float = 0.01) -> Iterator[Callable[[], float]]:
    """The longest the process went without running Python while the block ran (a C call holding the GIL
    freezes the server's event loop with it: no request, not even /readyz, is answered meanwhile).

    A gap counts for the CPU time the process had in it, at most its length: a process the machine's other
    work kept off the cores (a busy CI host) was not stalled by its own code, and a CPU-bound C call holding the
    GIL (a decoder: what this corpus attacks) runs on a core all along. A call blocked in a system call with the
    GIL held would go unseen."""
    longest = 0.0
    done = threading.Event()

    def ticker() -> None:
        nonlocal longest
        last, last_cpu = time.monotonic(), time.process_time()
        while not done.wait(tick):
            now, cpu = time.monotonic(), time.process_time()
            longest = max(longest, min(now - last, cpu - last_cpu) - tick)
            last, last_cpu = now, cpu

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        yield lambda: longest
    finally:
        done.set()
        thread.join()


def post_and_check(client: httpx.Client, path: str, kwargs: dict[str, Any], statuses: set[int]) -> None:
    with longest_stall() as stall:
        started = time.monotonic()
        r = client.post(path, **kwargs)
        elapsed = time.monotonic() - started
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert elapsed < REQUEST_SECONDS, f"took {elapsed:.1f} s"
    assert stall() < STALL_SECONDS, f"the process ran no Python for {stall():.1f} s"
    assert "Traceback" not in r.text
    if r.status_code != 200:
        error = r.json()["error"]
        assert set(error) == {"type", "message"} and error["type"] and error["message"]
    assert client.get("/readyz").status_code == 200


def test_the_corpus_leaves_peak_rss_bounded(client: httpx.Client) -> None:
    """Observed on 2 CPU cores: ru_maxrss grew by ~770 MiB over the whole corpus (the valid 6000x6000 PNG
    is most of it); the WAV sample-rate bug alone adds ~1.9 GB, hence it is left out until fixed.

    Loading the demo models peaks at ~1.3 GB, which would hide everything below it: the peak is reset first.
    """
    reset_peak_rss()
    before = peak_rss()
    for name, path, kwargs, statuses in CORPUS:
        if name not in KNOWN_BUGS:
            post_and_check(client, path, kwargs, statuses)
    grown = peak_rss() - before
    assert grown < CORPUS_MAXRSS_GROWTH, f"peak RSS grew by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize(("path", "kwargs", "statuses"), params())
def test_hostile_media_gets_a_json_4xx_in_bounded_time_and_memory(
    client: httpx.Client, path: str, kwargs: dict[str, Any], statuses: set[int]
) -> None:
    measured = reset_peak_rss()
    before = peak_rss()
    post_and_check(client, path, kwargs, statuses)
    grown = peak_rss() - before
    assert not measured or grown < REQUEST_RSS_GROWTH, f"peak RSS rose by {grown / 2**20:.0f} MiB in this request"


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30
