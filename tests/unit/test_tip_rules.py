"""TIP selection rules: counts and identities against brute force, seeds, layout invariance."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from tip_megatron.tip import (
    RULES, QuadrantRule, SelectionConfig, TokenSignals, concat_signals, global_norm_stats,
    select, select_global,
)
from tip_megatron.testing.synthetic_signals import Rollout, pack, synthetic_rollouts
from tip_megatron.tip.rules import WHOLE_RULES

RULE_RHO = [(r, 1.0 if r == "all" or r in WHOLE_RULES else 0.3) for r in sorted(RULES)]


def _ref_count(rho, m, min_keep=0):
    return max(math.floor(Fraction(str(rho)) * m), min(min_keep, m))


def _ref_norm_scores(sig, norm_groups):
    """Per-token (s, w) with h^, d^ computed independently per normalization group."""
    h, d, f = (x.numpy() for x in (sig.entropy_norm, sig.reverse_kl, sig.forward_kl))
    s, w = np.zeros_like(h), np.zeros_like(h)
    for g in norm_groups:
        def scale(x):
            span = x.max() - x.min()
            return (x - x.min()) / span if span > 0 else np.zeros_like(x)
        h_hat = scale(np.minimum(h[g], np.percentile(h[g], 98)))
        d_hat = scale(d[g])
        s[g], w[g] = h_hat + d_hat - h_hat * d_hat, f[g] * (1 - h_hat)
    return s, w


def _groups(sig, by_rollout):
    mask, rid = sig.response_mask.numpy(), sig.rollout_ids.numpy()
    if not by_rollout:
        return [mask]
    return [mask & (rid == r) for r in np.unique(rid[mask])]


def _brute_force(sig, rule, scope, rho, quadrant_union=(1, 3)):
    """Kept mask: for each count group, the top-k eligible tokens by key, ties by position."""
    s, w = _ref_norm_scores(sig, _groups(sig, scope == "rollout"))
    h, d = sig.entropy_norm.numpy(), sig.reverse_kl.numpy()
    key = {"entropy_topk": h, "soft_or": s, "soft_or_bottom": -s, "q3": w, "div_topk": d,
           "quadrants": s}[rule]
    eligible = sig.response_mask.numpy().copy()
    if rule == "quadrants":
        labels = np.where(h > 0.05, np.where(d > 0.5, 1, 2), np.where(d > 0.5, 3, 4))
        eligible &= np.isin(labels, quadrant_union)
    kept = np.zeros_like(eligible)
    for g in _groups(sig, scope == "rollout" or rule.startswith("soft_or")):
        idx = sorted(np.flatnonzero(g & eligible), key=lambda i: (-key[i], i))
        kept[idx[: min(len(idx), _ref_count(rho, int(g.sum())))]] = True
    return kept


def _keys(sig, kept):
    """Kept tokens as (rollout id, index among the rollout's response tokens)."""
    seen, out = {}, set()
    for m, r, k in zip(sig.response_mask.tolist(), sig.rollout_ids.tolist(), kept.tolist()):
        if m:
            if k:
                out.add((r, seen.get(r, 0)))
            seen[r] = seen.get(r, 0) + 1
    return out


@pytest.fixture(scope="module")
def batch():
    return pack(synthetic_rollouts(seed=5, num_rollouts=6, max_response=40))


@pytest.mark.parametrize("rho", [0.5, 0.2])
@pytest.mark.parametrize("scope", ["rollout", "microbatch"])
@pytest.mark.parametrize("rule", ["entropy_topk", "soft_or", "soft_or_bottom", "q3", "div_topk", "quadrants"])
def test_deterministic_rules_match_brute_force(batch, rule, scope, rho):
    kept = select(SelectionConfig(rule=rule, rho=rho, scope=scope), batch)
    np.testing.assert_array_equal(kept.numpy(), _brute_force(batch, rule, scope, rho))


def test_all_keeps_exactly_the_response(batch):
    kept = select(SelectionConfig(rule="all"), batch)
    assert torch.equal(kept, batch.response_mask)
    uncapped = select(SelectionConfig(rule="quadrants", keep_quadrants=(2, 4)), batch)
    np.testing.assert_array_equal(uncapped.numpy(), _brute_force(batch, "quadrants", "rollout", 1.0, (2, 4)))


@pytest.mark.parametrize("scope", ["rollout", "microbatch"])
@pytest.mark.parametrize("rule", ["random", "entropy_sample"])
def test_sampled_rule_counts(batch, rule, scope):
    kept = select(SelectionConfig(rule=rule, rho=0.3, scope=scope), batch)
    for g in _groups(batch, scope == "rollout"):
        assert int(kept.numpy()[g].sum()) == _ref_count(0.3, int(g.sum()))


@pytest.mark.parametrize("rule,rho", RULE_RHO)
def test_prompt_and_padding_never_kept(batch, rule, rho):
    for min_keep in (0, 1000):
        kept = select(SelectionConfig(rule=rule, rho=rho, min_keep=min_keep, scope="rollout"), batch)
        assert not bool((kept & ~batch.response_mask).any())


def test_min_keep_and_exact_floor():
    tiny = pack([Rollout(0, 2, np.array([0.1, 0.5, 0.3]), np.ones(3), np.ones(3))])
    assert int(select(SelectionConfig(rule="div_topk", rho=0.1, scope="rollout"), tiny).sum()) == 0
    assert int(select(SelectionConfig(rule="div_topk", rho=0.1, min_keep=1, scope="rollout"),
                      tiny).sum()) == 1
    assert int(select(SelectionConfig(rule="entropy_topk", rho=0.1, min_keep=2, scope="rollout"),
                      tiny).sum()) == 2
    rng = np.random.default_rng(0)
    hundred = pack([Rollout(0, 1, rng.random(100), rng.random(100), rng.random(100))])
    for rho, k in ((0.29, 29), (0.57, 57), (0.5, 50)):  # 0.57 * 100 == 56.99999999999999 in float
        assert int(select(SelectionConfig(rule="soft_or", rho=rho), hundred).sum()) == k


def test_config_and_select_errors(batch):
    with pytest.raises(ValueError, match="registered rules are.*soft_or"):
        SelectionConfig(rule="tip")
    for rho in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            SelectionConfig(rule="soft_or", rho=rho)
    with pytest.raises(ValueError, match="rule 'all'"):
        SelectionConfig(rule="all", rho=0.5)
    with pytest.raises(ValueError, match="scope"):
        SelectionConfig(scope="batch")
    with pytest.raises(ValueError, match="min_keep"):
        SelectionConfig(min_keep=-1)
    with pytest.raises(ValueError, match="keep_quadrants"):
        SelectionConfig(rule="quadrants", keep_quadrants=(5,))
    with pytest.raises(ValueError, match="global_norm_stats"):
        select(SelectionConfig(rule="soft_or", rho=0.5, scope="global"), batch)
    stats = global_norm_stats([batch], None)
    with pytest.raises(ValueError, match="select_global"):
        select(SelectionConfig(rule="q3", rho=0.5, scope="global"), batch, norm_stats=stats)
    with pytest.raises(ValueError, match="scope"):
        select(SelectionConfig(rule="soft_or", rho=0.5), batch, norm_stats=stats)


@pytest.mark.parametrize("rule", ["random", "entropy_sample"])
def test_seeds(batch, rule):
    def kept(seed, step):
        return select(SelectionConfig(rule=rule, rho=0.3, seed=seed, scope="rollout"), batch,
                      step=step)
    assert torch.equal(kept(1, 0), kept(1, 0))
    assert not torch.equal(kept(1, 0), kept(2, 0))
    assert not torch.equal(kept(1, 0), kept(1, 1))


def _exact_inclusion(w, k):
    """Inclusion probabilities of successive sampling proportional to w (k draws)."""
    probs = np.zeros(len(w))
    def walk(chosen, p):
        if len(chosen) == k:
            probs[list(chosen)] += p
            return
        rest = sum(w[j] for j in range(len(w)) if j not in chosen)
        for j in range(len(w)):
            if j not in chosen and w[j] > 0:
                walk(chosen + (j,), p * w[j] / rest)
    walk((), 1.0)
    return probs


def test_sampling_inclusion_probabilities():
    h = np.array([0.8, 0.4, 0.2, 0.1, 0.0])  # rho 0.4 of 5 -> 2 kept per rollout
    n = 3000
    sig = pack([Rollout(i, 1, h, np.ones(5), np.ones(5)) for i in range(n)], seed=1)
    mask = sig.response_mask
    for rule, want in (("entropy_sample", _exact_inclusion(h, 2)), ("random", np.full(5, 0.4))):
        config = SelectionConfig(rule=rule, rho=0.4, seed=3, scope="rollout")
        kept = select(config, sig)[mask].reshape(n, 5)
        np.testing.assert_allclose(kept.double().mean(0).numpy(), want, atol=0.04)
        if rule == "entropy_sample":  # zero entropy is zero weight: never drawn, in any rollout
            assert not bool(kept[:, -1].any())


def _layouts(rollouts):
    """The same rollouts as one micro-batch, and as three with different padding."""
    one = [pack(rollouts, seed=1)]
    three = [pack(rollouts[i: i + 2], pad_to=60 + i, seed=i) for i in range(0, len(rollouts), 2)]
    return one, three


@pytest.mark.parametrize("rule,rho", RULE_RHO)
def test_rollout_scope_invariant_to_microbatch_split(rule, rho):
    one, three = _layouts(synthetic_rollouts(seed=7, num_rollouts=6, max_response=40))
    config = SelectionConfig(rule=rule, rho=rho, scope="rollout", seed=11)
    keys = [set().union(*(_keys(s, select(config, s, step=4)) for s in layout)) for layout in (one, three)]
    assert keys[0] == keys[1] and len(keys[0]) > 0


@pytest.mark.parametrize("quadrant_kind", ["fixed", "quantile"])
@pytest.mark.parametrize("rule,rho", RULE_RHO)
def test_microbatch_scope_equals_global_on_one_microbatch(batch, rule, rho, quadrant_kind):
    kw = dict(rule=rule, rho=rho, seed=2, quadrant_rule=QuadrantRule(kind=quadrant_kind))
    local = select(SelectionConfig(scope="microbatch", **kw), batch, step=1)
    (global_,) = select_global(SelectionConfig(scope="global", **kw), [batch], None, step=1)
    assert torch.equal(local, global_)


@pytest.mark.parametrize("rule", ["soft_or", "q3", "entropy_sample"])
def test_global_scope_over_microbatches_equals_concatenation(rule):
    one, three = _layouts(synthetic_rollouts(seed=8, num_rollouts=6, max_response=40))
    config = SelectionConfig(rule=rule, rho=0.25, scope="global")
    split = set().union(*(_keys(s, k) for s, k in zip(three, select_global(config, three, None))))
    assert split == _keys(one[0], select_global(config, one, None)[0])
    if rule == "soft_or":  # per-rollout counting also works through select + norm_stats
        stats = global_norm_stats(three, None)
        again = set().union(*(_keys(s, select(config, s, norm_stats=stats)) for s in three))
        assert again == split


@pytest.mark.parametrize("rule", ["entropy_topk", "div_topk", "q3"])
def test_ties_broken_by_rollout_and_position_in_any_layout(rule):
    # Coarse values make many exact ties; micro-batches hold rollouts out of id order.
    rollouts = [Rollout(r.rollout_id, r.num_prompt, np.round(r.entropy_norm, 1),
                        np.round(r.reverse_kl, 0), np.round(r.forward_kl, 0))
                for r in synthetic_rollouts(seed=9, num_rollouts=6, max_response=40)]
    config = SelectionConfig(rule=rule, rho=0.3, scope="global")
    one = pack(rollouts)
    want = _keys(one, select_global(config, [one], None)[0])
    mixed = [pack([rollouts[i] for i in ids]) for ids in ((4, 1), (5, 0), (3, 2))]
    got = set().union(*(_keys(s, k) for s, k in zip(mixed, select_global(config, mixed, None))))
    assert got == want
    local = select(SelectionConfig(rule=rule, rho=0.3, scope="microbatch"), one)
    np.testing.assert_array_equal(local.numpy(), _brute_force(one, rule, "microbatch", 0.3))


def test_inputs_are_not_mutated(batch):
    before = TokenSignals(*(t.clone() for t in (batch.entropy_norm, batch.reverse_kl,
                                                 batch.forward_kl, batch.response_mask, batch.rollout_ids)))
    for rule, rho in RULE_RHO:
        select(SelectionConfig(rule=rule, rho=rho, scope="rollout"), batch)
        select_global(SelectionConfig(rule=rule, rho=rho, scope="global"), [batch], None)
    for name in ("entropy_norm", "reverse_kl", "forward_kl", "response_mask", "rollout_ids"):
        assert torch.equal(getattr(before, name), getattr(batch, name))
    assert concat_signals([batch]).num_tokens == batch.num_tokens
