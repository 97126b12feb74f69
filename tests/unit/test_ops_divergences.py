"""The fused output-layer loss for every `loss.divergence` against the float64 reference
(value, and gradient w.r.t. hidden and output weight), at TP = 1 with padded vocabulary.

TP = 2 / 4 is in tests/distributed/test_ops_tensor_parallel.py.
"""
import pytest
import torch
from torch.testing import assert_close

from tip_megatron.distill.spec import LossConfig
from tip_megatron.ops import fused_linear_divergence
from tip_megatron.ops.divergences import Divergence
from tip_megatron.testing import reference_ops as ref

K, H, H_T, WIDTH, VOCAB = 10, 6, 5, 24, 21
CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, H, generator=g), torch.randn(WIDTH, H, generator=g),
            torch.randn(K, H_T, generator=g), torch.randn(WIDTH, H_T, generator=g),
            torch.rand(K, generator=g))


def _fused(inputs, divergence, chunk_size):
    hidden, weight, th, tw, tok_w = inputs
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, per_token = fused_linear_divergence(h, w, th, tw, tp_group=None, vocab_size=VOCAB,
                                              token_weights=tok_w, chunk_size=chunk_size,
                                              divergence=divergence)
    loss.backward()
    return loss.detach(), per_token, h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("name,beta", CASES)
def test_fused_divergence_matches_float64(name, beta, chunk_size):
    inputs = _inputs()
    got = _fused(inputs, Divergence(name, beta), chunk_size)
    want = ref.linear_divergence(*inputs, VOCAB, name, beta)
    for label, a, b in zip(("loss", "value", "grad_hidden", "grad_weight"), got, want):
        assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=label)
    assert (got[3][VOCAB:] == 0).all()  # padded vocabulary rows get no gradient
    assert float(got[1].min()) > 0.0


def test_divergences_differ_and_vanish_on_identical_models():
    hidden, weight, _, _, tok_w = _inputs()
    values = {n: _fused((hidden, weight, hidden, weight, tok_w), Divergence(n), 4) for n in
              ("reverse_kl", "forward_kl", "jsd")}
    for loss, per_token, grad_h, grad_w in values.values():
        assert float(per_token.abs().max()) < 1e-6 and float(grad_h.abs().max()) < 1e-6
    inputs = _inputs(seed=1)
    losses = [float(_fused(inputs, Divergence(n), 4)[0]) for n in ("reverse_kl", "forward_kl", "jsd")]
    assert len({round(x, 4) for x in losses}) == 3


def test_jsd_bf16_close_to_float64():
    inputs = _inputs()
    bf16 = tuple(x.bfloat16() if x.dim() == 2 else x for x in inputs)
    got = _fused(bf16, Divergence("jsd", 0.3), 4)
    want = ref.linear_divergence(*bf16, VOCAB, "jsd", 0.3)
    for label, a, b in zip(("loss", "value", "grad_hidden", "grad_weight"), got, want):
        assert_close(a.double(), b, rtol=2e-2, atol=2e-2, msg=label)


@pytest.mark.parametrize("kwargs,match", [
    ({"divergence": "kl"}, r"loss.divergence='kl': accepted values are \['reverse_kl', 'forward_kl', 'jsd'\]"),
    ({"divergence": "jsd", "jsd_beta": 0.0}, r"loss.jsd_beta=0.0: must be in the open interval \(0, 1\)"),
    ({"divergence": "jsd", "jsd_beta": 1.0}, r"loss.jsd_beta=1.0"),
    ({"divergence": "jsd", "jsd_beta": 1.5}, r"loss.jsd_beta=1.5"),
    ({"divergence": "forward_kl", "impl": "unfused"}, r"loss.impl='unfused'.*reverse_kl"),
])
def test_loss_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_fused_keeps_nothing_vocab_sized_for_backward(name):
    """What autograd saves is the [k, h] hidden gradient and the [V/tp, h] weight gradient:
    the gradients are computed in the forward, chunk by chunk, as for reverse_kl."""
    hidden, weight, th, tw, tok_w = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                  lambda t: t):
        loss, _ = fused_linear_divergence(h, w, th, tw, tp_group=None, vocab_size=VOCAB,
                                          token_weights=tok_w, chunk_size=3,
                                          divergence=Divergence(name, 0.4))
    assert sorted(saved) == sorted([(K, H), (WIDTH, H)])
