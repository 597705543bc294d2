"""Parity of every head against transformers on the same saved weights and inputs."""

from __future__ import annotations

import pytest
import torch
from reference import CONFIGS, Reference, reference_logits, relative_error

import perceiver_core
from perceiver_core.heads import PerceiverForMaskedLM, PerceiverForMultimodalAutoencoding

ARCHS = list(CONFIGS)


def _multimodal_points(ref: Reference) -> dict[str, torch.Tensor | None]:
    return {"audio": torch.arange(4, 8), "image": torch.arange(100, 164), "label": None}


def _run(model: perceiver_core.PerceiverHead, ref: Reference, **extra: object) -> object:
    with torch.no_grad():
        out = model(**ref.inputs, **extra)
    return out.last_hidden_state if out.logits is None else out.logits


def _compare(ours: object, theirs: object, tol: float) -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict)
        assert set(ours) == set(theirs)
        for key in theirs:
            _compare(ours[key], theirs[key], tol)
        return
    assert isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor)
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours).all()
    err = relative_error(ours.float(), theirs)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _reference_and_extra(arch: str, ref: Reference) -> tuple[object, dict[str, object]]:
    extra: dict[str, object] = {}
    if arch == "PerceiverForMultimodalAutoencoding":
        extra["subsampled_output_points"] = _multimodal_points(ref)
    theirs = reference_logits(ref, **extra)
    if arch == "PerceiverForMaskedLM":  # transformers always decodes max_position_embeddings positions
        assert isinstance(theirs, torch.Tensor)
        theirs = theirs[:, : ref.inputs["inputs"].shape[1]]
    return theirs, extra


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_parity(arch: str, references: dict[str, Reference]) -> None:
    ref = references[arch]
    theirs, extra = _reference_and_extra(arch, ref)
    model = perceiver_core.from_pretrained(ref.path)
    assert type(model).__name__ == arch
    _compare(_run(model, ref, **extra), theirs, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_parity(arch: str, dtype: torch.dtype, references: dict[str, Reference]) -> None:
    """Every head runs in bf16 and fp16 (transformers' multimodal head fails in bf16) within half tolerance."""
    ref = references[arch]
    theirs, extra = _reference_and_extra(arch, ref)
    model = perceiver_core.from_pretrained(ref.path, dtype=dtype)
    _compare(_run(model, ref, **extra), theirs, 3e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ARCHS)
def test_residual_sums_in_fp32_in_half_precision(
    arch: str, dtype: torch.dtype, references: dict[str, Reference]
) -> None:
    """Every head with its residual sums kept in fp32 (PerceiverLayer.residual_dtype) under bf16 or fp16 weights:
    the same parity with transformers fp32, the outputs and latents in the model's dtype, and the same state dict
    (the setting is not a weight). The flow head keeps fp32 sums by default; the others opt in."""
    ref = references[arch]
    theirs, extra = _reference_and_extra(arch, ref)
    model = perceiver_core.from_pretrained(ref.path, dtype=dtype)
    keys = list(model.state_dict())
    model.residual_dtype = torch.float32
    assert model.residual_dtype == torch.float32 and list(model.state_dict()) == keys
    with torch.no_grad():
        out = model(**ref.inputs, **extra)
    assert out.last_hidden_state.dtype == dtype
    for logits in out.logits.values() if isinstance(out.logits, dict) else [out.logits]:
        assert logits is None or logits.dtype == dtype
    _compare(_run(model, ref, **extra), theirs, 3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_flow_keeps_fp32_residual_sums_by_default_and_fp32_models_are_unchanged(
    references: dict[str, Reference],
) -> None:
    """Flow and the image classifiers keep fp32 sums by default (their bf16 error, run 11), the text heads and
    multimodal the weights' dtype. In fp32 the setting changes nothing (the sums are already fp32): bit for bit
    the same logits. In bf16 the encoder's stream changes the arithmetic (the outputs differ from bf16 sums, by
    rounding); the decoder's would not."""
    defaults = {arch: perceiver_core.from_pretrained(references[arch].path).residual_dtype for arch in references}
    wide = {arch for arch, dtype in defaults.items() if dtype == torch.float32}
    assert wide == {
        "PerceiverForOpticalFlow",
        "PerceiverForImageClassificationLearned",
        "PerceiverForImageClassificationFourier",
        "PerceiverForImageClassificationConvProcessing",
    }, defaults
    assert all(defaults[arch] is None for arch in set(defaults) - wide), defaults
    ref = references["PerceiverForOpticalFlow"]
    model = perceiver_core.from_pretrained(ref.path)
    wide = _run(model, ref)
    model.residual_dtype = None
    assert isinstance(wide, torch.Tensor) and torch.equal(wide, _run(model, ref))
    half = perceiver_core.from_pretrained(ref.path, dtype=torch.bfloat16)
    wide = _run(half, ref)
    # The decoder sums once, without a query residual, and rounds at once: a wide sum there gives the same bits,
    # so it keeps plain sums
    assert half.decoder.layer.residual_dtype is None
    half.decoder.layer.residual_dtype = torch.float32
    assert isinstance(wide, torch.Tensor) and torch.equal(wide, _run(half, ref))
    half.residual_dtype = None
    assert not torch.equal(wide, _run(half, ref))


def test_reassociated_attention_matches_plain(references: dict[str, Reference]) -> None:
    """The folded single-head cross-attention forms give the plain result within fp32 rounding."""
    for arch in ("PerceiverForImageClassificationLearned", "PerceiverForOpticalFlow"):
        ref = references[arch]
        model = perceiver_core.from_pretrained(ref.path)
        folded = _run(model, ref)
        plans = {m.attn._plan(8, 300) for m in model.modules() if hasattr(m, "attn") and m.attn.cross}
        assert plans & {"fold_kv", "fold_q"}, "test config should exercise a reassociated form"
        for module in model.modules():
            if hasattr(module, "allow_reassociation"):
                module.allow_reassociation = False
        _compare(folded, _run(model, ref), 1e-5)


def test_masked_lm_decodes_only_requested_positions(references: dict[str, Reference]) -> None:
    ref = references["PerceiverForMaskedLM"]
    model = perceiver_core.from_pretrained(ref.path)
    assert isinstance(model, PerceiverForMaskedLM)
    theirs = reference_logits(ref)
    positions = torch.tensor([0, 3, 9, 16])
    with torch.no_grad():
        ours = model(**ref.inputs, positions=positions).logits
    assert ours.shape == (2, 4, 262)
    _compare(ours, theirs[:, positions], 1e-4)


def test_multimodal_single_encoder_pass_matches_chunked_reference(references: dict[str, Reference]) -> None:
    """autoencode() runs the encoder once; transformers re-runs it per chunk. Every chunk must agree."""
    ref = references["PerceiverForMultimodalAutoencoding"]
    model = perceiver_core.from_pretrained(ref.path)
    assert isinstance(model, PerceiverForMultimodalAutoencoding)
    config = ref.model.config
    chunks = 4
    t, h, w = config.output_shape[1:]
    n_img, n_audio = t * h * w // chunks, config.num_frames * config.audio_samples_per_frame
    n_aud = n_audio // config.samples_per_patch // chunks
    with torch.no_grad():
        ours = model.autoencode(ref.inputs["inputs"], num_chunks=chunks)
        for k in range(chunks):
            points = {
                "audio": torch.arange(n_aud * k, n_aud * (k + 1)),
                "image": torch.arange(n_img * k, n_img * (k + 1)),
                "label": None,
            }
            theirs = ref.model(**ref.inputs, subsampled_output_points=points).logits
            span = slice(n_img * k, n_img * (k + 1))
            _compare(ours["image"].reshape(2, -1, 3)[:, span], theirs["image"], 1e-4)
            audio_span = slice(n_aud * k * config.samples_per_patch, n_aud * (k + 1) * config.samples_per_patch)
            _compare(ours["audio"][:, audio_span], theirs["audio"], 1e-4)
            _compare(ours["label"], theirs["label"], 1e-4)
    assert ours["image"].shape == (2, t, h, w, 3)
    assert ours["audio"].shape == (2, n_audio)
    with torch.no_grad():
        default = model.autoencode(ref.inputs["inputs"])  # the fast default (up to 8 chunks): same outputs
    for name in ("image", "audio", "label"):
        _compare(default[name], ours[name], 1e-5)


def test_learned_head_interpolates_position_table(references: dict[str, Reference]) -> None:
    ref = references["PerceiverForImageClassificationLearned"]
    model = perceiver_core.from_pretrained(ref.path)
    pixels = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        theirs = ref.model(inputs=pixels, interpolate_pos_encoding=True).logits
        ours = model(inputs=pixels, interpolate_pos_encoding=True).logits
        _compare(ours, theirs, 1e-4)
        with pytest.raises(ValueError, match="interpolate_pos_encoding"):
            model(inputs=pixels)


def test_cached_encodings_follow_new_weights(references: dict[str, Reference]) -> None:
    """Cached projected position tables must not survive a weight update."""
    ref = references["PerceiverForImageClassificationLearned"]
    model = perceiver_core.from_pretrained(ref.path)
    with torch.no_grad():
        before = _run(model, ref)
        model.input.position_projection.weight.mul_(2)  # type: ignore[union-attr,operator]
        after = _run(model, ref)
    assert isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
    assert not torch.allclose(before, after)


def test_multimodal_label_only_decode_matches_full(references: dict[str, Reference]) -> None:
    """Classification needs only the label query: decoding it alone gives the same label logits."""
    ref = references["PerceiverForMultimodalAutoencoding"]
    model = perceiver_core.from_pretrained(ref.path)
    assert isinstance(model, PerceiverForMultimodalAutoencoding)
    with torch.no_grad():
        z = model.encode(ref.inputs["inputs"])
        empty = torch.zeros(0, dtype=torch.long)
        alone = model.decode(z, empty, empty)
        theirs = reference_logits(ref, subsampled_output_points=_multimodal_points(ref))
    assert alone["audio"].shape == (2, 0) and alone["image"].shape == (2, 0, 3)
    _compare(alone["label"], theirs["label"], 1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_width_padding_for_tensor_cores_is_exact(arch: str, references: dict[str, Reference]) -> None:
    """The CUDA-only zero padding of odd widths (261, 322, 1026, ...) gives the unpadded result."""
    from perceiver_core import aligned

    ref = references[arch]
    _, extra = _reference_and_extra(arch, ref)
    model = perceiver_core.from_pretrained(ref.path)
    plain = _run(model, ref, **extra)
    with aligned.force():
        padded = _run(model, ref, **extra)
    _compare(padded, plain, 1e-5)


def test_subsampled_positions_match_unravel_index_exactly() -> None:
    """The multimodal decoder's query positions: the same numbers as torch.unravel_index and a tensor of the
    dims (DeepMind's -1 + 2i/N), computed with Python-int strides only."""
    from perceiver_core.position import subsampled_positions

    dims = (16, 56, 56)
    indices = torch.randperm(16 * 56 * 56)[:5000]
    expected = -1 + 2 * torch.stack(torch.unravel_index(indices, dims), dim=1) / torch.tensor(dims)[None, :]
    assert torch.equal(subsampled_positions(indices, dims), expected)
    audio = torch.arange(30, 60)
    assert torch.equal(subsampled_positions(audio, (1920,)), (-1 + 2 * audio / 1920)[:, None])
