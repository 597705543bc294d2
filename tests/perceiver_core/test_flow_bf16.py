"""Optical flow in bf16 stays within 1e-2 of transformers fp32 on the published config (24 latent layers, 2,048
latents, 182,528 inputs at 368x496, the only size transformers' flow head takes), with random weights (seed 0)
saved by transformers, in the same test: through the CPU's attention and through the path CUDA takes (widths padded
to multiples of 8, the wide single-head cross-attentions as two GEMMs around an fp32 softmax).

How far bf16 can get depends on the weights: over eight random draws the same comparison reads 3.5e-3 to 4.5e-2,
and rounding the weights to bf16 with exact arithmetic after it (the storage floor) already costs 3.0e-3 to 3.2e-2
of that. Seed 0 is 5.6e-3 with a floor of 3.2e-3: this test holds the arithmetic to what it is on a draw where bf16
can meet the bound (docs/performance.md, "bf16 fidelity"; benchmarks/flow_bf16.py --seeds)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import perceiver_core
from benchmarks.flow_bf16 import published_flow, relative
from perceiver_core import aligned

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    directory = tmp_path_factory.mktemp("flow")
    reference, inputs = published_flow(directory)
    with torch.no_grad():
        expected = reference(inputs=inputs).logits
    return directory, inputs, expected


@pytest.mark.parametrize("cuda_path", [False, True], ids=["cpu-attention", "cuda-path"])
def test_published_flow_in_bf16_is_within_1e_2_of_transformers_fp32(
    flow: tuple[Path, torch.Tensor, torch.Tensor], cuda_path: bool
) -> None:
    directory, inputs, expected = flow
    model = perceiver_core.from_pretrained(directory, dtype=torch.bfloat16)
    with aligned.force() if cuda_path else contextlib.nullcontext(), torch.no_grad():
        flow_bf16 = model(inputs.bfloat16()).logits
    assert flow_bf16.dtype == torch.bfloat16 and flow_bf16.shape == expected.shape == (1, 368, 496, 2)
    error = relative(flow_bf16, expected)
    assert error <= 1e-2, error
    assert error > 1e-4  # it did run in bf16 (fp32 is 2e-7 away)
