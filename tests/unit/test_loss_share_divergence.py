"""`q{i}_loss_share` splits the loss actually trained: under every `loss.divergence` the
quadrant loss sums add up to the step's loss_sum, and each share equals a float64
recomputation of that divergence (reference_ops, textbook formulas) summed over the kept
tokens of the quadrant, divided by its sum over all kept tokens.

Through the real output processor and loss_func (TP = 1, one micro-batch)."""
from types import SimpleNamespace

import pytest
import torch

from tip_megatron.distill.loss import (
    DistillSpec, LossConfig, MicrobatchContext, loss_func, make_output_processor,
)
from tip_megatron.testing import reference_ops as ref
from tip_megatron.tip import SelectionConfig, finalize

S, B, H, H_T, VOCAB = 12, 2, 6, 5, 19


def _step(divergence, beta, rule, rho):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(S, B, H, generator=g)
    weight, th, tw = torch.randn(VOCAB, H, generator=g), torch.randn(S, B, H_T, generator=g), torch.randn(VOCAB, H_T, generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 3:], mask[1, 5:10] = True, True
    ctx = MicrobatchContext(th, tw, mask, torch.tensor([0, 1]))
    spec = DistillSpec(SelectionConfig(rule=rule, rho=rho, scope="rollout" if rule != "all" else "auto"),
                       LossConfig(divergence=divergence, jsd_beta=beta), VOCAB, None)
    out = make_output_processor(spec)(hidden_states=hidden, output_layer=SimpleNamespace(weight=weight),
                                      output_weight=None, context=ctx)
    loss_sum, _, report = loss_func(out)
    # float64 per-token divergence over all [b*s] positions, token order of the loss path
    flat = lambda x: x.transpose(0, 1).reshape(-1, x.shape[-1])  # noqa: E731
    want = ref.divergence(flat(hidden).double() @ weight.double().t(),
                          flat(th).double() @ tw.double().t(), VOCAB, divergence, beta)
    return loss_sum, report, want


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                             ("reverse_kl", 0.5)])
@pytest.mark.parametrize("rule,rho", [("all", 1.0), ("soft_or", 0.5)])
def test_loss_shares_split_the_trained_divergence(divergence, beta, rule, rho):
    loss_sum, report, want = _step(divergence, beta, rule, rho)
    sums = {k[len("tip/"):]: v for k, v in report.items() if k.startswith("tip/")}
    kept, labels = report["kept_mask"], report["quadrants"]
    assert 0 < int(kept.sum()) <= int(report["signals"].response_mask.sum())
    numerators = sum(float(sums[f"loss_q{i}"]) for i in range(1, 5))
    assert numerators == pytest.approx(float(loss_sum), rel=1e-5)
    shares = finalize(sums)
    total = float(want[kept].sum())
    assert sum(shares[f"q{i}_loss_share"] for i in range(1, 5)) == pytest.approx(1.0, abs=1e-9)
    for i in range(1, 5):
        expect = float(want[kept & (labels == i)].sum()) / total
        assert shares[f"q{i}_loss_share"] == pytest.approx(expect, rel=1e-5, abs=1e-7), i
