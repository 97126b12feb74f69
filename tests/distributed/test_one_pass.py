"""One logit pass per token (distill/one_pass.py, docs/tip.md "LM-head matmuls per step").

- Rule `all` scores and learns in one fused pass (`loss.one_pass=True`, the default): its
  losses, gradients, kept sets, signals and metric sums equal the two-pass path's
  (`loss.one_pass=False`: a scoring pass, then the fused loss) for every divergence, at
  TP1, TP2 and PP2; the other rules are unaffected by the key.
- The output layer's matmuls, counted per step by instrumenting every matrix product
  (testing.lm_head), are exactly what docs/tip.md states per rule, before and after:
  logit rows 4n -> 2n for rule `all`; 2n + 2k for a rule scored at the output layer;
  2n (pre-pass) + 2k for scope `global`; gradient rows k each (n response tokens, k kept).
"""
from dataclasses import replace

import pytest
import torch

from tip_megatron.runtime import parallel
from tip_megatron.distill.spec import DistillSpec, LossConfig
from tip_megatron.distill.prepass import select_prepass, with_preselection
from tip_megatron.distill.step import (
    Microbatch, make_contexts, scoring_pass, teacher_hidden_states, teacher_output_weight, train_pass,
)
from tip_megatron.models import build_model
from tip_megatron.models.init import init_full_state
from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
from tip_megatron.ops._shard import vocab_shard
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.lm_head import LMHeadCounter
from tip_megatron.testing.models import tiny_arch
from tip_megatron.tip import SelectionConfig
from tip_megatron.config import OptimConfig
from tip_megatron.train.optimizer import wrap_ddp

ROWS, SEQ = 8, 12
STUDENT = tiny_arch("qwen3")
TEACHER = tiny_arch("llama", hidden_size=96, ffn_hidden_size=128)
DIVERGENCES = {"reverse_kl": LossConfig(chunk_size=7),
               "forward_kl": LossConfig(chunk_size=7, divergence="forward_kl"),
               "jsd": LossConfig(chunk_size=7, divergence="jsd", jsd_beta=0.3)}
CASES = {f"all/{name}": (SelectionConfig(rule="all"), cfg) for name, cfg in DIVERGENCES.items()}
CASES.update({
    "soft_or": (SelectionConfig(rule="soft_or", rho=0.5), DIVERGENCES["reverse_kl"]),
    "q3": (SelectionConfig(rule="q3", rho=0.2), DIVERGENCES["forward_kl"]),
    "entropy_topk/microbatch": (SelectionConfig(rule="entropy_topk", rho=0.4, scope="microbatch"),
                                DIVERGENCES["jsd"]),
})
LAYOUTS = {1: {"tp1_mb2": (1, 1, 2)}, 2: {"tp2": (2, 1, 1), "pp2_mb4": (1, 2, 4)}}


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, STUDENT.vocab_size, (ROWS, SEQ), generator=gen)
    target = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    for r in range(ROWS):
        target[r, 2 + r % 4:SEQ - 1 - r % 3] = True
    return Microbatch(ids, torch.arange(SEQ).expand(ROWS, SEQ).contiguous(), target, torch.arange(ROWS))


def _weights():
    g = parallel.initialize(parallel.ParallelLayout(), seed=0)
    s, t = build_model(STUDENT, g), build_model(TEACHER, g)
    return init_full_state(s, g, STUDENT, 1), init_full_state(t, g, TEACHER, 2)


def _step(layout, s_full, t_full, selection, loss_cfg):
    """One student step: (results, gradients, LM-head rows counted on this rank, n)."""
    tp, pp, num_mb = layout
    g = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=pp))
    student, teacher = build_model(STUDENT, g), build_model(TEACHER, g, frozen=True)
    load_full_state_dict(student, s_full, g, STUDENT)
    load_full_state_dict(teacher, t_full, g, TEACHER)
    ddp = wrap_ddp(student, g, OptimConfig(use_distributed_optimizer=False))
    full = _batch()
    mbs = [Microbatch(*[getattr(full, f).chunk(num_mb)[i] for f in
                        ("input_ids", "position_ids", "target_mask", "rollout_ids")]) for i in range(num_mb)]
    shape = dict(seq_length=SEQ, micro_batch_size=ROWS // num_mb)
    hidden = teacher_hidden_states(teacher, g, mbs, **shape)
    contexts = make_contexts(g, mbs, hidden, teacher_output_weight(teacher) if g.is_last_stage else None)
    spec = DistillSpec(selection, loss_cfg, STUDENT.vocab_size, g.tp_group)
    padded = STUDENT.vocab_size if not g.is_last_stage else teacher_output_weight(teacher).shape[0]
    widths = (padded, vocab_shard(padded, g.tp_group, STUDENT.vocab_size).valid_width)
    with LMHeadCounter(widths, (STUDENT.hidden_size, TEACHER.hidden_size)) as count:
        if selection.needs_prepass:
            signals = scoring_pass(ddp, g, mbs, contexts, spec, **shape).signals
            if g.is_last_stage:
                masks, labels = select_prepass(selection, signals, g.dp_group, step=0)
                contexts = with_preselection(contexts, signals, masks, labels)
        results = train_pass(ddp, g, mbs, contexts, spec, **shape)
    grads = gather_full_state_dict(ddp, g, STUDENT, tensor_of=lambda p: p.main_grad)
    n = int(full.target_mask.sum()) if g.is_last_stage else 0
    return results, grads, dict(count.rows), n


def _both(layouts, s_full, t_full):
    """{(layout, case, one_pass): _step(...)} for every layout of this world size."""
    return {(name, case, flag): _step(layout, s_full, t_full, sel, replace(cfg, one_pass=flag))
            for name, layout in layouts.items() for case, (sel, cfg) in CASES.items()
            for flag in (False, True)}


def _expected_rows(case, n, k, one_pass):
    """The rows docs/tip.md states: (logits, grad_hidden, grad_weight)."""
    if n == 0:  # not the last stage: no output layer
        return {}
    if case.startswith("all/") and one_pass:
        return {"logits": 2 * n, "grad_hidden": n, "grad_weight": n}
    return {"logits": 2 * n + 2 * k, "grad_hidden": k, "grad_weight": k}


def _close(got, ref, what, rel=1e-6):
    for name, r in ref.items():
        err = (got[name].double() - r.double()).abs().max().item()
        scale = r.abs().max().item() + 1e-12
        assert err <= rel * scale, f"{what}: {name} off by {err:.2e} (scale {scale:.2e})"


def _check_same(two, one, what):
    (r2, g2, _, _), (r1, g1, _, _) = two, one
    assert len(r1) == len(r2), what
    for a, b in zip(r2, r1):
        assert torch.equal(a.kept_mask, b.kept_mask), f"{what}: kept set"
        assert a.finite and b.finite
        for key, value in a.metric_sums.items():
            assert torch.allclose(b.metric_sums[key].double(), value.double(), rtol=1e-6, atol=1e-9), \
                f"{what}: {key}"
        for name in ("entropy_norm", "reverse_kl", "forward_kl", "teacher_entropy"):
            assert torch.allclose(getattr(b.signals, name), getattr(a.signals, name),
                                  rtol=1e-6, atol=1e-7), f"{what}: signal {name}"
    _close(g1, g2, what)


@pytest.fixture(scope="module")
def weights():
    return run_distributed(_weights, 1)[0]


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_one_pass_equals_two_passes_and_counts_matmuls(weights, world):
    results = run_distributed(_both, world, args=(LAYOUTS[world], *weights))
    for rank, by_key in enumerate(results):
        for name in LAYOUTS[world]:
            for case in CASES:
                two, one = by_key[(name, case, False)], by_key[(name, case, True)]
                _check_same(two, one, f"{name} rank {rank} {case}")
                for flag, run in ((False, two), (True, one)):
                    res, _, rows, n = run
                    k = sum(int(r.kept_mask.sum()) for r in res)
                    assert 0 < k <= n or n == 0
                    assert rows == _expected_rows(case, n, k, flag), \
                        f"{name} rank {rank} {case} one_pass={flag}: LM-head rows {rows} (n={n}, k={k})"
