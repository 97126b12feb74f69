"""The local spec's core attention through `torch.nn.functional.scaled_dot_product_attention`.

Shapes: query [sq, b, np, hn], key / value [sk, b, ng, hn] (np heads and ng query groups of
this TP rank), output [sq, b, np * hn]: megatron's `DotProductAttention` contract.

megatron's `DotProductAttention` (the local spec's, the one that runs on CPU) materialises
the [b, np, sq, sk] scores (baddbmm into a global buffer), builds the causal mask, runs its
softmax, then a bmm, and keeps the probabilities for backward. For the causal attention of
our models without dropout, SDPA computes the same function with one fused kernel (flash
attention on CPU and GPU), keeps only the log-sum-exp for backward and never builds the mask:
on the v32k teacher it removes ~0.5 s of a 2.8 s forward (tools/bench_teacher_stage.py,
docs/performance.md) and the [b, np, s, s] activations of every student layer. Same numbers
up to float rounding (tests/unit/test_attention.py compares forward and gradients in float64
against megatron's).

Anything SDPA would not compute the same way goes to megatron's own path: an explicit
attention mask, a mask type other than causal, attention dropout while training, query-key
layer scaling, windowed attention, or a softmax type other than vanilla.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SdpaAttention(DotProductAttention):
    """megatron's `DotProductAttention` whose causal, dropout-free case runs as one SDPA
    call (the same constructor, attributes and state dict: a layer-spec submodule)."""

    def _sdpa_applies(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        dropout = self.attention_dropout.p if self.training else 0.0
        return (attention_mask is None and mask_type == AttnMaskType.causal and attention_bias is None
                and packed_seq_params is None and dropout == 0.0 and self.softmax_offset is None
                and not self.config.apply_query_key_layer_scaling
                and self.scale_mask_softmax.window_size is None)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None):
        if query.shape[0] != key.shape[0] or not self._sdpa_applies(
                attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b = query.shape[0], query.shape[1]
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        # query i sees keys 0..i (sq == sk: the whole sequence, as megatron's causal mask)
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
