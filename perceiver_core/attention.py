"""Attention and MLP blocks: the only place attention math lives.

Numerics follow transformers' ``PerceiverLayer``: pre-LayerNorm (eps 1e-5) on queries and, for
cross-attention, on the key/value inputs; ``scores = q·kᵀ / sqrt(qk_channels / heads)``; exact-erf GELU;
query residual around attention (optional for cross-attention), MLP residual always.

Single-head cross-attention can be *reassociated* so that one of the two large projections is never
materialised. Both forms are exact up to rounding:

* ``fold_kv`` (many inputs M, few queries N — every encoder):
  ``softmax(q Kᵀ) V = softmax((q W_k) X̂ᵀ) X̂ W_vᵀ + b_v``, where X̂ = LN(X). The ``q·b_k`` term is
  constant along each softmax row and drops out; rows of P sum to one so ``b_v`` passes through.
* ``fold_q`` (many queries, few latents — the optical-flow decoder):
  ``softmax(Q̂ W_qᵀ Kᵀ + b_q Kᵀ) V W_oᵀ = softmax(Q̂ (K W_q)ᵀ + K b_q) (V W_oᵀ)``.

The cheaper form is picked per call from the actual shapes (see ``_plan``).
"""

from __future__ import annotations

import functools
import logging
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import aligned
from .aligned import AlignedLinear
from .kernel_switch import KernelSwitch

log = logging.getLogger("perceiver_core.attention")

# Score matrices above this many elements are computed in query chunks to bound peak memory.
_MAX_SCORE_ELEMENTS = 1 << 28
# Widest head the fused CUDA attention kernels take: FlashAttention (PyTorch's flash SDPA backend)
# supports head dims up to 256. Wider heads go to _explicit; narrower q/k are padded up to v's width
# when v fits under this limit, since the fused kernels need equal q/k and v head widths.
_FUSED_MAX_HEAD_DIM = 256


def resolve_channels(
    q_dim: int, kv_dim: int, qk_channels: int | None, v_channels: int | None, shape_for_attention: str
) -> tuple[int, int]:
    """transformers' channel rule: qk defaults to the kv (or q) width, v defaults to qk."""
    qk = qk_channels if qk_channels is not None else (kv_dim if shape_for_attention == "kv" else q_dim)
    return qk, v_channels if v_channels is not None else qk


class Attention(nn.Module):
    """Pre-LayerNorm multi-head attention followed by its output projection (no residual)."""

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        qk_channels: int,
        v_channels: int,
        num_heads: int,
        out_dim: int,
        cross: bool,
    ) -> None:
        super().__init__()
        if qk_channels % num_heads:
            raise ValueError(f"qk_channels ({qk_channels}) must be divisible by num_heads ({num_heads})")
        if v_channels % num_heads:
            raise ValueError(f"v_channels ({v_channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.cross = cross
        self.scale = 1.0 / math.sqrt(qk_channels // num_heads)
        self.norm_q = LayerNorm(q_dim)
        self.norm_kv = LayerNorm(kv_dim) if cross else None
        self.q = AlignedLinear(q_dim, qk_channels)
        self.k = AlignedLinear(kv_dim, qk_channels)
        self.v = AlignedLinear(kv_dim, v_channels)
        self.o = AlignedLinear(v_channels, out_dim)
        # Tests switch this off to compare the reassociated forms against the plain one.
        self.allow_reassociation = True

    def forward(
        self, x: Tensor, kv: Tensor | None = None, mask: Tensor | None = None, projected_q: Tensor | None = None
    ) -> Tensor:
        """x: [B, N, Cq] queries; kv: [B, M, Ckv] inputs (None for self-attention); mask: bool [B, M].

        projected_q: ``q(norm_q(x))`` precomputed by the caller, for decoders whose queries are constants.
        """
        if projected_q is not None:
            if self.norm_kv is None or kv is None:
                raise ValueError("projected_q is only supported for cross-attention")
            return self._plain(projected_q, self.norm_kv(kv), mask)
        xq = self.norm_q(x)
        xkv = xq if self.norm_kv is None or kv is None else self.norm_kv(kv)
        plan = self._plan(xq.shape[1], xkv.shape[1])
        key_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, M]
        if plan == "fold_kv":
            qw = self.q(xq) @ self.k.weight  # [B, N, Ckv]
            inputs = xkv[:, None]  # one object for keys and values: padded (if at all) once
            out = _attend(qw[:, None], inputs, inputs, key_mask, self.scale)[:, 0]
            return self.o(F.linear(out, self.v.weight, self.v.bias))
        if plan == "fold_q":
            k = self.k(xkv)  # [B, M, qk]
            bias = (k @ self.q.bias * self.scale)[:, None, None, :]  # [B, 1, 1, M]
            if key_mask is not None:
                bias = bias.masked_fill(~key_mask, torch.finfo(bias.dtype).min)
            keys = (k @ self.q.weight)[:, None]  # [B, 1, M, Cq]
            values = F.linear(self.v(xkv), self.o.weight)[:, None]  # [B, 1, M, out]
            return _attend(xq[:, None], keys, values, bias, self.scale)[:, 0] + self.o.bias
        return self._plain(self.q(xq), xkv, mask)

    def _plain(self, q_proj: Tensor, xkv: Tensor, mask: Tensor | None) -> Tensor:
        """Multi-head attention from projected queries [B, N, qk] and normalised inputs [B, M, Ckv]."""
        key_mask = None if mask is None else mask[:, None, None, :]
        b, n, _ = q_proj.shape
        h = self.num_heads
        q = q_proj.view(b, n, h, -1).transpose(1, 2)  # [B, H, N, qk/H]
        k = self.k(xkv).view(b, xkv.shape[1], h, -1).transpose(1, 2)
        v = self.v(xkv).view(b, xkv.shape[1], h, -1).transpose(1, 2)
        out = _attend(q, k, v, key_mask, self.scale)  # [B, H, N, v/H]
        return self.o(out.transpose(1, 2).reshape(b, n, -1))

    def _plan(self, n: int, m: int) -> str:
        """Pick the form with the fewest multiply-adds for N queries against M inputs."""
        if not (self.cross and self.num_heads == 1 and self.allow_reassociation):
            return "plain"
        cq, ckv = self.q.in_features, self.k.in_features
        qk, v, out = self.q.out_features, self.v.out_features, self.o.out_features
        costs = {
            "plain": n * cq * qk + m * ckv * (qk + v) + n * m * (qk + v) + n * v * out,
            "fold_kv": n * cq * qk + n * qk * ckv + 2 * n * m * ckv + n * ckv * v + n * v * out,
            "fold_q": m * ckv * (qk + v) + m * qk * cq + m * v * out + n * m * (cq + out),
        }
        return min(costs, key=costs.__getitem__)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA over [B, H, N, E] queries, chunked along N when the score matrix would be huge."""
    if aligned.wanted(q, q.shape[-1], v.shape[-1]):  # zero columns change neither q·k nor the kept outputs
        same = k is v
        q, k = aligned.pad_last(q), aligned.pad_last(k)
        width = v.shape[-1]
        v = k if same else aligned.pad_last(v)
        return _attend(q, k, v, mask, scale)[..., :width]
    if q.shape[-1] < v.shape[-1] <= _FUSED_MAX_HEAD_DIM:
        # Fused (flash) kernels need equal q/k and v head widths; Perceiver often has qk < v (e.g. 32 vs
        # 160 per head). Zero columns add nothing to q·k, so pad q and k up to v's width.
        pad = v.shape[-1] - q.shape[-1]
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    if (q.is_cuda or aligned.forced()) and q.shape[-1] > _FUSED_MAX_HEAD_DIM:
        kernel = _wide_kernel(q, k, v, mask)
        if kernel is not None:  # it writes no score matrix, so it needs no chunks
            try:
                return kernel.wide_attention(q, k, v, mask, scale)
            except torch.OutOfMemoryError:
                raise  # the batcher splits the batch
            except Exception as exc:  # e.g. Triton cannot build its launcher (no C compiler in the image)
                WIDE_ATTENTION.give_up(exc)
    b, h, n, _ = q.shape
    if torch.compiler.is_compiling() and q.shape[-1] <= _FUSED_MAX_HEAD_DIM:
        # A compiled layer (compiled.py): SDPA lowers to fused kernels that hold no score matrix, so chunks bound
        # nothing, and a chunk count computed from the dynamic batch would guard on it: a graph per batch size.
        return _sdpa(q, k, v, mask, scale)
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, b * h * k.shape[2]))
    if n <= rows:
        return _sdpa(q, k, v, mask, scale)
    return torch.cat([_sdpa(q[:, :, i : i + rows], k, v, mask, scale) for i in range(0, n, rows)], dim=2)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    if (q.is_cuda or aligned.forced()) and q.shape[-1] > _FUSED_MAX_HEAD_DIM:
        return _explicit(q, k, v, mask, scale)
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    except RuntimeError as exc:
        # Fused CUDA kernels reject some shape/mask/dtype combinations (e.g. odd mask widths in bf16);
        # the math kernel accepts all of them.
        if not q.is_cuda:
            raise
        _warn_fallback(exc)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# How heads wider than 256 are computed on CUDA: ``gemm`` (``_explicit``, the default) or ``fused`` (the Triton
# kernel in wide_attention.py). The default follows measurement: it changes where benchmarks/wide_attention.py
# shows the kernel faster on a card (docs/performance.md).
WIDE_ATTENTION = KernelSwitch("PERCEIVER_WIDE_ATTENTION", "gemm", "fused", "wide_attention", "two GEMMs")
WIDE_ATTENTION_ENV = WIDE_ATTENTION.variable


def _wide_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> ModuleType | None:
    """The fused kernel's module when it is asked for and takes these operands: on CUDA in bf16 or fp16, or on a
    CPU under Triton's interpreter (tests)."""
    kernel = WIDE_ATTENTION.module()
    if kernel is None or not kernel.supported(q, k, v, mask):
        return None
    if kernel.interpreting():  # tests, on the CPU
        return kernel
    # On CUDA in half precision only: fp32 has no tensor-core product, and the kernel's fp32 build spills
    # kilobytes of registers (benchmarks/wide_attention.py --compile-check), where two fp32 GEMMs do not.
    return kernel if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) else None


def _explicit(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q·kᵀ·scale + mask)·v as two batched GEMMs around a softmax.

    For single heads wider than any fused kernel takes (Perceiver's 322- to 1032-wide cross-attention),
    PyTorch picks its memory-efficient kernel, which re-reads all keys and values for every 32-query
    tile: on an H200 that took 78% of the optical-flow forward. Two GEMMs read them once, and the score
    matrix (chunked by the caller to at most 2^28 elements) costs less than the re-reads.

    Scores and the softmax are fp32 whatever the inputs' dtype (bf16 keeps 8 mantissa bits: a score of 50
    would be rounded by 0.25 before the exponential); the probabilities go back to v's dtype for the second
    GEMM, which accumulates in fp32 as every GEMM does.
    """
    scores = _scores_fp32(q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def _scores_fp32(q: Tensor, k: Tensor) -> Tensor:
    """q·kᵀ in fp32 or wider: CUDA's bmm writes fp32 from bf16/fp16 inputs (``out_dtype``); elsewhere, upcast first.
    fp32 and fp64 inputs keep their own dtype (CUDA's ``out_dtype`` takes half-precision inputs only)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return torch.matmul(q, k.transpose(-1, -2))
    lead = q.shape[:-2]
    if q.is_cuda and k.shape[:-2] == lead:
        flat_q, flat_k = q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:])
        scores = torch.bmm(flat_q, flat_k.transpose(-1, -2), out_dtype=torch.float32)
        return scores.reshape(*lead, q.shape[-2], k.shape[-2])
    return torch.matmul(q.float(), k.float().transpose(-1, -2))


@functools.cache
def _warn_fallback(exc: RuntimeError) -> None:
    log.warning("fused attention kernel refused a call (%s); using the math kernel", str(exc)[:200])


class MLP(nn.Module):
    """Linear → exact GELU → Linear."""

    def __init__(self, dim: int, widening_factor: int) -> None:
        super().__init__()
        self.fc1 = AlignedLinear(dim, widening_factor * dim)
        self.fc2 = AlignedLinear(widening_factor * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        dim, hidden = self.fc1.in_features, self.fc1.out_features
        if aligned.wanted(x, dim, hidden):  # stay padded through the hidden layer: gelu(0) = 0
            return self.fc2.forward_padded(F.gelu(self.fc1.forward_padded(aligned.pad_last(x))))[..., :dim]
        return self.fc2(F.gelu(self.fc1(x)))


# How LayerNorm runs at widths that are not a multiple of 8: ``torch``, ``triton`` (the kernel in layer_norm.py)
# or ``auto`` (the default): the kernel on CUDA, PyTorch's elsewhere. The default follows measurement: on an H200
# (run 11, docs/performance.md) the kernel made each head with an odd width 1.02-1.22x faster.
LAYER_NORM = KernelSwitch("PERCEIVER_LAYER_NORM", "torch", "triton", "layer_norm", "PyTorch's", default="auto")
LAYER_NORM_ENV = LAYER_NORM.variable


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) whose CUDA calls at odd widths (261, 322, 1,026:
    not a multiple of 8) run layer_norm.py's Triton kernel unless $PERCEIVER_LAYER_NORM=torch."""

    def forward(self, x: Tensor) -> Tensor:
        kernel = _layer_norm_kernel(x, self)
        if kernel is not None:
            try:
                return kernel.layer_norm(x, self.weight, self.bias, self.eps)
            except torch.OutOfMemoryError:
                raise  # the batcher splits the batch
            except Exception as exc:  # e.g. Triton cannot build its launcher (no C compiler in the image)
                LAYER_NORM.give_up(exc)
        return super().forward(x)


def _layer_norm_kernel(x: Tensor, norm: nn.LayerNorm) -> ModuleType | None:
    if (not x.is_cuda and not aligned.forced()) or x.shape[-1] % aligned.MULTIPLE == 0:
        return None
    if torch.compiler.is_compiling():
        return None  # a compiled graph gets Inductor's own fused LayerNorm
    kernel = LAYER_NORM.module(cuda=x.is_cuda)
    if kernel is None or not kernel.supported(x, norm.weight, norm.bias):
        return None
    return kernel if x.is_cuda or kernel.interpreting() else None


class PerceiverLayer(nn.Module):
    """Attention (+ optional query residual) followed by a residual MLP on the attention output.

    ``residual_dtype`` (an attribute, not a parameter: checkpoints are unchanged): the dtype the residual sums are
    kept in when it is wider than the weights', for example fp32 in a bf16 model. The attention and the MLP still
    run in the weights' dtype on the stream rounded to it, but the stream itself is not rounded at every layer:
    ``h = attn(x) + x`` and ``h + mlp(norm(h))`` are summed in ``residual_dtype`` and returned in it (the encoder
    and decoder return their output in the weights' dtype). None, or the weights' own dtype: plain sums. Costs: the
    stream's bytes once more in each sum, and two casts a layer (Inductor fuses them into the sums in a compiled
    latent block).
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        qk_channels: int,
        v_channels: int,
        num_heads: int,
        widening_factor: int,
        cross: bool,
        query_residual: bool = True,
    ) -> None:
        super().__init__()
        if not cross and v_channels != q_dim:
            raise ValueError(f"self-attention needs v_channels ({v_channels}) == q_dim ({q_dim}) for its residual")
        out_dim = q_dim if cross else v_channels
        self.attn = Attention(q_dim, kv_dim, qk_channels, v_channels, num_heads, out_dim, cross)
        self.query_residual = query_residual
        self.norm = LayerNorm(q_dim)
        self.mlp = MLP(q_dim, widening_factor)
        self.residual_dtype: torch.dtype | None = None

    def forward(
        self, x: Tensor, kv: Tensor | None = None, mask: Tensor | None = None, projected_q: Tensor | None = None
    ) -> Tensor:
        dtype, wide = self.norm.weight.dtype, self.residual_dtype
        if wide is None or wide == dtype:
            h = self.attn(x, kv, mask, projected_q)
            if self.query_residual:
                h = h + x
            return h + self.mlp(self.norm(h))
        h = self.attn(x.to(dtype), kv, mask, projected_q)
        h = x.to(wide) + h if self.query_residual else h.to(wide)  # the sum is wide, whichever dtype x comes in
        return h + self.mlp(self.norm(h.to(dtype)))
