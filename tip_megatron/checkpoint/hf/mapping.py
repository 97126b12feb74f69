"""Declarative HF <-> Megatron name tables for llama, qwen2 and qwen3, with merge/split rules.

Shapes (h = hidden, d = head_dim, n = attention heads, g = kv heads, F = ffn, V = vocab):
    HF q_proj [n*d, h], k_proj / v_proj [g*d, h]  <->  linear_qkv [(n + 2g)*d, h]
    HF gate_proj / up_proj [F, h]                 <->  linear_fc1 [2F, h] = [gate; up]

The Megatron side is the FULL naming of `tip_megatron.models.state` (TP=1/PP=1 local-spec
names, global layer index, true vocabulary rows). Megatron's fused QKV is laid out per
query group: for each of the g groups, its n/g query heads, then its key head, then its
value head (d rows each); the qkv bias of qwen2 follows the same layout.

Every rule converts one Megatron tensor from/to its HF source tensors, so a caller can
stream: `Rule.to_full(arch, [hf tensors])` needs only that rule's HF tensors in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from tip_megatron.models.arch import ModelArch

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensor(s) it is made of. `{i}` is the layer index."""

    mcore: str
    hf: tuple[str, ...]
    kind: str = COPY
    """copy (same tensor), qkv (merge q, k, v per query group), gate_up (cat gate, up)."""

    def at(self, layer: Optional[int]) -> "Rule":
        if layer is None:
            return self
        return Rule(self.mcore.format(i=layer), tuple(n.format(i=layer) for n in self.hf), self.kind)

    def to_full(self, arch: ModelArch, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """HF tensors (in `self.hf` order) -> the Megatron full tensor."""
        if self.kind == QKV:
            return merge_qkv(arch, *tensors)
        if self.kind == GATE_UP:
            return torch.cat(list(tensors), dim=0)
        return tensors[0]

    def to_hf(self, arch: ModelArch, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The Megatron full tensor -> HF tensors (in `self.hf` order), contiguous."""
        if self.kind == QKV:
            return [t.contiguous() for t in split_qkv(arch, tensor)]
        if self.kind == GATE_UP:
            return [t.contiguous() for t in tensor.chunk(2, dim=0)]
        return [tensor.contiguous()]


# ------------------------------------------------------------------------------ tables
_L = "model.layers.{i}"
_M = "decoder.layers.{i}"

#: Tensors outside the transformer layers. `output_layer` is absent when embeddings are tied.
GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
)

#: Per-layer tensors shared by every family.
LAYER_RULES = (
    Rule(f"{_M}.input_layernorm.weight", (f"{_L}.input_layernorm.weight",)),
    Rule(f"{_M}.self_attention.linear_qkv.weight",
         (f"{_L}.self_attn.q_proj.weight", f"{_L}.self_attn.k_proj.weight",
          f"{_L}.self_attn.v_proj.weight"), QKV),
    Rule(f"{_M}.self_attention.linear_proj.weight", (f"{_L}.self_attn.o_proj.weight",)),
    Rule(f"{_M}.pre_mlp_layernorm.weight", (f"{_L}.post_attention_layernorm.weight",)),
    Rule(f"{_M}.mlp.linear_fc1.weight", (f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"),
         GATE_UP),
    Rule(f"{_M}.mlp.linear_fc2.weight", (f"{_L}.mlp.down_proj.weight",)),
)

#: Family-specific per-layer tensors, on top of LAYER_RULES.
FAMILY_LAYER_RULES = {
    "llama": (),
    "qwen2": (
        Rule(f"{_M}.self_attention.linear_qkv.bias",
             (f"{_L}.self_attn.q_proj.bias", f"{_L}.self_attn.k_proj.bias",
              f"{_L}.self_attn.v_proj.bias"), QKV),
    ),
    "qwen3": (
        Rule(f"{_M}.self_attention.q_layernorm.weight", (f"{_L}.self_attn.q_norm.weight",)),
        Rule(f"{_M}.self_attention.k_layernorm.weight", (f"{_L}.self_attn.k_norm.weight",)),
    ),
}

#: HF buffers some checkpoints carry that are derived from the config, not weights.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


# ------------------------------------------------------------------------------ rules
def global_rules(arch: ModelArch) -> list[Rule]:
    rules = list(GLOBAL_RULES)
    if arch.tie_word_embeddings:
        rules = [r for r in rules if r.mcore != "output_layer.weight"]
    return rules


def layer_rules(arch: ModelArch, layer: int) -> list[Rule]:
    if not 0 <= layer < arch.num_layers:
        raise ValueError(f"layer {layer} is out of range for num_layers={arch.num_layers}")
    return [r.at(layer) for r in LAYER_RULES + FAMILY_LAYER_RULES[arch.family]]


def rules_of(arch: ModelArch, layer: Optional[int]) -> list[Rule]:
    """The rules of one layer, or of the tensors outside the layers (layer=None)."""
    return global_rules(arch) if layer is None else layer_rules(arch, layer)


def all_rules(arch: ModelArch) -> list[Rule]:
    """Every rule, in HF checkpoint order: embedding, layers 0..L-1, final norm, lm_head."""
    head = global_rules(arch)
    rules = head[:1]
    for layer in range(arch.num_layers):
        rules += layer_rules(arch, layer)
    return rules + head[1:]


def mcore_rule(arch: ModelArch, full_name: str) -> Rule:
    """The rule that produces the Megatron full tensor `full_name`."""
    parts = full_name.split(".")
    layer = int(parts[2]) if full_name.startswith("decoder.layers.") else None
    for rule in rules_of(arch, layer):
        if rule.mcore == full_name:
            return rule
    raise KeyError(f"no HF mapping for Megatron tensor {full_name!r} ({arch.family})")


def expected_hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the checkpoint must hold -> its shape under `arch`."""
    h, d, f = arch.hidden_size, arch.kv_channels, arch.ffn_hidden_size
    n, g = arch.num_attention_heads, arch.num_kv_heads
    by_suffix = {
        "embed_tokens.weight": (arch.vocab_size, h), "lm_head.weight": (arch.vocab_size, h),
        "norm.weight": (h,), "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (n * d, h), "k_proj.weight": (g * d, h), "v_proj.weight": (g * d, h),
        "q_proj.bias": (n * d,), "k_proj.bias": (g * d,), "v_proj.bias": (g * d,),
        "o_proj.weight": (h, n * d), "q_norm.weight": (d,), "k_norm.weight": (d,),
        "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
    }
    shapes = {}
    for rule in all_rules(arch):
        for name in rule.hf:
            suffix = ".".join(name.split(".")[-2:])
            shapes[name] = by_suffix[suffix]
    return shapes


# ------------------------------------------------------------------------------ per layer
def hf_to_full(
    arch: ModelArch, hf: Mapping[str, torch.Tensor], layer: Optional[int]
) -> dict[str, torch.Tensor]:
    """One layer's HF tensors (or the non-layer ones, layer=None) -> Megatron full tensors.

    `hf` must hold exactly that layer's HF tensors: a missing or extra name is a KeyError
    naming it.
    """
    rules = rules_of(arch, layer)
    expected = {name for rule in rules for name in rule.hf}
    _check_names(set(hf), expected, "HF", layer)
    return {rule.mcore: rule.to_full(arch, [hf[name] for name in rule.hf]) for rule in rules}


def full_to_hf(
    arch: ModelArch, full: Mapping[str, torch.Tensor], layer: Optional[int]
) -> dict[str, torch.Tensor]:
    """One layer's Megatron full tensors (or the non-layer ones) -> HF tensors."""
    rules = rules_of(arch, layer)
    _check_names(set(full), {rule.mcore for rule in rules}, "Megatron", layer)
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        out.update(zip(rule.hf, rule.to_hf(arch, full[rule.mcore])))
    return out


def _check_names(got: set, expected: set, side: str, layer: Optional[int]) -> None:
    where = f"layer {layer}" if layer is not None else "the non-layer tensors"
    if got - expected:
        raise KeyError(f"unexpected {side} tensor(s) for {where}: {sorted(got - expected)}")
    if expected - got:
        raise KeyError(f"missing {side} tensor(s) for {where}: {sorted(expected - got)}")


# ------------------------------------------------------------------------------ fused QKV
def merge_qkv(arch: ModelArch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n*d, ...], k, v [g*d, ...] -> Megatron's per-query-group [(n + 2g)*d, ...]."""
    g, d = arch.num_kv_heads, arch.kv_channels
    per_group = arch.num_attention_heads // g
    rest = tuple(q.shape[1:])
    grouped = torch.cat(
        [q.reshape(g, per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
    )
    return grouped.reshape(g * (per_group + 2) * d, *rest)


def split_qkv(arch: ModelArch, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv`: [(n + 2g)*d, ...] -> (q [n*d, ...], k [g*d, ...], v [g*d, ...])."""
    g, d = arch.num_kv_heads, arch.kv_channels
    per_group = arch.num_attention_heads // g
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(g, (per_group + 2) * d, *rest)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(g * per_group * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)
