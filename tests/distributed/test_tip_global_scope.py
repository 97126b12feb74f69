"""Scope `global` across DP=2 (gloo) equals one process over the concatenated batch.

One launch covers: global_norm_stats, select_global for per-rollout and globally counted
rules (ties, interleaved rollout ids, a micro-batch without response tokens), and the
DP all-reduce of the metric sums.
"""
import numpy as np
import pytest

from tip_megatron.testing.distributed import run_distributed
from tip_megatron.tip import (
    QuadrantRule, SelectionConfig, all_reduce_metric_sums, concat_signals, global_norm_stats,
    quadrant_labels, select_global, selection_metric_sums, sum_metric_sums,
)
from tip_megatron.testing.synthetic_signals import Rollout, pack, synthetic_rollouts

QUANTILE = QuadrantRule(kind="quantile", entropy_quantile=0.6, div_quantile=0.7)
CONFIGS = [
    SelectionConfig(rule="soft_or", rho=0.5, scope="global"),
    SelectionConfig(rule="q3", rho=0.2, scope="global"),
    SelectionConfig(rule="entropy_topk", rho=0.3, scope="global"),
    SelectionConfig(rule="entropy_sample", rho=0.3, scope="global", seed=5),
    SelectionConfig(rule="random", rho=0.1, scope="global", seed=5),
    SelectionConfig(rule="quadrants", rho=0.3, scope="global", quadrant_rule=QUANTILE),
]
# Interleaved rollout ids per rank and micro-batch; rollout 8 has no response tokens.
LAYOUT = [[[1, 4], [8]], [[0, 3, 6], [2, 5], [7]]]


def _rollouts():
    rollouts = synthetic_rollouts(seed=21, num_rollouts=8, max_response=30)
    # Coarse entropies: exact ties that only the (rollout id, position) tie-break orders.
    rollouts = [Rollout(r.rollout_id, r.num_prompt, np.round(r.entropy_norm, 1), r.reverse_kl,
                        r.forward_kl) for r in rollouts]
    return rollouts + [Rollout(8, 3, np.zeros(0), np.zeros(0), np.zeros(0))]


def _as_keys(sig, kept):
    seen, out = {}, []
    for m, r, k in zip(sig.response_mask.tolist(), sig.rollout_ids.tolist(), kept.tolist()):
        if m:
            if k:
                out.append((r, seen.get(r, 0)))
            seen[r] = seen.get(r, 0) + 1
    return out


def _select_all(parts, dp_group):
    stats = global_norm_stats(parts, dp_group, split_quantiles=QUANTILE.split_quantiles)
    kept = {c.rule: select_global(c, parts, dp_group, step=3) for c in CONFIGS}
    labels = [quadrant_labels(p, QUANTILE, stats) for p in parts]
    sums = sum_metric_sums([selection_metric_sums(p, k, q)
                            for p, k, q in zip(parts, kept["q3"], labels)])
    keys = {rule: sorted(sum((_as_keys(p, k) for p, k in zip(parts, ks)), [])) for rule, ks in kept.items()}
    stat_values = {f: getattr(stats, f).tolist() for f in
                   ("num_tokens", "entropy_clip", "entropy_min", "div_min", "div_max", "entropy_split", "div_split")}
    return stat_values, keys, all_reduce_metric_sums(sums, dp_group)


def _rank_fn():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rollouts = _rollouts()
    parts = [pack([rollouts[i] for i in ids], seed=len(ids)) for ids in LAYOUT[dist.get_rank()]]
    stats, keys, sums = _select_all(parts, dist.group.WORLD)
    return stats, keys, {k: float(v) for k, v in sums.items()}


def test_global_scope_dp2_equals_one_process():
    rollouts = _rollouts()
    whole = [pack(rollouts)]
    want_stats, want_keys, want_sums = _select_all(whole, None)
    results = run_distributed(_rank_fn, world_size=2, timeout_s=120)
    for stats, _, sums in results:
        assert stats == want_stats  # exact: same values gathered, same arithmetic
        for k, v in want_sums.items():
            assert sums[k] == pytest.approx(float(v), rel=1e-12, abs=1e-12), k
    for rule, want in want_keys.items():
        got = sorted(results[0][1][rule] + results[1][1][rule])
        assert got == want, rule
    m = int(concat_signals(whole).response_mask.sum())
    assert len(want_keys["q3"]) == m * 2 // 10 and len(want_keys["random"]) == m // 10
