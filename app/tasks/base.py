"""What every task shares: the Task record, and the request path through the batcher.

A task's lifecycle is decode (upload → tensors, in the decode pool) → predict (a batched forward on the
inference thread) → encode (tensors → response). ``submit`` is the one place that applies draining,
deadlines, backpressure, cancellation on disconnect and error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter, Request

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing import tokenizer

from ..batching import BatchError, Cancelled, Expired, QueueFull
from ..errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    Draining,
    InferenceFailed,
    InvalidInput,
    NotReady,
    Overloaded,
)
from ..runtime import Runtime, ServedModel

TEXT_BUCKETS = (64, 128, 256, 512, 1024, 2048)

# Demo-profile latent stacks: small enough that every task warms up in seconds on a laptop CPU.
DEMO_LATENTS: dict[str, Any] = dict(
    num_latents=64,
    d_latents=128,
    num_blocks=1,
    num_self_attends_per_block=2,
    num_self_attention_heads=4,
    num_cross_attention_heads=1,
)
DEMO_TEXT: dict[str, Any] = dict(
    num_latents=32,
    d_latents=128,
    d_model=64,
    num_blocks=1,
    num_self_attends_per_block=4,
    num_self_attention_heads=4,
    num_cross_attention_heads=4,
)


@dataclass(frozen=True)
class WarmupItem:
    payload: Any
    bucket: Hashable


@dataclass(frozen=True)
class Task:
    name: str
    path: str
    architectures: tuple[str, ...]
    demo_configs: dict[str, PerceiverConfig]  # variant → small config for the demo profile
    predict: Callable[[PerceiverHead, Sequence[Any]], list[Any]]  # batched forward, inference thread
    warmup_items: Callable[[ServedModel], list[WarmupItem]]  # one per shape bucket
    register: Callable[[APIRouter, Callable[[Request], Runtime]], None]  # adds the route(s)
    default_batch_cost: Callable[[int], int | None] = field(default=lambda size: None)
    max_batch_size_cap: int | None = None  # for tasks whose single request is already a large forward pass


def encode_text(text: str, max_bytes: int) -> list[int]:
    """Byte ids with [CLS]/[SEP]; over-long text is refused (422), not silently truncated."""
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidInput(f"text is {size} UTF-8 bytes; the limit is {max_bytes}")
    return tokenizer.encode(text, truncate=False, max_length=max_bytes + 2)


def text_warmup_items(served: ServedModel, make: Callable[[list[int]], Any]) -> list[WarmupItem]:
    """One payload per length bucket the model supports, with ids that really fill that bucket."""
    limit = served.model.config.max_position_embeddings
    items = []
    for bucket in (b for b in TEXT_BUCKETS if b <= limit):
        ids = [tokenizer.CLS, *[tokenizer.BYTE_OFFSET] * (bucket - 3), tokenizer.MASK, tokenizer.SEP]
        items.append(WarmupItem(make(ids), bucket))
    return items


def text_bucket(length: int) -> int:
    """Smallest padded length that holds ``length`` ids."""
    return next(b for b in TEXT_BUCKETS if b >= length)


def to_device(batch: torch.Tensor, model: PerceiverHead) -> torch.Tensor:
    """Host → device; pinned and asynchronous on CUDA so the copy overlaps the previous kernels."""
    if model.device.type == "cuda":
        batch = batch.pin_memory().to(model.device, non_blocking=True)
    else:
        batch = batch.to(model.device)
    return batch.to(model.dtype) if batch.is_floating_point() else batch


def request_deadline(request: Request, runtime: Runtime) -> float:
    """Monotonic deadline: the server's timeout, shortened (never lengthened) by x-request-timeout-ms."""
    timeout = runtime.settings.request_timeout_s
    header = request.headers.get("x-request-timeout-ms")
    if header is not None:
        with contextlib.suppress(ValueError):
            timeout = min(timeout, max(0.0, float(header) / 1000))
    return time.monotonic() + timeout


def select_model(request: Request, runtime: Runtime, task: str, variant: str | None = None) -> ServedModel:
    """The model serving ``task`` (404 if none); remembered on the request for metrics and logs."""
    served = runtime.model_for(task, variant)
    request.state.model = served.name
    return served


async def submit(
    request: Request, runtime: Runtime, served: ServedModel, payload: Any, *, cost: int, bucket: Hashable
) -> Any:
    """Queue ``payload`` on the model's batcher and wait for its result, with every guard applied."""
    labels = {"task": served.task, "model": served.name}
    if runtime.draining:
        runtime.metrics.rejections.labels(**labels, reason="draining").inc()
        raise Draining("the server is shutting down; retry on another replica")
    if not runtime.ready or served.batcher is None:
        raise NotReady("models are still loading")
    deadline = getattr(request.state, "deadline", None) or request_deadline(request, runtime)
    try:
        ticket = served.batcher.submit(payload, cost=cost, bucket=bucket, deadline=deadline)
    except QueueFull as exc:
        runtime.metrics.rejections.labels(**labels, reason="queue_full").inc()
        retry = f"{served.batcher.estimated_wait_s():.0f}"
        raise Overloaded(f"{served.name} is overloaded: {exc}", headers={"Retry-After": retry}) from exc
    ticket.future.add_done_callback(_retrieve)  # the handler may have left (deadline, disconnect)
    watcher = asyncio.create_task(_watch_disconnect(request, ticket.cancel))
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            result = await asyncio.shield(ticket.future)
    except TimeoutError as exc:
        ticket.cancel()
        runtime.metrics.rejections.labels(**labels, reason="deadline").inc()
        raise DeadlineExceeded("the request did not finish before its deadline") from exc
    except Expired as exc:
        runtime.metrics.rejections.labels(**labels, reason="deadline").inc()
        raise DeadlineExceeded(str(exc)) from exc
    except Cancelled as exc:
        raise ClientClosedRequest(f"request dropped before inference: {exc}") from exc
    except BatchError as exc:
        raise InferenceFailed(f"inference failed for this batch ({type(exc.__cause__).__name__})") from exc
    finally:
        watcher.cancel()
    runtime.metrics.queue_duration.labels(**labels).observe(ticket.queue_s)
    runtime.metrics.inference_duration.labels(**labels).observe(ticket.inference_s)
    request.state.timing = (ticket.queue_s, ticket.inference_s, ticket.batch_size)
    return result


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _watch_disconnect(request: Request, cancel: Callable[[], None]) -> None:
    """Cancel the ticket as soon as the client goes away (Starlette does not cancel plain handlers)."""
    while True:
        if await request.is_disconnected():
            cancel()
            return
        await asyncio.sleep(0.2)  # queued work is dropped within 0.2 s of the client leaving


def top_k(probs: torch.Tensor, k: int, config: PerceiverConfig) -> list[dict[str, Any]]:
    """[K] probabilities → the k best as {"label", "index", "score"}."""
    scores, indices = probs.float().topk(min(k, probs.shape[-1]))
    return [
        {"label": config.label(int(i)), "index": int(i), "score": round(float(s), 6)}
        for s, i in zip(scores, indices, strict=True)
    ]


def pad_ids(rows: Sequence[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[PAD]-pad id lists to ``length``: ids [B, length] and the 1/0 attention mask."""
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask
