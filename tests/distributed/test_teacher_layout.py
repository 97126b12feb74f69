"""The teacher on a layout and ranks of its own (issue: teacher layout and placement).

3 OPD steps, fp32, gloo: the student's losses, gradient norms and selection (kept counts
and quadrant shares of the kept set, every step) with the teacher on its own grid equal
those of the one-grid TP1 run: the teacher's hidden states and output weight reach the
student's loss path unchanged whatever the teacher's layout and ranks. The teacher is wider
and deeper than the student (its hidden size differs), so the output weight is re-cut
across two different TP sizes and hidden widths.
"""
import pytest

from tip_megatron.testing.assets import logged_history, opd_assets
from tip_megatron.testing.assets import tiny_run_overrides as _overrides
from tip_megatron.testing.assets import train_history as _train
from tip_megatron.testing.distributed import DistributedTestError, run_distributed

#: Compared exactly up to fp32 reduction order: the loss, the update, and the selection.
COMPARED = ("loss", "grad_norm", "num_kept", "num_response", "kept_fraction",
            "q1_fraction_kept", "q2_fraction_kept", "q3_fraction_kept", "q4_fraction_kept",
            "mean_reverse_kl_all", "mean_entropy_all")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return opd_assets(tmp_path_factory.mktemp("teacher_layout"), teacher_layers=4)


def _run(assets, world, **overrides):
    return logged_history(run_distributed(_train, world, args=(_overrides(assets, **overrides),),
                                    timeout_s=600))


def _assert_same(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        for key in COMPARED:
            assert g[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), (key, g["step"], g[key], r[key])


@pytest.fixture(scope="module")
def reference(assets):
    return _run(assets, 1)


@pytest.mark.parametrize("world,overrides", [
    # student TP2 on ranks 0-1, teacher TP2 on ranks 2-3 of its own
    (4, {"parallel.tp": 2, "teacher.parallel.tp": 2, "teacher.placement": "separate"}),
    # student TP1 x DP2 and teacher TP2 on the same two ranks, each with its own groups
    (2, {"teacher.parallel.tp": 2}),
    # student TP2, teacher PP2 (TP1) on two ranks of its own
    (4, {"parallel.tp": 2, "teacher.parallel.tp": 1, "teacher.parallel.pp": 2,
         "teacher.placement": "separate"}),
    # student TP2, teacher TP2 with sequence parallelism (its own padding) on the same ranks
    (2, {"parallel.tp": 2, "teacher.parallel.sequence_parallel": True}),
], ids=["separate-tp2-tp2", "shared-dp2-tp2", "separate-tp2-pp2", "shared-tp2-teacher-sp"])
def test_teacher_grid_gives_the_one_grid_run(assets, reference, world, overrides):
    got = _run(assets, world, **overrides)
    _assert_same(got, reference)
    if overrides.get("teacher.placement") == "separate":
        assert all(m["time_teacher_wait_s"] >= 0 for m in got)


def test_separate_teacher_with_two_replicas_and_student_dp(assets, reference):
    """Student TP1 x DP2 on ranks 0-1, teacher TP1 x DP2 on ranks 2-3: micro-batches of
    both student replicas cross to both teacher replicas (g % 2)."""
    got = _run(assets, 4, **{"teacher.parallel.tp": 1, "teacher.parallel.dp": 2,
                             "teacher.placement": "separate"})
    _assert_same(got, reference)


@pytest.mark.parametrize("overrides,message", [
    ({"teacher.placement": "separate", "teacher.parallel.tp": 2},
     "teacher.placement=separate takes 2 ranks .* of a world of 2: none left for the student"),
    ({"teacher.parallel.tp": 3}, r"world size 2 is not divisible by tp\*pp = 3\*1 = 3 \(teacher.parallel.tp x teacher.parallel.pp\)"),
    ({"teacher.parallel.dp": 2}, "teacher.parallel.dp=2: only with teacher.placement=separate"),
    ({"teacher.placement": "elsewhere"}, r"teacher.placement='elsewhere': accepted values are \['shared', 'separate'\]"),
])
def test_bad_teacher_layout_fails_before_any_group(assets, overrides, message):
    with pytest.raises(DistributedTestError, match=message):
        run_distributed(_train, 2, args=(_overrides(assets, **overrides),), timeout_s=300)


def test_separate_resume_equals_uninterrupted(assets, tmp_path):
    """Student and teacher on a rank each: 4 steps straight == 2 steps, save, resume, 2 more
    (the student's checkpoints live in the student's world; the teacher's ranks hold none)."""
    sep = {"teacher.placement": "separate", "train.steps": 4}
    straight = [m["loss"] for m in _run(assets, 2, **sep)]
    ckdir = tmp_path / "ck"
    first = [m["loss"] for m in _run(assets, 2, **sep, **{"train.exit_after_steps": 2,
                                                         "checkpoint.dir": ckdir})]
    rest = [m["loss"] for m in _run(assets, 2, **sep, **{"checkpoint.dir": ckdir})]
    assert first + rest == straight


RULES = [("all", {"selection.rho": 1.0}), ("random", {}), ("entropy_sample", {}), ("entropy_topk", {}),
         ("soft_or_bottom", {}), ("q3", {}), ("div_topk", {}),
         ("quadrants", {"selection.keep_quadrants": "[1,3]"})]


@pytest.mark.slow
@pytest.mark.parametrize("rule,extra", RULES, ids=[r for r, _ in RULES])
def test_every_rule_through_a_separate_teacher(assets, rule, extra):
    """Student TP2 + teacher TP2 on ranks of its own vs the one-grid TP1 run, 2 steps."""
    run = {"selection.rule": rule, "train.steps": 2, **extra}
    ref = _run(assets, 1, **run)
    got = _run(assets, 4, **run, **{"parallel.tp": 2, "teacher.parallel.tp": 2,
                                   "teacher.placement": "separate"})
    _assert_same(got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_every_divergence_through_a_separate_teacher(assets, divergence):
    run = {"loss.divergence": divergence, "train.steps": 2}
    ref = _run(assets, 1, **run)
    got = _run(assets, 4, **run, **{"parallel.tp": 2, "teacher.parallel.tp": 2,
                                   "teacher.placement": "separate"})
    _assert_same(got, ref)


@pytest.mark.slow
def test_interleaved_teacher_on_its_own_ranks(assets, reference):
    """The teacher's 4 layers as PP2 x VPP2 (interleaved schedule) on two ranks of its own."""
    got = _run(assets, 3, **{"teacher.parallel.pp": 2, "teacher.parallel.vpp": 2,
                             "teacher.placement": "separate"})
    _assert_same(got, reference)
