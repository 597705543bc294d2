from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from .tasks import runtime_of

router = APIRouter()


class ModelsResponse(BaseModel):
    demo: bool
    models: list[dict[str, Any]]


@router.get("/healthz", tags=["operations"], summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], summary="Readiness: models loaded and warmed, not draining")
async def readyz(request: Request) -> JSONResponse:
    runtime = runtime_of(request)
    if runtime.load_error is not None:
        return JSONResponse({"status": "failed", "error": runtime.load_error}, status_code=503)
    if runtime.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not runtime.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready"})


# HEAD for the probes too (load balancers and uptime checkers send it); same answer, no body.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Text format"}},
)
async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    runtime.metrics.update_gpu_memory()
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelsResponse, tags=["operations"], summary="Loaded models")
async def models(request: Request) -> dict[str, Any]:
    runtime = runtime_of(request)
    return {"demo": runtime.settings.demo, "models": [m.describe() for m in runtime.all_models()]}
