"""Next-token cross entropy on vocab-parallel logits (supervised pre-training of the tiny
quickstart models, and the loss of the parallel-parity tests).

Shapes: logits [b, s, V/tp] (vocab-parallel shard), labels / loss_mask [b, s].
"""
from __future__ import annotations

import torch

from tip_megatron.models.vocab import mask_padded_vocab


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, *, vocab_size: int, tp_group
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Megatron's loss contract: (loss_sum, num_tokens, report).

    Padded vocabulary columns (global index >= vocab_size) are masked to -inf first, so
    they carry no probability mass. megatron's vocab_parallel_cross_entropy overwrites fp32
    logits in place; the masked copy is ours, so nobody else reads what it overwrites.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    masked = mask_padded_vocab(logits.float(), vocab_size, tp_group)
    per_token = vocab_parallel_cross_entropy(masked, labels, tp_group=tp_group)
    mask = loss_mask.float()
    loss_sum = (per_token * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum()])
    return loss_sum, num_tokens, {"lm_loss": report}
