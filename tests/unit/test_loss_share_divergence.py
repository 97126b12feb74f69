"""`q{i}_loss_share` splits the loss actually trained: under every `loss.divergence` the
quadrant loss sums add up to the step's loss_sum, and each share equals a float64
recomputation of that divergence (reference_ops, textbook formulas) summed over the kept
tokens of the quadrant, divided by its sum over all kept tokens.

Through the real output processor and loss function (TP = 1, one micro-batch)."""
from types import SimpleNamespace

import pytest
import torch

from tip_megatron.distill.loss import make_loss_func
from tip_megatron.distill.spec import DistillSpec, LossConfig, MicrobatchContext
from tip_megatron.distill.processor import make_output_processor
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
    results = []
    loss_sum, num_kept, report = make_loss_func(results)(out)
    (result,) = results
    assert report is result.metric_sums and int(num_kept) == int(result.kept_mask.sum()) and result.finite
    # float64 per-token divergence over all [b*s] positions, token order of the loss path
    flat = lambda x: x.transpose(0, 1).reshape(-1, x.shape[-1])  # noqa: E731
    want = ref.divergence(flat(hidden).double() @ weight.double().t(),
                          flat(th).double() @ tw.double().t(), VOCAB, divergence, beta)
    return loss_sum, result, want


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                             ("reverse_kl", 0.5)])
@pytest.mark.parametrize("rule,rho", [("all", 1.0), ("soft_or", 0.5)])
def test_loss_shares_split_the_trained_divergence(divergence, beta, rule, rho):
    loss_sum, result, want = _step(divergence, beta, rule, rho)
    sums = {k[len("tip/"):]: v for k, v in result.metric_sums.items() if k.startswith("tip/")}
    kept, labels = result.kept_mask, result.labels
    assert 0 < int(kept.sum()) <= int(result.signals.response_mask.sum())
    numerators = sum(float(sums[f"loss_q{i}"]) for i in range(1, 5))
    assert numerators == pytest.approx(float(loss_sum), rel=1e-5)
    shares = finalize(sums)
    total = float(want[kept].sum())
    assert sum(shares[f"q{i}_loss_share"] for i in range(1, 5)) == pytest.approx(1.0, abs=1e-9)
    for i in range(1, 5):
        expect = float(want[kept & (labels == i)].sum()) / total
        assert shares[f"q{i}_loss_share"] == pytest.approx(expect, rel=1e-5, abs=1e-7), i


def _result(ctx, spec, hidden, weight):
    results = []
    out = make_output_processor(spec)(hidden_states=hidden, output_layer=SimpleNamespace(weight=weight),
                                      output_weight=None, context=ctx)
    loss_sum, _, report = make_loss_func(results)(out)
    return loss_sum, report, results[0]


def test_non_finite_statistics_travel_as_a_flag_not_as_a_nan_loss():
    """A non-finite teacher state: the result says `finite=False`. A pre-pass's
    `finite=False` reaches the result while the loss stays the number the same kept tokens
    give with `finite=True` (the skip is the trainer's decision, not a NaN in the loss)."""
    from dataclasses import replace

    from tip_megatron.distill.loss import build_signals
    from tip_megatron.distill.spec import Preselection

    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(S, B, H, generator=g), torch.randn(VOCAB, H, generator=g)
    th, tw = torch.randn(S, B, H_T, generator=g), torch.randn(VOCAB, H_T, generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 2:9], mask[1, 4:11] = True, True
    ctx = MicrobatchContext(th, tw, mask, torch.tensor([0, 1]))
    spec = DistillSpec(SelectionConfig(rule="soft_or", rho=0.5, scope="rollout"), LossConfig(), VOCAB, None)
    assert _result(ctx, spec, hidden, weight)[2].finite
    poisoned = th.clone()
    poisoned[10, 1, 0] = float("inf")  # row 1, position 10: a target position
    assert not _result(replace(ctx, teacher_hidden=poisoned), spec, hidden, weight)[2].finite
    signals, finite = build_signals(_flat(hidden), weight, ctx, spec)
    kept = torch.zeros(B * S, dtype=torch.bool)
    kept[[3, 5, S + 6]] = True
    for flag in (True, False):
        pre = replace(ctx, preselection=Preselection(signals, kept, finite=flag))
        loss_sum, report, result = _result(pre, spec, hidden, weight)
        assert result.finite is flag and torch.isfinite(loss_sum)
        assert torch.equal(result.kept_mask, kept) and report is result.metric_sums
        if flag:
            clean = loss_sum
    assert float(loss_sum) == float(clean)


def _flat(x):
    return x.transpose(0, 1).reshape(-1, x.shape[-1])
