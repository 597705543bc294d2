"""Fused attention for heads wider than the flash kernels take, in the Triton language.

Perceiver's single-head cross-attentions are 261 to 1,032 channels wide (image 261/264/322/328/512 and the
1,024-wide classification query, flow 322/328, multimodal 704/1,026/1,032). PyTorch's flash kernels stop at
256, so on CUDA those calls go to ``attention._explicit``: two GEMMs around an fp32 softmax, which writes the
whole score matrix out and reads it back (0.75 GB per flow pair per attention).

This kernel never writes a score matrix. One program owns ``BLOCK_N`` queries and ``BLOCK_DV`` of the value
channels. It walks the keys in ``BLOCK_M`` tiles; for each tile it builds the scores by summing ``q·kᵀ`` over
the head dimension in ``BLOCK_D`` slices (so a 1,032-wide head needs no 1,032-wide registers), then folds the
tile into an online softmax (running row maximum and sum, FlashAttention's recurrence) and into its slice of
``p·v``. Scores, the softmax and both accumulations are fp32 whatever the inputs' dtype, as in ``_explicit``;
the probabilities are rounded to v's dtype before they meet v, as there. The price of the split is that
each of the ``DV / BLOCK_DV`` programs of a query block recomputes that block's scores.

Masks are what ``attention`` passes: ``None``, or one row per batch element over the keys (``[B, 1, 1, M]``),
boolean (False drops the key) or additive (fp32 scores plus the mask). A row whose keys are all dropped comes
out NaN, as softmax gives.

On CUDA the kernel runs, in bf16 and fp16, where ``PERCEIVER_WIDE_ATTENTION=fused`` asks for it
(``attention._attend``, before it would cut the queries into chunks); the default stays the two GEMMs until
benchmarks/wide_attention.py has measured both on a card (docs/performance.md). On a CPU,
``TRITON_INTERPRET=1`` runs the same kernel in Triton's interpreter: tests/perceiver_core/test_wide_attention.py
checks it there against ``_explicit`` on the shapes of every published config.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "yes", "on"}


@triton.jit
def _round_to_bf16(x):
    """fp32 → the nearest bf16 value (ties to even), kept in fp32. Triton's interpreter converts to bf16 by
    truncation, where a GPU rounds to nearest: this gives the interpreter the GPU's rounding."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _wide_attention_kernel(
    Q,
    K,
    V,
    MASK,
    OUT,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_km,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vm,
    stride_vd,
    stride_mb,
    stride_mm,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    N,
    M,
    D,
    DV,
    scale,
    size_bucket,  # the autotuner's key with D and DV (next power of two of B·H·N·M); the kernel never reads it
    MASK_KIND: tl.constexpr,  # 0 none, 1 boolean (nonzero keeps the key), 2 additive
    # The interpreter's tl.dot misreads bf16 and its casts to bf16 truncate: multiply bf16 values in fp32 (their
    # products are exact there) and round to nearest by hand.
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_dv = tl.program_id(2)
    # Batch and head offsets in 64 bits: at image batch 84 and more, b * stride_qb alone passes 2^31.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_ok = offs_n < N
    dv_ok = offs_dv < DV

    row_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        key_ok = offs_m < M
        # Scores of this key tile, summed over the head dimension one BLOCK_D slice at a time.
        scores = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for start_d in range(0, D, BLOCK_D):
            offs_d = start_d + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            q = tl.load(
                q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            k_t = tl.load(
                k_base + offs_m[None, :] * stride_km + offs_d[:, None] * stride_kd,
                mask=key_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            if EMULATE_BF16:
                q = q.to(tl.float32)
                k_t = k_t.to(tl.float32)
            scores += tl.dot(q, k_t, input_precision="ieee")
        scores = scores * scale
        if MASK_KIND == 1:
            keep = tl.load(MASK + b * stride_mb + offs_m * stride_mm, mask=key_ok, other=0)
            scores = tl.where(keep[None, :] != 0, scores, float("-inf"))
        if MASK_KIND == 2:
            bias = tl.load(MASK + b * stride_mb + offs_m * stride_mm, mask=key_ok, other=0.0)
            scores = scores + bias.to(tl.float32)[None, :]
        scores = tl.where(key_ok[None, :], scores, float("-inf"))

        # Online softmax: rescale what was summed so far to the new row maximum. A row that has seen only
        # dropped keys keeps a maximum of -inf; subtracting 0 instead keeps its terms at exp(-inf) = 0.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max - shift)
        p = tl.exp(scores - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None]

        v = tl.load(
            v_base + offs_m[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
            mask=key_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        # The probabilities meet v in v's dtype, as in _explicit.
        if EMULATE_BF16:
            acc += tl.dot(_round_to_bf16(p), v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    # A row whose keys were all dropped has a sum of 0: NaN, as softmax gives, without dividing 0 by 0.
    seen = row_sum > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, row_sum, 1.0)[:, None], float("nan"))
    if EMULATE_BF16:
        out = _round_to_bf16(out)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


# Tile sizes. The interpreter runs each program in numpy, where a call costs far more than its arithmetic, so it
# takes large tiles (the tests' shapes still span several of each); on a GPU
# the autotuner picks among the configurations below for each (D, DV) width, measured on the first call.
_INTERPRETER_BLOCKS = dict(BLOCK_N=32, BLOCK_M=64, BLOCK_D=128, BLOCK_DV=128)
# Each compiles for sm_90 without spilling registers (benchmarks/wide_attention.py --compile-check 90, which CI runs).
_CUDA_CONFIGS = [
    triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv), num_warps=warps, num_stages=stages)
    for bn, bm, bd, bdv, warps, stages in [
        (32, 64, 64, 512, 8, 2),  # every value channel in one program up to 512: no score is computed twice
        (64, 64, 64, 256, 8, 2),
        (64, 64, 64, 128, 8, 2),
        (128, 32, 64, 128, 8, 2),
    ]
]
# Tuned per width and per size class: warm-up's batch of 1 and a batch of 64 may want different tiles.
_tuned = (
    None
    if _INTERPRET
    else triton.autotune(configs=_CUDA_CONFIGS, key=["D", "DV", "size_bucket"])(_wide_attention_kernel)
)


def supported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether the kernel takes these operands: [B, H, N, E] 4-D tensors of one float dtype, with k and v
    over the same keys, and a mask (if any) of one row per batch element ([B, 1, 1, M] or [1, 1, 1, M])."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1] or k.shape[-2] == 0:
        return False  # no keys: softmax over nothing, left to the two GEMMs
    if any(x.shape[-2] * x.shape[-1] >= 2**31 for x in (q, k, v)):
        return False  # one batch element's offsets are 32-bit in the kernel
    for other in (k, v):  # keys and values may be shared across the batch or the heads (size 1 there)
        if any(size not in (1, want) for size, want in zip(other.shape[:2], q.shape[:2], strict=True)):
            return False
    if mask is None:
        return True
    return (
        mask.dim() == 4
        and mask.shape[1] == mask.shape[2] == 1
        and mask.shape[0] in (1, q.shape[0])
        and mask.shape[-1] == k.shape[-2]
    )


def wide_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, config: triton.Config | None = None
) -> Tensor:
    """softmax(q·kᵀ·scale + mask)·v for q [B, H, N, D], k [B|1, H|1, M, D], v [B|1, H|1, M, DV] → [B, H, N, DV]
    in v's dtype, without a score matrix. ``mask`` as in ``supported``. ``config`` runs one tiling of
    ``_CUDA_CONFIGS`` instead of the autotuner's pick (or the interpreter's tiles): tests check each of them."""
    if not supported(q, k, v, mask):
        raise ValueError(
            f"wide_attention takes 4-D q/k/v of one dtype with one mask row per batch element; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"mask {None if mask is None else tuple(mask.shape)}"
        )
    b, h, n, d = q.shape
    m, dv = k.shape[-2], v.shape[-1]
    k = k.expand(b, h, m, d)  # broadcast batch/head dimensions become stride 0: nothing is copied
    v = v.expand(b, h, m, dv)
    out = torch.empty(b, h, n, dv, dtype=v.dtype, device=q.device)
    if n == 0 or b * h == 0 or dv == 0:
        return out
    if mask is None:
        mask_kind, mask_arg, mask_strides = 0, q, (0, 0)  # MASK is never read
    else:
        rows = mask.reshape(mask.shape[0], m)
        if rows.dtype == torch.bool:
            mask_kind, mask_arg = 1, rows.to(torch.uint8)
        else:
            mask_kind, mask_arg = 2, rows.float()
        mask_strides = (mask_arg.stride(0) if mask_arg.shape[0] > 1 else 0, mask_arg.stride(1))
    args = (
        q,
        k,
        v,
        mask_arg,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *mask_strides,
        *out.stride(),
        h,
        n,
        m,
        d,
        dv,
        float(scale),
        triton.next_power_of_2(b * h * n * m),
    )
    if _tuned is None or config is not None:
        blocks = _INTERPRETER_BLOCKS if config is None else config.kwargs
        launch = {} if config is None or _INTERPRET else dict(num_warps=config.num_warps, num_stages=config.num_stages)

        def grid(_meta: dict[str, int]) -> tuple[int, int, int]:
            return triton.cdiv(n, blocks["BLOCK_N"]), b * h, triton.cdiv(dv, blocks["BLOCK_DV"])

        emulate = _INTERPRET and q.dtype == torch.bfloat16
        _wide_attention_kernel[grid](*args, MASK_KIND=mask_kind, EMULATE_BF16=emulate, **blocks, **launch)
    else:

        def tuned_grid(meta: dict[str, int]) -> tuple[int, int, int]:
            return triton.cdiv(n, meta["BLOCK_N"]), b * h, triton.cdiv(dv, meta["BLOCK_DV"])

        _tuned[tuned_grid](*args, MASK_KIND=mask_kind, EMULATE_BF16=False)
    return out
