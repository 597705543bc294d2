"""CUDA-graph replay for fixed-shape forwards (image heads, optical flow).

A serving batch is padded up to the nearest captured batch size, copied into a static input buffer,
and the captured graph is replayed: one launch instead of hundreds, which matters most when the GPU
finishes kernels faster than Python can issue them. Shapes or calls the graphs do not cover (extra
keyword arguments, autograd, CPU tensors, batches above the largest size) run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .heads import PerceiverHead, PerceiverOutput

log = logging.getLogger("perceiver_core.graphs")


@dataclass
class _Graph:
    static_in: Tensor
    static_out: PerceiverOutput
    graph: Any  # torch.cuda.CUDAGraph


def _capture(eager: Callable[..., PerceiverOutput], example: Tensor) -> _Graph:
    static_in = example.clone()
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # fill caches and settle kernel choices outside the capture
            eager(inputs=static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = eager(inputs=static_in)
    return _Graph(static_in, static_out, graph)


def enable_cuda_graphs(model: PerceiverHead, batch_sizes: Sequence[int]) -> None:
    """Route ``model(inputs=x)`` through CUDA graphs captured lazily per (padded batch, shape, dtype)."""
    eager = model.forward
    sizes = sorted(set(batch_sizes))
    graphs: dict[tuple[Any, ...], _Graph | None] = {}  # None: capture failed, run eagerly

    def forward(inputs: Tensor | None = None, **kwargs: Any) -> PerceiverOutput:
        if kwargs or inputs is None or not inputs.is_cuda or torch.is_grad_enabled():
            return eager(inputs=inputs, **kwargs)
        b = inputs.shape[0]
        size = next((s for s in sizes if s >= b), None)
        if size is None:
            return eager(inputs=inputs)
        key = (size, tuple(inputs.shape[1:]), inputs.dtype)
        if key not in graphs:
            padded = torch.zeros((size, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
            try:
                graphs[key] = _capture(eager, padded)
            except Exception as exc:  # an op that cannot be captured: serve this shape eagerly
                log.warning("CUDA graph capture failed for %s (%s); running eagerly", key, exc)
                graphs[key] = None
        entry = graphs[key]
        if entry is None:
            return eager(inputs=inputs)
        entry.static_in[:b].copy_(inputs)
        if size > b:
            entry.static_in[b:].zero_()
        entry.graph.replay()
        static_out = entry.static_out
        logits = static_out.logits
        if not isinstance(logits, Tensor):
            raise TypeError("CUDA graphs support heads with tensor logits only")
        # Clone: the next replay overwrites the static buffers.
        return PerceiverOutput(logits[:b].clone(), static_out.last_hidden_state[:b].clone())

    model.forward = forward
