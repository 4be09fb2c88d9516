"""A pretrained transformer's taps and their poolings over tokens (kind "text", branching.models.kinds.text).

The transformer itself (branching.models.encoder) is frozen and costly, so it runs once per text: it turns the
text into one vector per tap and pooling (every pooling of TEXT_POOLS at the embeddings and at each layer, as
deep as the tree reads), and those vectors, standardised, are the parent's inputs (an EncodedNet,
branching.models.encoded): by default its head reads the last layer, mean-pooled, the sentence embedding of a
sentence-transformers model.
"""

from __future__ import annotations

import torch

TEXT_POOLS = ("mean", "cls", "max", "last")  # over the attention mask: the mean, the first token, the max, the last
DEFAULT_MAX_LENGTH = 128
MAX_LENGTHS = (8, 8192)


def tap_names(layers: int) -> list[str]:
    """The taps of a transformer of `layers` layers: the embeddings, then each layer's output."""
    return ["embeddings", *(f"layer{i}" for i in range(layers))]


def pool_tokens(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Token states (B, T, W) of texts with attention mask (B, T) made vectors (B, W)."""
    mask = mask.to(states.dtype)
    if how == "mean":
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if how == "cls":
        return states[:, 0]
    if how == "max":
        return states.masked_fill(mask[..., None] == 0, float("-inf")).amax(1)
    if how == "last":
        last = mask.sum(1).long().clamp_min(1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]  # shape[0]: an exported graph's free batch
    raise ValueError(f"unknown text pool {how!r}; use one of {', '.join(TEXT_POOLS)}")
