"""Latent array, cross-attend to the inputs, then a latent transformer whose block shares weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attention import PerceiverLayer, resolve_channels
from .config import PerceiverConfig


class PerceiverEncoder(nn.Module):
    """inputs [B, M, C] (+ bool mask [B, M]) → latents [B, N, D]."""

    def __init__(self, config: PerceiverConfig, kv_dim: int) -> None:
        super().__init__()
        d = config.d_latents
        self.latents = nn.Parameter(torch.randn(config.num_latents, d) * 0.02)
        qk, v = resolve_channels(
            d, kv_dim, config.qk_channels, config.v_channels, config.cross_attention_shape_for_attention
        )
        self.cross = PerceiverLayer(
            d,
            kv_dim,
            qk,
            v,
            config.num_cross_attention_heads,
            config.cross_attention_widening_factor,
            cross=True,
            query_residual=config.use_query_residual,
        )
        sqk, sv = resolve_channels(d, d, config.qk_channels, config.v_channels, "q")
        self.layers = nn.ModuleList(
            PerceiverLayer(
                d, d, sqk, sv, config.num_self_attention_heads, config.self_attention_widening_factor, cross=False
            )
            for _ in range(config.num_self_attends_per_block)
        )
        self.num_blocks = config.num_blocks
        # ``layer(z)`` compiled once for every latent layer (compiled.py); None runs them eagerly.
        self.layer_call: Callable[[nn.Module, Tensor], Tensor] | None = None

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        # The mask only applies to this cross-attention; the reference leaves self-attention unmasked.
        z = self.cross(self.latents.expand(inputs.shape[0], -1, -1), inputs, mask)
        call = self.layer_call
        for _ in range(self.num_blocks):  # the same layers, applied num_blocks times
            for layer in self.layers:
                if call is None:
                    z = layer(z)
                else:
                    torch._dynamo.maybe_mark_dynamic(z, 0)  # one graph for every batch size above 1
                    z = call(layer, z)
        return z.to(self.latents.dtype)  # from a wide residual stream (PerceiverLayer.residual_dtype), if any
