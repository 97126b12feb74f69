"""The TIP loss path at the output layer, through megatron's schedules.

- rule `all` equals full-token OPD computed the naive way (full logits, float64
  log-softmax, reverse KL summed over response positions) in loss and in every gradient;
- every rule under its default (paper) scope -- soft_or per rollout; q3, entropy_sample,
  random, div_topk over the global batch through the scoring pre-pass -- keeps the same
  tokens and gives the same loss and gradients under TP=1/2/4, PP=1/2, DP=1/2 and
  micro-batch sizes 1/2/4/8 (one launch per world size);
- prompt and padding positions are never kept; a micro-batch with no response tokens
  contributes zero loss and zero gradient without breaking the schedule;
- scope `global` scores once, in the pre-pass: the student pass reuses those signals
  (no statistics call at the output layer) and gives what re-scoring gives.
"""
import math
from fractions import Fraction

import pytest
import torch

from tip_megatron.runtime import parallel
from tip_megatron.distill.spec import DistillSpec, LossConfig
from tip_megatron.distill import loss as loss_module
from tip_megatron.distill.prepass import select_prepass, with_preselection
from tip_megatron.distill.step import (
    Microbatch, make_contexts, scoring_pass, teacher_hidden_states, teacher_output_weight, train_pass,
)
from tip_megatron.models import build_model
from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
from tip_megatron.models.init import init_full_state
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch
from tip_megatron.tip import SelectionConfig
from tip_megatron.config import OptimConfig
from tip_megatron.train.optimizer import wrap_ddp

ROWS, SEQ = 8, 12
STUDENT = tiny_arch("qwen3")
TEACHER = tiny_arch("llama", hidden_size=96, ffn_hidden_size=128)


def _batch(empty_rows=()):
    """8 rollouts: a prompt of 3-6 tokens, a response, right padding; rows in `empty_rows`
    have no response at all."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, STUDENT.vocab_size, (ROWS, SEQ), generator=gen)
    target = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    for r in range(ROWS):
        prompt, end = 3 + r % 4, SEQ - r % 3
        if r not in empty_rows:
            target[r, prompt - 1:end - 1] = True  # position t predicts response token t+1
    return Microbatch(ids, torch.arange(SEQ).expand(ROWS, SEQ).contiguous(), target, torch.arange(ROWS))


def _cut(mb, dp_rank, dp, num_mb):
    fields = ("input_ids", "position_ids", "target_mask", "rollout_ids")
    mine = [getattr(mb, f).chunk(dp)[dp_rank] for f in fields]
    return [Microbatch(*[t.chunk(num_mb)[i] for t in mine]) for i in range(num_mb)]


def _weights():
    g = parallel.initialize(parallel.ParallelLayout(), seed=0)
    s, t = build_model(STUDENT, g), build_model(TEACHER, g)
    return init_full_state(s, g, STUDENT, 1), init_full_state(t, g, TEACHER, 2)


def _count_stats_calls() -> list:
    """Count the loss path's calls of the statistics op (the real op still runs)."""
    calls = []
    real = loss_module.vocab_parallel_stats

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    loss_module.vocab_parallel_stats = counted
    return calls


def _tip(layout, s_full, t_full, selection, impl, empty_rows=()):
    tp, pp, dp, num_mb = layout
    g = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=pp))
    student, teacher = build_model(STUDENT, g), build_model(TEACHER, g, frozen=True)
    load_full_state_dict(student, s_full, g, STUDENT)
    load_full_state_dict(teacher, t_full, g, TEACHER)
    ddp = wrap_ddp(student, g, OptimConfig(use_distributed_optimizer=False))
    mbs = _cut(_batch(empty_rows), g.dp_rank, dp, num_mb)
    shape = dict(seq_length=SEQ, micro_batch_size=ROWS // dp // num_mb)
    hidden = teacher_hidden_states(teacher, g, mbs, **shape)
    contexts = make_contexts(g, mbs, hidden, teacher_output_weight(teacher) if g.is_last_stage else None)
    loss_cfg = impl if isinstance(impl, LossConfig) else LossConfig(impl=impl, chunk_size=7)
    spec = DistillSpec(selection, loss_cfg, STUDENT.vocab_size, g.tp_group)
    calls = _count_stats_calls()
    if selection.needs_prepass:
        signals = scoring_pass(ddp, g, mbs, contexts, spec, **shape).signals
        if g.is_last_stage:
            masks, labels = select_prepass(selection, signals, g.dp_group, step=spec.step)
            contexts = with_preselection(contexts, signals, masks, labels)
    num_prepass_calls = len(calls)
    results = train_pass(ddp, g, mbs, contexts, spec, **shape)
    scoring = (num_prepass_calls, len(calls) - num_prepass_calls)
    assert all(r.finite for r in results)
    loss = torch.stack([r.metric_sums["distill"] for r in results]).sum(0) if results else None
    kept = [r.kept_mask.view(-1, SEQ) for r in results] if g.is_last_stage else None
    metrics = ({k: float(sum(r.metric_sums[k] for r in results)) for k in results[0].metric_sums
                if k.startswith("tip/")} if results else None)
    grads = gather_full_state_dict(ddp, g, STUDENT, tensor_of=lambda p: p.main_grad)
    return loss, kept, grads, (g.dp_rank, g.tp_rank, g.pp_rank), scoring, metrics


def _naive(s_full, t_full):
    """Full-token OPD the way the paper's code does it: logits for every position, float64
    log-softmax over the true vocabulary, reverse KL summed over response positions."""
    g = parallel.initialize(parallel.ParallelLayout())
    (student,), (teacher,) = build_model(STUDENT, g), build_model(TEACHER, g)
    load_full_state_dict([student], s_full, g, STUDENT)
    load_full_state_dict([teacher], t_full, g, TEACHER)
    mb = _batch()
    logits = student(mb.input_ids, mb.position_ids, None)[..., :STUDENT.vocab_size].double()
    with torch.no_grad():
        t_logits = teacher(mb.input_ids, mb.position_ids, None)[..., :STUDENT.vocab_size].double()
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(t_logits, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    loss_sum = kl[mb.target_mask].sum()
    n = int(mb.target_mask.sum())
    (loss_sum / n).backward()
    grads = gather_full_state_dict([student], g, STUDENT, tensor_of=lambda p: p.grad)
    return float(loss_sum), n, grads


def _close(got, ref, what, rel=1e-5):
    for name, r in ref.items():
        err = (got[name].double() - r.double()).abs().max().item()
        scale = r.abs().max().item() + 1e-12
        assert err <= rel * scale, f"{what}: {name} off by {err:.2e} (scale {scale:.2e})"


def _unique_loss(results):
    seen = {}
    for loss, _, _, (dp_rank, _, _), *_rest in results:
        if loss is not None:
            seen[dp_rank] = loss
    total = torch.stack(list(seen.values())).sum(0)
    return float(total[0]), int(total[1])


def _kept_rows(results, dp):
    """The global [rows, seq] kept mask, reassembled from the last-stage DP replicas."""
    parts = {}
    for _, kept, _, (dp_rank, tp_rank, _), *_rest in results:
        if kept is not None and tp_rank == 0:
            parts[dp_rank] = torch.cat(kept)
    return torch.cat([parts[r] for r in range(dp)])


@pytest.fixture(scope="module")
def weights():
    return run_distributed(_weights, 1)[0]


@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_rule_all_is_full_token_opd(weights, impl):
    ref_loss, ref_n, ref_grads = run_distributed(_naive, 1, args=weights)[0]
    loss, kept, grads, *_ = run_distributed(
        _tip, 1, args=((1, 1, 1, 1), *weights, SelectionConfig(rule="all"), impl))[0]
    assert int(loss[1]) == ref_n
    assert float(loss[0]) == pytest.approx(ref_loss, rel=1e-6)
    assert torch.equal(torch.cat(kept), _batch().target_mask)
    _close(grads, ref_grads, f"rule all ({impl}) vs naive full-token OPD")


# The paper's defaults (scope auto): Soft-OR per rollout, the other rules over the global
# batch (a scoring pre-pass). Layouts grouped by world size: one launch per world size.
DEFAULT_SELECTIONS = {
    "soft_or": SelectionConfig(rule="soft_or", rho=0.5),
    "q3": SelectionConfig(rule="q3", rho=0.2),
    "entropy_sample": SelectionConfig(rule="entropy_sample", rho=0.5, seed=7),
    "random": SelectionConfig(rule="random", rho=0.3, seed=7),
    "div_topk": SelectionConfig(rule="div_topk", rho=0.1),
}
LAYOUTS_BY_WORLD = {
    1: {"mbs4": (1, 1, 1, 2), "mbs2": (1, 1, 1, 4), "mbs1": (1, 1, 1, 8)},
    2: {"tp2": (2, 1, 1, 1), "pp2_mb4": (1, 2, 1, 4), "dp2_mb2": (1, 1, 2, 2)},
    4: {"tp4": (4, 1, 1, 1), "tp2_pp2_mb4": (2, 2, 1, 4), "dp2_tp2_mbs1": (2, 1, 2, 4)},
}


def _tip_many(layouts, s_full, t_full, selections):
    """`_tip` for every (layout, selection) in one launch: {(layout name, rule): result}."""
    return {(name, rule): _tip(layout, s_full, t_full, sel, "fused")
            for name, layout in layouts.items() for rule, sel in selections.items()}


def test_paper_defaults_are_layout_invariant(weights):
    """Identical kept sets, kept counts, losses and gradients at TP1/TP2/TP4/PP2/DP2 and
    micro-batch sizes 1/2/4/8, for each rule under its default (paper) scope."""
    assert {s.effective_scope for s in DEFAULT_SELECTIONS.values()} == {"rollout", "global"}
    ref = run_distributed(_tip_many, 1, args=({"ref": (1, 1, 1, 1)}, *weights, DEFAULT_SELECTIONS))[0]
    target = _batch().target_mask
    for rule, sel in DEFAULT_SELECTIONS.items():
        kept = _kept_rows([ref[("ref", rule)]], 1)
        assert not (kept & ~target).any(), "a prompt or padding position was kept"
        m = int(target.sum())
        want = math.floor(Fraction(str(sel.rho)) * m) if sel.effective_scope == "global" else None
        assert want is None or int(kept.sum()) == want, rule  # floor(rho * m) over the batch
        assert 0 < int(kept.sum()) < m
    for world, layouts in LAYOUTS_BY_WORLD.items():
        results = run_distributed(_tip_many, world, args=(layouts, *weights, DEFAULT_SELECTIONS))
        for name, layout in layouts.items():
            dp = layout[2]
            for rule in DEFAULT_SELECTIONS:
                got = [r[(name, rule)] for r in results]
                want = ref[("ref", rule)]
                assert torch.equal(_kept_rows(got, dp), _kept_rows([want], 1)), f"{name} {rule}: kept set"
                loss, num_kept = _unique_loss(got)
                assert num_kept == int(want[0][1]), f"{name} {rule}"
                assert loss == pytest.approx(float(want[0][0]), rel=1e-5), f"{name} {rule}"
                for r in got:
                    _close(r[2], want[2], f"{rule} {name}")


def test_microbatch_without_response_tokens(weights):
    """Rows 0-3 have no response: with 2 micro-batches the first keeps nothing at all."""
    results = run_distributed(_tip, 1, args=((1, 1, 1, 2), *weights, SelectionConfig(rule="soft_or", rho=0.5),
                                             "fused", (0, 1, 2, 3)))
    loss, kept, grads, *_ = results[0]
    assert int(kept[0].sum()) == 0 and int(kept[1].sum()) > 0
    assert all(torch.isfinite(g).all() for g in grads.values())
    # the same loss as the second micro-batch alone (rows 4-7)
    alone = run_distributed(_tip, 1, args=((1, 1, 1, 1), *weights, SelectionConfig(rule="soft_or", rho=0.5),
                                           "fused", (0, 1, 2, 3)))[0]
    assert float(loss[0]) == pytest.approx(float(alone[0][0]), rel=1e-6)
    _close(grads, alone[2], "empty micro-batch")


def test_global_scope_reuses_the_prepass_signals(weights):
    """Scope `global`: the statistics op runs in the scoring pre-pass only, never in the
    student pass; with one micro-batch the global batch is the micro-batch, so the result
    (kept set, loss, gradients, metric sums) equals scope `microbatch`, which scores in the
    student pass. DP=2 x 2 micro-batches and PP=2 x 4 keep the same tokens."""
    local = SelectionConfig(rule="soft_or", rho=0.5, scope="microbatch")
    ref = run_distributed(_tip, 1, args=((1, 1, 1, 1), *weights, local, "fused"))
    assert ref[0][4][0] == 0 and ref[0][4][1] > 0  # scored at the output layer
    glob = SelectionConfig(rule="soft_or", rho=0.5, scope="global")
    one = run_distributed(_tip, 1, args=((1, 1, 1, 1), *weights, glob, "fused"))
    assert one[0][4] == (ref[0][4][1], 0), "the student pass scored again"
    assert torch.equal(_kept_rows(one, 1), _kept_rows(ref, 1))
    assert _unique_loss(one) == pytest.approx(_unique_loss(ref), rel=1e-6)
    assert one[0][5] == pytest.approx(ref[0][5], rel=1e-6)
    _close(one[0][2], ref[0][2], "global vs microbatch scope")
    for layout in ((1, 1, 2, 2), (1, 2, 1, 4)):
        tp, pp, dp, _ = layout
        results = run_distributed(_tip, tp * pp * dp, args=(layout, *weights, glob, "fused"))
        assert all(r[4][1] == 0 for r in results), f"{layout}: the student pass scored again"
        assert torch.equal(_kept_rows(results, dp), _kept_rows(one, 1)), layout
        for r in results:
            _close(r[2], one[0][2], f"global scope {layout}")
