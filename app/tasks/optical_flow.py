"""POST /v1/optical-flow: dense flow between two frames of any (equal) size, tiled into 368×496 windows."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing.flow import FlowTiles, blend_tiles, extract_patches, grid_indices, prepare_tiles

from ..batching import still_wanted
from ..errors import InvalidInput, PayloadTooLarge
from ..media import decode_rgb_array
from .base import DEMO_LATENTS, DecodeContext, Reply, Task, TaskRequest, Upload, naming, to_device

FLO_MAGIC = 202021.25  # Middlebury .flo header
WINDOWS_PER_PASS = 8  # bounds activation memory when one request alone brings many windows


class FlowRequest(TaskRequest):
    format: Literal["json", "npy", "flo", "png"] = Field("json", description="Response encoding.")


class FlowResponse(BaseModel):
    model: str
    weights: str
    height: int
    width: int
    tiles: int = Field(description="368x496 windows the pair was cut into")
    flow: list[list[list[float]]] = Field(description="[H][W][2] displacement (dx, dy) in pixels")


@dataclass(frozen=True)
class FlowResult:
    logits: torch.Tensor  # [n, wh, ww, 2] per window
    layout: FlowTiles


def flow_to_color(flow: np.ndarray) -> np.ndarray:
    """Middlebury colour-wheel visualisation of [H, W, 2] flow → uint8 [H, W, 3]."""
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
    radius = radius / (radius.max() + 1e-5)
    angle = np.arctan2(-v, -u) / np.pi
    position = (angle + 1) / 2 * (len(colorwheel) - 1)
    k0 = np.floor(position).astype(int)
    k1 = (k0 + 1) % len(colorwheel)
    frac = (position - k0)[..., None]
    color = ((1 - frac) * colorwheel[k0] + frac * colorwheel[k1]) / 255
    color = 1 - radius[..., None] * (1 - color)
    return (color * 255).astype(np.uint8)


class OpticalFlow(Task[FlowRequest, FlowTiles, FlowResult]):
    name = "optical-flow"
    path = "/v1/optical-flow"
    summary = "Optical flow between two frames"
    tag = "vision"
    architectures = ("PerceiverForOpticalFlow",)
    demo_configs: ClassVar[dict[str, PerceiverConfig]] = {
        "default": PerceiverConfig(architecture="PerceiverForOpticalFlow", **DEMO_LATENTS, train_size=(368, 496))
    }
    labelled = False
    request_model = FlowRequest
    response_model = FlowResponse
    uploads = (
        Upload("frame1", "First frame (any size)"),
        Upload("frame2", "Second frame, same size as the first"),
    )
    media_types = ("application/x-npy", "application/octet-stream", "image/png")
    encode_offloaded = True  # blending the windows and encoding [H, W, 2] floats
    cuda_graphs = True
    max_batch_size_cap = WINDOWS_PER_PASS

    def decode(self, request: FlowRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> FlowTiles:
        h0, w0 = ctx.config.train_size
        window = (h0, w0)
        with naming("frame1"):
            frame1 = decode_rgb_array(files["frame1"], ctx.limits.max_image_pixels)
        with naming("frame2"):
            frame2 = decode_rgb_array(files["frame2"], ctx.limits.max_image_pixels)
        if frame1.shape != frame2.shape:
            raise InvalidInput(
                f"frames differ in size: {frame1.shape[1]}x{frame1.shape[0]} vs {frame2.shape[1]}x{frame2.shape[0]}"
            )
        h, w = frame1.shape[:2]
        tiles = len(grid_indices(max(h, window[0]), max(w, window[1]), window))
        if tiles > ctx.limits.max_flow_tiles:
            raise PayloadTooLarge(f"a {w}x{h} pair needs {tiles} windows; the limit is {ctx.limits.max_flow_tiles}")
        return prepare_tiles(torch.from_numpy(frame1), torch.from_numpy(frame2), window)

    def bucket(self, payload: FlowTiles) -> tuple[int, int]:
        return payload.window

    def cost(self, payload: FlowTiles) -> int:
        return int(payload.tiles.shape[0])  # windows: max_batch_cost bounds windows per batch

    def default_max_batch_cost(self, max_batch_size: int) -> int:
        return max_batch_size  # one request may bring up to max_flow_tiles windows: bound windows, not pairs

    def predict(self, model: PerceiverHead, payloads: Sequence[FlowTiles]) -> list[FlowResult]:
        """All windows of all requests, in forward passes of at most WINDOWS_PER_PASS windows. Before each
        pass, windows of requests that have ended (deadline, disconnect) are left out: their answer would
        be thrown away, and a 24-window pair is seconds of work on a CPU."""
        tiles = torch.cat([p.tiles for p in payloads])
        owner = [i for i, p in enumerate(payloads) for _ in range(p.tiles.shape[0])]
        h, w = payloads[0].window
        logits = torch.zeros(tiles.shape[0], h, w, 2)  # [n, wh, ww, 2]: stays zero for abandoned windows
        for start in range(0, tiles.shape[0], WINDOWS_PER_PASS):
            wanted = still_wanted(payloads)
            rows = [j for j in range(start, min(start + WINDOWS_PER_PASS, tiles.shape[0])) if wanted[owner[j]]]
            if not rows:
                continue
            patches = extract_patches(to_device(tiles[rows], model))  # 27x expansion on the device
            logits[rows] = model(inputs=patches).logits.float().cpu()
        out = torch.split(logits, [p.tiles.shape[0] for p in payloads])
        return [FlowResult(chunk, payload) for chunk, payload in zip(out, payloads, strict=True)]

    def encode(self, result: FlowResult, request: FlowRequest) -> Reply:
        array = blend_tiles(result.logits, result.layout).numpy().astype(np.float32)
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
            "tiles": int(result.logits.shape[0]),
            "height": array.shape[0],
            "width": array.shape[1],
            "flow": np.round(array.astype(np.float64), 4).tolist(),  # float64: 4 decimals print as 4 decimals
        }
        return Reply(fields, headers=headers)

    def warmup_payloads(self, config: PerceiverConfig) -> list[FlowTiles]:
        h, w = config.train_size
        frame = torch.zeros(h, w, 3, dtype=torch.uint8)
        return [prepare_tiles(frame, frame, (h, w))]


TASK = OpticalFlow()
