"""TIP signals validation, normalization statistics, scores and quadrant labels.

References are float64 numpy, written here independently of the library.
"""
import numpy as np
import pytest
import torch

from tip_megatron.tip import (
    Quadrant, QuadrantRule, TokenSignals, compute_norm_stats, compute_scores, quadrant_labels,
    quantile_per_group,
)
from tip_megatron.testing.synthetic_signals import pack, synthetic_rollouts


def _signals(h, d, f=None, mask=None, rid=None):
    n = len(h)
    return TokenSignals(
        entropy_norm=torch.tensor(h, dtype=torch.float64),
        reverse_kl=torch.tensor(d, dtype=torch.float64),
        forward_kl=torch.tensor(f if f is not None else np.zeros(n), dtype=torch.float64),
        response_mask=torch.tensor(mask if mask is not None else np.ones(n, bool)),
        rollout_ids=torch.tensor(rid if rid is not None else np.zeros(n, np.int64)),
    )


def _ref_scores(h, d, f):
    """h^, d^, s, w of one normalization group (all arrays are its response tokens)."""
    def scale(x):
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)
    h_hat = scale(np.minimum(h, np.percentile(h, 98)))  # numpy 'linear' percentile
    d_hat = scale(d)
    return h_hat, d_hat, h_hat + d_hat - h_hat * d_hat, f * (1 - h_hat)


# ---- signals -------------------------------------------------------------------------

def test_nan_names_the_field():
    with pytest.raises(ValueError, match="forward_kl"):
        _signals([0.1, 0.2], [0.1, 0.2], f=[0.0, float("nan")])
    with pytest.raises(ValueError, match="reverse_kl"):
        _signals([0.1, 0.2], [float("inf"), 0.2])


def test_length_and_dtype_are_checked():
    s = _signals([0.1, 0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="reverse_kl"):
        TokenSignals(s.entropy_norm, s.reverse_kl[:1], s.forward_kl, s.response_mask, s.rollout_ids)
    with pytest.raises(ValueError, match="response_mask"):
        TokenSignals(s.entropy_norm, s.reverse_kl, s.forward_kl, s.response_mask.long(), s.rollout_ids)
    with pytest.raises(ValueError, match="rollout_ids"):
        TokenSignals(s.entropy_norm, s.reverse_kl, s.forward_kl, s.response_mask, s.rollout_ids.int())


# ---- statistics and scores -----------------------------------------------------------

@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.98, 1.0])
def test_quantile_matches_numpy_linear(q):
    rng = np.random.default_rng(0)
    sizes = [1, 2, 0, 51, 7]
    values = [rng.random(n) for n in sizes]
    group = torch.tensor(np.repeat(np.arange(len(sizes)), sizes))
    # Shuffle so groups interleave: the function must not rely on contiguous groups.
    perm = torch.from_numpy(rng.permutation(sum(sizes)))
    got = quantile_per_group(torch.from_numpy(np.concatenate(values))[perm], group[perm], len(sizes), q)
    want = [np.quantile(v, q) if v.size else 0.0 for v in values]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scope", ["rollout", "microbatch"])
def test_scores_match_reference(scope):
    sig = pack(synthetic_rollouts(seed=1, num_rollouts=5, max_response=40))
    scores = compute_scores(sig, compute_norm_stats(sig, scope))
    mask, rid = sig.response_mask.numpy(), sig.rollout_ids.numpy()
    groups = [rid == r for r in np.unique(rid[mask])] if scope == "rollout" else [np.ones_like(mask)]
    for g in groups:
        sel = g & mask
        want = _ref_scores(*(x.numpy()[sel] for x in (sig.entropy_norm, sig.reverse_kl, sig.forward_kl)))
        got = [x.numpy()[sel] for x in (scores.entropy_hat, scores.div_hat, scores.soft_or, scores.q3)]
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    for x in (scores.entropy_hat, scores.div_hat, scores.soft_or, scores.q3):
        assert torch.all(x[~sig.response_mask] == 0)  # prompt and padding score 0


def test_entropy_clipped_at_98th_percentile():
    h = np.r_[np.linspace(0.0, 0.5, 99), 1.0]  # one outlier above the 98th percentile
    sig = _signals(h, np.linspace(0, 1, 100))
    stats = compute_norm_stats(sig, "microbatch")
    clip = np.percentile(h, 98)
    assert float(stats.entropy_clip[0]) == pytest.approx(clip, abs=1e-12)
    h_hat = compute_scores(sig, stats).entropy_hat.numpy()
    np.testing.assert_allclose(h_hat[h >= clip], 1.0)
    np.testing.assert_allclose(h_hat[h < clip], h[h < clip] / clip, atol=1e-12)


def test_constant_inputs_scale_to_zero():
    sig = _signals([0.3] * 4, [0.7] * 4, f=[1.0, 2.0, 3.0, 4.0])
    scores = compute_scores(sig, compute_norm_stats(sig, "microbatch"))
    assert torch.all(scores.entropy_hat == 0) and torch.all(scores.div_hat == 0)
    assert torch.all(scores.soft_or == 0)
    assert scores.q3.tolist() == [1.0, 2.0, 3.0, 4.0]  # w = d_fwd * (1 - 0)


def test_single_token_and_empty_groups():
    # Rollout 0: one response token (constant -> 0); rollout 1: prompt only.
    sig = _signals([0.5, 0.9, 0.2], [2.0, 1.0, 3.0], mask=[True, False, False], rid=[0, 1, 1])
    stats = compute_norm_stats(sig, "rollout")
    assert stats.group_ids.tolist() == [0] and stats.num_tokens.tolist() == [1]
    assert compute_scores(sig, stats).soft_or.tolist() == [0.0, 0.0, 0.0]
    empty = _signals([0.5], [1.0], mask=[False])
    assert compute_scores(empty, compute_norm_stats(empty, "microbatch")).soft_or.tolist() == [0.0]


def test_scope_errors():
    sig = _signals([0.1, 0.2], [0.1, 0.2], rid=[0, 1])
    with pytest.raises(ValueError, match="global_norm_stats"):
        compute_norm_stats(sig, "global")
    with pytest.raises(ValueError, match="rollout.*microbatch.*global"):
        compute_norm_stats(sig, "batch")
    other = _signals([0.1], [0.1], rid=[7])
    with pytest.raises(ValueError, match="rollout 7"):
        compute_scores(other, compute_norm_stats(sig, "rollout"))


# ---- quadrants -----------------------------------------------------------------------

def _ref_labels(h, d, th, td):
    return np.where(h > th, np.where(d > td, 1, 2), np.where(d > td, 3, 4))


def test_fixed_quadrants_match_reference():
    sig = pack(synthetic_rollouts(seed=2, num_rollouts=6, max_response=30))
    labels = quadrant_labels(sig, QuadrantRule()).numpy()
    mask = sig.response_mask.numpy()
    want = _ref_labels(sig.entropy_norm.numpy(), sig.reverse_kl.numpy(), 0.05, 0.5)
    np.testing.assert_array_equal(labels[mask], want[mask])
    assert np.all(labels[~mask] == int(Quadrant.NONE))
    assert set(np.unique(labels[mask])) == {1, 2, 3, 4}


@pytest.mark.parametrize("scope", ["rollout", "microbatch"])
def test_quantile_quadrants_match_reference(scope):
    rule = QuadrantRule(kind="quantile", entropy_quantile=0.5, div_quantile=0.8)
    sig = pack(synthetic_rollouts(seed=3, num_rollouts=4, max_response=30))
    stats = compute_norm_stats(sig, scope, split_quantiles=rule.split_quantiles)
    labels = quadrant_labels(sig, rule, stats).numpy()
    mask, rid = sig.response_mask.numpy(), sig.rollout_ids.numpy()
    groups = [rid == r for r in np.unique(rid[mask])] if scope == "rollout" else [np.ones_like(mask)]
    for g in groups:
        h, d = sig.entropy_norm.numpy()[g & mask], sig.reverse_kl.numpy()[g & mask]
        want = _ref_labels(h, d, np.quantile(h, 0.5), np.quantile(d, 0.8))
        np.testing.assert_array_equal(labels[g & mask], want)


def test_quadrant_rule_errors():
    with pytest.raises(ValueError, match="fixed.*quantile"):
        QuadrantRule(kind="median")
    with pytest.raises(ValueError, match="entropy_quantile"):
        QuadrantRule(kind="quantile", entropy_quantile=1.5)
    with pytest.raises(ValueError, match="split_quantiles"):
        quadrant_labels(_signals([0.1], [0.1]), QuadrantRule(kind="quantile"))
