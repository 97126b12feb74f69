"""Next-token cross entropy on vocab-parallel logits (supervised pre-training of the tiny
quickstart models, `tip-megatron demo`, the loss of the parallel-parity tests), its
megatron forward_step, and random-token batches for smoke runs.

Shapes: logits [b, s, V/tp] (vocab-parallel shard), labels / loss_mask [b, s].
"""
from __future__ import annotations

from functools import partial

import torch

from tip_megatron.models.arch import ModelArch
from tip_megatron.models.vocab import mask_padded_vocab


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, *, vocab_size: int, tp_group
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Megatron's loss contract: (loss_sum, num_tokens, report).

    Padded vocabulary columns (global index >= vocab_size) are masked to -inf first, so
    they carry no probability mass. megatron's vocab_parallel_cross_entropy overwrites fp32
    logits in place; the masked copy is ours, so nobody else reads what it overwrites.
    """
    # heavy: megatron.core takes ~10 s to import; config checks reach this module (built-ins)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    masked = mask_padded_vocab(logits.float(), vocab_size, tp_group)
    per_token = vocab_parallel_cross_entropy(masked, labels, tp_group=tp_group)
    mask = loss_mask.float()
    loss_sum = (per_token * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum()])
    return loss_sum, num_tokens, {"lm_loss": report}


def lm_forward_step(arch: ModelArch, tp_group, data_iterator, model):
    """megatron forward_step_func for next-token cross entropy on `lm_batches`-style dicts."""
    batch = next(data_iterator)
    output = model(batch["input_ids"], batch["position_ids"], None)
    return output, partial(_batch_loss, arch, tp_group, batch)


def _batch_loss(arch: ModelArch, tp_group, batch: dict, logits: torch.Tensor):
    return lm_loss(logits, batch["labels"], batch["loss_mask"], vocab_size=arch.vocab_size, tp_group=tp_group)


def lm_batches(arch: ModelArch, num: int, batch: int, seq: int, seed: int) -> list[dict]:
    """`num` micro-batches of random token sequences with next-token labels; the first
    quarter of each sequence is a "prompt" that carries no loss."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, arch.vocab_size, (batch, seq + 1), generator=gen)
        mask = torch.ones(batch, seq)
        mask[:, : seq // 4] = 0
        out.append(dict(
            input_ids=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
            loss_mask=mask, position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
        ))
    return out
