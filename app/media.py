"""Safe decoding of uploads (images, audio, video) with limits. Runs in the decode thread pool.

Bad input never escapes as anything but a ServiceError: 415 for what is not a supported image/video,
413 for what is too big to decode, 422 for what is corrupt or truncated.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMedia

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
VIDEO_FORMATS = ("mp4", "mov", "m4a", "matroska", "webm", "3gp", "mj2")
AUDIO_RATE = 48_000


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes → a PIL image whose header was read and checked (format, pixel count); no pixel decoded yet."""
    if not data:
        raise InvalidInput("the image upload is empty")
    if data.startswith(PNG_SIGNATURE):  # before Pillow opens it: opening walks the chunks before the pixels
        _count_png_chunks(data)
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_CHUNKS = 100_000  # a 32 MB PNG written in 8 KB IDAT chunks has about 4,000


def _count_png_chunks(data: bytes) -> None:
    """Pillow reads a PNG chunk by chunk in Python: 2.5 million empty chunks in 30 MB held a decode thread for 7 s
    (and a deadline cannot stop a decode once it runs). The chunks are counted first, from their lengths alone
    (~40 ms at the bound), and a PNG of more is refused."""
    offset, count, size = 8, 0, len(data)
    while offset + 8 <= size:
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise PayloadTooLarge(
                f"the PNG has over {MAX_PNG_CHUNKS:,} chunks; save it again (any image editor writes a few dozen)"
            )
        if data[offset + 4 : offset + 8] == b"IEND":
            return
        offset += 12 + struct.unpack_from(">I", data, offset)[0]


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
    # The whole file in one decoder call: Pillow feeds it 64 KB at a time and releases the GIL around each
    # call, and a decode thread that must take the GIL back from a busy event loop or inference thread waits
    # up to the switch interval (5 ms) every time; 28 waits for a 1.8 MB phone photo (docs/performance-history.md).
    # Only for a JPEG (one tile): Pillow reads up to this many bytes per tile, and a hostile TIFF whose strips all
    # start at one offset would then copy the rest of the file once per strip.
    if isinstance(image, ImageFile.ImageFile) and image.format in ("JPEG", "MPO") and len(image.tile) == 1:
        image.decodermaxblock = max(image.decodermaxblock, len(data))
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


@contextlib.contextmanager
def _decoding(what: str) -> Iterator[None]:
    """FFmpeg's and PyAV's exceptions as client errors (the upload is what failed), ours as they are."""
    import av

    try:
        yield
    except ServiceError:
        raise
    except av.error.FFmpegError as exc:
        raise InvalidInput(f"the {what} is corrupt or truncated: {exc}") from exc
    except Exception as exc:
        raise InvalidInput(f"the {what} cannot be decoded: {exc}") from exc


class VideoReader:
    """A video whose header passed the limits (container, duration, declared frames, frame size).

    Opening reads only the header: what a request asks of the video (clips, frames for flow) can be refused
    on the declared ``duration`` and ``declared_frames`` before ``sample``, ``every`` or ``audio`` decodes
    anything. Made by ``open_video``, which closes it.
    """

    def __init__(self, container: Any, *, max_seconds: float, max_frames: int, max_pixels: int) -> None:
        self._container = container
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        fmt = container.format.name
        if not any(name in VIDEO_FORMATS for name in fmt.split(",")):
            raise UnsupportedMedia(f"container {fmt} is not accepted (MP4, MOV, MKV, WebM)")
        streams = container.streams
        if not streams.video:
            raise InvalidInput("the upload has no video stream")
        self._stream = video = streams.video[0]
        self._audio = streams.audio[0] if streams.audio else None
        in_container = _seconds(container.duration, 1e-6)
        in_stream = _seconds(video.duration, video.time_base)
        duration = in_container or in_stream
        if duration is not None and duration > max_seconds:
            raise PayloadTooLarge(f"video lasts {duration:.1f} s; the limit is {max_seconds:.0f} s")
        if video.frames and video.frames > max_frames:
            raise PayloadTooLarge(f"video declares {video.frames} frames; the limit is {max_frames}")
        self.width, self.height = video.codec_context.width, video.codec_context.height
        if self.width * self.height > max_pixels:
            raise PayloadTooLarge("video frames have too many pixels")
        # The video track's own length where the container says it (the audio track may run a few ms longer).
        self._duration = in_stream or in_container
        self.declared_frames: int | None = int(video.frames) or None
        self.rate: float | None = float(video.average_rate) if video.average_rate else None
        self.has_audio = self._audio is not None

    @property
    def duration(self) -> float:
        """Seconds of video: from the header, or (WebM from a browser's recorder declares none) from the
        timestamps of its packets, read without decoding them."""
        if self._duration is None:
            with _decoding("video"):
                end, time_base = 0.0, self._stream.time_base
                for index, packet in enumerate(self._container.demux(self._stream)):
                    if index > self.max_frames:
                        raise PayloadTooLarge(f"video has more than {self.max_frames} frames")
                    if packet.pts is not None and time_base is not None:
                        end = max(end, float((packet.pts + (packet.duration or 0)) * time_base))
                self._container.seek(0)
            self._duration = end
        return self._duration

    def estimated_frames(self) -> int | None:
        """Frames the video declares, or its duration times its frame rate; None when neither is known."""
        if self.declared_frames:
            return self.declared_frames
        if self.rate:
            return math.ceil(self.duration * self.rate - 1e-3)
        return None

    def sample(
        self, times: Sequence[float], transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """For each time (seconds, any order), the last frame shown at or before it (the first frame for
        times before it, the last frame for times past the end), as uint8 RGB passed through ``transform``.

        Each source frame is converted at most once, and only if some time needs it; decoding stops once
        every time is covered.
        """
        order = sorted(range(len(times)), key=times.__getitem__)
        out: list[np.ndarray | None] = [None] * len(times)
        filled = 0
        cached: tuple[Any, np.ndarray] | None = None

        def convert(frame: Any) -> np.ndarray:
            nonlocal cached
            if cached is None or cached[0] is not frame:
                rgb = frame.to_ndarray(format="rgb24")
                cached = (frame, rgb if transform is None else transform(rgb))
            return cached[1]

        previous = None
        with _decoding("video"):
            for index, frame in enumerate(self._container.decode(self._stream)):
                self._check(index, frame)
                t = frame.time if frame.time is not None else index / (self.rate or 25.0)
                while filled < len(order) and times[order[filled]] < t - 1e-6:  # times before this frame
                    out[order[filled]] = convert(previous if previous is not None else frame)
                    filled += 1
                previous = frame
                if filled == len(order):
                    break
            if previous is None:
                raise InvalidInput("the video has no decodable frames")
            for i in order[filled:]:
                out[i] = convert(previous)
        return [frame for frame in out if frame is not None]

    def _check(self, index: int, frame: Any) -> None:
        """Every decoded frame against the limits, not only the header: a stream may declare 64x64 and
        change to 7000x6000 a few frames in (each frame is checked before it is converted or kept)."""
        if index >= self.max_frames:
            raise PayloadTooLarge(f"video has more than {self.max_frames} frames")
        if frame.width * frame.height > self.max_pixels:
            raise PayloadTooLarge(
                f"video frame {index} is {frame.width}x{frame.height}, {frame.width * frame.height} pixels; "
                f"the limit is {self.max_pixels}"
            )

    def every(self, stride: int, max_kept: int) -> tuple[list[np.ndarray], list[float]]:
        """Frames 0, stride, 2·stride, ... of the stream as uint8 RGB [H, W, 3], with their times in seconds;
        more than ``max_kept`` of them is a 413, raised as soon as the one too many is reached."""
        frames: list[np.ndarray] = []
        times: list[float] = []
        with _decoding("video"):
            for index, frame in enumerate(self._container.decode(self._stream)):
                self._check(index, frame)
                if index % stride:
                    continue
                if len(frames) == max_kept:
                    raise PayloadTooLarge(
                        f"video has more than {max_kept} frames at stride {stride}; the limit is {max_kept}"
                    )
                rgb = frame.to_ndarray(format="rgb24")
                if frames and rgb.shape != frames[0].shape:
                    raise InvalidInput(
                        f"the video changes frame size at frame {index} ({rgb.shape[1]}x{rgb.shape[0]}, "
                        f"was {frames[0].shape[1]}x{frames[0].shape[0]}); flow needs frames of one size"
                    )
                frames.append(rgb)
                times.append(float(frame.time) if frame.time is not None else index / (self.rate or 25.0))
        return frames, times

    def audio(self, samples: int) -> np.ndarray | None:
        """The first ``samples`` of the video's own track as float32 mono 48 kHz; None without a track."""
        if self._audio is None:
            return None
        with _decoding("video"):
            return _decode_audio_stream(self._container, self._audio, samples)


@contextlib.contextmanager
def open_video(data: bytes, *, max_seconds: float, max_frames: int, max_pixels: int) -> Iterator[VideoReader]:
    """A ``VideoReader`` on the upload, its header checked; closed on the way out."""
    container: Any = _open_container(data, "video")
    try:
        with _decoding("video"):
            reader = VideoReader(container, max_seconds=max_seconds, max_frames=max_frames, max_pixels=max_pixels)
        yield reader
    finally:
        container.close()


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
    """The first ``num_frames`` frames at ``fps`` and the first ``audio_samples`` of 48 kHz mono audio.

    Clips shorter than num_frames / fps repeat their last frame.
    """
    with open_video(data, max_seconds=max_seconds, max_frames=max_frames, max_pixels=max_pixels) as video:
        frames = video.sample([k / fps for k in range(num_frames)])
        audio = video.audio(audio_samples)
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
