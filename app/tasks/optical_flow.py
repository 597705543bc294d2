"""POST /v1/optical-flow: dense flow between two frames of any (equal) size, tiled into 368×496 windows,
or between each consecutive pair of a video's frames (every ``stride``-th frame).

A pair and a video are one payload: frames [T, H, W, 3] (T = 2 for a pair) whose T − 1 pairs are cut into
the same windows. The batcher counts windows (pairs × windows per pair), and the windows of all the pairs
of a batch run in passes of at most WINDOWS_PER_PASS on a GPU and of one window on a CPU.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field, RootModel

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing.flow import FlowLayout, blend_tiles, cut_windows, extract_patches, flow_layout

from ..batching import EVERY, Batch
from ..errors import InvalidInput, PayloadTooLarge
from ..media import decode_rgb_array, open_video
from .base import DEMO_LATENTS, DecodeContext, Reply, Task, TaskRequest, Upload, naming, to_device

FLO_MAGIC = 202021.25  # Middlebury .flo header
WINDOWS_PER_PASS = 8  # on a GPU: bounds activation memory when one request alone brings many windows
# On a CPU a window's activations are ~1.4 GB in fp32 (the demo head and the published one alike), and windows
# sharing a pass cost more each there (the flow model's max_batch_size=auto is 1): 8 windows in a pass were
# 9.5 GB and 37 s on 2 cores, where 8 passes of one are 1.4 GB at a time (docs/reliability.md, threats).
CPU_WINDOWS_PER_PASS = 1


PAIR_FORMATS = ("json", "npy", "flo", "png")
VIDEO_FORMATS = ("json", "npz", "npy", "mp4")


def windows_per_pass(device: torch.device) -> int:
    """How many 368x496 windows share a forward pass on ``device``: what bounds a request's memory."""
    return WINDOWS_PER_PASS if device.type == "cuda" else CPU_WINDOWS_PER_PASS


class FlowRequest(TaskRequest):
    format: Literal["json", "npy", "flo", "png", "npz", "mp4"] = Field(
        "json",
        description="Response encoding. A frame pair: json ([H][W][2] flow), npy, flo or png. A video: json "
        "(per-pair statistics), npz or npy (flow [T-1, H, W, 2]) or mp4 (colour-wheel flow video).",
    )
    stride: int = Field(1, ge=1, description="A video: flow between every stride-th frame (1: every frame).")


class FlowResponse(BaseModel):
    model: str
    weights: str
    height: int
    width: int
    tiles: int = Field(description="368x496 windows the pair was cut into")
    flow: list[list[list[float]]] = Field(description="[H][W][2] displacement (dx, dy) in pixels")


class PairStatistics(BaseModel):
    start_s: float = Field(description="Time of the pair's first frame in the video, in seconds.")
    end_s: float = Field(description="Time of its second frame.")
    mean_dx: float = Field(description="Mean horizontal displacement in pixels (positive: rightwards).")
    mean_dy: float = Field(description="Mean vertical displacement in pixels (positive: downwards).")
    mean_magnitude: float = Field(description="Mean length of the displacement vectors, in pixels.")
    max_magnitude: float


class VideoFlowResponse(BaseModel):
    model: str
    weights: str
    height: int
    width: int
    tiles: int = Field(description="368x496 windows each pair was cut into")
    frames: int = Field(description="Frames used (every stride-th frame of the video)")
    stride: int
    pairs: list[PairStatistics] = Field(description="One entry per consecutive pair of the frames used")


class FlowAnswer(RootModel[FlowResponse | VideoFlowResponse]):
    """The JSON answer: a pair's flow, or a video's per-pair statistics."""


@dataclass(frozen=True)
class FlowFrames:
    """Frames whose consecutive pairs get flow: a pair (T = 2), or a video's frames after the stride."""

    frames: torch.Tensor  # uint8 [T, H, W, 3]
    layout: FlowLayout  # the windows of one pair: the same for every pair
    times: tuple[float, ...] | None = None  # a video's frame times in seconds; None for a pair
    rate: float | None = None  # a video's frames per second, after the stride

    @property
    def pairs(self) -> int:
        return int(self.frames.shape[0]) - 1

    @property
    def windows(self) -> int:
        return self.pairs * len(self.layout.corners)


@dataclass(frozen=True)
class FlowResult:
    logits: torch.Tensor  # [P, n, wh, ww, 2]: per pair, per window
    payload: FlowFrames

    def flow(self) -> np.ndarray:
        """Flow in pixels [P, H, W, 2] float32."""
        return np.stack([blend_tiles(pair, self.payload.layout).numpy() for pair in self.logits]).astype(np.float32)


def flow_to_color(flow: np.ndarray, max_radius: float | None = None) -> np.ndarray:
    """Middlebury colour-wheel visualisation of [H, W, 2] flow → uint8 [H, W, 3]: hue is the direction,
    saturation the length relative to ``max_radius`` (default: the longest vector here); no motion is white."""
    counts = (15, 6, 4, 11, 13, 6)  # RY, YG, GC, CB, BM, MR
    wheel = []
    for i, n in enumerate(counts):
        ramp = np.arange(n) / n
        rising, falling = ramp, 1 - ramp
        full, zero = np.ones(n), np.zeros(n)
        wheel.append(
            [
                (full, rising, zero),
                (falling, full, zero),
                (zero, full, rising),
                (zero, falling, full),
                (rising, zero, full),
                (full, zero, falling),
            ][i]
        )
    colorwheel = np.concatenate([np.stack(c, axis=1) for c in wheel]) * 255  # [55, 3]
    u, v = flow[..., 0], flow[..., 1]
    radius = np.sqrt(u**2 + v**2)
    radius = radius / ((radius.max() if max_radius is None else max_radius) + 1e-5)
    angle = np.arctan2(-v, -u) / np.pi
    position = (angle + 1) / 2 * (len(colorwheel) - 1)
    k0 = np.floor(position).astype(int)
    k1 = (k0 + 1) % len(colorwheel)
    frac = (position - k0)[..., None]
    color = ((1 - frac) * colorwheel[k0] + frac * colorwheel[k1]) / 255
    color = 1 - radius[..., None] * (1 - color)
    return (color * 255).astype(np.uint8)


def encode_flow_mp4(flow: np.ndarray, rate: float) -> bytes:
    """Flow [P, H, W, 2] as a colour-wheel video (H.264), one frame per pair, one colour scale for all."""
    import av

    colour = [flow_to_color(pair, float(np.sqrt((flow**2).sum(-1)).max())) for pair in flow]
    h, w = flow.shape[1] + flow.shape[1] % 2, flow.shape[2] + flow.shape[2] % 2  # yuv420p needs even sides
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(
            "libx264" if "libx264" in av.codecs_available else "mpeg4", rate=max(1, round(rate))
        )
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for image in colour:
            padded = np.pad(image, ((0, h - image.shape[0]), (0, w - image.shape[1]), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


class OpticalFlow(Task[FlowRequest, FlowFrames, FlowResult]):
    name = "optical-flow"
    path = "/v1/optical-flow"
    summary = "Optical flow between two frames, or along a video"
    tag = "vision"
    architectures = ("PerceiverForOpticalFlow",)
    demo_configs: ClassVar[dict[str, PerceiverConfig]] = {
        "default": PerceiverConfig(architecture="PerceiverForOpticalFlow", **DEMO_LATENTS, train_size=(368, 496))
    }
    labelled = False
    request_model = FlowRequest
    response_model = FlowAnswer
    uploads = (
        Upload("frame1", "First frame (any size)"),
        Upload("frame2", "Second frame, same size as the first"),
        Upload(
            "video",
            "Instead of two frames: a video (MP4, MOV, MKV, WebM); flow between consecutive frames",
            required=False,
            instead_of=("frame1", "frame2"),
        ),
    )
    media_types = ("application/x-npy", "application/octet-stream", "image/png", "application/x-npz", "video/mp4")
    encode_offloaded = True  # blending the windows and encoding [H, W, 2] floats
    cuda_graphs = True
    max_batch_size_cap = WINDOWS_PER_PASS

    def decode(self, request: FlowRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> FlowFrames:
        if "video" in files:
            if "frame1" in files or "frame2" in files:
                raise InvalidInput("send either frame1 and frame2, or video, not both")
            return self._decode_video(request, files["video"], ctx)
        if "frame1" not in files or "frame2" not in files:
            raise InvalidInput("send frame1 and frame2 (two images), or video (one video file)")
        if request.format not in PAIR_FORMATS:
            answers = ", ".join(PAIR_FORMATS)
            raise InvalidInput(f"format={request.format} is for a video; a frame pair answers {answers}")
        if request.stride != 1:
            raise InvalidInput("stride is for a video; a frame pair is one pair")
        with naming("frame1"):
            frame1 = decode_rgb_array(files["frame1"], ctx.limits.max_image_pixels)
        with naming("frame2"):
            frame2 = decode_rgb_array(files["frame2"], ctx.limits.max_image_pixels)
        if frame1.shape != frame2.shape:
            raise InvalidInput(
                f"frames differ in size: {frame1.shape[1]}x{frame1.shape[0]} vs {frame2.shape[1]}x{frame2.shape[0]}"
            )
        layout = self._layout(frame1.shape[0], frame1.shape[1], ctx, "pair")
        return FlowFrames(torch.from_numpy(np.stack([frame1, frame2])), layout)

    def _layout(self, height: int, width: int, ctx: DecodeContext, what: str) -> FlowLayout:
        layout = flow_layout(height, width, ctx.config.train_size)
        if len(layout.corners) > ctx.limits.max_flow_tiles:
            raise PayloadTooLarge(
                f"a {width}x{height} {what} needs {len(layout.corners)} windows; "
                f"the limit is {ctx.limits.max_flow_tiles}"
            )
        return layout

    def _decode_video(self, request: FlowRequest, data: bytes, ctx: DecodeContext) -> FlowFrames:
        """The video's every stride-th frame, its bounds (frames after the stride, windows per pair) checked on
        the header before any frame is decoded, and again while decoding (headers may lie or say nothing)."""
        if request.format not in VIDEO_FORMATS:
            answers = ", ".join(VIDEO_FORMATS)
            raise InvalidInput(f"format={request.format} is for a frame pair; a video answers {answers}")
        limits, stride, most = ctx.limits, request.stride, ctx.limits.max_flow_frames
        with (
            naming("video"),
            open_video(
                data,
                max_seconds=limits.max_video_seconds,
                max_frames=limits.max_video_frames,
                max_pixels=limits.max_image_pixels,
            ) as video,
        ):
            layout = self._layout(video.height, video.width, ctx, "video")
            declared = video.estimated_frames()
            if declared is not None and math.ceil(declared / stride) > most:
                raise PayloadTooLarge(
                    f"the video has {declared} frames, {math.ceil(declared / stride)} at stride {stride}; the "
                    f"server's limit is {most} frames: send a shorter video or a stride of at least "
                    f"{math.ceil(declared / most)}"
                )
            frames, times = video.every(stride, most)
            rate = video.rate
        if len(frames) < 2:
            raise InvalidInput(f"video: {len(frames)} frame(s) at stride {stride}; flow needs at least two")
        if frames[0].shape[:2] != (layout.height, layout.width):  # the header's size was not the frames' size
            layout = self._layout(frames[0].shape[0], frames[0].shape[1], ctx, "video")
        return FlowFrames(
            torch.from_numpy(np.stack(frames)),
            layout,
            tuple(times),
            (rate or len(frames) / max(times[-1] - times[0], 1e-3)) / stride,
        )

    def bucket(self, payload: FlowFrames) -> tuple[int, int]:
        return payload.layout.window

    def cost(self, payload: FlowFrames) -> int:
        return payload.windows  # windows: max_batch_cost bounds windows per batch

    def units(self, payload: FlowFrames) -> int:
        return payload.windows

    def default_max_batch_cost(self, max_batch_size: int) -> int:
        return max_batch_size  # one request may bring many windows (a large pair, a video): bound windows

    def predict(self, model: PerceiverHead, payloads: Sequence[FlowFrames], batch: Batch = EVERY) -> list[FlowResult]:
        """All windows of all pairs of all requests, in forward passes of at most WINDOWS_PER_PASS windows (one
        on a CPU: ``windows_per_pass``). Before each pass, windows of requests that have ended (deadline,
        disconnect) are left out: their answer would be thrown away, and a 24-window pair is seconds of work on
        a CPU."""
        # (request, pair, window) of every window, in order
        units = [
            (i, p, w) for i, f in enumerate(payloads) for p in range(f.pairs) for w in range(len(f.layout.corners))
        ]
        h, w = payloads[0].layout.window
        logits = torch.zeros(len(units), h, w, 2)  # [n, wh, ww, 2]: stays zero for abandoned windows
        for rows in batch.passes([u[0] for u in units], windows_per_pass(model.device)):
            pieces: list[torch.Tensor] = []
            pairs: dict[tuple[int, int], list[int]] = {}  # the windows of each pair in this pass, cut together
            for j in rows:
                pairs.setdefault(units[j][:2], []).append(units[j][2])
            for (i, p), which in pairs.items():
                frames = payloads[i].frames
                pieces.append(cut_windows(frames[p], frames[p + 1], payloads[i].layout, which))
            patches = extract_patches(to_device(torch.cat(pieces), model))  # 27x expansion on the device
            logits[rows] = model(inputs=patches).logits.float().cpu()
        out = torch.split(logits, [p.windows for p in payloads])
        return [
            FlowResult(chunk.reshape(p.pairs, len(p.layout.corners), h, w, 2), p)
            for chunk, p in zip(out, payloads, strict=True)
        ]

    def encode(self, result: FlowResult, request: FlowRequest) -> Reply:
        if result.payload.times is not None:
            return self._encode_video(result, request)
        array = result.flow()[0]
        headers = {"x-flow-shape": json.dumps(list(array.shape))}
        if request.format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, array)
            return Reply(buffer.getvalue(), "application/x-npy", headers)
        if request.format == "flo":
            h, w = array.shape[:2]
            flo = np.float32(FLO_MAGIC).tobytes() + np.int32(w).tobytes() + np.int32(h).tobytes() + array.tobytes()
            return Reply(flo, "application/octet-stream", headers)
        if request.format == "png":
            buffer = io.BytesIO()
            Image.fromarray(flow_to_color(array)).save(buffer, format="PNG")
            return Reply(buffer.getvalue(), "image/png", headers)
        fields = {
            "tiles": len(result.payload.layout.corners),
            "height": array.shape[0],
            "width": array.shape[1],
            "flow": np.round(array.astype(np.float64), 4).tolist(),  # float64: 4 decimals print as 4 decimals
        }
        return Reply(fields, headers=headers)

    def _encode_video(self, result: FlowResult, request: FlowRequest) -> Reply:
        flow, payload = result.flow(), result.payload  # [P, H, W, 2]
        times = payload.times or ()
        headers = {
            "x-flow-shape": json.dumps(list(flow.shape)),
            "x-frame-times": json.dumps([round(t, 4) for t in times]),
        }
        if request.format == "npz" or request.format == "npy":
            buffer = io.BytesIO()
            if request.format == "npy":
                np.save(buffer, flow)
                return Reply(buffer.getvalue(), "application/x-npy", headers)
            np.savez(buffer, flow=flow, times=np.array(times, dtype=np.float64))
            return Reply(buffer.getvalue(), "application/x-npz", headers)
        if request.format == "mp4":
            return Reply(encode_flow_mp4(flow, payload.rate or 25.0), "video/mp4", headers)
        magnitude = np.sqrt((flow.astype(np.float64) ** 2).sum(-1))  # [P, H, W]
        pairs = [
            {
                "start_s": round(times[p], 4),
                "end_s": round(times[p + 1], 4),
                "mean_dx": round(float(flow[p, ..., 0].mean(dtype=np.float64)), 4),
                "mean_dy": round(float(flow[p, ..., 1].mean(dtype=np.float64)), 4),
                "mean_magnitude": round(float(magnitude[p].mean()), 4),
                "max_magnitude": round(float(magnitude[p].max()), 4),
            }
            for p in range(flow.shape[0])
        ]
        fields: dict[str, Any] = {
            "tiles": len(payload.layout.corners),
            "height": flow.shape[1],
            "width": flow.shape[2],
            "frames": len(times),
            "stride": request.stride,
            "pairs": pairs,
        }
        return Reply(fields, headers=headers)

    def warmup_payloads(self, config: PerceiverConfig) -> list[FlowFrames]:
        h, w = config.train_size
        return [FlowFrames(torch.zeros(2, h, w, 3, dtype=torch.uint8), flow_layout(h, w, (h, w)))]


TASK = OpticalFlow()
