"""Selection metrics: values against numpy, additivity over micro-batches, empty selections."""
import math

import numpy as np
import pytest
import torch

from tip_megatron.tip import (
    METRIC_SUM_KEYS, QuadrantRule, SelectionConfig, all_reduce_metric_sums, concat_signals,
    finalize, quadrant_labels, select, selection_metric_sums, sum_metric_sums,
)
from tip_megatron.testing.synthetic_signals import pack, synthetic_rollouts


def _report(sig, kept):
    return selection_metric_sums(sig, kept, quadrant_labels(sig, QuadrantRule()))


def test_metrics_match_reference():
    sig = pack(synthetic_rollouts(seed=4, num_rollouts=5, max_response=30))
    kept = select(SelectionConfig(rule="soft_or", rho=0.4), sig)
    got = finalize(_report(sig, kept))
    mask, k = sig.response_mask.numpy(), kept.numpy()
    h, d, f = (x.numpy() for x in (sig.entropy_norm, sig.reverse_kl, sig.forward_kl))
    q = np.where(h > 0.05, np.where(d > 0.5, 1, 2), np.where(d > 0.5, 3, 4))
    assert got["kept_fraction"] == pytest.approx(k.sum() / mask.sum())
    for i in (1, 2, 3, 4):
        assert got[f"q{i}_fraction_all"] == pytest.approx((q[mask] == i).mean())
        assert got[f"q{i}_fraction_kept"] == pytest.approx((q[k] == i).mean())
        assert got[f"q{i}_loss_share"] == pytest.approx(d[k & (q == i)].sum() / d[k].sum())
    for name, x in (("entropy", h), ("reverse_kl", d), ("forward_kl", f)):
        assert got[f"mean_{name}_all"] == pytest.approx(x[mask].mean())
        assert got[f"mean_{name}_kept"] == pytest.approx(x[k].mean())
    assert sum(got[f"q{i}_loss_share"] for i in (1, 2, 3, 4)) == pytest.approx(1.0)


def test_sums_over_microbatches_equal_the_concatenation():
    parts = [pack(synthetic_rollouts(seed=s, num_rollouts=3, max_response=20, first_id=10 * s))
             for s in (1, 2)]
    kept = [select(SelectionConfig(rule="q3", rho=0.3, scope="rollout"), p) for p in parts]
    summed = finalize(all_reduce_metric_sums(sum_metric_sums([_report(p, k) for p, k in zip(parts, kept)]), None))
    whole = finalize(_report(concat_signals(parts), torch.cat(kept)))
    assert summed.keys() == whole.keys()
    for key in whole:
        assert summed[key] == pytest.approx(whole[key], rel=1e-12, abs=0), key


def test_nothing_kept_and_nothing_to_keep():
    sig = pack(synthetic_rollouts(seed=3, num_rollouts=2, max_response=10))
    sums = _report(sig, torch.zeros_like(sig.response_mask))
    assert set(sums) == set(METRIC_SUM_KEYS) and float(sums["num_kept"]) == 0
    out = finalize(sums)
    assert out["kept_fraction"] == 0.0 and math.isnan(out["mean_entropy_kept"])
    assert not math.isnan(out["mean_entropy_all"])
    prompt_only = pack([r for r in synthetic_rollouts(seed=0, num_rollouts=30) if r.num_response == 0][:1])
    assert math.isnan(finalize(_report(prompt_only, torch.zeros_like(prompt_only.response_mask)))["kept_fraction"])


def test_kept_outside_response_is_an_error():
    sig = pack(synthetic_rollouts(seed=3, num_rollouts=2, max_response=10))
    with pytest.raises(ValueError, match="outside the response"):
        _report(sig, torch.ones_like(sig.response_mask))
