"""Input adapters: turn one modality's tensors into the encoder's [B, M, C] input array."""
