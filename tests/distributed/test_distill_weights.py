"""Per-token weights through megatron's schedules (distill.loss + distill.weighting):

- mask-valued weights give today's losses and gradients exactly: `tip_soft` with weights
  (1, 1, 1, 1) is rule `all`, with (1, 0, 1, 0) it is `quadrants` keeping {1, 3}
  (torch.equal, not a tolerance);
- a weighted loss (propose_verify {0, beta, 1}; tip_soft by quadrant) equals the float64
  reference sum_i w_i KL_i / sum_i w_i over the batch, weights computed by the reference
  from its own float64 logits, in value and in every gradient (fused path);
- the new rules (teachability through the scoring pre-pass, propose_verify, tip_soft) keep
  the same tokens, weights, loss and gradients at TP1/TP2/TP4, PP2, DP2 and micro-batch
  sizes 1/2/4/8.
"""
import pytest
import torch

from test_distill_loss import (  # noqa: F401  (the module fixture `weights` too)
    LAYOUTS_BY_WORLD, STUDENT, TEACHER, _batch, _close, _kept_rows, _tip, weights,
)
from tip_megatron.models import build_model
from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
from tip_megatron.runtime import parallel
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.tip import QuadrantRule, SelectionConfig

V = STUDENT.vocab_size


def _reference_logits(s_full, t_full):
    g = parallel.initialize(parallel.ParallelLayout())
    (student,), (teacher,) = build_model(STUDENT, g), build_model(TEACHER, g)
    load_full_state_dict([student], s_full, g, STUDENT)
    load_full_state_dict([teacher], t_full, g, TEACHER)
    mb = _batch()
    logits = student(mb.input_ids, mb.position_ids, None)[..., :V].double()
    with torch.no_grad():
        t_logits = teacher(mb.input_ids, mb.position_ids, None)[..., :V].double()
    return student, g, mb, logits, t_logits


def _signals64(logits, t_logits, ids):
    """Per position: normalised entropy, reverse KL, teacher rank of the next token."""
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(t_logits, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    h = -(logp.exp() * logp).sum(-1) / torch.log(torch.tensor(float(V), dtype=torch.float64))
    nxt = torch.cat([ids[:, 1:], ids[:, -1:]], 1)
    t_tok = t_logits.gather(-1, nxt[..., None])
    cols = torch.arange(V)
    rank = ((t_logits > t_tok) | ((t_logits == t_tok) & (cols < nxt[..., None]))).sum(-1)
    return h, kl, rank


def _midpoint(values):
    """A threshold halfway between the two middle values (never on a value)."""
    v = torch.sort(values).values
    i = v.numel() // 2
    return float((v[i - 1] + v[i]) / 2)


def _naive_weighted(s_full, t_full, rule):
    """(loss, weights [rows, seq], grads, selection) of the float64 reference."""
    student, g, mb, logits, t_logits = _reference_logits(s_full, t_full)
    h, kl, rank = _signals64(logits.detach(), t_logits, mb.input_ids)
    resp = mb.target_mask
    if rule == "propose_verify":
        top_k, beta = int(_midpoint(rank[resp].double())) + 1, 0.25
        w = torch.where(rank < top_k, 1.0, beta).double()
        sel = SelectionConfig(rule=rule, verify_top_k=top_k, reject_weight=beta)
    else:
        th_h, th_d, table = _midpoint(h[resp]), _midpoint(kl[resp]), (1.0, 0.5, 0.8, 0.1)
        q = torch.where(h > th_h, torch.where(kl > th_d, 1, 2), torch.where(kl > th_d, 3, 4))
        w = torch.tensor(table, dtype=torch.float64)[q - 1]
        sel = SelectionConfig(rule=rule, quadrant_weights=table,
                              quadrant_rule=QuadrantRule(entropy_threshold=th_h, div_threshold_nats=th_d))
    w = torch.where(resp, w, 0.0)
    assert len(torch.unique(w[resp])) > 1, "the weights must not be constant (they would cancel)"
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(t_logits, -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    loss = (w * per_token).sum() / w.sum()
    loss.backward()
    grads = gather_full_state_dict([student], g, STUDENT, tensor_of=lambda p: p.grad)
    return float(loss), w.float(), grads, sel


def _loss(results):
    """loss_sum / weight_sum over the unique DP replicas, and (num_kept, weight_sum)."""
    seen = {}
    for loss, _, _, (dp_rank, _, _), *_rest in results:
        if loss is not None:
            seen[dp_rank] = loss
    total = torch.stack(list(seen.values())).sum(0)
    return float(total[0] / total[2]), int(total[1]), float(total[2])


def test_mask_valued_weights_are_todays_loss_exactly(weights):
    pairs = (
        (SelectionConfig(rule="tip_soft", quadrant_weights=(1.0, 1.0, 1.0, 1.0)), SelectionConfig(rule="all")),
        (SelectionConfig(rule="tip_soft", quadrant_weights=(1.0, 0.0, 1.0, 0.0),
                         quadrant_rule=QuadrantRule(entropy_threshold=0.999, div_threshold_nats=0.01)),
         SelectionConfig(rule="quadrants", keep_quadrants=(1, 3),
                         quadrant_rule=QuadrantRule(entropy_threshold=0.999, div_threshold_nats=0.01))),
    )
    for soft, mask in pairs:
        got = run_distributed(_tip, 1, args=((1, 1, 1, 2), *weights, soft, "fused"))[0]
        want = run_distributed(_tip, 1, args=((1, 1, 1, 2), *weights, mask, "fused"))[0]
        assert 0 < int(want[0][1]) and torch.equal(torch.cat(got[1]), torch.cat(want[1]))
        assert torch.equal(got[0][:2], want[0][:2]) and float(got[0][2]) == float(want[0][1])
        for name, grad in want[2].items():
            assert torch.equal(got[2][name], grad), name


@pytest.mark.parametrize("rule", ["propose_verify", "tip_soft"])
def test_weighted_loss_and_gradients_vs_float64(weights, rule):
    ref_loss, ref_w, ref_grads, sel = run_distributed(_naive_weighted, 1, args=(*weights, rule))[0]
    for layout in ((1, 1, 1, 1), (1, 1, 1, 4)):
        got = run_distributed(_tip, 1, args=(layout, *weights, sel, "fused"))
        loss, num_kept, weight_sum = _loss(got)
        assert num_kept == int((ref_w > 0).sum())
        assert weight_sum == pytest.approx(float(ref_w.double().sum()), rel=1e-6)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        _close(got[0][2], ref_grads, f"{rule} {layout} vs float64")


NEW_RULES = {
    "teachability": SelectionConfig(rule="teachability", rho=0.3, top_k=5),
    "propose_verify": SelectionConfig(rule="propose_verify", verify_top_k=120, reject_weight=0.25),
    "tip_soft": SelectionConfig(rule="tip_soft", quadrant_weights=(1.0, 0.5, 0.8, 0.1),
                                quadrant_rule=QuadrantRule(entropy_threshold=0.99, div_threshold_nats=0.02)),
}


def _tip_new(layouts, s_full, t_full):
    return {(name, rule): _tip(layout, s_full, t_full, sel, "fused")
            for name, layout in layouts.items() for rule, sel in NEW_RULES.items()}


def test_new_rules_are_layout_invariant(weights):
    ref = run_distributed(_tip_new, 1, args=({"ref": (1, 1, 1, 1)}, *weights))[0]
    for rule in NEW_RULES:
        want = ref[("ref", rule)]
        m = int(_batch().target_mask.sum())
        assert 0 < int(want[0][1]) <= m
        if rule != "teachability":
            assert float(want[0][2]) < int(want[0][1]), f"{rule}: weights all 1 test nothing"
    for world, layouts in LAYOUTS_BY_WORLD.items():
        results = run_distributed(_tip_new, world, args=(layouts, *weights))
        for name, layout in layouts.items():
            dp = layout[2]
            for rule in NEW_RULES:
                got = [r[(name, rule)] for r in results]
                want = ref[("ref", rule)]
                assert torch.equal(_kept_rows(got, dp), _kept_rows([want], 1)), f"{name} {rule}: kept set"
                loss, num_kept, weight_sum = _loss(got)
                ref_loss, ref_kept, ref_weight = _loss([want])
                assert num_kept == ref_kept, f"{name} {rule}"
                assert weight_sum == pytest.approx(ref_weight, rel=1e-6), f"{name} {rule}"
                assert loss == pytest.approx(ref_loss, rel=1e-5), f"{name} {rule}"
                for r in got:
                    _close(r[2], want[2], f"{rule} {name}")


USER_RULE = '''
import torch

TABLE = torch.tensor([0.0, 1.0, 0.5, 0.8, 0.1], dtype=torch.float64)


def soft_quadrants(signals, *, seed, step):
    """tip_soft's weights with the fixed thresholds of NEW_RULES, written by a user."""
    high_h = signals.entropy_norm.double() > 0.99
    high_d = signals.reverse_kl.double() > 0.02
    q = torch.where(high_h, torch.where(high_d, 1, 2), torch.where(high_d, 3, 4))
    return TABLE[q]
'''


def test_user_rule_by_import_path_equals_the_builtin(weights, tmp_path, monkeypatch):
    """A user rule loaded by import path that computes tip_soft's weights gives tip_soft's
    kept set, loss and gradients exactly, at TP1 and TP2 x PP2."""
    (tmp_path / "user_soft_rules.py").write_text(USER_RULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    user = SelectionConfig(rule="user_soft_rules:soft_quadrants")  # loaded and probed here
    builtin = NEW_RULES["tip_soft"]
    for world, layout in ((1, (1, 1, 1, 2)), (4, (2, 2, 1, 4))):
        got = run_distributed(_tip, world, args=(layout, *weights, user, "fused"))
        want = run_distributed(_tip, world, args=(layout, *weights, builtin, "fused"))
        assert torch.equal(_kept_rows(got, 1), _kept_rows(want, 1)), layout
        assert _loss(got) == _loss(want), layout
        for a, b in zip(got, want):
            for name, grad in b[2].items():
                assert torch.equal(a[2][name], grad), (layout, name)
