"""GPU paths: parity on CUDA, and CUDA graphs that give the eager result. Skipped without CUDA; the
CPU fallback of the graph wrapper is tested everywhere."""

from __future__ import annotations

import pytest
import torch
from reference import Reference, reference_logits, relative_error

import perceiver_core
from perceiver_core import compiled
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
@pytest.mark.parametrize("arch", ["PerceiverForImageClassificationConvProcessing", "PerceiverForOpticalFlow"])
def test_odd_width_layer_norm_kernel_on_cuda_in_bf16(
    arch: str, references: dict[str, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PERCEIVER_LAYER_NORM=triton (the 322-wide inputs of both heads go to layer_norm.py's kernel): bf16 within
    the parity bound of transformers fp32 and within 1e-2 of PyTorch's LayerNorm, eagerly and in CUDA graphs."""
    ref = references[arch]
    theirs = reference_logits(ref)
    model = perceiver_core.from_pretrained(ref.path, device="cuda", dtype=torch.bfloat16)
    inputs = {k: v.cuda() for k, v in ref.inputs.items()}
    with torch.inference_mode():
        monkeypatch.setenv("PERCEIVER_LAYER_NORM", "torch")
        plain = model(**inputs).logits.float().cpu()
        monkeypatch.setenv("PERCEIVER_LAYER_NORM", "triton")
        ours = model(**inputs).logits.float().cpu()
        enable_cuda_graphs(model, [1, 2, 4])
        captured = model(**inputs).logits.float().cpu()
        replayed = model(**inputs).logits.float().cpu()
    assert relative_error(ours, theirs) <= 3e-2
    assert relative_error(ours, plain) <= 1e-2
    assert torch.allclose(captured, ours, atol=1e-2, rtol=1e-2)
    assert torch.equal(replayed, captured)


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


@cuda
def test_the_mlm_is_not_compiled_on_cuda(references: dict[str, Reference]) -> None:
    """Compiled on an H200 (torch 2.11, run 11), the MLM's next forward pass segfaulted in the decoder's attention
    (benchmarks/results/gpu-run11/compiled-mlm-segfault.txt): compile_latent_block refuses it on CUDA, and the
    model stays eager. benchmarks/compile_crash.py runs the forced compile in child processes to narrow it."""
    model = perceiver_core.from_pretrained(references["PerceiverForMaskedLM"].path, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(compiled.CompileRefused):
        compiled.compile_latent_block(model)
    assert not compiled.compiled(model)


@cuda
@pytest.mark.parametrize("arch", ["PerceiverForImageClassificationLearned", "PerceiverForOpticalFlow"])
def test_compiled_latent_block_on_cuda_in_bf16(arch: str, references: dict[str, Reference]) -> None:
    """Compiled (Triton kernels from Inductor) within bf16 tolerance of transformers fp32 and close to eager bf16;
    under CUDA graphs it replays its own result, and batches of 3 compile nothing more (flow: through its fp32
    residual stream)."""
    ref = references[arch]
    theirs = reference_logits(ref)
    model = perceiver_core.from_pretrained(ref.path, device="cuda", dtype=torch.bfloat16)
    inputs = {k: v.cuda() for k, v in ref.inputs.items()}
    inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.inference_mode():
        eager = model(**inputs).logits.float()
        compiled.compile_latent_block(model)
        compiled.warm_compiled(model)
        ours = model(**inputs).logits.float()
        with torch._dynamo.config.patch(error_on_recompile=True):
            three = {k: torch.cat([v, v[:1]]) for k, v in inputs.items()}
            assert model(**three).logits.shape[0] == 3
    assert relative_error(ours.cpu(), theirs) <= 3e-2  # test_cuda_parity's bf16 bound
    assert relative_error(ours, eager) <= 2e-2  # two bf16 computations that round differently (CPU: 7-9e-3)
    if arch == "PerceiverForImageClassificationLearned":
        x = inputs["inputs"]
        with torch.inference_mode():
            enable_cuda_graphs(model, [1, 2, 4])
            first = model(inputs=x).logits.float()
            replay = model(inputs=x).logits.float()
        assert torch.equal(first, replay)
        assert relative_error(first, ours) <= 1e-2
