"""The local spec's core attention (`models/attention.py`): SDPA against megatron's own
`DotProductAttention` in float64, forward and gradients, with and without grouped queries;
megatron's path kept for what SDPA would compute differently (an explicit mask, attention
dropout while training); the local spec builds it."""
import pytest
import torch

from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch


def _config(heads: int, groups: int, dropout: float = 0.0):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=16 * heads, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=16, attention_dropout=dropout,
                             hidden_dropout=0.0, params_dtype=torch.float64)


def _pair(config):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from tip_megatron.models.attention import SdpaAttention

    return [cls(config, 1, AttnMaskType.causal, "self") for cls in (DotProductAttention, SdpaAttention)]


def _inputs(heads: int, groups: int, s: int = 12, b: int = 3):
    gen = torch.Generator().manual_seed(heads * 10 + groups)
    q = torch.randn(s, b, heads, 16, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(s, b, groups, 16, dtype=torch.float64, generator=gen) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


def _run(module, inputs, mask=None):
    out = module(*inputs, mask)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                inputs)
    return out, grads


def _checks(arch):
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.attention import SdpaAttention
    from tip_megatron.runtime import parallel

    g = parallel.initialize(parallel.ParallelLayout(), seed=0)
    found = {}
    for heads, groups in ((4, 4), (4, 2), (4, 1)):
        megatron_, ours = _pair(_config(heads, groups))
        inputs = _inputs(heads, groups)
        (ref, ref_grads), (got, got_grads) = _run(megatron_, inputs), _run(ours, inputs)
        found[(heads, groups)] = (float((got - ref).abs().max()),
                                  max(float((a - b).abs().max()) for a, b in zip(got_grads, ref_grads)))
    # megatron's path: an explicit mask (here: every key of a row visible), dropout in training
    megatron_, ours = _pair(_config(4, 2))
    inputs = _inputs(4, 2)
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)  # megatron: True = masked out
    explicit = torch.equal(_run(ours, inputs, mask)[0], _run(megatron_, inputs, mask)[0])
    megatron_, ours = _pair(_config(4, 2, dropout=0.5))
    ours.train()
    dropout_falls_back = not ours._sdpa_applies(None, None, None, None)
    ours.eval()
    eval_uses_sdpa = ours._sdpa_applies(None, None, None, None)
    chunks = build_model(arch, g, BuildOptions(init_weights=True))
    built = {type(layer.self_attention.core_attention) for layer in chunks[0].decoder.layers}
    return found, explicit, dropout_falls_back, eval_uses_sdpa, built == {SdpaAttention}


@pytest.fixture(scope="module")
def checks():
    return run_distributed(_checks, 1, args=(tiny_arch("llama"),))[0]


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"])
def test_sdpa_equals_megatrons_attention_in_float64(checks, heads, groups):
    forward, grads = checks[0][(heads, groups)]
    assert forward < 1e-12 and grads < 1e-12, (forward, grads)


def test_megatrons_path_where_sdpa_would_differ(checks):
    _, explicit, dropout_falls_back, eval_uses_sdpa, _ = checks
    assert explicit, "an explicit attention mask must take megatron's own path"
    assert dropout_falls_back and eval_uses_sdpa


def test_the_local_spec_builds_it(checks):
    assert checks[4]
