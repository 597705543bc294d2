"""Attention math: the explicit wide-head path and the fused kernels agree."""

from __future__ import annotations

import torch

from perceiver_core import aligned
from perceiver_core.attention import _attend


def test_wide_single_heads_take_the_explicit_path_with_the_same_result() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 1, 40, 322)
    kv = torch.randn(2, 1, 300, 322)
    mask = torch.rand(2, 1, 1, 300) > 0.2
    fused = _attend(q, kv, kv, mask, 0.05)
    with aligned.force():  # padding to 328 and the explicit GEMM + softmax path, as on CUDA
        explicit = _attend(q, kv, kv, mask, 0.05)
    assert explicit.shape == fused.shape == (2, 1, 40, 322)
    assert torch.allclose(explicit, fused, atol=1e-5, rtol=1e-5)
