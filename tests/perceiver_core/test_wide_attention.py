"""The fused wide-head attention kernel (perceiver_core/wide_attention.py), run in Triton's CPU interpreter
(TRITON_INTERPRET=1; compiled, where a GPU is), against the two-GEMM path it replaces and against transformers.

The shapes are the ones the published configs really produce: each config's model runs once on the meta device
(no memory, no arithmetic) with CUDA's padding switched on, and every attention call wider than 256 channels is
recorded (benchmarks/wide_attention.py, which times the same calls on a GPU). The interpreter runs each program
in numpy, so queries and keys are cut to a few tiles' worth; the head widths, the masks and the broadcasting stay
as published."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from test_heads import ARCHS, _compare, _reference_and_extra, _run

import perceiver_core
from benchmarks.wide_attention import call_operands, published_wide_calls
from perceiver_core import aligned, attention

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# Queries and keys kept per call: more than one tile of each in the interpreter's tiling (32 queries, 64 keys,
# 128 channels a slice), with ragged last tiles.
MAX_QUERIES, MAX_KEYS = 40, 150
# The tiny test heads (tests/reference.py) whose inputs are wider than 256 channels, as the published ones:
# Fourier pixels (261), convolutional patches and optical flow (322), multimodal (padded to the widest modality).
WIDE_TINY_HEADS = {
    "PerceiverForImageClassificationFourier",
    "PerceiverForImageClassificationConvProcessing",
    "PerceiverForOpticalFlow",
}


# The kernel and device fixtures (conftest.py) load this module's kernel.
KERNEL, KERNEL_SWITCH = "perceiver_core.wide_attention", "WIDE_ATTENTION"


CALLS = published_wide_calls()


def test_the_published_configs_have_the_wide_heads_the_kernel_is_for() -> None:
    widths = {(call["case"].split()[0], call["q"][-1]) for call in CALLS}
    # Unpadded and padded to a multiple of 8 (what CUDA runs), and the classifiers' one 1,024-wide query.
    assert {("image-fourier", 261), ("image-fourier", 264), ("image-conv", 322), ("image-conv", 328)} <= widths
    assert {("image-learned", 512), ("image-learned", 1024), ("optical", 322), ("optical", 328)} <= widths
    assert {("multimodal", 704), ("multimodal", 1026), ("multimodal", 1032)} <= widths
    assert {call["mask"] for call in CALLS} == {None, "additive"}  # the flow and multimodal decoders' key bias


def operands(call: dict[str, Any], dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    """Random operands of ``call``'s widths and mask, two batch elements, queries and keys cut down."""
    return call_operands(call, dtype, device, 2, MAX_QUERIES, MAX_KEYS)


@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{c['case'].split()[0]}-q{c['q'][-1]}-v{c['v'][-1]}-{c['mask']}")
def test_fp32_matches_the_two_gemm_path(kernel: ModuleType, device: torch.device, call: dict[str, Any]) -> None:
    q, k, v, mask = operands(call, torch.float32, device)
    expected = attention._explicit(q, k, v, mask, call["scale"])
    got = kernel.wide_attention(q, k, v, mask, call["scale"])
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{c['case'].split()[0]}-q{c['q'][-1]}-v{c['v'][-1]}-{c['mask']}")
def test_bf16_is_as_close_to_fp64_as_the_two_gemm_path(
    kernel: ModuleType, device: torch.device, call: dict[str, Any]
) -> None:
    """Both paths keep scores and softmax in fp32 and round the probabilities to bf16 before they meet v; the
    kernel's online softmax may round differently, but no worse than one more bf16 step."""
    q, k, v, mask = operands(call, torch.bfloat16, device)
    truth = attention._explicit(
        q.double(), k.double(), v.double(), None if mask is None else mask.double(), call["scale"]
    )
    explicit = attention._explicit(q, k, v, mask, call["scale"])
    got = kernel.wide_attention(q, k, v, mask, call["scale"])
    assert got.dtype == torch.bfloat16
    ulp = 2.0**-8 * truth.abs().max().item()
    assert (got.double() - truth).abs().max().item() <= (explicit.double() - truth).abs().max().item() + ulp


def test_boolean_masks_broadcast_batches_and_rows_with_no_key(kernel: ModuleType, device: torch.device) -> None:
    """A boolean key mask per batch element, keys shared across the batch (stride 0), one query, and a batch
    element whose keys are all dropped: NaN, as softmax gives."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 1, 1, 300, generator=gen)
    k = torch.randn(1, 1, 97, 300, generator=gen)
    v = torch.randn(1, 1, 97, 270, generator=gen)
    mask = torch.rand(3, 1, 1, 97, generator=gen) > 0.4
    mask[2] = False
    q, k, v, mask = (x.to(device) for x in (q, k, v, mask))
    got = kernel.wide_attention(q, k, v, mask, 0.05)
    expected = attention._explicit(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), mask, 0.05)
    torch.testing.assert_close(got[:2], expected[:2], rtol=1e-5, atol=1e-5)
    assert got[2].isnan().all() and expected[2].isnan().all()


@pytest.mark.parametrize("config", range(4), ids=lambda i: f"config{i}")
def test_every_gpu_tiling_matches_the_two_gemm_path(kernel: ModuleType, device: torch.device, config: int) -> None:
    """Each tiling the GPU's autotuner may pick (run directly, whatever it would pick), on a flow-decoder-like
    call with several tiles of queries, keys, head channels and value channels, all ragged: an additive bias
    whose first key tile is all dropped (-inf), and a mask shared by the batch."""
    assert len(kernel._CUDA_CONFIGS) == 4
    gen = torch.Generator().manual_seed(config)
    q = torch.randn(2, 1, 150, 328, generator=gen)
    k = torch.randn(2, 1, 100, 328, generator=gen)
    v = torch.randn(1, 1, 100, 330, generator=gen)  # one value set for the batch (stride 0)
    bias = 2 * torch.randn(2, 1, 1, 100, generator=gen)
    bias[0, ..., :70] = float("-inf")  # more than the widest key tile (64)
    shared = torch.rand(1, 1, 1, 100, generator=gen) > 0.5
    tiling = kernel._CUDA_CONFIGS[config]
    for mask in (bias, shared):
        q_, k_, v_, mask_ = (x.to(device) for x in (q, k, v, mask))
        got = kernel.wide_attention(q_, k_, v_, mask_, 0.05, config=tiling)
        expected = attention._explicit(q_, k_, v_.expand(2, -1, -1, -1), mask_, 0.05)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_kernel_that_fails_to_run_leaves_the_two_gemms(
    kernel: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where Triton cannot run (an image without a C compiler cannot build its launcher), the first wide call
    says so once in the log and every call, that one included, takes the two GEMMs; running out of memory is
    not such a failure (the batcher splits the batch)."""
    calls = []

    def broken(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(kernel, "wide_attention", broken)
    monkeypatch.setattr(attention.WIDE_ATTENTION, "failed", None)
    monkeypatch.setenv(attention.WIDE_ATTENTION_ENV, "fused")
    q, k = torch.randn(1, 1, 5, 300), torch.randn(1, 1, 7, 300)
    with aligned.force(), caplog.at_level("WARNING", logger="perceiver_core.attention"):
        first = attention._attend(q, k, k, None, 0.1)
        second = attention._attend(q, k, k, None, 0.1)
    expected = attention._explicit(q, k, k, None, 0.1)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert calls == [1]
    assert [r.getMessage() for r in caplog.records] == [
        "PERCEIVER_WIDE_ATTENTION=fused, but the Triton kernel failed (RuntimeError: Failed to find C compiler); "
        "using two GEMMs"
    ]

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernel, "wide_attention", out_of_memory)
    monkeypatch.setattr(attention.WIDE_ATTENTION, "failed", None)
    with aligned.force(), pytest.raises(torch.OutOfMemoryError):
        attention._attend(q, k, k, None, 0.1)


def test_operands_it_does_not_take_are_refused(kernel: ModuleType) -> None:
    q = torch.randn(1, 1, 4, 300)
    k = torch.randn(1, 1, 5, 300)
    assert kernel.supported(q, k, k, None)
    assert not kernel.supported(q, k.double(), k, None)  # mixed dtypes
    assert not kernel.supported(q, k, torch.randn(1, 1, 6, 300), None)  # keys and values disagree
    assert not kernel.supported(q, k, k, torch.ones(1, 1, 4, 5, dtype=torch.bool))  # a mask per query
    assert not kernel.supported(q, k[:, :, :0], k[:, :, :0], None)  # no keys
    with pytest.raises(ValueError, match="one mask row per batch element"):
        kernel.wide_attention(q, k, k, torch.ones(1, 1, 4, 5, dtype=torch.bool), 0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_head_through_the_kernel_matches_transformers(
    kernel: ModuleType, arch: str, references: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each head, on CUDA's path (padded widths, wide heads off the flash kernels) with
    PERCEIVER_WIDE_ATTENTION=fused, gives transformers' numbers, and every call the two GEMMs took before went
    to the kernel instead."""
    if not kernel.interpreting():
        pytest.skip("runs the tiny heads on the CPU, in the interpreter (tests/perceiver_core/test_cuda.py: on CUDA)")
    ref = references[arch]
    theirs, extra = _reference_and_extra(arch, ref)
    model = perceiver_core.from_pretrained(ref.path)
    gemm_calls: list[torch.Size] = []
    kernel_calls: list[torch.Size] = []
    explicit, fused = attention._explicit, kernel.wide_attention
    monkeypatch.setattr(attention, "_explicit", lambda *a: gemm_calls.append(a[0].shape) or explicit(*a))
    monkeypatch.setattr(kernel, "wide_attention", lambda *a: kernel_calls.append(a[0].shape) or fused(*a))
    with aligned.force():
        monkeypatch.setenv(attention.WIDE_ATTENTION_ENV, "gemm")
        _run(model, ref, **extra)
        monkeypatch.setenv(attention.WIDE_ATTENTION_ENV, "fused")
        ours = _run(model, ref, **extra)
    _compare(ours, theirs, 1e-4)
    assert kernel_calls == gemm_calls
    if arch in WIDE_TINY_HEADS:
        assert kernel_calls, "this head has a cross-attention wider than 256: it should have used the kernel"


def test_every_autotune_configuration_compiles_for_hopper_without_spilling(kernel: ModuleType) -> None:
    """Each configuration the GPU's autotuner may pick, compiled ahead of time for sm_90 (H100, H200) with Triton's
    own ptxas, no GPU needed: no register spilled to the stack or local memory, shared memory within the 227 KiB
    a block may have."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter's kernels do not compile
    done = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "wide_attention.py"), "--compile-check", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert len(rows) == 3 * len(kernel._CUDA_CONFIGS)
    for row in rows:
        assert row["stack_bytes"] == row["local_bytes"] == 0, row
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= 227 * 1024, row


def test_the_choice_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(attention.WIDE_ATTENTION_ENV, raising=False)
    assert attention.WIDE_ATTENTION.choice() == "gemm"
    monkeypatch.setenv(attention.WIDE_ATTENTION_ENV, " Fused ")
    assert attention.WIDE_ATTENTION.choice() == "fused"
    monkeypatch.setenv(attention.WIDE_ATTENTION_ENV, "fussed")
    with pytest.raises(ValueError, match="PERCEIVER_WIDE_ATTENTION='fussed': use one of gemm, fused"):
        attention.WIDE_ATTENTION.choice()
