"""Tiny models and batches for tests and smoke runs (no downloads)."""
from __future__ import annotations

from functools import partial

import torch

from tip_megatron.models.arch import ModelArch
from tip_megatron.models.lm import lm_loss


def tiny_arch(family: str = "llama", **overrides) -> ModelArch:
    """A 4-layer model of each family; vocab not a multiple of 128 so TP padding is real."""
    base = dict(
        family=family, vocab_size=250, hidden_size=64, num_layers=4, num_attention_heads=8,
        num_kv_heads=4, ffn_hidden_size=96, max_position_embeddings=64, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        head_dim=12 if family == "qwen3" else None,
    )
    base.update(overrides)
    return ModelArch(**base)


def lm_batches(arch: ModelArch, num: int, batch: int, seq: int, seed: int) -> list[dict]:
    """`num` micro-batches of random token sequences with next-token labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, arch.vocab_size, (batch, seq + 1), generator=gen)
        mask = torch.ones(batch, seq)
        mask[:, : seq // 4] = 0  # a "prompt" that carries no loss
        out.append(dict(
            input_ids=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
            loss_mask=mask, position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
        ))
    return out


def lm_forward_step(arch: ModelArch, tp_group, data_iterator, model):
    """megatron forward_step_func for next-token cross entropy."""
    batch = next(data_iterator)
    output = model(batch["input_ids"], batch["position_ids"], None)
    return output, partial(_loss, arch, tp_group, batch)


def _loss(arch, tp_group, batch, logits):
    return lm_loss(logits, batch["labels"], batch["loss_mask"], vocab_size=arch.vocab_size, tp_group=tp_group)
