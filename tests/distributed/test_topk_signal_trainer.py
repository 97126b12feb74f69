"""`teacher.signal: topk` through the trainer (3 OPD steps, fp32, gloo): the student at TP 2
gives the TP 1 run's losses, gradient norms and selection, with and without the tail; the
top-k loss is not the full-vocabulary loss, while the selection statistics of step 0 (same
weights) are those of `teacher.signal: full`: selection stays exact."""
import pytest

from tip_megatron.testing.assets import opd_assets
from tip_megatron.testing.assets import tiny_run_overrides as _overrides
from tip_megatron.testing.assets import train_history as _train
from tip_megatron.testing.distributed import run_distributed

COMPARED = ("loss", "grad_norm", "num_kept", "num_response", "kept_fraction",
            "q1_fraction_kept", "q2_fraction_kept", "q3_fraction_kept", "q4_fraction_kept",
            "mean_reverse_kl_all", "mean_entropy_all")
#: Statistics of the whole response before any update: the selection's inputs.
SELECTION = ("num_kept", "mean_reverse_kl_all", "mean_entropy_all", "q1_fraction_kept",
             "q2_fraction_kept", "q3_fraction_kept", "q4_fraction_kept")
TOPK = {"teacher.signal": "topk", "teacher.topk": 4}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return opd_assets(tmp_path_factory.mktemp("topk_signal"), teacher_layers=4)


def _run(assets, world, **overrides):
    hist = [h for h in run_distributed(_train, world, args=(_overrides(assets, **overrides),),
                                       timeout_s=600) if h]
    assert len(hist) == 1, "exactly one rank logs"
    return hist[0]


@pytest.fixture(scope="module")
def full(assets):
    return _run(assets, 1)


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no-tail"])
def test_topk_signal_tp2_matches_tp1(assets, full, tail):
    ref = _run(assets, 1, **TOPK, **{"teacher.topk_tail": tail})
    got = _run(assets, 2, **TOPK, **{"teacher.topk_tail": tail, "parallel.tp": 2})
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        for key in COMPARED:
            assert g[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), (key, g["step"], g[key], r[key])
    for key in SELECTION:
        assert ref[0][key] == pytest.approx(full[0][key], rel=1e-6, abs=1e-9), key
    loss, exact = ref[0]["loss"], full[0]["loss"]
    assert abs(loss - exact) > 1e-3 * abs(exact), (loss, exact)
