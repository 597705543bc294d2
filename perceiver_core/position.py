"""Position encodings: trainable tables and Fourier features, plus a cache for derived constants.

Fourier features follow transformers/DeepMind exactly: positions ``linspace(-1, 1, n)`` per index
dimension ("ij" meshgrid, float32), frequencies ``linspace(1, res/2, num_bands)`` per dimension of
``max_resolution``, features ``[pos, sin(π·pos·f) (dimension-major), cos(…)]``, computed in float32 and
only then cast.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from torch import Tensor, nn


class ConstantCache:
    """Memoises tensors that depend only on shapes and parameters, for inference.

    Entries are keyed on the caller's key plus each parameter's storage pointer and version counter,
    so loading new weights (or moving the module) invalidates them. Nothing is cached while autograd
    records, so training sees fresh tensors.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self._entries: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._max_entries = max_entries

    def get(self, key: Hashable, params: Iterable[Tensor], build: Callable[[], Tensor]) -> Tensor:
        if torch.is_grad_enabled():
            return build()
        full_key = (key, tuple((p.data_ptr(), p._version) for p in params))
        hit = self._entries.get(full_key)
        if hit is None:
            hit = build()
            self._entries[full_key] = hit
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(full_key)
        return hit


def linear_positions(index_dims: Sequence[int], device: torch.device | None = None) -> Tensor:
    """[prod(index_dims), len(index_dims)] float32 grid of ``linspace(-1, 1)`` coordinates."""
    ranges = [torch.linspace(-1.0, 1.0, steps=n, dtype=torch.float32, device=device) for n in index_dims]
    grid = torch.stack(torch.meshgrid(*ranges, indexing="ij"), dim=-1)
    return grid.reshape(-1, len(index_dims))


def subsampled_positions(indices: Tensor, index_dims: Sequence[int]) -> Tensor:
    """Coordinates of flat ``indices`` into ``index_dims`` as ``-1 + 2·i/N`` (N, not N−1: DeepMind's rule).

    Unravelled with Python-int strides: ``torch.unravel_index`` and a tensor of the dims would each copy a
    host list to the device on every decoder chunk (a synchronous copy, and one CUDA graphs cannot capture).
    """
    coords = []
    stride = math.prod(index_dims)
    for n in index_dims:
        stride //= n
        coords.append(-1 + 2 * (indices // stride % n) / n)
    return torch.stack(coords, dim=1)


def fourier_features(
    pos: Tensor, num_bands: int, max_resolution: Sequence[int], concat_pos: bool = True, sine_only: bool = False
) -> Tensor:
    """pos: [P, D] float32 → [P, D·(1 + 2K)] features (D + D·K without cos)."""
    freqs = torch.stack(
        [torch.linspace(1.0, res / 2, steps=num_bands, device=pos.device) for res in max_resolution]
    )  # [D, K]
    scaled = (pos[:, :, None] * freqs[None]).reshape(pos.shape[0], pos.shape[1] * num_bands)  # [P, D·K], dim-major
    if sine_only:
        feats = torch.sin(math.pi * scaled)
    else:
        feats = torch.cat([torch.sin(math.pi * scaled), torch.cos(math.pi * scaled)], dim=-1)
    return torch.cat([pos, feats], dim=-1) if concat_pos else feats


class FourierPositionEncoding(nn.Module):
    """Fixed Fourier features over a grid; cached per (grid, device, dtype)."""

    def __init__(
        self, num_bands: int, max_resolution: Sequence[int], concat_pos: bool = True, sine_only: bool = False
    ) -> None:
        super().__init__()
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution)
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        self._cache = ConstantCache()

    @property
    def num_channels(self) -> int:
        d = len(self.max_resolution)
        return d * self.num_bands * (1 if self.sine_only else 2) + (d if self.concat_pos else 0)

    def forward(self, index_dims: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """[prod(index_dims), C] encoding of the full grid."""
        dims = tuple(int(n) for n in index_dims)
        return self._cache.get((dims, device, dtype), (), lambda: self.at(linear_positions(dims, device), dtype))

    def at(self, pos: Tensor, dtype: torch.dtype) -> Tensor:
        """Encoding of explicit float32 coordinates pos: [P, D]."""
        if pos.shape[-1] != len(self.max_resolution):
            raise ValueError(f"positions have {pos.shape[-1]} dims, encoding expects {len(self.max_resolution)}")
        feats = fourier_features(pos, self.num_bands, self.max_resolution, self.concat_pos, self.sine_only)
        return feats.to(dtype)


class TrainablePositionEncoding(nn.Module):
    """A learned [P, C] table (decoder queries, or the learned image head's position embeddings)."""

    def __init__(self, num_positions: int, num_channels: int) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_positions, num_channels) * 0.02)

    @property
    def num_channels(self) -> int:
        return int(self.embeddings.shape[1])

    def forward(self, batch_size: int, index: Tensor | None = None) -> Tensor:
        """[B, P, C] (or [B, len(index), C]) expanded view of the table."""
        table = self.embeddings if index is None else self.embeddings[index]
        return table.expand(batch_size, -1, -1)
