"""Zero-padding feature widths to multiples of 8 for CUDA matrix products.

bf16/fp16 tensor-core GEMMs need 16-byte-aligned leading dimensions; several published models use
widths that are not (261, 322, 1026, 54 channels), and cuBLAS then falls back to much slower kernels.
Padding the reduction dimension with zero columns, or the output dimension with zero rows, leaves every
real output exactly as it was: the pads only ever multiply or add zeros. CPUs gain nothing, so padding
runs on CUDA tensors only (``force`` turns it on everywhere, for tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from .position import ConstantCache

MULTIPLE = 8
_force = False


@contextlib.contextmanager
def force() -> Iterator[None]:
    """Pad on every device (tests compare the padded path with the plain one on CPU)."""
    global _force
    previous, _force = _force, True
    try:
        yield
    finally:
        _force = previous


def forced() -> bool:
    return _force


def wanted(x: Tensor, *widths: int) -> bool:
    return (x.is_cuda or _force) and any(w % MULTIPLE for w in widths)


def padded_width(width: int) -> int:
    return -(-width // MULTIPLE) * MULTIPLE


def pad_last(x: Tensor) -> Tensor:
    """Zero-pad the last dimension up to a multiple of 8 (no copy when it already is one)."""
    extra = padded_width(x.shape[-1]) - x.shape[-1]
    return F.pad(x, (0, extra)) if extra else x


def pad_rows(weight: Tensor) -> Tensor:
    """Zero-pad the first dimension of a 2-D weight up to a multiple of 8."""
    return F.pad(weight, (0, 0, 0, padded_width(weight.shape[0]) - weight.shape[0]))


class AlignedLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose CUDA products run on padded widths."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self._padded = ConstantCache(max_entries=2)

    def forward(self, x: Tensor) -> Tensor:
        if not wanted(x, self.in_features, self.out_features):
            return F.linear(x, self.weight, self.bias)
        return self.forward_padded(pad_last(x))[..., : self.out_features]

    def forward_padded(self, x: Tensor) -> Tensor:
        """x already padded to the padded input width → output at the padded width (pad columns are 0)."""
        weight, bias = self.padded_parameters(x.dtype)
        return F.linear(x, weight, bias)

    def padded_parameters(self, dtype: object) -> tuple[Tensor, Tensor | None]:
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        weight = self._padded.get(("w", dtype), params, lambda: self._pad_weight())
        bias = None if self.bias is None else self._padded.get(("b", dtype), params, lambda: self._pad_bias())
        return weight, bias

    def _pad_weight(self) -> Tensor:
        rows = padded_width(self.out_features) - self.out_features
        cols = padded_width(self.in_features) - self.in_features
        return F.pad(self.weight, (0, cols, 0, rows))

    def _pad_bias(self) -> Tensor:
        if self.bias is None:
            raise ValueError("this layer has no bias")
        return F.pad(self.bias, (0, padded_width(self.out_features) - self.out_features))
