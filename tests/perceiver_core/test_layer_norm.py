"""The odd-width LayerNorm kernel (perceiver_core/layer_norm.py), run in Triton's CPU interpreter
(TRITON_INTERPRET=1; compiled, where a GPU is), against PyTorch's LayerNorm and against transformers.

The widths are the ones the published configs really normalise on CUDA's path: each config's model runs once on
the meta device with CUDA's padding switched on, and every LayerNorm call at a width that is not a multiple of 8
is recorded (benchmarks/layer_norm.py, which times the same calls on a GPU). The interpreter runs each program in
numpy, so the rows are cut to a few programs' worth."""

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
import torch.nn.functional as F
from test_heads import ARCHS, _compare, _reference_and_extra, _run

import perceiver_core
from benchmarks.layer_norm import call_operands, published_odd_norms
from perceiver_core import aligned, attention

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
ROWS = 37  # more than one program's rows at every published width (8 a program at 261 and 322, 2 at 1,026), ragged
# The tiny test heads (tests/reference.py) whose inputs are odd-width, as the published ones: Fourier pixels (261),
# convolutional patches and optical flow (322).
ODD_TINY_HEADS = {
    "PerceiverForImageClassificationFourier",
    "PerceiverForImageClassificationConvProcessing",
    "PerceiverForOpticalFlow",
}


# The kernel and device fixtures (conftest.py) load this module's kernel.
KERNEL, KERNEL_SWITCH = "perceiver_core.layer_norm", "LAYER_NORM"


CALLS = published_odd_norms()


def test_the_published_configs_have_the_odd_widths_the_kernel_is_for() -> None:
    widths = {(call["case"].split()[0], call["width"]) for call in CALLS}
    assert {("image-fourier", 261), ("image-conv", 322), ("optical", 322), ("multimodal", 1026)} <= widths
    assert all(call["width"] % 8 for call in CALLS)


def reference(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """The LayerNorm in float64, for how far each path is from the truth."""
    return F.layer_norm(x.double(), x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)


@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{c['case'].split()[0]}-{c['width']}")
def test_fp32_matches_pytorch(kernel: ModuleType, device: torch.device, call: dict[str, Any]) -> None:
    x, norm = call_operands(call, torch.float32, device, ROWS)
    got = kernel.layer_norm(x, norm.weight, norm.bias, norm.eps)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{c['case'].split()[0]}-{c['width']}")
def test_half_precision_is_the_exact_result_rounded(
    kernel: ModuleType, device: torch.device, call: dict[str, Any], dtype: torch.dtype
) -> None:
    """Statistics and the affine step in fp32, one rounding to the input's dtype at the end: within half a step
    of that dtype (plus fp32's rounding) of the float64 result, and no further from it than PyTorch's own."""
    x, norm = call_operands(call, dtype, device, ROWS)
    truth = reference(x, norm)
    got = kernel.layer_norm(x, norm.weight, norm.bias, norm.eps)
    assert got.dtype == dtype
    error = (got.double() - truth).abs()
    step = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)  # half the gap between neighbours, relative
    assert (error <= truth.abs() * step * 1.001 + 1e-6).all(), error.max()
    theirs = (F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps).double() - truth).abs()
    assert error.max() <= theirs.max() + 1e-6


def test_rows_far_from_zero_and_constant_rows(kernel: ModuleType, device: torch.device) -> None:
    """The mean is summed from the row shifted by its first value and the variance from the centred row, so a row
    at 10,000 ± 1 keeps the digits that fp32 sums of 10,000s round away (a one-pass sum of squares is off by
    ~1,000 there, PyTorch's CPU LayerNorm by 1.5e-3); a constant row normalises to zeros (the bias). Leading
    dimensions and a row stride wider than the row (a slice of a wider tensor) are kept."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 9, 400, generator=gen, dtype=torch.float64)
    wide[0] += 10_000
    wide[1, 4] = 7.0
    x = wide[..., :322].float().to(device)  # row stride 400
    norm = attention.LayerNorm(322).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(322, generator=gen))
        norm.bias.copy_(torch.randn(322, generator=gen))
    got = kernel.layer_norm(x, norm.weight, norm.bias, norm.eps)
    assert got.shape == (2, 9, 322)
    assert (got.double() - reference(x, norm)).abs().max().item() < 1e-4
    torch.testing.assert_close(got[1, 4], norm.bias.detach())


def test_inputs_it_does_not_take_are_refused(kernel: ModuleType, device: torch.device) -> None:
    x = torch.randn(4, 261, device=device)
    w, b = torch.ones(261, device=device), torch.zeros(261, device=device)
    assert kernel.supported(x, w, b)
    assert not kernel.supported(x.double(), w, b)
    assert not kernel.supported(x.t(), torch.ones(4, device=device), torch.zeros(4, device=device))  # column stride
    assert not kernel.supported(x, None, None)  # elementwise_affine=False
    assert not kernel.supported(torch.randn(2, kernel.MAX_WIDTH + 1, device=device), w, b)
    with pytest.raises(ValueError, match="unit-stride"):
        kernel.layer_norm(x.double(), w, b, 1e-5)


def test_a_kernel_that_fails_to_run_leaves_pytorchs_layer_norm(
    kernel: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where Triton cannot run (an image without a C compiler cannot build its launcher), the first odd-width
    call says so once in the log and every call, that one included, takes PyTorch's LayerNorm; running out of
    memory is not such a failure (the batcher splits the batch)."""
    calls = []

    def broken(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(kernel, "layer_norm", broken)
    monkeypatch.setattr(attention.LAYER_NORM, "failed", None)
    monkeypatch.setenv(attention.LAYER_NORM_ENV, "triton")
    norm = attention.LayerNorm(261)
    x = torch.randn(3, 261)
    with aligned.force(), caplog.at_level("WARNING", logger="perceiver_core.attention"), torch.no_grad():
        first, second = norm(x), norm(x)
    expected = F.layer_norm(x, (261,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert calls == [1]
    assert [r.getMessage() for r in caplog.records] == [
        "PERCEIVER_LAYER_NORM=triton, but the Triton kernel failed (RuntimeError: Failed to find C compiler); "
        "using PyTorch's"
    ]

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernel, "layer_norm", out_of_memory)
    monkeypatch.setattr(attention.LAYER_NORM, "failed", None)
    with aligned.force(), pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        norm(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_head_through_the_kernel_matches_transformers(
    kernel: ModuleType, arch: str, references: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each head, on CUDA's path (padded widths) with PERCEIVER_LAYER_NORM=triton, gives transformers' numbers;
    every odd-width LayerNorm went to the kernel, and none with PyTorch's choice."""
    if not kernel.interpreting():
        pytest.skip("runs the tiny heads on the CPU, in the interpreter (tests/perceiver_core/test_cuda.py: on CUDA)")
    ref = references[arch]
    theirs, extra = _reference_and_extra(arch, ref)
    model = perceiver_core.from_pretrained(ref.path)
    odd_calls: list[torch.Size] = []
    kernel_calls: list[torch.Size] = []
    real_forward, real_kernel = attention.LayerNorm.forward, kernel.layer_norm

    def counted(norm: attention.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % aligned.MULTIPLE:
            odd_calls.append(x.shape)
        return real_forward(norm, x)

    monkeypatch.setattr(attention.LayerNorm, "forward", counted)
    monkeypatch.setattr(kernel, "layer_norm", lambda *a: kernel_calls.append(a[0].shape) or real_kernel(*a))
    with aligned.force():
        monkeypatch.setenv(attention.LAYER_NORM_ENV, "torch")
        _run(model, ref, **extra)
        assert kernel_calls == []
        monkeypatch.setenv(attention.LAYER_NORM_ENV, "triton")
        odd_calls.clear()
        ours = _run(model, ref, **extra)
    _compare(ours, theirs, 1e-4)
    assert kernel_calls == odd_calls
    if arch in ODD_TINY_HEADS:
        assert kernel_calls, "this head normalises odd-width inputs: it should have used the kernel"


def test_the_kernel_compiles_for_hopper_without_spilling() -> None:
    """The kernel at every published odd width and the widest it takes, compiled ahead of time for sm_90 (H100,
    H200) as layer_norm() launches it, with Triton's own ptxas, no GPU needed: no register spilled to the stack
    or local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter's kernels do not compile
    done = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "layer_norm.py"), "--compile-check", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert {row["width"] for row in rows} >= {261, 322, 1026, 8191} and {row["dtype"] for row in rows} == {
        "bf16",
        "fp32",
    }
    for row in rows:
        assert row["stack_bytes"] == row["local_bytes"] == 0, row
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= 227 * 1024, row


def test_the_choice_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(attention.LAYER_NORM_ENV, raising=False)
    assert attention.LAYER_NORM.choice() == "auto"
    monkeypatch.setenv(attention.LAYER_NORM_ENV, " Triton ")
    assert attention.LAYER_NORM.choice() == "triton"
    monkeypatch.setenv(attention.LAYER_NORM_ENV, "fast")
    with pytest.raises(ValueError, match="PERCEIVER_LAYER_NORM='fast': use one of torch, triton, auto"):
        attention.LAYER_NORM.choice()


def test_auto_takes_the_kernel_on_cuda_only(
    kernel: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The default, auto: the kernel for calls on CUDA; on a CPU (CUDA's path emulated included) PyTorch's, the
    kernel's module not consulted. Where the kernel fails under auto, the log says so at INFO, not as a warning
    (an image without a C compiler is a documented set-up, not a fault)."""
    monkeypatch.delenv(attention.LAYER_NORM_ENV, raising=False)
    monkeypatch.setattr(attention.LAYER_NORM, "failed", None)
    assert attention.LAYER_NORM.module(cuda=True) is kernel
    assert attention.LAYER_NORM.module(cuda=False) is None
    calls = []
    monkeypatch.setattr(kernel, "layer_norm", lambda *args, **kwargs: calls.append(1))
    norm = attention.LayerNorm(261)
    x = torch.randn(3, 261)
    with aligned.force(), torch.no_grad():
        torch.testing.assert_close(norm(x), F.layer_norm(x, (261,), norm.weight, norm.bias, norm.eps))
    assert calls == []
    with caplog.at_level("INFO", logger="perceiver_core.attention"):
        attention.LAYER_NORM.give_up(RuntimeError("Failed to find C compiler"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "INFO",
            "PERCEIVER_LAYER_NORM=auto, but the Triton kernel failed (RuntimeError: Failed to find C compiler); "
            "using PyTorch's",
        )
    ]
    assert attention.LAYER_NORM.module(cuda=True) is None  # PyTorch's from then on
