"""GPU paths: parity on CUDA, and CUDA graphs that give the eager result. Skipped without CUDA; the
CPU fallback of the graph wrapper is tested everywhere."""

from __future__ import annotations

import pytest
import torch
from reference import Reference, reference_logits, relative_error

import perceiver_core
from perceiver_core.graphs import enable_cuda_graphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ARCHS = [
    "PerceiverForMaskedLM",
    "PerceiverForImageClassificationLearned",
    "PerceiverForImageClassificationConvProcessing",
    "PerceiverForOpticalFlow",
]


def test_graph_wrapper_falls_back_to_eager_on_cpu(references: dict[str, Reference]) -> None:
    ref = references["PerceiverForImageClassificationFourier"]
    model = perceiver_core.from_pretrained(ref.path)
    with torch.inference_mode():
        eager = model(**ref.inputs).logits
        enable_cuda_graphs(model, [1, 2, 4])
        wrapped = model(**ref.inputs).logits
    assert torch.equal(eager, wrapped)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_parity(arch: str, dtype: torch.dtype, references: dict[str, Reference]) -> None:
    ref = references[arch]
    theirs = reference_logits(ref)
    model = perceiver_core.from_pretrained(ref.path, device="cuda", dtype=dtype)
    inputs = {k: v.cuda() for k, v in ref.inputs.items()}
    with torch.inference_mode():
        ours = model(**inputs).logits.float().cpu()
    if arch == "PerceiverForMaskedLM":
        theirs = theirs[:, : ours.shape[1]]
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    assert relative_error(ours, theirs) <= tol


@cuda
@pytest.mark.parametrize("arch", ["PerceiverForImageClassificationLearned", "PerceiverForOpticalFlow"])
def test_cuda_graphs_replay_the_eager_result(arch: str, references: dict[str, Reference]) -> None:
    ref = references[arch]
    model = perceiver_core.from_pretrained(ref.path, device="cuda", dtype=torch.bfloat16)
    x = ref.inputs["inputs"].cuda().bfloat16()
    with torch.inference_mode():
        eager = model(inputs=x).logits.float()
        enable_cuda_graphs(model, [1, 2, 4])
        first = model(inputs=x).logits.float()  # captures (batch 2)
        again = model(inputs=x[:1]).logits.float()  # batch 1: its own graph
        replay = model(inputs=x).logits.float()
    assert torch.allclose(first, eager, atol=1e-2, rtol=1e-2)
    assert torch.equal(first, replay)
    assert torch.allclose(again, eager[:1], atol=1e-2, rtol=1e-2)
