"""The published Perceiver IO heads, assembled from adapters, encoder and decoders.

Each head takes the same keyword arguments and tensors as its transformers counterpart and returns a
``PerceiverOutput`` whose ``logits`` have the same shape and scale. Inference-only extras:
``PerceiverForMaskedLM(positions=...)`` decodes only chosen positions, and
``PerceiverForMultimodalAutoencoding.autoencode`` runs the encoder once for a whole video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import aligned
from .adapters.flow import FlowPatchAdapter
from .adapters.image import ConvImageAdapter, FourierImageAdapter, LearnedImageAdapter
from .adapters.multimodal import MultimodalAdapter, MultimodalQueries
from .adapters.text import TextAdapter
from .aligned import AlignedLinear
from .attention import PerceiverLayer
from .config import ARCHITECTURES, PerceiverConfig
from .decoder import CrossAttentionDecoder
from .encoder import PerceiverEncoder
from .position import ConstantCache, TrainablePositionEncoding

# The masked-LM decoder's attention shape. transformers hard-codes qk_channels=8 * 32 and num_heads=8
# in PerceiverForMaskedLM's PerceiverBasicDecoder instead of reading them from the config (8 heads of 32
# query/key channels); the published checkpoint's decoder query/key weights have this shape.
MLM_QK_CHANNELS = 8 * 32
MLM_NUM_HEADS = 8


@dataclass
class PerceiverOutput:
    """logits: head-specific tensor (or dict per modality); last_hidden_state: latents [B, N, D]."""

    logits: Tensor | dict[str, Tensor] | None
    last_hidden_state: Tensor


def _pick(inputs: Tensor | None, alias: Tensor | None, alias_name: str) -> Tensor:
    if inputs is not None and alias is not None:
        raise ValueError(f"pass either inputs or {alias_name}, not both")
    chosen = inputs if inputs is not None else alias
    if chosen is None:
        raise ValueError(f"missing inputs (or {alias_name})")
    return chosen


def _key_mask(attention_mask: Tensor | None, device: torch.device) -> Tensor | None:
    """bool [B, M] key mask on ``device``; None when nothing is masked and that is free to know.

    A host-side mask (what a tokenizer produces) is checked on the host, so an all-valid batch runs the
    unmasked fused kernels; a device-side mask is kept as is rather than synchronising to inspect it.
    """
    if attention_mask is None:
        return None
    if attention_mask.device.type == "cpu" and device.type != "cpu" and bool(attention_mask.all()):
        return None
    return attention_mask.to(device=device, dtype=torch.bool)


class PerceiverHead(nn.Module):
    """Common plumbing: the config, the encoder, and the parameter dtype/device."""

    encoder: PerceiverEncoder

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def residual_dtype(self) -> torch.dtype | None:
        """The dtype of the residual sums when it is wider than the weights' (fp32 in a bf16 or fp16 model); None:
        the weights' own dtype (PerceiverLayer has the details)."""
        return self.encoder.cross.residual_dtype

    @residual_dtype.setter
    def residual_dtype(self, dtype: torch.dtype | None) -> None:
        """Set for the encoder's layers and for decoders with a query residual. A decoder without one (flow, MLM,
        multimodal) sums once and rounds its output to the weights' dtype at once: a wide sum would give the same
        bits at the cost of its queries' bytes (182,528 × 322 a flow pair), so its layer keeps plain sums."""
        layers = [m for m in self.modules() if isinstance(m, PerceiverLayer)]
        for layer in layers:
            layer.residual_dtype = dtype
        for decoder in (m for m in self.modules() if isinstance(m, CrossAttentionDecoder)):
            if not decoder.layer.query_residual:
                decoder.layer.residual_dtype = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _float(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.dtype)


class PerceiverModel(PerceiverHead):
    """The bare encoder: float inputs [B, M, d_model] → latents [B, N, D] (logits is None)."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        self.encoder = PerceiverEncoder(config, config.d_model)

    def forward(self, inputs: Tensor, attention_mask: Tensor | None = None) -> PerceiverOutput:
        if inputs.shape[-1] != self.config.d_model:
            raise ValueError(f"inputs have {inputs.shape[-1]} channels, config.d_model is {self.config.d_model}")
        z = self.encoder(self._float(inputs), _key_mask(attention_mask, self.device))
        return PerceiverOutput(None, z)


class _TextHead(PerceiverHead):
    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        self.input = TextAdapter(config)
        self.encoder = PerceiverEncoder(config, self.input.num_channels)

    def _encode(self, ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.encoder(self.input(ids.to(self.device)), _key_mask(attention_mask, self.device))


class PerceiverForMaskedLM(_TextHead):
    """Byte-level masked language model: logits [B, L, vocab] for the L input positions."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.queries = TrainablePositionEncoding(config.max_position_embeddings, d)
        self.decoder = CrossAttentionDecoder(
            config, d, None, query_residual=False, qk_channels=MLM_QK_CHANNELS, v_channels=d, num_heads=MLM_NUM_HEADS
        )
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self._cache = ConstantCache(max_entries=4)

    def forward(
        self,
        inputs: Tensor | None = None,
        attention_mask: Tensor | None = None,
        input_ids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> PerceiverOutput:
        """positions: optional 1-D indices to decode (default: all L input positions)."""
        ids = _pick(inputs, input_ids, "input_ids")
        z = self._encode(ids, attention_mask)
        index = torch.arange(ids.shape[1], device=z.device) if positions is None else positions.to(z.device)
        # Decoder queries are independent of each other, so decoding a subset gives the same rows.
        h = self.decoder(
            self.queries(z.shape[0], index), z, self._projected_queries(z.dtype)[index].expand(z.shape[0], -1, -1)
        )
        return PerceiverOutput(self._vocab_logits(h), z)

    def _vocab_logits(self, h: Tensor) -> Tensor:
        """h @ Eᵀ + b, tied to the input embedding; on CUDA with the vocabulary padded 262 → 264 rows."""
        table = self.input.token_embedding.weight
        vocab = table.shape[0]
        if not aligned.wanted(h, vocab):
            return h @ table.T + self.output_bias
        padded = self._cache.get(("vocab", h.dtype), (table,), lambda: aligned.pad_rows(table))
        return (h @ padded.T)[..., :vocab] + self.output_bias

    def _projected_queries(self, dtype: torch.dtype) -> Tensor:
        """LayerNorm + query projection of the constant query table, computed once per weight version."""
        attn = self.decoder.layer.attn
        params = (self.queries.embeddings, attn.norm_q.weight, attn.norm_q.bias, attn.q.weight, attn.q.bias)
        return self._cache.get(dtype, params, lambda: attn.q(attn.norm_q(self.queries.embeddings)))


class _ClassifierHead(PerceiverHead):
    """A single learned query decoded to num_labels logits."""

    def _build_classifier(self) -> None:
        d = self.config.d_latents
        self.query = TrainablePositionEncoding(1, d)
        self.decoder = CrossAttentionDecoder(self.config, d, self.config.num_labels, query_residual=True)

    def _classify(self, z: Tensor) -> Tensor:
        return self.decoder(self.query(z.shape[0]), z)[:, 0]


class PerceiverForSequenceClassification(_TextHead, _ClassifierHead):
    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        self._build_classifier()

    def forward(
        self, inputs: Tensor | None = None, attention_mask: Tensor | None = None, input_ids: Tensor | None = None
    ) -> PerceiverOutput:
        z = self._encode(_pick(inputs, input_ids, "input_ids"), attention_mask)
        return PerceiverOutput(self._classify(z), z)


class _ImageClassifier(_ClassifierHead):
    adapter_type: type[LearnedImageAdapter] | type[FourierImageAdapter] | type[ConvImageAdapter]

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        self.input = self.adapter_type(config)
        self.encoder = PerceiverEncoder(config, self.input.num_channels)
        self._build_classifier()
        # In bf16 and fp16 the residual sums stay in fp32: on an H200 (run 11, the published configs) bf16 sums put
        # the three image heads 1.01e-2 to 1.16e-2 from transformers fp32, fp32 sums 7.8e-3 to 9.2e-3, for 13-19%
        # of their throughput (docs/performance.md, "bf16 fidelity"; residual_dtype: model gives it back).
        self.residual_dtype = torch.float32

    def forward(
        self,
        inputs: Tensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> PerceiverOutput:
        pixels = self._float(_pick(inputs, pixel_values, "pixel_values"))
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixel values [B, 3, H, W], got {list(pixels.shape)}")
        z = self.encoder(self.input(pixels, interpolate_pos_encoding), _key_mask(attention_mask, self.device))
        return PerceiverOutput(self._classify(z), z)


class PerceiverForImageClassificationLearned(_ImageClassifier):
    adapter_type = LearnedImageAdapter


class PerceiverForImageClassificationFourier(_ImageClassifier):
    adapter_type = FourierImageAdapter


class PerceiverForImageClassificationConvProcessing(_ImageClassifier):
    adapter_type = ConvImageAdapter


class PerceiverForOpticalFlow(PerceiverHead):
    """patches [B, 2, 27, H, W] → flow logits [B, H, W, 2] (×20 for pixels, see processing.flow)."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        self.input = FlowPatchAdapter(config)
        self.encoder = PerceiverEncoder(config, self.input.num_channels)
        # The query for each pixel is its own preprocessed input; no residual (queries aren't outputs).
        self.decoder = CrossAttentionDecoder(config, self.input.num_channels, 2, query_residual=False)
        # In bf16 and fp16 the residual sums stay in fp32: with bf16 sums the flow output (a 322 -> 2 projection of
        # small activations) is 1.2e-2 from transformers fp32 on some weight draws, 8e-3 with fp32 sums, at a cost
        # of the latent stream's bytes (docs/performance.md, "bf16 fidelity"). No effect in fp32.
        self.residual_dtype = torch.float32

    def forward(self, inputs: Tensor, attention_mask: Tensor | None = None) -> PerceiverOutput:
        patches = self._float(inputs)
        x = self.input(patches)
        z = self.encoder(x, _key_mask(attention_mask, self.device))
        flow = self.decoder(x, z) / 100.0
        return PerceiverOutput(flow.reshape(patches.shape[0], *patches.shape[3:], 2), z)


FAST_CHUNKS = 8  # autoencode()'s default decoder chunk count (see its docstring)


class PerceiverForMultimodalAutoencoding(PerceiverHead):
    """Video + audio + label autoencoder (and Kinetics-700 classifier through the label output)."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__(config)
        self.input = MultimodalAdapter(config)
        self.encoder = PerceiverEncoder(config, self.input.num_channels)
        self.queries = MultimodalQueries(config)
        self.decoder = CrossAttentionDecoder(
            config, self.queries.width, config.output_num_channels, query_residual=False
        )
        out = config.output_num_channels
        self.audio_output = AlignedLinear(out, config.samples_per_patch)
        self.image_output = AlignedLinear(out, 3)
        self.label_output = AlignedLinear(out, config.num_labels)

    def encode(self, inputs: dict[str, Tensor], attention_mask: Tensor | None = None) -> Tensor:
        """Latents [B, N, D] for {"image": [B, T, 3, H, W], "audio": [B, S, 1], "label": [B, K]}."""
        floats = {k: self._float(v) for k, v in inputs.items()}
        return self.encoder(self.input(floats), _key_mask(attention_mask, self.device))

    def decode(self, z: Tensor, audio_points: Tensor, image_points: Tensor) -> dict[str, Tensor]:
        """Outputs at the given flat audio-patch and video-pixel indices (the label is always decoded)."""
        queries = self.queries(z.shape[0], audio_points.to(z.device), image_points.to(z.device), z.dtype)
        h = self.decoder(queries, z)
        n_a, n_i = audio_points.shape[0], image_points.shape[0]
        return {
            "audio": self.audio_output(h[:, :n_a]).reshape(z.shape[0], -1),
            "image": self.image_output(h[:, n_a : n_a + n_i]),
            "label": self.label_output(h[:, n_a + n_i]),
        }

    def forward(
        self,
        inputs: dict[str, Tensor],
        attention_mask: Tensor | None = None,
        subsampled_output_points: dict[str, Tensor | None] | None = None,
    ) -> PerceiverOutput:
        """As transformers: decodes the subsampled points; without them, the whole video (chunked)."""
        z = self.encode(inputs, attention_mask)
        if subsampled_output_points is None:
            return PerceiverOutput(self.decode_all(z, 128), z)
        audio, image = subsampled_output_points.get("audio"), subsampled_output_points.get("image")
        if audio is None or image is None:
            raise ValueError("subsampled_output_points needs both 'audio' and 'image' index tensors")
        return PerceiverOutput(self.decode(z, audio, image), z)

    def autoencode(
        self, inputs: dict[str, Tensor], num_chunks: int | None = None, attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Encoder once, then every output point decoded in ``num_chunks`` query chunks.

        By default the fewest chunks up to FAST_CHUNKS that divide both point counts: on an H200, the
        colab's 128 chunks took 208 ms per video against 59 ms at 8 (fewer, larger GEMMs). The outputs are
        the same for any chunk count.

        Returns {"audio": [B, S], "image": [B, T, H, W, 3], "label": [B, K]}. The reference re-runs the
        encoder for each chunk; since decoder queries are independent, the outputs are the same.
        """
        if num_chunks is None:
            points = self.queries.num_points
            num_chunks = next(c for c in (FAST_CHUNKS, 4, 2, 1) if not points["audio"] % c and not points["image"] % c)
        return self.decode_all(self.encode(inputs, attention_mask), num_chunks)

    def decode_all(self, z: Tensor, num_chunks: int) -> dict[str, Tensor]:
        """Every output point of latents ``z``, decoded in ``num_chunks`` query chunks."""
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
        points = self.queries.num_points
        if points["audio"] % num_chunks or points["image"] % num_chunks:
            raise ValueError(f"num_chunks ({num_chunks}) must divide {points['audio']} and {points['image']}")
        na, ni = points["audio"] // num_chunks, points["image"] // num_chunks
        outs = [
            self.decode(
                z,
                torch.arange(na * k, na * (k + 1), device=z.device),
                torch.arange(ni * k, ni * (k + 1), device=z.device),
            )
            for k in range(num_chunks)
        ]
        return {
            "audio": torch.cat([o["audio"] for o in outs], dim=1),
            "image": torch.cat([o["image"] for o in outs], dim=1).reshape(z.shape[0], *self.queries.image_dims, 3),
            "label": outs[-1]["label"],  # the label query sees the same latents in every chunk
        }


# Every head class is named after its architecture (the transformers class config.json names), so the
# registry is config.ARCHITECTURES with each name resolved to the class of that name in this module.
HEADS: dict[str, type[PerceiverHead]] = {name: globals()[name] for name in ARCHITECTURES}


def build_model(config: PerceiverConfig) -> PerceiverHead:
    """A randomly initialised head of ``config.architecture``."""
    return HEADS[config.architecture](config)
