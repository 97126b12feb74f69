"""Tiny random Hugging Face models for converter tests (no downloads; needs transformers).

    model = tiny_hf_model("qwen3", tie_word_embeddings=True)
    model.save_pretrained(path)            # safetensors + config.json
"""
from __future__ import annotations

import torch

#: One small config per family: GQA (8 heads, 2 kv heads), vocab not a multiple of 128
#: so that TP padding is real, 4 layers so that PP=2 has two per stage.
_BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-6, tie_word_embeddings=False)
_FAMILY = {
    "llama": dict(),
    "qwen2": dict(),
    "qwen3": dict(head_dim=12),  # head_dim != hidden / heads, as in real Qwen3 models
}
#: Llama 3.x RoPE scaling (megatron-core supports only `factor` varying). rope_theta is
#: Llama 3's, so that with head_dim 8 some wavelengths fall in the smoothed band and some
#: in the scaled one: the scaling changes the logits measurably even at short lengths.
LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling=dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192))


def tiny_hf_config(family: str, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    kwargs = {**_BASE, **_FAMILY[family], **overrides}
    return cls(**kwargs)


@torch.no_grad()
def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A random fp32 causal LM in eval mode. Every tensor is redrawn (HF zero-inits biases
    and one-inits norms, which would hide a wrong mapping of those)."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(0.15 * noise)
    return model


@torch.no_grad()
def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab] fp32 logits of an HF causal LM."""
    return model(input_ids=input_ids).logits.float()
