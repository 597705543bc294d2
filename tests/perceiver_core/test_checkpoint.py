"""Loading, saving and resolving checkpoints; every broken checkpoint gives a clear CheckpointError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from reference import CONFIGS, Reference, reference_logits, relative_error
from safetensors.torch import load_file, save_file

import perceiver_core
from perceiver_core import CheckpointError
from perceiver_core.checkpoint import hf_key


def _copy(ref: Reference, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(ref.path, target)
    return target


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_save_pretrained_round_trips_through_transformers(
    arch: str, references: dict[str, Reference], tmp_path: Path
) -> None:
    ref = references[arch]
    ours = perceiver_core.from_pretrained(ref.path)
    perceiver_core.save_pretrained(ours, tmp_path / "saved")
    reloaded = getattr(transformers, arch).from_pretrained(tmp_path / "saved").eval()
    before = load_file(str(ref.path / "model.safetensors"))
    after = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    extra = {}
    if arch == "PerceiverForMultimodalAutoencoding":
        extra = {"subsampled_output_points": {"audio": torch.arange(2), "image": torch.arange(5), "label": None}}
    with torch.no_grad():
        again = reloaded(**ref.inputs, **extra).logits
    expected = reference_logits(ref, **extra)
    if isinstance(expected, dict):
        assert all(relative_error(again[k], expected[k]) == 0 for k in expected)
    elif again is not None:
        assert relative_error(again, expected) == 0


def test_key_map_covers_the_published_layout() -> None:
    assert hf_key("PerceiverForMaskedLM", "output_bias") == "embedding_decoder.bias"
    assert (
        hf_key("PerceiverForImageClassificationLearned", "encoder.layers.3.attn.o.weight")
        == "perceiver.encoder.self_attends.3.attention.output.dense.weight"
    )
    assert (
        hf_key("PerceiverModel", "encoder.cross.attn.norm_kv.bias")
        == "encoder.cross_attention.attention.self.layernorm2.bias"
    )


def test_missing_tensor(references: dict[str, Reference], tmp_path: Path) -> None:
    path = _copy(references["PerceiverForImageClassificationConvProcessing"], tmp_path)
    state = load_file(str(path / "model.safetensors"))
    del state["perceiver.input_preprocessor.convnet.batchnorm.running_var"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"missing tensors: perceiver\.input_preprocessor\.convnet\.batchnorm\.running_var"
    ):
        perceiver_core.from_pretrained(path)


def test_unexpected_tensor(references: dict[str, Reference], tmp_path: Path) -> None:
    path = _copy(references["PerceiverForSequenceClassification"], tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["perceiver.decoder.extra"] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: perceiver\.decoder\.extra"):
        perceiver_core.from_pretrained(path)


def test_wrong_shape_names_key_and_both_shapes(references: dict[str, Reference], tmp_path: Path) -> None:
    path = _copy(references["PerceiverForSequenceClassification"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_latents"] = 13  # the saved latents are [12, 32]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"perceiver\.embeddings\.latents: checkpoint has \[12, 32\].*expects \[13, 32\]"
    ):
        perceiver_core.from_pretrained(path)


def test_truncated_safetensors(references: dict[str, Reference], tmp_path: Path) -> None:
    path = _copy(references["PerceiverForOpticalFlow"], tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        perceiver_core.from_pretrained(path)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        perceiver_core.from_pretrained(tmp_path)


def test_unknown_architecture(references: dict[str, Reference], tmp_path: Path) -> None:
    path = _copy(references["PerceiverModel"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["PerceiverForTokenClassification"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown architecture 'PerceiverForTokenClassification'"):
        perceiver_core.from_pretrained(path)


def test_unknown_config_keys_are_tolerated_and_kept(references: dict[str, Reference], tmp_path: Path) -> None:
    path = _copy(references["PerceiverForOpticalFlow"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, seq_len=2048, position_embedding_init_scale=0.02)  # legacy Hub keys
    (path / "config.json").write_text(json.dumps(config))
    model = perceiver_core.from_pretrained(path)
    assert model.config.extra["seq_len"] == 2048
    perceiver_core.save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["seq_len"] == 2048


def test_pytorch_bin_is_loaded_with_weights_only(references: dict[str, Reference], tmp_path: Path) -> None:
    ref = references["PerceiverForSequenceClassification"]
    path = _copy(ref, tmp_path)
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    model = perceiver_core.from_pretrained(path)
    with torch.no_grad():
        assert relative_error(model(**ref.inputs).logits, reference_logits(ref)) < 1e-4
    # A pickle that would run code is refused rather than executed, and the error does not pass on torch's advice
    # to load it with weights_only=False
    torch.save({"x": Exploit()}, path / "pytorch_model.bin")
    unpickled = r"cannot read weights.*names print, and a checkpoint is never unpickled"
    with pytest.raises(CheckpointError, match=unpickled) as refused:
        perceiver_core.from_pretrained(path)
    assert "weights_only" not in str(refused.value)


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled!",))


def test_hub_repo_id_resolves_from_local_cache_offline(
    references: dict[str, Reference], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hf" / "hub" / "models--deepmind--tiny-perceiver" / "snapshots" / "0123abc"
    shutil.copytree(references["PerceiverForMaskedLM"].path, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = perceiver_core.from_pretrained("deepmind/tiny-perceiver")
    assert model.config.architecture == "PerceiverForMaskedLM"
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        perceiver_core.from_pretrained("deepmind/not-cached")


def test_a_pinned_revision_is_never_served_by_another_snapshot(
    references: dict[str, Reference], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only main is cached: v2.0 or another commit must fail, naming the revision; main and its commit work."""
    repo = tmp_path / "hf" / "hub" / "models--deepmind--tiny-perceiver"
    commit = "0123abc0123abc0123abc0123abc0123abc0123"
    shutil.copytree(references["PerceiverForMaskedLM"].path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for revision in ("v2.0", "fedcba9876543210fedcba9876543210fedcba98"):
        with pytest.raises(CheckpointError, match=f"revision '{revision}' is not in the local Hugging Face cache"):
            perceiver_core.from_pretrained("deepmind/tiny-perceiver", revision=revision)
    for revision in ("main", commit):
        model = perceiver_core.from_pretrained("deepmind/tiny-perceiver", revision=revision)
        assert model.config.architecture == "PerceiverForMaskedLM"


def test_package_does_not_import_serving_or_reference_code() -> None:
    import subprocess
    import sys

    code = (
        "import sys, perceiver_core, perceiver_core.processing.flow, perceiver_core.processing.image, "
        "perceiver_core.processing.tokenizer, perceiver_core.processing.video\n"
        "bad = [m for m in ('transformers', 'fastapi', 'pydantic', 'app') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
