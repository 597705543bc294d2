"""/healthz, /readyz, /metrics and /v1/models."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from .tasks import ErrorResponse, runtime_of

router = APIRouter()
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when PERCEIVER_API_KEYS is set)"}
}


class Health(BaseModel):
    status: Literal["ok", "unresponsive"]
    error: str | None = None  # why not live: the model process has stopped running (front-end processes)


class Readiness(BaseModel):
    status: Literal["ready", "loading", "draining", "failed"]
    error: str | None = Field(None, description="Why loading failed (status failed only).")


class Batching(BaseModel):
    max_batch_size: int
    max_batch_size_source: Literal["auto", "auto-fallback", "configured"] = Field(
        description="auto-fallback: max_batch_size=auto could not decide from its timings and took a safe default"
    )
    per_item_ms: dict[str, float] = Field(
        description="max_batch_size=auto: forward time per item by batch size, as measured (on the CPU: one "
        "thread's CPU time, which a busy machine does not inflate)"
    )
    admission_per_item_ms: dict[str, float] = Field(
        default_factory=dict,
        description="What admission estimates now, per unit of work by batch size class: the median of recent "
        "batches, started from warm-up's timings",
    )
    admission_per_item_ms_by_bucket: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="The same for each shape bucket other than the one warm-up timed first (text: by padded "
        "length in bytes, as longer windows take longer), once warm-up or a batch has timed it",
    )
    admission_margin: float = Field(
        1.2,
        description="What admission multiplies its estimates by: how much longer than estimated the requests it "
        "admitted close to their deadlines took (a high quantile of recent ones), 1.2 at least",
    )
    max_delay_ms: float
    max_batch_cost: int | None
    queue_depth: int
    running: int = Field(0, description="Batches in their forward pass now")
    placement: Literal["inference-thread", "lanes"] = Field(
        description="Where batches run: the one inference thread, or CPU lanes (batches of CPU models side by side)"
    )
    prepare_ahead: bool = Field(
        False,
        description="Each batch is prepared (JPEGs decoded on the GPU) while the batch before it runs "
        "(PERCEIVER_PREPARE_AHEAD, CUDA only)",
    )


class ModelInfo(BaseModel):
    name: str = Field(examples=["classify/learned"])
    task: str
    variant: str
    architecture: str
    source: str = Field(description="A checkpoint directory, a Hub repo id, or demo")
    weights: Literal["pretrained", "random-init"]
    dtype: str
    device: str
    compile: Literal["off", "latent"] = Field(description="Whether the latent block runs compiled (compile setting)")
    parameters: int
    num_labels: int | None = Field(None, description="Classes the model predicts (absent where it means nothing)")
    batching: Batching
    load_s: float
    warmup_s: float


class ModelsResponse(BaseModel):
    demo: bool
    models: list[ModelInfo]


@router.get(
    "/healthz",
    response_model=Health,
    response_model_exclude_none=True,
    tags=["operations"],
    summary="Liveness: the process serves HTTP (and, with front-end processes, the model process runs)",
    responses={503: {"model": Health, "description": "The model process has stopped running: restart the pod"}},
)
async def healthz(request: Request) -> JSONResponse:
    why = runtime_of(request).unresponsive()
    if why is not None:
        return JSONResponse({"status": "unresponsive", "error": why}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    tags=["operations"],
    summary="Readiness: models loaded and warmed, not draining",
    responses={503: {"model": Readiness, "description": "Loading, draining, or loading failed"}},
)
async def readyz(request: Request) -> JSONResponse:
    runtime = runtime_of(request)
    if runtime.load_error is not None:
        return JSONResponse({"status": "failed", "error": runtime.load_error}, status_code=503)
    if runtime.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not runtime.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    if (why := runtime.unresponsive()) is not None:
        return JSONResponse({"status": "failed", "error": why}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
        **UNAUTHORIZED,
    },
)
async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    runtime.metrics.update_gpu_memory()
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    response_model_exclude_unset=True,  # no num_labels where it means nothing
    tags=["operations"],
    summary="Loaded models",
    responses=UNAUTHORIZED,
)
async def models(request: Request) -> dict[str, Any]:
    runtime = runtime_of(request)
    return {"demo": runtime.settings.demo, "models": [await e.describe_now() for e in runtime.engines()]}
