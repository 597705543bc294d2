"""POST /v1/autoencode: multimodal (video + audio + label) autoencoding, and Kinetics-700 classification.

The model sees one clip: 16 frames at 25 fps (0.64 s) and the matching 30,720 samples of 48 kHz mono
audio (the video's own track, a separate ``audio`` upload, or silence). ``clips`` says which clips of the
video it sees: ``first`` (the default), ``uniform`` (as many as the video holds, up to the server's
``max_video_clips``, spread evenly from its start to its end) or a number of clips spread the same way.
The answer is the top-k of the clip-averaged probabilities (and each clip's own with ``per_clip``).
All the clips of a request are one unit of the batcher, costed by its clip count. By default only the
label query is decoded; ``reconstruction=npz|mp4`` also decodes every video pixel and audio sample of
every clip, running the encoder once for all of them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, field_validator

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.heads import PerceiverForMultimodalAutoencoding
from perceiver_core.processing.video import (
    AUDIO_RATE,
    VIDEO_FPS,
    clip_count,
    clip_starts,
    prepare_audio,
    prepare_frame,
)

from ..batching import EVERY, Batch
from ..errors import PayloadTooLarge
from ..media import decode_audio, open_video
from .base import DEMO_LATENTS, DecodeContext, Reply, Task, TaskRequest, Upload, naming, to_device, top_predictions
from .classify import Prediction

RECONSTRUCTION_CHUNKS = 16  # decoder query chunks per video: fewer, larger passes on a GPU
CLIPS_PER_PASS = 4  # bounds activation memory when one request alone brings many clips
# Common ingress limits on all response headers together are 4-8 KB (nginx answers 502 above them).
MAX_PREDICTIONS_HEADER = 2048


class AutoencodeRequest(TaskRequest):
    top_k: int = Field(5, ge=1, le=700, description="How many Kinetics-700 classes to return.")
    reconstruction: Literal["none", "npz", "mp4"] = Field(
        "none", description="none: only the label query is decoded; npz or mp4: every pixel and sample too."
    )
    clips: Literal["first", "uniform"] | Annotated[int, Field(ge=1)] = Field(
        "first",
        description="Which 0.64 s clips the model sees. first: the first one. uniform: as many as the video "
        "holds (ceil(duration / 0.64)), at most the server's max_video_clips, spread evenly from its start to "
        "its end. A number N: N clips spread the same way (over max_video_clips: 413). Predictions are "
        "averaged over the clips.",
    )
    per_clip: bool = Field(False, description="Also return each clip's own top-k, with its start time.")

    @field_validator("clips", mode="before")
    @classmethod
    def _clips(cls, value: Any) -> Any:
        """One message for the three forms instead of one per branch of the union."""
        if value in ("first", "uniform") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        raise ValueError(f"clips is first, uniform or a number of clips (1 or more), not {value!r}")


class ClipPredictions(BaseModel):
    start_s: float = Field(description="Where the clip starts in the video, in seconds.")
    predictions: list[Prediction]


class AutoencodeResponse(BaseModel):
    model: str
    weights: str
    audio_source: str
    num_clips: int = Field(description="Clips the predictions average over.")
    predictions: list[Prediction] = Field(description="Top-k of the class probabilities averaged over the clips.")
    per_clip: list[ClipPredictions] | None = Field(None, description="With per_clip=true: each clip's top-k.")


@dataclass
class Clips:
    frames: torch.Tensor  # uint8 [N, T, S, S, 3]: N clips of T frames, centre-cropped and resized
    audio: torch.Tensor  # [N, A, 1] in [-1, 1]
    starts: list[float]  # seconds
    audio_source: str
    top_k: int
    reconstruct: bool


def input_size(config: PerceiverConfig) -> int:
    """Side of the input frames: the encoder's 4x4 patches tile an image_size x image_size grid."""
    return 4 * config.image_size


def encode_mp4(video: torch.Tensor, audio: torch.Tensor) -> bytes:
    """Reconstructed frames (25 fps) and audio (48 kHz AAC) as an MP4."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=int(VIDEO_FPS))
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=AUDIO_RATE)
        sound.layout = "mono"
        for frame in (video.numpy() * 255).astype(np.uint8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        samples = audio.numpy().astype(np.float32)[None]
        chunk = 1024
        for start in range(0, samples.shape[1], chunk):
            piece = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[:, start : start + chunk]), format="flt", layout="mono"
            )
            piece.sample_rate = AUDIO_RATE
            piece.pts = start
            for packet in sound.encode(piece):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    return buffer.getvalue()


def predictions_header(predictions: list[dict[str, Any]]) -> dict[str, str]:
    """The best predictions that fit in MAX_PREDICTIONS_HEADER bytes as JSON, with the count sent and the
    count there are (npz bodies hold all of them as ``labels`` and ``scores``)."""
    count = len(predictions)
    while count and len(json.dumps(predictions[:count])) > MAX_PREDICTIONS_HEADER:
        count -= 1
    return {
        "x-predictions": json.dumps(predictions[:count]),
        "x-predictions-count": f"{count}/{len(predictions)}",
    }


class Autoencode(Task[AutoencodeRequest, Clips, dict[str, Any]]):
    name = "autoencode"
    path = "/v1/autoencode"
    summary = "Classify (and optionally reconstruct) a video with its audio"
    tag = "video"
    architectures = ("PerceiverForMultimodalAutoencoding",)
    demo_configs: ClassVar[dict[str, PerceiverConfig]] = {
        # Small latents, and a 56x56 reconstruction grid so a CPU can decode every pixel in about a second.
        "default": PerceiverConfig(
            architecture="PerceiverForMultimodalAutoencoding",
            **DEMO_LATENTS,
            num_labels=700,
            image_size=56,
            output_shape=(1, 16, 56, 56),
            output_num_channels=64,
            label_trainable_num_channels=64,
        )
    }
    request_model = AutoencodeRequest
    response_model = AutoencodeResponse
    uploads = (
        Upload("video", "MP4, MOV, MKV or WebM"),
        Upload("audio", "Optional audio; default: the video's own track", required=False),
    )
    media_types = ("application/x-npz", "video/mp4")
    encode_offloaded = True  # npz compression or H.264 encoding
    max_batch_size_cap = 4

    def decode(self, request: AutoencodeRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> Clips:
        config, limits = ctx.config, ctx.limits
        length, per_frame, size = config.num_frames, config.audio_samples_per_frame, input_size(config)
        if isinstance(request.clips, int) and request.clips > limits.max_video_clips:
            raise PayloadTooLarge(
                f"clips={request.clips} is over the server's limit of {limits.max_video_clips} clips per video; "
                f"ask for at most {limits.max_video_clips}, or clips=uniform"
            )
        with (
            naming("video"),
            open_video(
                files["video"],
                max_seconds=limits.max_video_seconds,
                max_frames=limits.max_video_frames,
                max_pixels=limits.max_image_pixels,
            ) as video,
        ):
            starts = [0]  # first frame of each clip, in 1/25 s
            if request.clips != "first":
                count = request.clips
                if count == "uniform":
                    count = min(clip_count(video.duration, length, VIDEO_FPS), limits.max_video_clips)
                starts = clip_starts(video.duration, int(count), length, VIDEO_FPS)
            times = [(start + k) / VIDEO_FPS for start in starts for k in range(length)]
            frames = video.sample(times, lambda rgb: prepare_frame(rgb, size))
            needed = (max(starts) + length) * per_frame  # audio samples up to the end of the last clip
            track = video.audio(needed) if "audio" not in files else None
        if "audio" in files:
            with naming("audio"):
                track, source = decode_audio(files["audio"], needed, limits.max_video_seconds), "upload"
        elif track is not None:
            source = "video"
        else:
            track, source = np.zeros(0, np.float32), "silence"
        samples = length * per_frame
        audio = [prepare_audio(track[s * per_frame : s * per_frame + samples], samples) for s in starts]
        return Clips(
            frames=torch.from_numpy(np.stack(frames).reshape(len(starts), length, size, size, 3)),
            audio=torch.stack(audio),
            starts=[s / VIDEO_FPS for s in starts],
            audio_source=source,
            top_k=request.top_k,
            reconstruct=request.reconstruction != "none",
        )

    def bucket(self, payload: Clips) -> bool:
        # One bucket per batch: either every clip is reconstructed, or only the label query is decoded.
        return payload.reconstruct

    def cost(self, payload: Clips) -> int:
        return int(payload.frames.shape[0])  # clips: max_batch_cost bounds clips per batch

    def units(self, payload: Clips) -> int:
        return int(payload.frames.shape[0])

    def default_max_batch_cost(self, max_batch_size: int) -> int:
        return max_batch_size  # one request may bring up to max_video_clips clips: bound clips, not requests

    def predict(self, model: PerceiverHead, payloads: Sequence[Clips], batch: Batch = EVERY) -> list[dict[str, Any]]:
        """All clips of all requests, in forward passes of at most CLIPS_PER_PASS clips. Before each pass,
        clips of requests that have ended (deadline, disconnect) are left out: their answer is thrown away."""
        if not isinstance(model, PerceiverForMultimodalAutoencoding):
            raise TypeError(f"autoencode needs PerceiverForMultimodalAutoencoding, got {type(model).__name__}")
        clips = [(i, c) for i, p in enumerate(payloads) for c in range(p.frames.shape[0])]
        reconstruct = payloads[0].reconstruct
        probs = torch.zeros(len(clips), model.config.num_labels)
        videos: dict[int, torch.Tensor] = {}
        sounds: dict[int, torch.Tensor] = {}
        for chunk in batch.passes([i for i, _ in clips], CLIPS_PER_PASS):
            frames = torch.stack([payloads[i].frames[c] for i, c in (clips[j] for j in chunk)])  # [b, T, S, S, 3]
            inputs = {
                "image": to_device(frames.permute(0, 1, 4, 2, 3).float() / 255.0, model),  # [b, T, 3, S, S]
                "audio": to_device(torch.stack([payloads[i].audio[c] for i, c in (clips[j] for j in chunk)]), model),
                "label": to_device(torch.zeros(len(chunk), model.config.num_labels), model),
            }
            z = model.encode(inputs)
            empty = torch.zeros(0, dtype=torch.long, device=z.device)
            out = model.decode_all(z, RECONSTRUCTION_CHUNKS) if reconstruct else model.decode(z, empty, empty)
            probs[chunk] = out["label"].float().softmax(-1).cpu()
            if reconstruct:
                for row, j in enumerate(chunk):
                    videos[j] = out["image"][row].float().clamp(0, 1).cpu()  # [T, H, W, 3]
                    sounds[j] = out["audio"][row].float().clamp(-1, 1).cpu()  # [S]
        results, first = [], 0
        for clip in payloads:
            rows = range(first, first + clip.frames.shape[0])
            first += len(rows)
            result: dict[str, Any] = {
                "audio_source": clip.audio_source,
                "starts": clip.starts,
                "predictions": top_predictions(probs[list(rows)].mean(0), clip.top_k, model.config),
                "per_clip": [top_predictions(probs[j], clip.top_k, model.config) for j in rows],
            }
            if reconstruct and all(j in videos for j in rows):
                result["video"] = torch.stack([videos[j] for j in rows])  # [N, T, H, W, 3]
                result["audio"] = torch.stack([sounds[j] for j in rows])  # [N, S]
            results.append(result)
        return results

    def encode(self, result: dict[str, Any], request: AutoencodeRequest) -> dict[str, Any] | Reply:
        fields: dict[str, Any] = {
            "audio_source": result["audio_source"],
            "num_clips": len(result["starts"]),
            "predictions": result["predictions"],
        }
        if request.per_clip:
            fields["per_clip"] = [
                {"start_s": round(start, 4), "predictions": predictions}
                for start, predictions in zip(result["starts"], result["per_clip"], strict=True)
            ]
        if request.reconstruction == "none":
            return fields
        headers = predictions_header(result["predictions"])
        video, audio = result["video"], result["audio"]  # [N, T, H, W, 3], [N, S]
        if request.clips != "first":
            headers["x-clip-starts"] = json.dumps([round(s, 4) for s in result["starts"]])
        if request.reconstruction == "mp4":  # the clips one after another
            return Reply(encode_mp4(video.flatten(0, 1), audio.flatten()), "video/mp4", headers)
        arrays: dict[str, np.ndarray] = {
            # clips=first keeps the one-clip layout: video [T, H, W, 3], audio [S]
            "video": (video[0] if request.clips == "first" else video).numpy(),
            "audio": (audio[0] if request.clips == "first" else audio).numpy(),
            "labels": np.array([p["label"] for p in result["predictions"]]),
            "scores": np.array([p["score"] for p in result["predictions"]], dtype=np.float32),
        }
        if request.clips != "first":
            arrays["starts"] = np.array(result["starts"], dtype=np.float32)
        if request.per_clip:
            arrays["clip_labels"] = np.array([[p["label"] for p in clip] for clip in result["per_clip"]])
            arrays["clip_scores"] = np.array([[p["score"] for p in clip] for clip in result["per_clip"]], np.float32)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return Reply(buffer.getvalue(), "application/x-npz", headers)

    def warmup_payloads(self, config: PerceiverConfig) -> list[Clips]:
        size = input_size(config)
        frames = torch.zeros(1, config.num_frames, size, size, 3, dtype=torch.uint8)
        audio = torch.zeros(1, config.num_frames * config.audio_samples_per_frame, 1)
        return [Clips(frames, audio, [0.0], "silence", 1, r) for r in (False, True)]


TASK = Autoencode()
