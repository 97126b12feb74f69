"""`selection.budget_per_teacher`: rho counted within each teacher's tokens (several
teachers), against a brute-force top-k per teacher; without the option, one budget over
the batch, where the teacher with the larger divergences takes most of it."""
import math
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch

from tip_megatron.testing.synthetic_signals import pack, synthetic_rollouts
from tip_megatron.tip import SelectionConfig, select, select_global


def _batch():
    """8 rollouts; the odd ones belong to teacher 1, whose divergences are 5x larger."""
    sig = pack(synthetic_rollouts(seed=11, num_rollouts=8, max_response=30))
    teacher = (sig.rollout_ids % 2).long()
    scale = torch.where(teacher == 1, 5.0, 1.0).to(sig.reverse_kl.dtype)
    return replace(sig, reverse_kl=sig.reverse_kl * scale, teacher_ids=teacher)


def _brute_force(sig, rho, groups):
    """Top floor(rho m_g) response tokens by reverse KL within each group (ties by position)."""
    d, resp = sig.reverse_kl.numpy(), sig.response_mask.numpy()
    kept = np.zeros_like(resp)
    for g in groups:
        idx = sorted(np.flatnonzero(resp & g), key=lambda i: (-d[i], i))
        kept[idx[:math.floor(Fraction(str(rho)) * int((resp & g).sum()))]] = True
    return kept


@pytest.mark.parametrize("rho", [0.2, 0.5])
@pytest.mark.parametrize("scope", ["microbatch", "global"])
def test_budget_per_teacher_matches_brute_force(rho, scope):
    sig = _batch()
    teacher = sig.teacher_ids.numpy()
    config = SelectionConfig(rule="div_topk", rho=rho, scope=scope, budget_per_teacher=True)
    kept = (select_global(config, [sig], None)[0] if scope == "global" else select(config, sig)).numpy()
    np.testing.assert_array_equal(kept, _brute_force(sig, rho, [teacher == 0, teacher == 1]))
    # one budget over the batch: the high-divergence teacher takes (almost) all of it
    one = replace(config, budget_per_teacher=False)
    shared = (select_global(one, [sig], None)[0] if scope == "global" else select(one, sig)).numpy()
    np.testing.assert_array_equal(shared, _brute_force(sig, rho, [np.ones_like(teacher, bool)]))
    assert (shared & (teacher == 0)).sum() < (kept & (teacher == 0)).sum()


def test_global_budget_per_teacher_over_split_microbatches():
    """Counted over the global batch: the masks do not depend on how rollouts are split."""
    sig = _batch()
    config = SelectionConfig(rule="div_topk", rho=0.3, scope="global", budget_per_teacher=True)
    (whole,) = select_global(config, [sig], None)
    cut = int(sig.num_tokens // 2)
    cut = int(torch.nonzero(sig.rollout_ids != sig.rollout_ids[cut]).flatten()[0]) if cut else 0
    parts = [replace(sig, **{f: getattr(sig, f)[s] for f in ("entropy_norm", "reverse_kl", "forward_kl",
                                                            "response_mask", "rollout_ids", "teacher_ids",
                                                            "teacher_entropy", "teachability",
                                                            "teacher_rank")})
             for s in (slice(0, cut), slice(cut, None))]
    split = torch.cat(select_global(config, parts, None))
    assert torch.equal(split, whole)
