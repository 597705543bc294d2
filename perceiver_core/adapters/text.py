"""UTF-8 byte ids → token + learned position embeddings."""

from __future__ import annotations

from torch import Tensor, nn

from ..config import PerceiverConfig


class TextAdapter(nn.Module):
    """ids [B, L] → [B, L, d_model]."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.d_model)

    @property
    def num_channels(self) -> int:
        return self.token_embedding.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(
                f"sequence of {length} ids exceeds max_position_embeddings ({self.position_embedding.num_embeddings}); "
                "truncate it (the tokenizer does)"
            )
        return self.token_embedding(ids) + self.position_embedding.weight[:length]
