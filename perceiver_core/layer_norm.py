"""LayerNorm over rows of any width, in the Triton language.

Several published inputs and queries are not a multiple of 8 channels wide: image 261 (Fourier pixels), flow
322 (patches with their positions), multimodal 1,026 (the decoder's queries). At those widths PyTorch's CUDA
LayerNorm takes its slow row-moments kernel: on an H200 it was 20% of the multimodal forward (100k × 1,026 per
decoder chunk), 11% of optical flow's (182,528 × 322) and 13% of image-learned's (run 3's profile,
docs/performance-history.md), where reading and writing those rows once takes a few percent.

One program normalises ``ROWS`` rows. It loads each row whole (the width rounded up to a power of two, the
columns past it masked out of the statistics), takes the mean of the row shifted by its first value and then the
variance of the centred row in fp32 (two passes over registers, where a one-pass sum of squares would cancel),
and writes ``(x - mean) · rstd · weight + bias`` in the input's dtype: PyTorch's numbers up to fp32 rounding.

On CUDA the kernel runs by default (``attention.LayerNorm``, for widths that are not a multiple of 8;
``PERCEIVER_LAYER_NORM=torch`` keeps PyTorch's): on an H200, benchmarks/layer_norm.py measured each head with an
odd width 1.02-1.22x faster with it (docs/performance.md). On a CPU, ``TRITON_INTERPRET=1`` runs the same
kernel in Triton's interpreter: tests/perceiver_core/test_layer_norm.py checks it there against PyTorch on every
published odd width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .wide_attention import _round_to_bf16, interpreting

# Rows wider than this are left to PyTorch: a row is held whole in registers (fp32), and 8,192 columns fill a
# program of 16 warps at 16 values a thread. The published widths are at most 1,026.
MAX_WIDTH = 8192
# Elements one program normalises: narrow rows are packed several to a program, so that a 261-wide row (512
# lanes, half of them masked) does not get a program to itself.
_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _layer_norm_kernel(
    X,
    W,
    B,
    Y,
    stride_x,
    stride_y,
    rows,
    width,
    eps,
    BLOCK_W: tl.constexpr,
    ROWS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    col = tl.arange(0, BLOCK_W)  # [BLOCK_W]
    inside = (row[:, None] < rows) & (col[None, :] < width)
    x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=inside, other=0.0).to(tl.float32)
    # Shifted by the row's first value (exact for values within a factor of 2 of it), the sum stays small: a row
    # at 10,000 ± 1 keeps its mean's digits, which a plain fp32 sum of 10,000s rounds away.
    shift = tl.load(X + row * stride_x, mask=row < rows, other=0.0).to(tl.float32)
    x = tl.where(inside, x - shift[:, None], 0.0)
    mean = tl.sum(x, axis=1) / width  # [ROWS], of the shifted row
    centred = tl.where(inside, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / width + eps)
    w = tl.load(W + col, mask=col < width, other=0.0).to(tl.float32)
    b = tl.load(B + col, mask=col < width, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    if EMULATE_BF16:  # the interpreter truncates to bf16 where a GPU rounds to nearest
        y = _round_to_bf16(y)
    tl.store(Y + row[:, None] * stride_y + col[None, :], y.to(Y.dtype.element_ty), mask=inside)


def supported(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the kernel takes this call: a float input whose last dimension is at most MAX_WIDTH and has
    unit stride, with an elementwise weight and bias (nn.LayerNorm's default)."""
    if weight is None or bias is None or x.dim() == 0 or x.numel() == 0:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.stride(-1) != 1:
        return False
    if not (weight.is_contiguous() and bias.is_contiguous()):
        return False
    return 0 < x.shape[-1] <= MAX_WIDTH and weight.shape == bias.shape == (x.shape[-1],)


def launch_shape(width: int, rows: int) -> tuple[int, int, int]:
    """The row's block (its width rounded up to a power of two), the rows per program and the warps per program
    for ``rows`` rows of ``width``: about _ELEMENTS_PER_PROGRAM elements a program, 16 of them a thread."""
    block_w = triton.next_power_of_2(width)
    per_program = max(1, min(_ELEMENTS_PER_PROGRAM // block_w, triton.next_power_of_2(rows)))
    return block_w, per_program, min(16, max(1, per_program * block_w // 512))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last dimension C of ``x`` [..., C], in x's dtype."""
    if not supported(x, weight, bias):
        raise ValueError(
            f"layer_norm takes a float input of at most {MAX_WIDTH} unit-stride channels with a weight and a bias "
            f"of that width; got {x.dtype} {tuple(x.shape)} (strides {x.stride()}), weight "
            f"{None if weight is None else tuple(weight.shape)}"
        )
    width = x.shape[-1]
    rows_2d = x.reshape(-1, width)  # a view where the leading dimensions allow, a copy where they do not
    if rows_2d.stride(-1) != 1:
        rows_2d = rows_2d.contiguous()
    out = torch.empty(rows_2d.shape, dtype=x.dtype, device=x.device)
    rows = rows_2d.shape[0]
    block_w, per_program, warps = launch_shape(width, rows)
    launch = {} if interpreting() else dict(num_warps=warps)
    _layer_norm_kernel[(triton.cdiv(rows, per_program),)](
        rows_2d,
        weight,
        bias,
        out,
        rows_2d.stride(0),
        out.stride(0),
        rows,
        width,
        float(eps),
        BLOCK_W=block_w,
        ROWS=per_program,
        EMULATE_BF16=interpreting() and x.dtype == torch.bfloat16,
        **launch,
    )
    return out.view(x.shape)
