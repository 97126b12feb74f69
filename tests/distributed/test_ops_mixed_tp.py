"""The per-token divergence mix of the fused output-layer loss (`ops.mixed`, `loss.mix`) at
TP = 1, 2 and 4 (gloo, CPU) against float64 autograd on the unsharded weights: value, the
gradient w.r.t. the (replicated) hidden state and w.r.t. each rank's output-weight shard,
with per-token coefficients (zeros included), token weights, padded vocabularies, and the
collectives per chunk (without a JSD part: as many as the reverse KL alone)."""
import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from tip_megatron.ops import fused_linear_divergence
from tip_megatron.ops.mixed import MixedDivergence
from tip_megatron.testing import reference_ops as ref
from tip_megatron.testing.distributed import run_distributed

PADDED, K = 24, 10


@pytest.fixture(scope="module", autouse=True)
def _megatron_imported_before_fork():
    import megatron.core.parallel_state  # noqa: F401


def _inputs(use_jsd: bool):
    g = torch.Generator().manual_seed(5)
    coefs = torch.rand(K, 3, generator=g)
    coefs[::3, 1] = 0.0  # some tokens reverse KL only
    coefs[1::4, 0] = 0.0
    if not use_jsd:
        coefs[:, 2] = 0.0
    return (torch.randn(K, 6, generator=g), torch.randn(PADDED, 6, generator=g),
            torch.randn(K, 5, generator=g), torch.randn(PADDED, 5, generator=g),
            torch.rand(K, generator=g), coefs)


def _reference(inputs, vocab_size, beta):
    hidden, weight, th, tw, tok_w, coefs = inputs
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    s, t = h @ w.t(), th.double() @ tw.double().t()
    parts = [ref.divergence(s, t, vocab_size, name, beta) for name in ("reverse_kl", "forward_kl", "jsd")]
    per_token = sum(coefs[:, i].double() * p for i, p in enumerate(parts))
    loss = (per_token * tok_w.double()).sum()
    loss.backward()
    return loss.detach(), per_token.detach(), h.grad, w.grad


def _rank_main(vocab_size: int) -> str:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    rows = slice(rank * PADDED // tp, (rank + 1) * PADDED // tp)
    for use_jsd, beta in ((False, 0.5), (True, 0.5), (True, 0.2)):
        inputs = _inputs(use_jsd)
        hidden, weight, th, tw, tok_w, coefs = inputs
        loss_r, value_r, gh_r, gw_r = _reference(inputs, vocab_size, beta)
        for chunk_size in (1, 3, K):
            h, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
            counts, original = Counter(), dist.all_reduce

            def counting(*a, **kw):
                counts["n"] += 1
                return original(*a, **kw)
            dist.all_reduce = counting
            try:
                loss, value = fused_linear_divergence(
                    h, w, th, tw[rows].clone(), tp_group=dist.group.WORLD, vocab_size=vocab_size,
                    token_weights=tok_w, chunk_size=chunk_size,
                    divergence=MixedDivergence(coefs, beta=beta, use_jsd=use_jsd))
                loss.backward()
            finally:
                dist.all_reduce = original
            tag = f"jsd={use_jsd} beta={beta} c={chunk_size}"
            assert_close(loss.double(), loss_r, **ref.FP32_TOL, msg=f"loss {tag}")
            assert_close(value.double(), value_r, **ref.FP32_TOL, msg=f"value {tag}")
            assert_close(h.grad.double(), gh_r, **ref.FP32_TOL, msg=f"grad hidden {tag}")
            assert_close(w.grad.double(), gw_r[rows], **ref.FP32_TOL, msg=f"grad weight {tag}")
            assert (w.grad[max(0, vocab_size - rows.start):] == 0).all()  # padding: no gradient
            if tp > 1:  # forward: 2 per chunk (+3 with the JSD); backward: the hidden gradient
                per_chunk = 5 if use_jsd else 2
                assert counts["n"] == per_chunk * math.ceil(K / chunk_size) + 1, (tag, counts["n"])
    return "ok"


@pytest.mark.parametrize("tp, vocab_size", [(1, 24), (2, 19), (4, 13)], ids=["tp1", "tp2", "tp4"])
def test_mix_matches_float64_reference(tp, vocab_size):
    assert run_distributed(_rank_main, world_size=tp, args=(vocab_size,), timeout_s=300) == ["ok"] * tp


def test_coefficient_shape_is_checked():
    h, w = torch.randn(4, 3), torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"\[k, 3\] = \[4, 3\]"):
        fused_linear_divergence(h, w, h, w, tp_group=None, vocab_size=8,
                                divergence=MixedDivergence(torch.ones(3, 3)))
