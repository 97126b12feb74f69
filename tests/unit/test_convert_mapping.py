"""The HF <-> Megatron name tables and split/merge rules (pure tensor code, no megatron)."""
import pytest
import torch

from tip_megatron.checkpoint.hf.mapping import (
    all_rules, expected_hf_shapes, full_to_hf, hf_to_full, mcore_rule, merge_qkv, split_qkv,
)
from tip_megatron.models.arch import ModelArch
from tip_megatron.testing.models import tiny_arch

ARCHS = {
    "llama": tiny_arch("llama"),
    "llama_tied_mha": tiny_arch("llama", num_kv_heads=8, tie_word_embeddings=True),
    "qwen2": tiny_arch("qwen2"),
    "qwen3": tiny_arch("qwen3"),
}


def _random_hf(arch: ModelArch) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in expected_hf_shapes(arch).items()}


def test_qkv_is_laid_out_per_query_group():
    """Megatron's fused QKV: for each kv group, its query heads, then its key, then its value."""
    arch = tiny_arch("llama", num_attention_heads=8, num_kv_heads=2)  # 4 query heads per group
    d = arch.kv_channels
    head = lambda tag, i: torch.full((d, 1), float(tag * 100 + i))  # noqa: E731
    q = torch.cat([head(1, i) for i in range(8)])
    k = torch.cat([head(2, i) for i in range(2)])
    v = torch.cat([head(3, i) for i in range(2)])
    merged = merge_qkv(arch, q, k, v)
    order = [int(x) for x in merged[::d, 0].tolist()]
    assert order == [100, 101, 102, 103, 200, 300, 104, 105, 106, 107, 201, 301]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(arch, merged), (q, k, v)))


def test_qkv_bias_uses_the_same_layout():
    arch = ARCHS["qwen2"]
    d, g = arch.kv_channels, arch.num_kv_heads
    q, k, v = torch.arange(8 * d) * 1.0, 1000 + torch.arange(g * d) * 1.0, 2000 + torch.arange(g * d) * 1.0
    weight = merge_qkv(arch, q[:, None].expand(-1, 3), k[:, None].expand(-1, 3), v[:, None].expand(-1, 3))
    assert torch.equal(merge_qkv(arch, q, k, v), weight[:, 0])


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_hf_full_hf_is_exact_per_layer(name):
    arch = ARCHS[name]
    hf = _random_hf(arch)
    for layer in [None] + list(range(arch.num_layers)):
        prefix = "model.layers." if layer is not None else None
        mine = {n: t for n, t in hf.items()
                if (n.startswith(f"model.layers.{layer}.") if prefix else not n.startswith("model.layers."))}
        full = hf_to_full(arch, mine, layer)
        back = full_to_hf(arch, full, layer)
        assert set(back) == set(mine)
        assert all(torch.equal(back[n], mine[n]) and back[n].is_contiguous() for n in mine)


def test_family_tables():
    names = lambda arch: {r.mcore for r in all_rules(arch)}  # noqa: E731
    assert "output_layer.weight" not in names(ARCHS["llama_tied_mha"])
    assert "output_layer.weight" in names(ARCHS["llama"])
    assert "decoder.layers.3.self_attention.linear_qkv.bias" in names(ARCHS["qwen2"])
    assert not any("bias" in n for n in names(ARCHS["llama"]) | names(ARCHS["qwen3"]))
    qwen3 = names(ARCHS["qwen3"])
    assert {"decoder.layers.0.self_attention.q_layernorm.weight",
            "decoder.layers.0.self_attention.k_layernorm.weight"} <= qwen3
    rule = mcore_rule(ARCHS["qwen3"], "decoder.layers.2.self_attention.q_layernorm.weight")
    assert rule.hf == ("model.layers.2.self_attn.q_norm.weight",)
    assert mcore_rule(ARCHS["llama"], "decoder.layers.1.mlp.linear_fc1.weight").hf == (
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(KeyError, match="no HF mapping"):
        mcore_rule(ARCHS["llama"], "decoder.layers.0.self_attention.q_layernorm.weight")


def test_gate_up_is_cat_gate_then_up():
    arch = ARCHS["llama"]
    rule = mcore_rule(arch, "decoder.layers.0.mlp.linear_fc1.weight")
    gate, up = torch.zeros(96, 64), torch.ones(96, 64)
    fc1 = rule.to_full(arch, [gate, up])
    assert fc1.shape == (192, 64) and fc1[:96].sum() == 0 and fc1[96:].min() == 1


def test_wrong_layer_tensors_are_named():
    arch = ARCHS["llama"]
    hf = {n: t for n, t in _random_hf(arch).items() if n.startswith("model.layers.0.")}
    missing = dict(hf)
    missing.pop("model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(KeyError, match="missing HF tensor.*k_proj"):
        hf_to_full(arch, missing, 0)
    with pytest.raises(KeyError, match="unexpected HF tensor.*extra"):
        hf_to_full(arch, {**hf, "model.layers.0.extra": torch.zeros(1)}, 0)
    with pytest.raises(ValueError, match="out of range"):
        hf_to_full(arch, hf, arch.num_layers)
