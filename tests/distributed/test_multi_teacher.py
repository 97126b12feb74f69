"""Several teachers in one run (issue: several teachers, routed by a prompt field).

3 OPD steps, fp32, gloo, on `opd_assets`; the prompts carry a `domain` field (a, b
alternating). Routing is checked against the single-teacher engine: two teachers that are
one checkpoint give the single-teacher run, a teacher without rows changes nothing, and a
run whose second teacher is a different model equals itself on every layout.
"""
import json

import pytest

from tip_megatron.testing.assets import logged_history, model_checkpoint, opd_assets
from tip_megatron.testing.assets import tiny_run_overrides as _overrides
from tip_megatron.testing.assets import train_history as _train
from tip_megatron.testing.distributed import DistributedTestError, run_distributed

COMPARED = ("loss", "grad_norm", "num_kept", "num_response", "kept_fraction",
            "q1_fraction_kept", "q3_fraction_kept", "mean_reverse_kl_all", "mean_entropy_all")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = opd_assets(tmp_path_factory.mktemp("multi_teacher"), teacher_layers=4)
    # a teacher whose vocabulary is not the student's (250)
    run_distributed(model_checkpoint, 1, args=(str(root / "big_vocab"), 32, 2, 5, "llama", 64, 300),
                    env={"TIP_MEGATRON_DEVICE": "cpu"})
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    for name, domain in (("routed.jsonl", lambda i: "ab"[i % 2]), ("only_a.jsonl", lambda i: "a")):
        (root / name).write_text("".join(json.dumps(dict(r, domain=domain(i))) + "\n"
                                         for i, r in enumerate(rows)))
    return root


def _teachers(assets, second="teacher", prompts="routed.jsonl", a=None, b=None):
    """Overrides of a two-teacher run: `a` the teacher checkpoint serving domain a, `b` the
    `second` checkpoint serving b (`a`, `b`: more keys of each entry)."""
    entries = [dict({"name": "a", "ckpt": str(assets / "teacher"), "serves": ["a"]}, **(a or {})),
               dict({"name": "b", "ckpt": str(assets / second), "serves": ["b"]}, **(b or {}))]
    return {"teacher.ckpt": None, "teachers": json.dumps(entries), "data.route_field": "domain",
            "data.prompts": f"[{assets / prompts}]"}


def _run(assets, world, **overrides):
    args = [o for o in _overrides(assets, **overrides) if not o.startswith("teacher.ckpt=None")]
    return logged_history(run_distributed(_train, world, args=(args,), timeout_s=600))


def _assert_same(got, ref, rel=1e-5):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        for key in COMPARED:
            assert g[key] == pytest.approx(r[key], rel=rel, abs=1e-7), (key, g["step"], g[key], r[key])


@pytest.fixture(scope="module")
def single(assets):
    return _run(assets, 1, **{"data.prompts": f"[{assets / 'routed.jsonl'}]"})


def test_two_teachers_of_one_checkpoint_give_the_single_teacher_run(assets, single):
    got = _run(assets, 1, **_teachers(assets))
    _assert_same(got, single, rel=1e-6)
    for step in got:  # each teacher scored its half of the rollouts
        assert step["teacher/a/tokens_share"] + step["teacher/b/tokens_share"] == pytest.approx(1.0)
        assert 0.3 < step["teacher/a/tokens_share"] < 0.7
        assert (step["teacher/a/num_kept"] + step["teacher/b/num_kept"]) == step["num_kept"]


def test_a_teacher_without_rows_does_nothing(assets, single):
    """Every prompt routed to `a`: `b` (another model) scores nothing; the single-teacher run."""
    got = _run(assets, 1, **_teachers(assets, second="student", prompts="only_a.jsonl"))
    _assert_same(got, single, rel=1e-6)
    assert all(step["teacher/b/num_response"] == 0 for step in got)


@pytest.fixture(scope="module")
def two_models(assets):
    """The reference of the layout tests: teachers of different sizes (teacher, student)."""
    return _run(assets, 1, **_teachers(assets, second="student"))


def test_a_second_model_changes_the_run(two_models, single):
    assert two_models[0]["loss"] != pytest.approx(single[0]["loss"], rel=1e-3)


SEPARATE = {"placement": "separate"}


@pytest.mark.parametrize("world,overrides,a,b", [
    (2, {"parallel.tp": 2}, None, None),
    (2, {"parallel.pp": 2}, None, None),
    (2, {}, None, None),  # DP2
    # `a` on the student's ranks, `b` on a rank of its own
    (2, {}, None, SEPARATE),
    # each teacher on a world of its own: ranks 0 student, 1 `a`, 2 `b`
    (3, {}, SEPARATE, SEPARATE),
    # student TP2, `a` TP1 on its own rank (unset, it would follow the student's TP2), `b`
    # TP2 on two more: 5 ranks in 3 worlds
    pytest.param(5, {"parallel.tp": 2}, dict(SEPARATE, parallel={"tp": 1}), dict(SEPARATE, parallel={"tp": 2}),
                 marks=pytest.mark.slow),
], ids=["tp2", "pp2", "dp2", "b-separate", "both-separate", "both-separate-tp2"])
def test_two_teacher_run_on_every_layout(assets, two_models, world, overrides, a, b):
    got = _run(assets, world, **overrides, **_teachers(assets, second="student", a=a, b=b))
    _assert_same(got, two_models)
    for key in ("teacher/a/num_kept", "teacher/b/num_kept", "teacher/b/mean_reverse_kl_all"):
        assert [s[key] for s in got] == pytest.approx([s[key] for s in two_models], rel=1e-5)


def _routing_rank(overrides):
    """Rows reach exactly their teacher: the loss path's signals and loss of a micro-batch
    whose rows two teachers share equal, row by row, those of each teacher alone (the
    single-teacher path); swapping a row's teacher changes exactly that row."""
    import torch

    from tip_megatron.config import load_config
    from tip_megatron.distill.loss import build_signals, kept_loss
    from tip_megatron.distill.spec import DistillSpec
    from tip_megatron.distill.step import (
        ScheduleShape, make_contexts, output_weight, teacher_hidden_states, teacher_output_weight,
    )
    from tip_megatron.distill.teachers import routed_contexts
    from tip_megatron.runtime import parallel
    from tip_megatron.train.batches import make_microbatches
    from tip_megatron.train.setup import build_models

    cfg = load_config(None, overrides)
    groups = parallel.initialize(cfg.parallel, seed=0)
    models = build_models(cfg, groups)
    gen = torch.Generator().manual_seed(0)
    rows, seq = 8, 10
    tokens = torch.randint(0, 12, (rows, seq), generator=gen)
    resp = torch.zeros(rows, seq, dtype=torch.bool)
    resp[:, 5:] = True
    teacher_ids = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1])
    mbs = make_microbatches(tokens, resp, torch.arange(rows), 2, teacher_ids=teacher_ids)
    shape = ScheduleShape(seq, 2)
    multi = routed_contexts(models.teachers, groups, mbs, shape)
    alone = [make_contexts(groups, mbs, teacher_hidden_states(t.chunks, groups, mbs, **shape._asdict()),
                           teacher_output_weight(t.chunks)) for t in models.teachers]
    spec = DistillSpec(cfg.selection, cfg.loss, models.vocab_size, groups.tp_group)
    weight = output_weight(models.student)
    for i, mb in enumerate(mbs):
        hidden = torch.randn(2 * seq, weight.shape[1], generator=gen)
        got, _ = build_signals(hidden, weight, multi[i], spec)
        refs = [build_signals(hidden, weight, c[i], spec)[0] for c in alone]
        tid = mb.teacher_ids.repeat_interleave(seq)
        assert torch.equal(got.teacher_ids, tid)
        for name in ("reverse_kl", "forward_kl", "entropy_norm", "teacher_entropy"):
            want = torch.where(tid == 0, getattr(refs[0], name), getattr(refs[1], name))
            assert torch.equal(getattr(got, name), want), (i, name)
        kept = got.response_mask & (torch.arange(2 * seq) % 3 != 0)
        loss, token_loss = kept_loss(hidden, weight, multi[i], kept, spec)
        want_loss, want_tokens = 0.0, torch.zeros(int(kept.sum()))
        for t, ctx in enumerate(alone):
            mine = kept & (tid == t)
            part_loss, part_tokens = kept_loss(hidden, weight, ctx[i], mine, spec)
            want_loss = want_loss + part_loss
            want_tokens[(tid[kept] == t)] = part_tokens
        assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
        assert torch.allclose(token_loss, want_tokens, rtol=1e-6, atol=1e-7)
    return True


def test_rows_reach_exactly_their_teacher(assets):
    args = [o for o in _overrides(assets, **_teachers(assets, second="student"))
            if not o.startswith("teacher.ckpt=None")]
    assert run_distributed(_routing_rank, 1, args=(args,), timeout_s=300) == [True]


@pytest.mark.parametrize("change,message", [
    ({"b": {"serves": ["c"]}}, r"routed.jsonl, line 2: route value 'b' \(data.route_field\) is served "
                               r"by no teacher and no teacher has default: true"),
    ({"b": {"name": "a"}}, r"teachers\[1\].name='a': two teachers have this name"),
    ({"b": {"default": True}, "a": {"default": True}}, "at most one teacher takes"),
    ({"prompts": "prompts.jsonl"}, r"prompts.jsonl, line 1: no 'domain' field \(data.route_field"),
    ({"second": "big_vocab"}, r"teachers\[1\] \(b\).*300"),
])
def test_bad_teachers_are_one_line(assets, change, message):
    kwargs = dict(second=change.pop("second", "student"), prompts=change.pop("prompts", "routed.jsonl"),
                  **change)
    with pytest.raises(DistributedTestError, match=message):
        _run(assets, 1, **_teachers(assets, **kwargs))


def test_unlisted_values_go_to_the_default_teacher(assets, two_models):
    """`b` serves nothing but is the default: the same run as `b` serving domain b. With
    validation per domain: one mean@k per route value, averaging to the overall one (the
    two domains hold equally many prompts)."""
    got = _run(assets, 1, **_teachers(assets, second="student", b={"serves": [], "default": True}),
               **{"eval.every": 3, "eval.prompts": f"[{assets / 'routed.jsonl'}]", "eval.n": 2,
                  "eval.max_new_tokens": 4, "eval.grader": "regex", "eval.route_field": "domain"})
    _assert_same(got, two_models, rel=1e-6)
    last = got[-1]
    assert (last["eval/a/mean_at_k"] + last["eval/b/mean_at_k"]) / 2 == pytest.approx(last["eval/mean_at_k"])
