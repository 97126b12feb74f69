"""Selection in the trainer: the quantile quadrant rule, several updates per rollout batch
(the same mini-batches at DP=1 and DP=2, masks re-scored per update), the budget warning.

Tiny random models (CPU, gloo), character tokenizer, addition prompts: 16 prompts x 1
rollout of 6 new tokens per step.
"""
import logging

import pytest
import torch

from tip_megatron.config import load_config
from tip_megatron.testing.assets import tiny_run_overrides
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.train.batches import update_rows


@pytest.fixture
def assets(opd_assets):
    return opd_assets


def _overrides(assets, **extra):
    """The tiny run, 2 steps; the rule is the test's (config defaults: all tokens, rho 1)."""
    return tiny_run_overrides(assets, **{"selection.rule": "all", "selection.rho": 1.0,
                                         "train.steps": 2, **extra})


def _train(overrides):
    """Train; return (history of the logging rank, budget warnings logged on this rank)."""
    from tip_megatron.train.trainer import run

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("tip_megatron.tip.budget").addHandler(handler)
    return run(load_config(None, overrides)), [r.getMessage() for r in records]


def _history(results):
    hist = [h for h, _ in results if h]
    assert len(hist) == 1, "exactly one rank logs"
    return hist[0]


def test_update_rows_are_fixed_global_ids():
    """Update u holds the global ids = u (mod updates), whichever replica holds them."""
    ids = torch.arange(16)
    whole = update_rows(ids, 2)
    halves = [ids[:8][r] for r in update_rows(ids[:8], 2)], [ids[8:][r] for r in update_rows(ids[8:], 2)]
    for u in range(2):
        assert ids[whole[u]].tolist() == list(range(u, 16, 2))
        assert sorted(halves[0][u].tolist() + halves[1][u].tolist()) == ids[whole[u]].tolist()


def test_quantile_quadrant_rule_in_training(assets):
    """kind=quantile at the medians, in the pre-pass (rule quadrants, scope auto = global)
    and in the loss path (soft_or, per rollout): with distinct values, exactly floor(N/2)
    of N response tokens are strictly above the batch median of each signal."""
    quantile = {"selection.quadrant_rule.kind": "quantile", "train.steps": 2}
    glob = _history(run_distributed(_train, 1, args=(_overrides(
        assets, **quantile, **{"selection.rule": "quadrants", "selection.keep_quadrants": "[1,3]"}),)))
    for h in glob:
        n = h["num_response"]
        assert (h["q1_fraction_all"] + h["q2_fraction_all"]) * n == pytest.approx(n // 2)
        assert (h["q1_fraction_all"] + h["q3_fraction_all"]) * n == pytest.approx(n // 2)
        assert h["kept_fraction"] * n == pytest.approx(n // 2)  # Q1 + Q3: high divergence
        assert torch.isfinite(torch.tensor(h["loss"]))
    local = _history(run_distributed(_train, 1, args=(_overrides(
        assets, **quantile, **{"selection.rule": "soft_or", "selection.rho": 0.5}),)))
    for h in local:  # per rollout of m tokens, floor(m/2) above its median
        assert h["q1_fraction_all"] + h["q2_fraction_all"] <= 0.5
        assert h["q1_fraction_all"] + h["q2_fraction_all"] > 0.3
        assert h["kept_fraction"] == pytest.approx(0.5, abs=0.1)


def test_two_updates_dp1_equals_dp2(assets):
    """updates_per_rollout=2 with q3@0.2 over the global batch (re-scored per update):
    DP=2 trains on the same mini-batches as DP=1, every update's loss agrees."""
    extra = {"selection.rule": "q3", "selection.rho": 0.2, "train.updates_per_rollout": 2,
             "train.steps": 3}
    one = _history(run_distributed(_train, 1, args=(_overrides(assets, **extra),)))
    two = _history(run_distributed(_train, 2, args=(_overrides(assets, **extra),)))
    for a, b in zip(one, two, strict=True):
        assert len(a["loss_updates"]) == 2
        assert b["loss_updates"] == pytest.approx(a["loss_updates"], rel=1e-5)
        assert b["num_kept"] == a["num_kept"]
        # each update keeps floor(0.2 m) of its own mini-batch
        assert a["kept_fraction"] == pytest.approx(0.2, abs=0.02)


def _update_losses(overrides):
    """One rollout batch through the trainer's stages; per update, the training loss and
    the mean reverse KL of the kept tokens as the selection's signals saw it."""
    from tip_megatron.distill.step import (
        ScheduleShape, make_contexts, teacher_hidden_states, teacher_output_weight,
    )
    from tip_megatron.train import trainer

    run = trainer.setup(load_config(None, overrides))
    out = trainer.generate_rollouts(run, run.prompts.next())
    mb_groups = trainer.microbatches(run, out)
    mbs = [mb for group in mb_groups for mb in group]
    shape = ScheduleShape(out.token_ids.shape[1], run.cfg.train.micro_batch_size)
    hidden = teacher_hidden_states(run.models.teacher, run.groups, mbs, **shape._asdict())
    contexts = make_contexts(run.groups, mbs, hidden, teacher_output_weight(run.models.teacher))
    ups = trainer.run_updates(run, mb_groups, contexts, shape, out)  # the generation source reads it
    sizes = [sum(int(mb.target_mask.sum()) for mb in group) for group in mb_groups]
    return [(m["loss"], m["mean_reverse_kl_kept"], m["num_response"], n)
            for (_, m), n in zip(ups, sizes, strict=True)]


@pytest.mark.parametrize("rescore", [True, False])
def test_rescore_each_update(assets, rescore):
    """The signals a selection used were scored with the weights being trained iff the
    selection's mean reverse KL of the kept tokens equals the training loss. Re-scoring:
    true at both updates. One pre-pass: true at the first update only (the second trains
    weights that moved), and its selection spans the whole rollout batch."""
    extra = {"selection.rule": "q3", "selection.rho": 0.2, "train.updates_per_rollout": 2,
             "selection.rescore_each_update": rescore}
    (first, second) = run_distributed(_update_losses, 1, args=(_overrides(assets, **extra),))[0]
    assert first[1] == pytest.approx(first[0], rel=1e-5)
    if rescore:
        assert second[1] == pytest.approx(second[0], rel=1e-5)
    else:
        assert abs(second[1] - second[0]) > 1e-3 * abs(second[0])
    # each update's metrics count exactly its own mini-batch's response tokens
    assert first[2] == first[3] and second[2] == second[3]
    assert first[3] + second[3] > 0


def test_ill_posed_budget_warns_once(assets):
    """q3 at rho 0.1 counted per rollout over 6-token rollouts: floor(0.6) = 0 everywhere.
    One warning with the numbers over two steps; the reported kept share is the real 0."""
    hist_warn = run_distributed(_train, 1, args=(_overrides(assets, **{
        "selection.rule": "q3", "selection.rho": 0.1, "selection.scope": "rollout"}),))[0]
    hist, warnings = hist_warn
    assert len(warnings) == 1
    assert "of 16 rollout groups (m = " in warnings[0] and "instead of 10.0%" in warnings[0]
    assert all(h["kept_fraction"] == 0.0 for h in hist)
    _, none = run_distributed(_train, 1, args=(_overrides(assets, **{
        "selection.rule": "q3", "selection.rho": 0.1}),))[0]
    assert none == []  # the default (global batch) keeps 10%
