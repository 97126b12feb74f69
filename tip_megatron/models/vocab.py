"""Padded-vocabulary handling for vocab-parallel logits.

Megatron pads the vocabulary to a multiple of 128 * tp; those rows are not tokens and
must never receive probability mass. Shapes: logits [..., V/tp].
"""
from __future__ import annotations

import torch

from tip_megatron.runtime.groups import group_rank


def shard_vocab_range(shard_width: int, tp_group) -> tuple[int, int]:
    """[start, end) of the global vocabulary ids held by this TP rank (tp_group None:
    unsharded, as in `ops`; not the world's rank, which would shift a DP rank's columns)."""
    rank = group_rank(tp_group)
    return rank * shard_width, (rank + 1) * shard_width


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """A copy of `logits` with columns of global id >= vocab_size set to -inf
    (the input itself is returned when this shard holds no padding)."""
    start, end = shard_vocab_range(logits.shape[-1], tp_group)
    if end <= vocab_size:
        return logits
    ids = torch.arange(start, end, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))
