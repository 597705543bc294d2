"""Hugging Face checkpoints ↔ our modules: config.json conversion, the one key map, strict loading.

Our module names describe roles (``encoder.cross.attn.q``); transformers' names describe its class tree
(``perceiver.encoder.cross_attention.attention.self.query``). ``KEY_MAP`` and ``_LAYER_RENAMES`` are the
only place the two meet.
"""

from __future__ import annotations

import json
import os
import pickle  # its error type only: checkpoints are read by safetensors, or torch.load(weights_only=True)
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ARCHITECTURES, PerceiverConfig
from .heads import PerceiverHead, build_model


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the head its config names."""


_COMMON = (
    ("encoder.latents", "perceiver.embeddings.latents"),
    ("encoder.cross.", "perceiver.encoder.cross_attention."),
    ("encoder.layers.", "perceiver.encoder.self_attends."),
)
_TEXT = (
    ("input.token_embedding.", "perceiver.input_preprocessor.embeddings."),
    ("input.position_embedding.", "perceiver.input_preprocessor.position_embeddings."),
)
_WRAPPED_DECODER = (  # decoders that transformers nests one level deeper (decoder.decoder)
    ("decoder.layer.", "perceiver.decoder.decoder.decoding_cross_attention."),
    ("decoder.final.", "perceiver.decoder.decoder.final_layer."),
)
_CLASSIFIER = (
    ("query.embeddings", "perceiver.decoder.decoder.output_position_encodings.position_embeddings"),
    *_WRAPPED_DECODER,
)

KEY_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    "PerceiverModel": _COMMON,
    "PerceiverForMaskedLM": _COMMON
    + _TEXT
    + (
        ("queries.embeddings", "perceiver.decoder.output_position_encodings.position_embeddings"),
        ("decoder.layer.", "perceiver.decoder.decoding_cross_attention."),
        ("output_bias", "embedding_decoder.bias"),
    ),
    "PerceiverForSequenceClassification": _COMMON + _TEXT + _CLASSIFIER,
    "PerceiverForImageClassificationLearned": _COMMON
    + _CLASSIFIER
    + (
        ("input.conv1x1.", "perceiver.input_preprocessor.convnet_1x1."),
        ("input.position.embeddings", "perceiver.input_preprocessor.position_embeddings.position_embeddings"),
        ("input.position_projection.", "perceiver.input_preprocessor.positions_projection."),
    ),
    "PerceiverForImageClassificationFourier": _COMMON + _CLASSIFIER,
    "PerceiverForImageClassificationConvProcessing": _COMMON
    + _CLASSIFIER
    + (
        ("input.conv.", "perceiver.input_preprocessor.convnet.conv."),
        ("input.batchnorm.", "perceiver.input_preprocessor.convnet.batchnorm."),
    ),
    "PerceiverForOpticalFlow": _COMMON
    + _WRAPPED_DECODER
    + (("input.patch_projection.", "perceiver.input_preprocessor.conv_after_patches."),),
    "PerceiverForMultimodalAutoencoding": _COMMON
    + _WRAPPED_DECODER
    + (
        ("input.padding.", "perceiver.input_preprocessor.padding."),
        ("input.mask.", "perceiver.input_preprocessor.mask."),
        ("queries.padding.", "perceiver.decoder.padding."),
        (
            "queries.label_query.embeddings",
            "perceiver.decoder.modalities.label.decoder.output_position_encodings.position_embeddings",
        ),
        ("audio_output.", "perceiver.output_postprocessor.modalities.audio.classifier."),
        ("image_output.", "perceiver.output_postprocessor.modalities.image.classifier."),
        ("label_output.", "perceiver.output_postprocessor.modalities.label.classifier."),
    ),
}

# Inside every PerceiverLayer.
_LAYER_RENAMES = tuple(
    (re.compile(re.escape(ours)), theirs)
    for ours, theirs in (
        (".attn.norm_q.", ".attention.self.layernorm1."),
        (".attn.norm_kv.", ".attention.self.layernorm2."),
        (".attn.q.", ".attention.self.query."),
        (".attn.k.", ".attention.self.key."),
        (".attn.v.", ".attention.self.value."),
        (".attn.o.", ".attention.output.dense."),
        (".norm.", ".layernorm."),
        (".mlp.fc1.", ".mlp.dense1."),
        (".mlp.fc2.", ".mlp.dense2."),
    )
)


def hf_key(architecture: str, key: str) -> str:
    """transformers' state-dict name for our parameter or buffer ``key``."""
    for ours, theirs in KEY_MAP[architecture]:
        if key.startswith(ours):
            name = theirs + key[len(ours) :]
            break
    else:
        raise KeyError(f"{key!r} has no transformers name for {architecture}")
    for pattern, replacement in _LAYER_RENAMES:
        name = pattern.sub(replacement, name)
    # The bare model is saved without the "perceiver." prefix of the heads.
    return name.removeprefix("perceiver.") if architecture == "PerceiverModel" else name


# ----------------------------------------------------------------------------------------- config.json

_RENAMED_FIELDS = {"label_trainable_num_channels": "_label_trainable_num_channels"}


def config_from_dict(raw: dict[str, Any]) -> PerceiverConfig:
    """Our config from a transformers config.json dict; unknown keys are kept in ``extra``."""
    architectures = raw.get("architectures") or ["PerceiverModel"]
    known = {f.name for f in fields(PerceiverConfig)} - {"architecture", "extra", "id2label", "num_labels"}
    values: dict[str, Any] = {"architecture": architectures[0]}
    for name in known:
        key = _RENAMED_FIELDS.get(name, name)
        if raw.get(key) is not None:
            values[name] = raw[key]
    for name in ("train_size", "output_shape"):
        if name in values:
            values[name] = tuple(values[name])
    if isinstance(values.get("image_size"), list | tuple):
        values["image_size"] = values["image_size"][0]
    id2label = {int(k): str(v) for k, v in (raw.get("id2label") or {}).items()}
    values["id2label"] = id2label
    values["num_labels"] = len(id2label) if id2label else int(raw.get("num_labels", 2))
    used = {_RENAMED_FIELDS.get(n, n) for n in known} | {"architectures", "id2label", "num_labels", "label2id"}
    values["extra"] = {k: v for k, v in raw.items() if k not in used}
    return PerceiverConfig(**values)


def config_to_dict(config: PerceiverConfig) -> dict[str, Any]:
    """The transformers config.json dict for ``config``."""
    out: dict[str, Any] = dict(config.extra)
    for f in fields(PerceiverConfig):
        if f.name in ("architecture", "extra", "id2label"):
            continue
        value = getattr(config, f.name)
        out[_RENAMED_FIELDS.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
    labels = {i: config.label(i) for i in range(config.num_labels)}
    out.update(
        architectures=[config.architecture],
        model_type="perceiver",
        id2label={str(i): name for i, name in labels.items()},
        label2id={name: i for i, name in labels.items()},
    )
    return out


# ----------------------------------------------------------------------------------------- resolving


def _hub_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def _cached_snapshot(repo_id: str, revision: str) -> Path | None:
    """The local HF-cache snapshot of ``repo_id`` at ``revision`` (a branch, tag or commit), if cached.

    Resolved by huggingface_hub's own cache lookup (refs → commit → snapshot), never by falling back to
    another snapshot: a pinned revision that is not cached is not silently served by ``main``.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    for cache in _hub_cache_dirs():  # read per call: HF_HOME / HF_HUB_CACHE may change after import
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache, revision=revision)
        if isinstance(found, str):
            return Path(found).parent
    return None


def resolve_checkpoint(path_or_repo_id: str | os.PathLike[str], revision: str = "main") -> Path:
    """A local checkpoint directory: the path itself, a cached Hub snapshot, or (online only) a download."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; expected a Hugging Face checkpoint directory")
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise CheckpointError(f"{repo_id!r} is neither a checkpoint directory nor a Hub repo id (org/name)")
    cached = _cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise CheckpointError(
            f"{repo_id} at revision {revision!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(f"{repo_id} is not cached locally and huggingface_hub is not installed") from exc
    try:
        patterns = ["config.json", "*.safetensors", "pytorch_model.bin"]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth or missing repo: one clear error for all of them
        raise CheckpointError(f"could not download {repo_id}: {exc}") from exc


# ----------------------------------------------------------------------------------------- weights


def _read_weights(directory: Path) -> dict[str, Tensor]:
    safetensors_file, bin_file = directory / "model.safetensors", directory / "pytorch_model.bin"
    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_file))
        if bin_file.is_file():
            # weights_only: never unpickle arbitrary objects from a checkpoint.
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{bin_file} does not hold a state dict")
            return state
    except CheckpointError:
        raise
    except Exception as exc:
        name = safetensors_file if safetensors_file.is_file() else bin_file
        reason = str(exc)
        if isinstance(exc, pickle.UnpicklingError):  # not torch's advice to load it with weights_only=False
            found = re.search(r"GLOBAL ([\w.]+)", reason)
            if found:
                reason = (
                    f"it names {found.group(1)}, and a checkpoint is never unpickled: convert it to safetensors or "
                    "use another copy"
                )
            else:  # corrupt, truncated, a Git LFS pointer: torch's own reason, without its advice
                said = [line.strip() for line in reason.splitlines() if line.strip() and "weights_only" not in line]
                torch_said = said[-1].removeprefix("WeightsUnpickler error: ") if said else "refused"
                reason = f"not a readable torch checkpoint ({torch_said})"
        raise CheckpointError(f"cannot read weights from {name}: {reason}") from exc
    raise CheckpointError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def load_state(model: PerceiverHead, state: dict[str, Tensor]) -> None:
    """Copy a transformers state dict into ``model``: every tensor present, no extras, shapes equal."""
    arch = model.config.architecture
    ours = model.state_dict()
    names = {hf_key(arch, key): key for key in ours}
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}" + (" …" if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + (" …" if len(unexpected) > 10 else ""))
        raise CheckpointError(f"checkpoint does not match {arch}: " + "; ".join(parts))
    mapped = {}
    for theirs, key in names.items():
        tensor = state[theirs]
        if tuple(tensor.shape) != tuple(ours[key].shape):
            raise CheckpointError(
                f"shape mismatch for {theirs}: checkpoint has {list(tensor.shape)}, "
                f"{arch} with this config expects {list(ours[key].shape)}"
            )
        mapped[key] = tensor
    model.load_state_dict(mapped, strict=True, assign=True)


def from_pretrained(
    path_or_repo_id: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str = "main",
) -> PerceiverHead:
    """Load the head that a Hugging Face Perceiver checkpoint's config names, in eval mode."""
    directory = resolve_checkpoint(path_or_repo_id, revision)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{directory / 'config.json'} is not a JSON object")
    architectures = raw.get("architectures") or ["PerceiverModel"]
    if architectures[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"unknown architecture {architectures[0]!r} in {directory / 'config.json'}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    try:
        config = config_from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid config in {directory / 'config.json'}: {exc}") from exc
    with torch.device("meta"):  # no random init of weights we are about to overwrite
        model = build_model(config)
    load_state(model, _read_weights(directory))
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: PerceiverHead, directory: str | os.PathLike[str]) -> None:
    """Write config.json + model.safetensors in transformers' format."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arch = model.config.architecture
    tensors = {hf_key(arch, k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_dict(model.config), indent=2, sort_keys=True) + "\n")
