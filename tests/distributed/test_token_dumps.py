"""Per-token dumps of a real (tiny, CPU) run at DP=2: the dumped kept flags are the kept
masks the run used (its logged kept and quadrant fractions, recomputed from the dump; per
rollout the Soft-OR count floor(rho * m)), the quadrant labels follow the thresholds, the
cap samples uniformly, and `tip-megatron plot` draws the scatter of the dump. A weighted
rule's dump (tip_soft) carries each token's loss weight: its quadrant's weight.
"""
from collections import Counter

import numpy as np
import pytest

from tip_megatron.apps import cli
from tip_megatron.train.dump_file import dump_path, read_token_dump
from tip_megatron.testing.assets import opd_assets, tiny_run_overrides, train_history
from tip_megatron.testing.distributed import run_distributed

STEPS, RHO = 3, 0.5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return opd_assets(tmp_path_factory.mktemp("dumps"), teacher_layers=2, num_prompts=32)


def _run(assets, run_dir, world, **extra):
    overrides = tiny_run_overrides(assets, **{
        "data.prompts_per_step": 8, "rollout.n": 2, "selection.rho": RHO, "train.steps": STEPS,
        "train.micro_batch_size": 4, "logging.jsonl": run_dir / "metrics.jsonl",
        "logging.dump_tokens_every": 1, **extra})
    (history,) = [h for h in run_distributed(train_history, world, args=(overrides,)) if h]
    return {h["step"]: h for h in history}


@pytest.fixture(scope="module")
def dp2_run(assets):
    run_dir = assets / "run_dp2"
    return run_dir, _run(assets, run_dir, 2)


def test_dump_kept_flags_are_the_kept_masks_the_run_used(dp2_run):
    run_dir, metrics = dp2_run
    for step in range(1, STEPS + 1):
        dump, m = read_token_dump(dump_path(run_dir, step)), metrics[step]
        assert dump.step == step and dump.num_tokens == dump.num_response_tokens > 0  # no cap
        assert dump.kept.mean() == pytest.approx(m["kept_fraction"], abs=1e-12)
        for q in (1, 2, 3, 4):
            in_q = dump.quadrant == q
            assert in_q.mean() == pytest.approx(m[f"q{q}_fraction_all"], abs=1e-12)
            assert (in_q & dump.kept).sum() / dump.kept.sum() == pytest.approx(
                m[f"q{q}_fraction_kept"], abs=1e-12)
        # Rollouts of both DP ranks (8 prompts x n=2 = 16 ids), each one whole: positions
        # 0..m-1, and Soft-OR keeps floor(rho * m) of its m tokens (no hidden minimum:
        # selection.min_keep=0, so a one-token rollout keeps none at rho 0.5).
        assert sorted(set(dump.rollout_id.tolist())) == list(range(16))
        for rid, count in Counter(dump.rollout_id.tolist()).items():
            mine = dump.rollout_id == rid
            assert sorted(dump.position[mine].tolist()) == list(range(count))
            assert int(dump.kept[mine].sum()) == int(count * RHO)


def test_dump_quadrants_follow_the_fixed_thresholds(dp2_run):
    run_dir, _ = dp2_run
    dump = read_token_dump(dump_path(run_dir, 1))
    h, d = dump.entropy_norm.astype(np.float64), dump.reverse_kl.astype(np.float64)
    clear = (np.abs(h - dump.entropy_threshold) > 1e-6) & (np.abs(d - dump.div_threshold_nats) > 1e-6)
    expected = np.where(h > dump.entropy_threshold, np.where(d > dump.div_threshold_nats, 1, 2),
                        np.where(d > dump.div_threshold_nats, 3, 4))
    assert (dump.quadrant[clear] == expected[clear]).all()
    assert (dump.reverse_kl >= -1e-6).all() and (dump.forward_kl >= -1e-6).all()
    assert ((dump.entropy_norm >= 0) & (dump.entropy_norm <= 1)).all()


def test_cap_samples_the_global_batch(assets, dp2_run):
    """Same run (same seeds) with a cap: the dump is a subset of the uncapped one's tokens."""
    run_dir, _ = dp2_run
    capped_dir = assets / "run_capped"
    _run(assets, capped_dir, 2, **{"logging.dump_tokens_max": 10, "train.steps": 1})
    full, capped = read_token_dump(dump_path(run_dir, 1)), read_token_dump(dump_path(capped_dir, 1))
    assert capped.num_tokens == 10 and capped.num_response_tokens == full.num_tokens
    rows = {(r, p): (k, q) for r, p, k, q in zip(full.rollout_id, full.position, full.kept, full.quadrant)}
    for r, p, k, q in zip(capped.rollout_id, capped.position, capped.kept, capped.quadrant):
        assert rows[(r, p)] == (k, q)
    assert len(set(capped.rollout_id.tolist())) > 1  # drawn over the batch, not one rollout


def test_plot_draws_the_scatter_of_the_run(dp2_run, capsys):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from matplotlib.image import imread

    run_dir, _ = dp2_run
    assert cli.main(["plot", str(run_dir)]) == 0
    written = capsys.readouterr().out.split()
    scatter = [p for p in written if p.endswith("tokens_step_000001.png")]
    assert scatter, written
    pixels = imread(scatter[0])[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10


def test_a_weighted_rules_dump_carries_the_weights_the_run_used(assets, capsys):
    """tip_soft at DP=2 with weights (0.9, 0.5, 1, 0): each dumped token's weight is its
    quadrant's (the dump's own label), Q4 tokens weigh 0 and are the only ones not kept;
    the plot colours the tokens by weight (a colour bar beside the scatter)."""
    table = np.array([0.0, 0.9, 0.5, 1.0, 0.0])
    run_dir = assets / "run_tip_soft"
    _run(assets, run_dir, 2, **{"selection.rule": "tip_soft", "selection.rho": 1.0,
                                "selection.quadrant_weights": [0.9, 0.5, 1.0, 0.0], "train.steps": 1,
                                # median splits: every quadrant holds tokens (a random tiny
                                # model's tokens are all Q1 under the fixed thresholds)
                                "selection.quadrant_rule.kind": "quantile"})
    dump = read_token_dump(dump_path(run_dir, 1))
    assert dump.num_tokens == dump.num_response_tokens > 0
    np.testing.assert_allclose(dump.weight, table[dump.quadrant.astype(int)].astype(np.float32))
    assert ((dump.weight > 0) == dump.kept).all()
    assert set(dump.quadrant.tolist()) == {1, 2, 3, 4}
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from tip_megatron.apps.plots.scatter import token_scatter_figure

    fig = token_scatter_figure(dump)
    assert [ax.get_ylabel() for ax in fig.axes] == ["reverse KL (nats)", "loss weight"]
