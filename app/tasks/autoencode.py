"""POST /v1/autoencode: multimodal (video + audio + label) autoencoding, and Kinetics-700 classification.

The model sees the first 16 frames at 25 fps (0.64 s) and the matching 30,720 samples of 48 kHz mono
audio: the video's own track, a separate ``audio`` upload, or silence. By default only the label query
is decoded (top-k classes); ``reconstruction=npz|mp4`` also decodes every video pixel and audio sample,
running the encoder once for all of them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.heads import PerceiverForMultimodalAutoencoding
from perceiver_core.processing.video import AUDIO_RATE, VIDEO_FPS, prepare_audio, prepare_frames

from ..media import decode_audio, decode_video
from ..runtime import Runtime, ServedModel
from .base import DEMO_LATENTS, Task, WarmupItem, select_model, submit, to_device, top_k
from .classify import Prediction

RECONSTRUCTION_CHUNKS = 16  # decoder query chunks per video: fewer, larger passes on a GPU


@dataclass
class Clip:
    frames: torch.Tensor  # [T, 3, 224, 224] in [0, 1]
    audio: torch.Tensor  # [S, 1]
    audio_source: str
    top_k: int
    reconstruct: bool


class AutoencodeResponse(BaseModel):
    model: str
    weights: str
    audio_source: str
    predictions: list[Prediction]


def input_size(config: PerceiverConfig) -> int:
    """Side of the input frames: the encoder's 4x4 patches tile an image_size x image_size grid."""
    return 4 * config.image_size


def decode(
    video: bytes, audio: bytes | None, config: PerceiverConfig, top: int, reconstruct: bool, limits: dict[str, Any]
) -> Clip:
    samples = config.num_frames * config.audio_samples_per_frame
    clip = decode_video(video, num_frames=config.num_frames, fps=VIDEO_FPS, audio_samples=samples, **limits)
    if audio is not None:
        track, source = decode_audio(audio, samples, limits["max_seconds"]), "upload"
    elif clip.has_audio:
        track, source = clip.audio, "video"
    else:
        track, source = np.zeros(0, np.float32), "silence"
    frames = prepare_frames(clip.frames, config.num_frames, input_size(config))
    return Clip(frames, prepare_audio(track, samples), source, top, reconstruct)


def predict(model: PerceiverHead, payloads: Sequence[Clip]) -> list[dict[str, Any]]:
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
    # One bucket per batch: either every clip is reconstructed, or only the label query is decoded.
    out = model.decode_all(z, RECONSTRUCTION_CHUNKS) if payloads[0].reconstruct else model.decode(z, empty, empty)
    probs = out["label"].float().softmax(-1).cpu()
    results = []
    for i, clip in enumerate(payloads):
        result: dict[str, Any] = {"predictions": top_k(probs[i], clip.top_k, model.config)}
        if clip.reconstruct:
            result["video"] = out["image"][i].float().clamp(0, 1).cpu()  # [T, H, W, 3]
            result["audio"] = out["audio"][i].float().clamp(-1, 1).cpu()  # [S]
        results.append(result)
    return results


def warmup_items(served: ServedModel) -> list[WarmupItem]:
    config = served.model.config
    frames = torch.zeros(config.num_frames, 3, input_size(config), input_size(config))
    audio = torch.zeros(config.num_frames * config.audio_samples_per_frame, 1)
    return [WarmupItem(Clip(frames, audio, "silence", 1, r), r) for r in (False, True)]


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


def encode(result: dict[str, Any], fmt: str, meta: dict[str, Any]) -> Response | dict[str, Any]:
    body = {**meta, "predictions": result["predictions"]}
    if fmt == "none":
        return body
    headers = {
        "x-predictions": json.dumps(result["predictions"]),
        "x-model": meta["model"],
        "x-weights": meta["weights"],
    }
    if fmt == "mp4":
        return Response(encode_mp4(result["video"], result["audio"]), media_type="video/mp4", headers=headers)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        video=result["video"].numpy(),
        audio=result["audio"].numpy(),
        labels=np.array([p["label"] for p in result["predictions"]]),
        scores=np.array([p["score"] for p in result["predictions"]], dtype=np.float32),
    )
    return Response(buffer.getvalue(), media_type="application/x-npz", headers=headers)


def register(router: APIRouter, runtime_of: Callable[[Request], Runtime]) -> None:
    @router.post(
        "/v1/autoencode",
        response_model=AutoencodeResponse,
        tags=["video"],
        summary="Classify (and optionally reconstruct) a video with its audio",
        responses={200: {"content": {"application/x-npz": {}, "video/mp4": {}}}},
    )
    async def autoencode(
        request: Request,
        video: Annotated[UploadFile, File(description="MP4, MOV, MKV or WebM")],
        audio: Annotated[UploadFile | None, File(description="Optional audio; default: the video's own track")] = None,
        top_k: Annotated[int, Form(ge=1, le=700)] = 5,
        reconstruction: Annotated[Literal["none", "npz", "mp4"], Form()] = "none",
    ) -> Any:
        runtime = runtime_of(request)
        served = select_model(request, runtime, "autoencode")
        s = runtime.settings
        limits = {
            "max_seconds": s.max_video_seconds,
            "max_frames": s.max_video_frames,
            "max_pixels": s.max_image_pixels,
        }
        audio_bytes = await audio.read() if audio is not None else None
        clip = await runtime.decode(
            decode, await video.read(), audio_bytes, served.model.config, top_k, reconstruction != "none", limits
        )
        result = await submit(request, runtime, served, clip, cost=1, bucket=clip.reconstruct)
        meta = {"model": served.name, "weights": served.weights, "audio_source": clip.audio_source}
        return await runtime.offload(encode, result, reconstruction, meta)


TASK = Task(
    name="autoencode",
    path="/v1/autoencode",
    architectures=("PerceiverForMultimodalAutoencoding",),
    demo_configs={
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
    },
    predict=predict,
    warmup_items=warmup_items,
    register=register,
    default_batch_cost=lambda size: size,
    max_batch_size_cap=4,
)
