"""POST /v1/optical-flow: dense flow between two frames of any (equal) size, tiled into 368×496 windows."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing.flow import FlowTiles, blend_tiles, extract_patches, grid_indices, prepare_tiles

from ..errors import InvalidInput, PayloadTooLarge
from ..media import decode_rgb_array
from ..runtime import Runtime, ServedModel
from .base import DEMO_LATENTS, Task, WarmupItem, select_model, submit, to_device

FLO_MAGIC = 202021.25  # Middlebury .flo header
WINDOWS_PER_PASS = 8  # bounds activation memory when one request alone brings many windows


class FlowResponse(BaseModel):
    model: str
    weights: str
    height: int
    width: int
    tiles: int = Field(description="368x496 windows the pair was cut into")
    flow: list[list[list[float]]] = Field(description="[H][W][2] displacement (dx, dy) in pixels")


def decode(data1: bytes, data2: bytes, window: tuple[int, int], max_pixels: int, max_tiles: int) -> FlowTiles:
    frame1 = decode_rgb_array(data1, max_pixels)
    frame2 = decode_rgb_array(data2, max_pixels)
    if frame1.shape != frame2.shape:
        raise InvalidInput(
            f"frames differ in size: {frame1.shape[1]}x{frame1.shape[0]} vs {frame2.shape[1]}x{frame2.shape[0]}"
        )
    h, w = frame1.shape[:2]
    tiles = len(grid_indices(max(h, window[0]), max(w, window[1]), window))
    if tiles > max_tiles:
        raise PayloadTooLarge(f"a {w}x{h} pair needs {tiles} windows; the limit is {max_tiles}")
    return prepare_tiles(torch.from_numpy(frame1), torch.from_numpy(frame2), window)


def predict(model: PerceiverHead, payloads: Sequence[Any]) -> list[torch.Tensor]:
    """All windows of all requests in forward passes of at most max_batch_size windows."""
    tiles = torch.cat([p.tiles for p in payloads])
    logits = []
    for i in range(0, tiles.shape[0], WINDOWS_PER_PASS):
        patches = extract_patches(to_device(tiles[i : i + WINDOWS_PER_PASS], model))  # 27x expansion on the device
        logits.append(model(inputs=patches).logits.float().cpu())
    out = torch.cat(logits)
    sizes = [p.tiles.shape[0] for p in payloads]
    return list(torch.split(out, sizes))


def warmup_items(served: ServedModel) -> list[WarmupItem]:
    h, w = served.model.config.train_size
    frame = torch.zeros(h, w, 3, dtype=torch.uint8)
    return [WarmupItem(prepare_tiles(frame, frame, (h, w)), (h, w))]


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


def encode(flow: torch.Tensor, fmt: str, meta: dict[str, Any]) -> Response:
    array = flow.numpy().astype(np.float32)
    headers = {"x-flow-shape": json.dumps(list(array.shape)), "x-model": meta["model"], "x-weights": meta["weights"]}
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, array)
        return Response(buffer.getvalue(), media_type="application/x-npy", headers=headers)
    if fmt == "flo":
        h, w = array.shape[:2]
        flo = np.float32(FLO_MAGIC).tobytes() + np.int32(w).tobytes() + np.int32(h).tobytes() + array.tobytes()
        return Response(flo, media_type="application/octet-stream", headers=headers)
    if fmt == "png":
        buffer = io.BytesIO()
        Image.fromarray(flow_to_color(array)).save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)
    body = {**meta, "height": array.shape[0], "width": array.shape[1], "flow": np.round(array, 4).tolist()}
    return JSONResponse(body, headers=headers)


def register(router: APIRouter, runtime_of: Callable[[Request], Runtime]) -> None:
    @router.post(
        "/v1/optical-flow",
        response_model=FlowResponse,
        tags=["vision"],
        summary="Optical flow between two frames",
        responses={200: {"content": {"application/x-npy": {}, "application/octet-stream": {}, "image/png": {}}}},
    )
    async def optical_flow(
        request: Request,
        frame1: Annotated[UploadFile, File(description="First frame (any size)")],
        frame2: Annotated[UploadFile, File(description="Second frame, same size as the first")],
        format: Annotated[Literal["json", "npy", "flo", "png"], Form(description="Response encoding")] = "json",
    ) -> Any:
        runtime = runtime_of(request)
        served = select_model(request, runtime, "optical-flow")
        window = tuple(served.model.config.train_size)
        settings = runtime.settings
        layout = await runtime.decode(
            decode, await frame1.read(), await frame2.read(), window, settings.max_image_pixels, settings.max_flow_tiles
        )
        n = layout.tiles.shape[0]
        logits = await submit(request, runtime, served, layout, cost=n, bucket=window)
        flow = await runtime.offload(blend_tiles, logits, layout)
        meta = {"model": served.name, "weights": served.weights, "tiles": n}
        return await runtime.offload(encode, flow, format, meta)


TASK = Task(
    name="optical-flow",
    path="/v1/optical-flow",
    architectures=("PerceiverForOpticalFlow",),
    demo_configs={
        "default": PerceiverConfig(
            architecture="PerceiverForOpticalFlow",
            **DEMO_LATENTS,
            train_size=(368, 496),
        )
    },
    predict=predict,
    warmup_items=warmup_items,
    register=register,
    default_batch_cost=lambda size: size,  # windows per batch
    max_batch_size_cap=WINDOWS_PER_PASS,
)
