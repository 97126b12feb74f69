"""The 2026 rules, weights and `loss.mix` through the trainer end to end (rollouts, teacher,
pre-pass, student pass, gradient rescale, optimizer, metrics): DP=2 gives DP=1's losses and
weight sums at every step, and the logged loss is loss_sum / weight_sum."""
import pytest

from tip_megatron.testing.assets import logged_history, opd_assets
from tip_megatron.testing.assets import tiny_run_overrides as _overrides
from tip_megatron.testing.assets import train_history as _train
from tip_megatron.testing.distributed import run_distributed

CASES = {
    "propose_verify+mix": {"selection.rule": "propose_verify", "selection.rho": 1.0, "selection.verify_top_k": 3,
                           "selection.reject_weight": 0.25, "loss.mix": "entropy_aware",
                           "loss.mix_threshold": 1.0},
    "teachability": {"selection.rule": "teachability", "selection.rho": 0.3, "selection.top_k": 3},
    "tip_soft_global": {"selection.rule": "tip_soft", "selection.rho": 1.0, "selection.scope": "global",
                        "selection.quadrant_weights": "[0.6, 0.5, 1.0, 0.25]"},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return opd_assets(tmp_path_factory.mktemp("opd"), teacher_layers=4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dp2_equals_dp1(assets, case):
    overrides = _overrides(assets, **CASES[case], **{"train.steps": 2})
    one = logged_history(run_distributed(_train, 1, args=(overrides,)))
    two = logged_history(run_distributed(_train, 2, args=(overrides,)))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), case
        assert b["weight_sum"] == pytest.approx(a["weight_sum"], rel=1e-6), case
        assert b["num_kept"] == a["num_kept"], case
        assert a["loss"] == pytest.approx(a["loss_sum"] / a["weight_sum"], rel=1e-12)
    if case != "teachability":
        assert any(m["weight_sum"] < m["num_kept"] for m in one), "weights < 1 somewhere"
