"""Safe decoding of uploads (images, audio, video) with limits. Runs in the decode thread pool.

Bad input never escapes as anything but a ServiceError: 415 for what is not a supported image/video,
413 for what is too big to decode, 422 for what is corrupt or truncated.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInput, PayloadTooLarge, UnsupportedMedia

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
VIDEO_FORMATS = ("mp4", "mov", "m4a", "matroska", "webm", "3gp", "mj2")
AUDIO_RATE = 48_000


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes → a PIL image whose header was read and checked (format, pixel count); no pixel decoded yet."""
    if not data:
        raise InvalidInput("the image upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(
            "the upload is not an image in a supported format (JPEG, PNG, WebP, GIF, BMP, TIFF)"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image has too many pixels (limit {max_pixels})") from exc
    except Exception as exc:  # malformed headers raise all sorts of things
        raise InvalidInput(f"the image cannot be read: {exc}") from exc
    if image.format not in IMAGE_FORMATS:
        raise UnsupportedMedia(f"image format {image.format} is not accepted")
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width == 0 or height == 0:
        raise InvalidInput("the image has no pixels")
    return image


def decode_image(data: bytes, max_pixels: int, min_short_side: int | None = None) -> Image.Image:
    """Bytes → RGB-convertible PIL image, EXIF orientation applied, first frame of animations.

    With ``min_short_side``, a JPEG whose short side is at least twice that is decoded at a reduced
    scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling: the decoder skips the high frequencies instead of
    computing pixels a resize would throw away), never below ``min_short_side`` on its short side.
    """
    image = open_image(data, max_pixels)
    width, height = image.size
    if min_short_side is not None and image.format == "JPEG" and min(width, height) >= 2 * min_short_side:
        short = min(width, height)
        # draft picks the largest scale that keeps the image at least this size in both dimensions.
        image.draft(None, (-(-width * min_short_side // short), -(-height * min_short_side // short)))
    try:
        image.seek(0)  # first frame of GIF/WebP animations
        image.load()
        if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation; transposing copies, so only when needed
            image = ImageOps.exif_transpose(image) or image
    except Exception as exc:
        raise InvalidInput(f"the image is corrupt or truncated: {exc}") from exc
    return image


def device_decodable(image: Image.Image) -> bool:
    """A JPEG that a device decoder (nvJPEG) can take as it is: baseline, RGB or grey, upright.

    Everything else (PNG, WebP, CMYK, progressive, EXIF-rotated) stays on the CPU path.
    """
    return (
        image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and not image.info.get("progressive")
        and not image.info.get("progression")
        and image.getexif().get(0x0112, 1) == 1
    )


def decode_rgb_array(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes → uint8 [H, W, 3] (transparency composited on white)."""
    from perceiver_core.processing.image import to_rgb

    return np.array(to_rgb(decode_image(data, max_pixels)), dtype=np.uint8)  # a writable copy for torch


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 [T, H, W, 3], sampled at 25 fps from the start
    audio: np.ndarray  # float32 mono samples at 48 kHz (may be empty)
    has_audio: bool


def _open_container(data: bytes, what: str) -> object:
    import av

    if not data:
        raise InvalidInput(f"the {what} upload is empty")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        raise UnsupportedMedia(f"the {what} upload is not a readable media file") from exc
    except Exception as exc:
        raise InvalidInput(f"the {what} upload cannot be opened: {exc}") from exc
    return container


def decode_video(
    data: bytes,
    *,
    num_frames: int,
    fps: float,
    audio_samples: int,
    max_seconds: float,
    max_frames: int,
    max_pixels: int,
) -> DecodedClip:
    """The first ``num_frames`` frames at ``fps`` and the first ``audio_samples`` of 48 kHz mono audio."""
    import av

    container = _open_container(data, "video")
    try:
        fmt = container.format.name  # type: ignore[attr-defined]
        if not any(name in VIDEO_FORMATS for name in fmt.split(",")):
            raise UnsupportedMedia(f"container {fmt} is not accepted (MP4, MOV, MKV, WebM)")
        streams = container.streams  # type: ignore[attr-defined]
        if not streams.video:
            raise InvalidInput("the upload has no video stream")
        video = streams.video[0]
        duration = _seconds(container.duration, 1e-6) or _seconds(video.duration, video.time_base)  # type: ignore[attr-defined]
        if duration is not None and duration > max_seconds:
            raise PayloadTooLarge(f"video lasts {duration:.1f} s; the limit is {max_seconds:.0f} s")
        if video.frames and video.frames > max_frames:
            raise PayloadTooLarge(f"video declares {video.frames} frames; the limit is {max_frames}")
        if video.codec_context.width * video.codec_context.height > max_pixels:
            raise PayloadTooLarge("video frames have too many pixels")
        frames = _sample_frames(container, video, num_frames, fps, max_frames)
        audio = _decode_audio_stream(container, streams.audio[0], audio_samples) if streams.audio else None
    except (UnsupportedMedia, InvalidInput, PayloadTooLarge):
        raise
    except av.error.FFmpegError as exc:
        raise InvalidInput(f"the video is corrupt or truncated: {exc}") from exc
    except Exception as exc:
        raise InvalidInput(f"the video cannot be decoded: {exc}") from exc
    finally:
        container.close()  # type: ignore[attr-defined]
    if not frames:
        raise InvalidInput("the video has no decodable frames")
    return DecodedClip(np.stack(frames), audio if audio is not None else np.zeros(0, np.float32), audio is not None)


def decode_audio(data: bytes, audio_samples: int, max_seconds: float) -> np.ndarray:
    """A separate audio upload (WAV, MP3, AAC, FLAC, Ogg, ...) → float32 mono 48 kHz samples."""

    container = _open_container(data, "audio")
    try:
        streams = container.streams  # type: ignore[attr-defined]
        if not streams.audio:
            raise InvalidInput("the audio upload has no audio stream")
        duration = _seconds(container.duration, 1e-6)  # type: ignore[attr-defined]
        if duration is not None and duration > max_seconds:
            raise PayloadTooLarge(f"audio lasts {duration:.1f} s; the limit is {max_seconds:.0f} s")
        return _decode_audio_stream(container, streams.audio[0], audio_samples)
    except (UnsupportedMedia, InvalidInput, PayloadTooLarge):
        raise
    except Exception as exc:
        raise InvalidInput(f"the audio cannot be decoded: {exc}") from exc
    finally:
        container.close()  # type: ignore[attr-defined]


def _seconds(value: object, unit: object) -> float | None:
    if value is None or unit is None:
        return None
    return float(value) * float(unit)  # type: ignore[arg-type]


def _sample_frames(container: object, video: object, count: int, fps: float, max_frames: int) -> list[np.ndarray]:
    """Frames at t = k / fps (k < count): for each, the last decoded frame at or before t.

    Clips shorter than count / fps repeat their last frame. Decoding stops once the targets are covered.
    """
    out: list[np.ndarray] = []
    previous: np.ndarray | None = None
    for index, frame in enumerate(container.decode(video)):  # type: ignore[attr-defined]
        if index >= max_frames:
            raise PayloadTooLarge(f"video has more than {max_frames} frames")
        t = frame.time if frame.time is not None else index / fps
        rgb = frame.to_ndarray(format="rgb24")
        while len(out) < count and len(out) / fps < t - 1e-6:  # targets before this frame
            out.append(previous if previous is not None else rgb)
        previous = rgb
        if len(out) >= count:
            break
    while previous is not None and len(out) < count:
        out.append(previous)
    return out


MAX_AUDIO_RATE = 768_000  # the highest rate real recordings use (DXD is 352.8 kHz; some interfaces do 768 kHz)


def _decode_audio_stream(container: object, stream: object, samples: int) -> np.ndarray:
    import av

    # FFmpeg's resampler allocates in proportion to the input rate, holding the GIL: a WAV header claiming
    # 700 MHz cost 1.9 GB and froze the server for 13 s. Refuse such rates before building it.
    rate = getattr(stream, "sample_rate", None) or 0
    if not 0 < rate <= MAX_AUDIO_RATE:
        raise UnsupportedMedia(f"audio sample rate {rate} Hz is outside 1 to {MAX_AUDIO_RATE} Hz")

    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    container.seek(0)  # type: ignore[attr-defined]
    for frame in container.decode(stream):  # type: ignore[attr-defined]
        for out in resampler.resample(frame):
            chunk = out.to_ndarray().reshape(-1)
            chunks.append(chunk)
            total += chunk.shape[0]
        if total >= samples:
            break
    else:
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return audio[:samples].astype(np.float32)
