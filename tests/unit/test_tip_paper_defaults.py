"""rho means rho: kept counts per rule and scope against a brute-force floor(rho * m), the
paper scopes behind `selection.scope=auto`, and the warning for an ill-posed budget."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from tip_megatron.tip import (
    PAPER_SCOPES, RULES, SelectionConfig, budget_message, select, select_global,
)
from tip_megatron.testing.synthetic_signals import pack, synthetic_rollouts
from tip_megatron.tip.rules import WHOLE_RULES

COUNTED = sorted(set(RULES) - {"all", "quadrants"} - WHOLE_RULES)
# The paper's reading (TIP.md): Soft-OR per rollout (Eq. 7-8), the others over the batch.
PAPER = {"soft_or": "rollout", "soft_or_bottom": "rollout", "random": "global",
         "entropy_sample": "global", "q3": "global", "div_topk": "global"}


def _parts():
    """Rollouts of mixed lengths (0..40 response tokens) in three micro-batches."""
    rollouts = synthetic_rollouts(seed=13, num_rollouts=12, max_response=40)
    return [pack(rollouts[i:i + 4], seed=i) for i in range(0, 12, 4)]


def _floor(rho, m):
    return math.floor(Fraction(str(rho)) * m)


def _count_groups(parts, rule, scope):
    """[(kept-count group name, [(part index, token mask)])] by the rule's counting unit."""
    if rule.startswith("soft_or") or scope == "rollout":
        rids = sorted({int(r) for p in parts for r in p.rollout_ids[p.response_mask]})
        return [[(i, p.response_mask & (p.rollout_ids == r)) for i, p in enumerate(parts)]
                for r in rids]
    if scope == "microbatch":
        return [[(i, p.response_mask)] for i, p in enumerate(parts)]
    return [[(i, p.response_mask) for i, p in enumerate(parts)]]


def _select(config, parts):
    if config.effective_scope == "global":
        return select_global(config, parts, None, step=2)
    return [select(config, p, step=2) for p in parts]


@pytest.mark.parametrize("rho", [0.1, 0.37])
@pytest.mark.parametrize("scope", ["auto", "rollout", "microbatch", "global"])
@pytest.mark.parametrize("rule", COUNTED)
def test_kept_count_is_floor_rho_m_per_group(rule, scope, rho):
    config = SelectionConfig(rule=rule, rho=rho, scope=scope, seed=4)
    assert config.min_keep == 0  # the default: no hidden minimum
    parts = _parts()
    kept = _select(config, parts)
    groups = _count_groups(parts, rule, config.effective_scope)
    assert len(groups) > 1 or config.effective_scope == "global"
    for group in groups:
        m = sum(int(mask.sum()) for _, mask in group)
        got = sum(int((kept[i] & mask).sum()) for i, mask in group)
        assert got == _floor(rho, m), (rule, scope, m)


def test_auto_scope_is_the_papers_reading():
    for rule, scope in PAPER.items():
        assert PAPER_SCOPES[rule] == scope
        assert SelectionConfig(rule=rule, rho=0.2).effective_scope == scope
        assert SelectionConfig(rule=rule, rho=0.2, scope="microbatch").effective_scope == "microbatch"
    assert SelectionConfig().scope == "auto"
    assert not SelectionConfig(rule="all").needs_prepass  # nothing to normalise
    assert SelectionConfig(rule="q3", rho=0.1).needs_prepass
    assert not SelectionConfig(rule="soft_or", rho=0.5).needs_prepass
    with pytest.raises(ValueError, match=r"selection.scope='batch': accepted values are \['auto'"):
        SelectionConfig(scope="batch")
    with pytest.raises(ValueError, match="rescore_each_update"):
        SelectionConfig(rescore_each_update="yes")


def test_auto_q3_at_rho_01_keeps_10_percent_of_short_rollouts():
    """The issue's case: 4-token rollouts, Q3 at rho 0.1. Per rollout it keeps nothing now
    (floor(0.4) = 0, no hidden minimum); the paper's batch reading keeps 10%."""
    rng = np.random.default_rng(0)
    from tip_megatron.testing.synthetic_signals import Rollout

    rollouts = [Rollout(i, 2, rng.random(4) ** 4, rng.exponential(0.5, 4), rng.exponential(0.5, 4))
                for i in range(40)]
    sig = pack(rollouts)
    per_rollout = select(SelectionConfig(rule="q3", rho=0.1, scope="rollout"), sig)
    assert int(per_rollout.sum()) == 0
    (batch,) = select_global(SelectionConfig(rule="q3", rho=0.1), [sig], None)
    assert int(batch.sum()) == 16  # floor(0.1 * 160)


def test_ill_posed_budget_message_has_the_numbers():
    sizes = torch.tensor([4] * 60 + [12] * 4)
    msg = budget_message(SelectionConfig(rule="q3", rho=0.1, scope="rollout"), sizes)
    assert msg is not None
    assert "60 of 64 rollout groups (m = 4..12 response tokens) keep no token" in msg
    assert f"keeps {4 / 288:.1%} of its response tokens instead of 10.0%" in msg
    # well posed: the same rollouts counted over the batch, or a rho that fits the rollouts
    assert budget_message(SelectionConfig(rule="q3", rho=0.1), sizes.sum().reshape(1)) is None
    assert budget_message(SelectionConfig(rule="q3", rho=0.5, scope="rollout"), sizes) is None
    assert budget_message(SelectionConfig(rule="all"), sizes) is None
    assert budget_message(SelectionConfig(rule="q3", rho=0.1, scope="rollout", min_keep=1),
                          sizes) is None
