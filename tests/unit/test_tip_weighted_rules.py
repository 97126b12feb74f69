"""The 2026 rules on synthetic signals against plain-Python references: teachability's
top-rho (and threshold), propose-and-verify weights {0, beta, 1}, TIP's type-aware soft
weights by quadrant; weight-0 tokens are never kept; every weight is in [0, 1]; the
weighted rules are invariant to how rollouts are split into micro-batches."""
import numpy as np
import pytest
import torch

from tip_megatron.testing.synthetic_signals import pack, synthetic_rollouts
from tip_megatron.tip import SelectionConfig, select_global_weighted, select_weighted


@pytest.fixture(scope="module")
def batch():
    return pack(synthetic_rollouts(seed=21, num_rollouts=7, max_response=30))


def _quadrants(sig):
    h, d = sig.entropy_norm.numpy(), sig.reverse_kl.numpy()
    return np.where(h > 0.05, np.where(d > 0.5, 1, 2), np.where(d > 0.5, 3, 4))


@pytest.mark.parametrize("beta,top_k", [(0.5, 1), (0.2, 2), (0.0, 1), (1.0, 3)])
def test_propose_verify_weights(batch, beta, top_k):
    kept, w = select_weighted(SelectionConfig(rule="propose_verify", reject_weight=beta,
                                              verify_top_k=top_k), batch)
    resp, rank = batch.response_mask.numpy(), batch.teacher_rank.numpy()
    want = np.where(resp, np.where(rank < top_k, 1.0, beta), 0.0)
    np.testing.assert_array_equal(w.numpy(), want.astype(np.float32))
    np.testing.assert_array_equal(kept.numpy(), want > 0)
    assert set(np.unique(w.numpy()).tolist()) <= {0.0, float(np.float32(beta)), 1.0}


def test_tip_soft_weights(batch):
    table = (0.9, 0.3, 1.0, 0.0)
    kept, w = select_weighted(SelectionConfig(rule="tip_soft", quadrant_weights=table), batch)
    resp = batch.response_mask.numpy()
    want = np.where(resp, np.array(table)[_quadrants(batch) - 1], 0.0)
    np.testing.assert_allclose(w.numpy(), want, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(kept.numpy(), want > 0)  # Q4 at weight 0 is dropped
    assert not bool((kept & ~batch.response_mask).any())


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_teachability_top_rho(batch, threshold):
    rho = 0.3
    config = SelectionConfig(rule="teachability", rho=rho, threshold=threshold, top_k=4)
    (kept,), (w,), _, _ = select_global_weighted(config, [batch], None)
    assert w is None  # a mask rule
    score, resp = batch.teachability.numpy(), batch.response_mask.numpy()
    eligible = resp & (score >= threshold if threshold is not None else True)
    k = min(int(np.floor(rho * resp.sum())), int(eligible.sum()))
    order = sorted(np.flatnonzero(eligible), key=lambda i: (-score[i], i))
    want = np.zeros_like(resp)
    want[order[:k]] = True
    np.testing.assert_array_equal(kept.numpy(), want)


@pytest.mark.parametrize("rule", ["propose_verify", "tip_soft"])
def test_weights_invariant_to_microbatch_split(rule):
    rollouts = synthetic_rollouts(seed=4, num_rollouts=6, max_response=25)
    one = pack(rollouts, seed=1)
    parts = [pack(rollouts[i:i + 2], pad_to=40 + i, seed=i) for i in range(0, 6, 2)]
    config = SelectionConfig(rule=rule)

    def by_token(sig):
        _, w = select_weighted(config, sig)
        out, seen = {}, {}
        for m, r, x in zip(sig.response_mask.tolist(), sig.rollout_ids.tolist(), w.tolist()):
            if m:
                out[(r, seen.get(r, 0))] = x
                seen[r] = seen.get(r, 0) + 1
        return out
    merged = {}
    for p in parts:
        merged.update(by_token(p))
    assert merged == by_token(one)


def test_refusals(batch):
    for kw, key in (({"rule": "propose_verify", "rho": 0.5}, "rho"),
                    ({"rule": "propose_verify", "reject_weight": 1.5}, "reject_weight"),
                    ({"rule": "tip_soft", "quadrant_weights": (1.0, 0.5, 2.0, 0.0)}, "quadrant_weights"),
                    ({"rule": "tip_soft", "quadrant_weights": (1.0, 0.5)}, "quadrant_weights"),
                    ({"rule": "teachability", "rho": 0.1, "top_k": 0}, "top_k"),
                    ({"rule": "teachability", "rho": 0.1, "threshold": -0.1}, "threshold")):
        with pytest.raises(ValueError, match=f"selection.{key}="):
            SelectionConfig(**kw)
    bare = pack(synthetic_rollouts(seed=1, num_rollouts=2))
    bare = type(bare)(bare.entropy_norm, bare.reverse_kl, bare.forward_kl, bare.response_mask,
                      bare.rollout_ids)
    with pytest.raises(ValueError, match="signal 'teacher_rank'"):
        select_weighted(SelectionConfig(rule="propose_verify"), bare)
