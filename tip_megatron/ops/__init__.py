"""Vocab-parallel primitives: statistics, reverse KL with its gradient, fused output-layer
loss and sampling, on logits sharded over the vocabulary by tensor parallelism.

Every op takes an explicit `tp_group` (None = unsharded) and the TRUE `vocab_size`; none
reads megatron's global process groups, gathers the vocabulary, or modifies its inputs.
See docs/ops.md for the math, the collectives and the tolerances.
"""
from tip_megatron.ops.candidates import global_top_k, vocab_parallel_rank, vocab_parallel_topk_mass
from tip_megatron.ops.fused_linear_kl import fused_linear_divergence, unfused_linear_divergence
from tip_megatron.ops.reverse_kl import vocab_parallel_reverse_kl
from tip_megatron.ops.sampling import vocab_parallel_sample
from tip_megatron.ops.topk_divergence import TopkSignal, topk_linear_divergence
from tip_megatron.ops.vocab_parallel import TokenStats, check_vocab_compat, vocab_parallel_stats

__all__ = [
    "TokenStats",
    "TopkSignal",
    "check_vocab_compat",
    "fused_linear_divergence",
    "topk_linear_divergence",
    "global_top_k",
    "unfused_linear_divergence",
    "vocab_parallel_rank",
    "vocab_parallel_reverse_kl",
    "vocab_parallel_sample",
    "vocab_parallel_stats",
    "vocab_parallel_topk_mass",
]
