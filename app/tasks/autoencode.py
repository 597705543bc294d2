"""POST /v1/autoencode: multimodal (video + audio + label) autoencoding, and Kinetics-700 classification.

The model sees the first 16 frames at 25 fps (0.64 s) and the matching 30,720 samples of 48 kHz mono
audio: the video's own track, a separate ``audio`` upload, or silence. By default only the label query
is decoded (top-k classes); ``reconstruction=npz|mp4`` also decodes every video pixel and audio sample,
running the encoder once for all of them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.heads import PerceiverForMultimodalAutoencoding
from perceiver_core.processing.video import AUDIO_RATE, VIDEO_FPS, prepare_audio, prepare_frames

from ..media import decode_audio, decode_video
from .base import DEMO_LATENTS, DecodeContext, Reply, Task, TaskRequest, Upload, naming, to_device, top_predictions
from .classify import Prediction

RECONSTRUCTION_CHUNKS = 16  # decoder query chunks per video: fewer, larger passes on a GPU
# Common ingress limits on all response headers together are 4-8 KB (nginx answers 502 above them).
MAX_PREDICTIONS_HEADER = 2048


class AutoencodeRequest(TaskRequest):
    top_k: int = Field(5, ge=1, le=700, description="How many Kinetics-700 classes to return.")
    reconstruction: Literal["none", "npz", "mp4"] = Field(
        "none", description="none: only the label query is decoded; npz or mp4: every pixel and sample too."
    )


class AutoencodeResponse(BaseModel):
    model: str
    weights: str
    audio_source: str
    predictions: list[Prediction]


@dataclass
class Clip:
    frames: torch.Tensor  # [T, 3, 224, 224] in [0, 1]
    audio: torch.Tensor  # [S, 1]
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


class Autoencode(Task[AutoencodeRequest, Clip, dict[str, Any]]):
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

    def decode(self, request: AutoencodeRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> Clip:
        config, limits = ctx.config, ctx.limits
        samples = config.num_frames * config.audio_samples_per_frame
        with naming("video"):
            clip = decode_video(
                files["video"],
                num_frames=config.num_frames,
                fps=VIDEO_FPS,
                audio_samples=samples,
                max_seconds=limits.max_video_seconds,
                max_frames=limits.max_video_frames,
                max_pixels=limits.max_image_pixels,
            )
        if "audio" in files:
            with naming("audio"):
                track, source = decode_audio(files["audio"], samples, limits.max_video_seconds), "upload"
        elif clip.has_audio:
            track, source = clip.audio, "video"
        else:
            track, source = np.zeros(0, np.float32), "silence"
        frames = prepare_frames(clip.frames, config.num_frames, input_size(config))
        return Clip(frames, prepare_audio(track, samples), source, request.top_k, request.reconstruction != "none")

    def bucket(self, payload: Clip) -> bool:
        # One bucket per batch: either every clip is reconstructed, or only the label query is decoded.
        return payload.reconstruct

    def predict(self, model: PerceiverHead, payloads: Sequence[Clip]) -> list[dict[str, Any]]:
        if not isinstance(model, PerceiverForMultimodalAutoencoding):
            raise TypeError(f"autoencode needs PerceiverForMultimodalAutoencoding, got {type(model).__name__}")
        b = len(payloads)
        inputs = {
            "image": to_device(torch.stack([p.frames for p in payloads]), model),
            "audio": to_device(torch.stack([p.audio for p in payloads]), model),
            "label": to_device(torch.zeros(b, model.config.num_labels), model),
        }
        z = model.encode(inputs)
        empty = torch.zeros(0, dtype=torch.long, device=z.device)
        out = model.decode_all(z, RECONSTRUCTION_CHUNKS) if payloads[0].reconstruct else model.decode(z, empty, empty)
        probs = out["label"].float().softmax(-1).cpu()
        results = []
        for i, clip in enumerate(payloads):
            result: dict[str, Any] = {
                "audio_source": clip.audio_source,
                "predictions": top_predictions(probs[i], clip.top_k, model.config),
            }
            if clip.reconstruct:
                result["video"] = out["image"][i].float().clamp(0, 1).cpu()  # [T, H, W, 3]
                result["audio"] = out["audio"][i].float().clamp(-1, 1).cpu()  # [S]
            results.append(result)
        return results

    def encode(self, result: dict[str, Any], request: AutoencodeRequest) -> dict[str, Any] | Reply:
        fields = {"audio_source": result["audio_source"], "predictions": result["predictions"]}
        if request.reconstruction == "none":
            return fields
        headers = predictions_header(result["predictions"])
        if request.reconstruction == "mp4":
            return Reply(encode_mp4(result["video"], result["audio"]), "video/mp4", headers)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            video=result["video"].numpy(),
            audio=result["audio"].numpy(),
            labels=np.array([p["label"] for p in result["predictions"]]),
            scores=np.array([p["score"] for p in result["predictions"]], dtype=np.float32),
        )
        return Reply(buffer.getvalue(), "application/x-npz", headers)

    def warmup_payloads(self, config: PerceiverConfig) -> list[Clip]:
        frames = torch.zeros(config.num_frames, 3, input_size(config), input_size(config))
        audio = torch.zeros(config.num_frames * config.audio_samples_per_frame, 1)
        return [Clip(frames, audio, "silence", 1, r) for r in (False, True)]


TASK = Autoencode()
