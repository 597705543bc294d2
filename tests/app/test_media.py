"""Upload decoding on real files: accepted formats, limits, corrupt input, EXIF orientation, video and audio."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence

from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from app.media import (
    AUDIO_RATE,
    IMAGE_FORMATS,
    DecodedClip,
    decode_audio,
    decode_image,
    decode_rgb_array,
    decode_video,
    open_video,
)
from tests.helpers import pcm16_wav

from .conftest import MEDIA, make_mp4

CAT = (MEDIA / "cat.jpg").read_bytes()
COFFEE = (MEDIA / "coffee.jpg").read_bytes()
CAT_SIZE = (451, 300)  # width, height
LIMIT = 40_000_000


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height RGB pixels (its data is far too short for them)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Red left half, blue right half, a green top-left corner: any flip or rotation changes its pixels."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:, : size[0] // 2] = (255, 0, 0)
    array[:, size[0] // 2 :] = (0, 0, 255)
    array[:4, :4] = (0, 255, 0)
    return Image.fromarray(array)


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("BMP", {}), ("TIFF", {})],
)
def test_accepted_formats_decode_to_the_photo(fmt: str, options: dict[str, Any]) -> None:
    photo = Image.open(io.BytesIO(CAT)).convert("RGB")
    image = decode_image(encode(photo, fmt, **options), LIMIT)
    assert image.format == fmt and image.format in IMAGE_FORMATS
    assert image.size == CAT_SIZE
    decoded = np.asarray(image.convert("RGB"), dtype=np.int16)
    # GIF quantises to 256 colours and JPEG re-encodes; the others are lossless.
    tolerance = {"GIF": 12.0, "JPEG": 3.0}.get(fmt, 0.0)
    assert np.abs(decoded - np.asarray(photo, dtype=np.int16)).mean() <= tolerance


def test_real_jpeg_photos_decode() -> None:
    cat, coffee = decode_image(CAT, LIMIT), decode_image(COFFEE, LIMIT)
    assert (cat.format, cat.size) == ("JPEG", CAT_SIZE)
    assert (coffee.format, coffee.size) == ("JPEG", (600, 400))
    assert np.asarray(coffee.convert("RGB")).std() > 20  # real content, not a blank frame


def test_a_large_jpeg_is_decoded_in_one_decoder_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow feeds its decoder 64 KB at a time and releases the GIL around each call; each call is then a
    wait for the GIL in a decode thread. A JPEG goes in one call, with the same pixels. (PNG stays per IDAT
    chunk: Pillow's reader hands over one chunk at a time.)"""
    photo = Image.open(io.BytesIO(CAT)).convert("RGB").resize((1804, 1200), Image.Resampling.NEAREST)
    data = encode(photo, "JPEG", quality=98)
    assert len(data) > 8 * 65536
    calls: list[int] = []
    real = Image._getdecoder

    class Counted:
        def __init__(self, decoder: Any) -> None:
            self.decoder = decoder

        def decode(self, buffer: bytes) -> Any:
            calls.append(len(buffer))
            return self.decoder.decode(buffer)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.decoder, name)

    monkeypatch.setattr(Image, "_getdecoder", lambda *args: Counted(real(*args)))
    image = decode_image(data, LIMIT)
    assert len(calls) == 1 and calls[0] >= len(data) - 1024  # all but the header, which the opener read
    reference = Image.open(io.BytesIO(data))
    reference.load()
    assert len(calls) > 8  # the default: many calls (so the counter sees them)
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_gif_animation_gives_its_first_frame() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 8), c) for c in colours]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert sum(1 for _ in ImageSequence.Iterator(Image.open(io.BytesIO(data)))) == 3
    image = decode_image(data, LIMIT)
    assert image.convert("RGB").getpixel((5, 5)) == (255, 0, 0)


def test_empty_upload_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"", LIMIT)


def test_text_is_unsupported_media() -> None:
    with pytest.raises(UnsupportedMedia, match="not an image"):
        decode_image(b"just some text\n" * 20, LIMIT)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_jpeg_is_invalid_input(keep: float) -> None:
    with pytest.raises(InvalidInput, match="truncated"):
        decode_image(CAT[: int(len(CAT) * keep)], LIMIT)


def test_a_few_bytes_of_jpeg_are_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        decode_image(CAT[:100], LIMIT)


def test_pixel_limit_is_inclusive_and_named_in_the_error() -> None:
    pixels = CAT_SIZE[0] * CAT_SIZE[1]
    assert decode_image(CAT, pixels).size == CAT_SIZE
    with pytest.raises(PayloadTooLarge) as caught:
        decode_image(CAT, pixels - 1)
    assert caught.value.message == f"image is 451x300 = {pixels} pixels; the limit is {pixels - 1}"


@pytest.mark.parametrize(
    ("width", "height"),
    [(100_000, 100_000), (100_000, 1_000)],  # past Pillow's hard limit; between its warning and its limit
    ids=["bomb-error", "bomb-warning"],
)
def test_decompression_bomb_header_is_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(PayloadTooLarge, match=f"limit {LIMIT}"):
        decode_image(png_header(width, height), LIMIT)


def test_declared_size_over_the_limit_is_refused_before_decoding() -> None:
    # 5000 x 5000 is below Pillow's bomb check; the data could never fill it, so only the limit stops it.
    with pytest.raises(PayloadTooLarge, match="5000x5000 = 25000000 pixels; the limit is 1000000"):
        decode_image(png_header(5000, 5000), 1_000_000)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_pillow_reads_but_we_do_not_accept_are_unsupported(fmt: str) -> None:
    assert fmt not in IMAGE_FORMATS
    data = encode(Image.new("RGB", (32, 16), (1, 2, 3)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would read it
    with pytest.raises(UnsupportedMedia, match=f"image format {fmt} is not accepted"):
        decode_image(data, LIMIT)


# EXIF orientation -> how the camera stored the upright picture (the inverse of the transpose that displays it).
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(image: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    return encode(image.transpose(STORED[orientation]), fmt, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = halves()
    data = with_orientation(upright, orientation, "PNG")
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif()[0x0112] == orientation
    if orientation >= 5:
        assert stored.size == (20, 40)  # stored sideways
    image = decode_image(data, LIMIT)
    assert image.size == (40, 20)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(upright))
    assert image.getexif().get(0x0112, 1) == 1  # not applied twice downstream


def test_exif_rotated_camera_jpeg_matches_the_upright_photo() -> None:
    upright = decode_image(CAT, LIMIT).convert("RGB")
    image = decode_image(with_orientation(upright, 6, "JPEG"), LIMIT)
    assert image.size == CAT_SIZE
    difference = np.abs(np.asarray(image.convert("RGB"), np.int16) - np.asarray(upright, np.int16))
    assert difference.mean() < 3.0


def test_orientation_one_returns_the_image_untouched() -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    image = decode_image(encode(halves(), "PNG", exif=exif.tobytes()), LIMIT)
    assert image.size == (40, 20) and image.format == "PNG"  # no transpose: still the file's own image


# ---------------------------------------------------------------------------------------------- RGB arrays


def test_rgb_array_composites_transparency_on_white() -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent: white
    rgba[0, 1] = (200, 100, 50, 255)  # opaque: itself
    rgba[0, 2] = (0, 0, 0, 128)  # half black over white: mid grey
    array = decode_rgb_array(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMIT)
    assert array.shape == (2, 3, 3) and array.dtype == np.uint8
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[0, 1]) == (200, 100, 50)
    assert all(abs(int(v) - 127) <= 1 for v in array[0, 2])


def test_rgb_array_of_a_palette_gif_with_a_transparent_index_is_white_there() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    array = decode_rgb_array(encode(image, "GIF", transparency=0), LIMIT)
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[3, 3]) == (255, 0, 0)


def test_rgb_array_of_a_photo_is_writable_uint8_hw3() -> None:
    array = decode_rgb_array(CAT, LIMIT)
    assert array.shape == (300, 451, 3) and array.dtype == np.uint8
    assert array.flags.writeable and array.flags.c_contiguous
    array[0, 0] = 0  # torch.from_numpy needs this to work without a warning


def test_rgb_array_of_greyscale_repeats_the_channel() -> None:
    grey = Image.open(io.BytesIO(COFFEE)).convert("L")
    array = decode_rgb_array(encode(grey, "PNG"), LIMIT)
    assert array.shape == (400, 600, 3)
    assert np.array_equal(array[..., 0], np.asarray(grey)) and np.array_equal(array[..., 0], array[..., 2])


def test_rgb_array_keeps_the_limits() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_rgb_array(CAT, 1000)
    with pytest.raises(UnsupportedMedia):
        decode_rgb_array(b"not an image" * 10, LIMIT)


# ---------------------------------------------------------------------------------------------- video

MP4 = make_mp4(seconds=1.0)  # 25 frames, a 40 px bar moving 8 px per frame, a 440 Hz tone at 0.3
SILENT_MP4 = make_mp4(seconds=0.5, with_audio=False)
VIDEO = dict(num_frames=16, fps=25.0, audio_samples=AUDIO_RATE, max_seconds=60.0, max_frames=1800, max_pixels=LIMIT)


def clip_of(data: bytes, **changes: Any) -> DecodedClip:
    """``decode_video`` with the limits above, some changed."""
    options: dict[str, Any] = {**VIDEO, **changes}
    return decode_video(data, **options)


def bar_positions(frames: np.ndarray) -> list[int]:
    """Left edge of the orange bar in each frame [T, H, W, 3]."""
    return [int(np.argmax(f[:, :, 0].mean(0) > 128)) for f in frames]


def test_video_frames_are_sampled_at_25_fps() -> None:
    clip = clip_of(MP4)
    assert clip.frames.shape == (16, 240, 320, 3) and clip.frames.dtype == np.uint8
    assert bar_positions(clip.frames) == [8 * i for i in range(16)]  # source frames 0..15, in order


def test_a_lower_rate_skips_frames_and_a_short_clip_repeats_its_last() -> None:
    clip = clip_of(MP4, fps=12.5)
    # t = k / 12.5 s is source frame 2k; the clip ends at frame 24 (x = 192), which then repeats.
    assert bar_positions(clip.frames) == [16 * k for k in range(13)] + [192] * 3
    assert np.array_equal(clip.frames[-1], clip.frames[12])


def test_video_audio_is_48khz_mono_float32_of_the_tone() -> None:
    clip = clip_of(MP4)
    assert clip.has_audio
    assert clip.audio.shape == (AUDIO_RATE,) and clip.audio.dtype == np.float32
    steady = clip.audio[4800:]  # past the AAC encoder's priming
    assert np.sqrt(np.mean(steady**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.1)
    spectrum = np.abs(np.fft.rfft(steady))
    assert np.fft.rfftfreq(steady.size, 1 / AUDIO_RATE)[np.argmax(spectrum)] == pytest.approx(440, abs=2)


def test_audio_is_cut_at_the_requested_samples() -> None:
    clip = clip_of(MP4, audio_samples=1000)
    assert clip.audio.shape == (1000,)


def test_video_without_audio() -> None:
    clip = clip_of(SILENT_MP4)
    assert not clip.has_audio
    assert clip.audio.shape == (0,) and clip.audio.dtype == np.float32
    assert clip.frames.shape == (16, 240, 320, 3)  # 12 frames decoded, the last repeated


def audio_only_m4a(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    n = int(seconds * AUDIO_RATE)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / AUDIO_RATE)).astype(np.float32)[None]
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=AUDIO_RATE)
        stream.layout = "mono"
        for start in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, start : start + 1024]), format="flt", layout="mono"
            )
            frame.sample_rate, frame.pts = AUDIO_RATE, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def wav(seconds: float, rate: int = 16_000, amplitude: float = 0.5, hz: float = 440.0) -> bytes:
    n = int(seconds * rate)
    return pcm16_wav(amplitude * np.sin(2 * np.pi * hz * np.arange(n) / rate), rate)


def test_an_audio_only_mp4_has_no_video_stream() -> None:
    with pytest.raises(InvalidInput, match="no video stream"):
        clip_of(audio_only_m4a())


def test_a_non_video_container_is_unsupported() -> None:
    with pytest.raises(UnsupportedMedia, match="container wav is not accepted"):
        clip_of(wav(0.5))


@pytest.mark.parametrize("data", [b"just some text\n" * 20, bytes(range(256)) * 40], ids=["text", "random"])
def test_non_media_bytes_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia, match="not a readable media file"):
        clip_of(data)
    with pytest.raises(UnsupportedMedia, match="not a readable media file"):
        decode_audio(data, AUDIO_RATE, 60.0)


def test_empty_media_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="video upload is empty"):
        clip_of(b"")
    with pytest.raises(InvalidInput, match="audio upload is empty"):
        decode_audio(b"", AUDIO_RATE, 60.0)


def test_an_image_is_not_a_video() -> None:
    with pytest.raises((UnsupportedMedia, InvalidInput)):
        clip_of(CAT)


def test_a_truncated_video_is_refused_with_a_client_error() -> None:
    with pytest.raises((UnsupportedMedia, InvalidInput)):
        clip_of(MP4[: len(MP4) // 3])


def test_a_video_over_max_seconds_is_too_large() -> None:
    with pytest.raises(PayloadTooLarge, match=r"video lasts 3\.0 s; the limit is 2 s"):
        clip_of(make_mp4(seconds=3.0, with_audio=False, size=(64, 48)), max_seconds=2.0)


def test_video_frames_over_the_pixel_limit_are_too_large() -> None:
    with pytest.raises(PayloadTooLarge, match="too many pixels"):
        clip_of(SILENT_MP4, max_pixels=320 * 240 - 1)


def remux(data: bytes, fmt: str) -> bytes:
    """The video stream of ``data`` in another container, packets copied as they are."""
    buffer = io.BytesIO()
    with av.open(io.BytesIO(data), "r") as source, av.open(buffer, "w", format=fmt) as target:
        video = source.streams.video[0]
        stream = target.add_stream_from_template(video)
        for packet in source.demux(video):
            if packet.dts is not None:  # the demuxer's final flush packet
                packet.stream = stream
                target.mux(packet)
    return buffer.getvalue()


MKV = remux(make_mp4(seconds=1.0, with_audio=False), "matroska")


def test_matroska_decodes_like_mp4() -> None:
    clip = clip_of(MKV)
    assert bar_positions(clip.frames) == [8 * i for i in range(16)]
    assert not clip.has_audio


def test_a_video_declaring_more_frames_than_allowed_is_too_large() -> None:
    with pytest.raises(PayloadTooLarge, match="video declares 25 frames; the limit is 16"):
        clip_of(MP4, max_frames=16, num_frames=25)


def test_frames_are_counted_while_decoding_when_the_container_declares_none() -> None:
    with av.open(io.BytesIO(MKV)) as container:
        assert container.streams.video[0].frames == 0  # Matroska does not declare a frame count
    with pytest.raises(PayloadTooLarge, match="video has more than 16 frames"):
        clip_of(MKV, max_frames=16, num_frames=25)


# ---------------------------------------------------------------------------------------------- audio


def test_wav_is_resampled_to_48khz_float32_mono() -> None:
    samples = decode_audio(wav(1.0, rate=16_000, amplitude=0.5), 10 * AUDIO_RATE, 60.0)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert samples.shape[0] == pytest.approx(AUDIO_RATE, abs=64)  # 1 s at 48 kHz, whatever the source rate
    steady = samples[1000:-1000]
    assert np.abs(steady).max() == pytest.approx(0.5, abs=0.02)
    assert np.sqrt(np.mean(steady**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_wav_is_cut_at_the_requested_samples() -> None:
    assert decode_audio(wav(1.0), 24_000, 60.0).shape == (24_000,)


def test_audio_track_of_an_mp4_decodes() -> None:
    samples = decode_audio(audio_only_m4a(), AUDIO_RATE, 60.0)
    assert samples.shape == (AUDIO_RATE,) and samples.dtype == np.float32
    assert np.sqrt(np.mean(samples[4800:] ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.1)


def test_a_silent_video_has_no_audio_to_decode() -> None:
    with pytest.raises(InvalidInput, match="no audio stream"):
        decode_audio(SILENT_MP4, AUDIO_RATE, 60.0)


def test_audio_over_max_seconds_is_too_large() -> None:
    with pytest.raises(PayloadTooLarge, match=r"audio lasts 2\.0 s"):
        decode_audio(wav(2.0), AUDIO_RATE, 1.0)


# ---------------------------------------------------------------------------------------------- video reader

READER = dict(max_seconds=60.0, max_frames=1800, max_pixels=LIMIT)


def test_frames_at_any_times_in_any_order_each_converted_once() -> None:
    converted: list[int] = []

    def mark(rgb: np.ndarray) -> np.ndarray:
        converted.append(bar_positions(rgb[None])[0])
        return rgb

    with open_video(MP4, **READER) as video:
        assert (video.width, video.height, video.declared_frames, video.rate) == (320, 240, 25, 25.0)
        assert video.duration == pytest.approx(1.0)
        frames = video.sample([0.4, 0.0, 0.12, 0.41, 10.0], mark)
    assert bar_positions(np.stack(frames)) == [80, 0, 24, 80, 192]  # frames 10, 0, 3, 10 and the last (24)
    assert sorted(converted) == [0, 24, 80, 192]  # frame 10 once, though asked for twice


def test_every_stride_th_frame_with_its_time_and_a_bound_on_how_many() -> None:
    with open_video(MP4, **READER) as video:
        frames, times = video.every(3, 9)
    assert bar_positions(np.stack(frames)) == [24 * i for i in range(9)]  # frames 0, 3, ..., 24
    assert times == pytest.approx([0.12 * i for i in range(9)])
    with open_video(MP4, **READER) as video, pytest.raises(PayloadTooLarge, match="more than 8 frames at stride 3"):
        video.every(3, 8)


def live_webm(frames: int = 30) -> bytes:
    """WebM as a browser's recorder writes it (live: no duration, no frame count in the header)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm", options={"live": "1"}) as container:
        stream = container.add_stream("libvpx", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), i * 8, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_a_video_without_a_declared_length_is_measured_from_its_packets() -> None:
    data = live_webm()
    with av.open(io.BytesIO(data)) as container:
        assert container.duration is None and container.streams.video[0].frames == 0
    with open_video(data, **READER) as video:
        assert video.duration == pytest.approx(1.2) and video.estimated_frames() == 30
        frames = video.sample([0.0, 0.5])  # decoding starts from the first frame again
    assert [round(float(f.mean()) / 8) for f in frames] == [0, 12]
    with open_video(data, **{**READER, "max_frames": 20}) as video, pytest.raises(PayloadTooLarge):
        assert video.duration > 0  # counting packets stops past max_frames
