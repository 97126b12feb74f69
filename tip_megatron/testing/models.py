"""Tiny model architectures for tests (no downloads)."""
from __future__ import annotations

from tip_megatron.models.arch import ModelArch


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
