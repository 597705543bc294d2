"""Decoders: queries cross-attend to the latents. Query providers live with their adapters/heads."""

from __future__ import annotations

from torch import Tensor, nn

from .aligned import AlignedLinear
from .attention import PerceiverLayer, resolve_channels
from .config import PerceiverConfig


class CrossAttentionDecoder(nn.Module):
    """queries [B, O, Cq] × latents [B, N, D] → [B, O, F] (F = out_dim, or Cq without projection)."""

    def __init__(
        self,
        config: PerceiverConfig,
        q_dim: int,
        out_dim: int | None,
        query_residual: bool,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        d = config.d_latents
        qk, v = resolve_channels(q_dim, d, qk_channels, v_channels, config.cross_attention_shape_for_attention)
        self.layer = PerceiverLayer(q_dim, d, qk, v, num_heads, 1, cross=True, query_residual=query_residual)
        self.final = AlignedLinear(q_dim, out_dim) if out_dim is not None else None

    def forward(self, queries: Tensor, latents: Tensor, projected_q: Tensor | None = None) -> Tensor:
        out = self.layer(queries, latents, projected_q=projected_q).to(self.layer.norm.weight.dtype)
        return self.final(out) if self.final is not None else out
