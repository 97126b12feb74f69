"""`loss.mix` through megatron's schedules: the per-token mix of reverse KL, forward KL and
JSD gated by a token's signal equals the float64 reference (its own teacher entropy and
divergences from full float64 logits) in loss and every gradient, with the `entropy_aware`
preset and a `custom` form that uses all three parts, under rule `all` and a weighted rule;
and it is the same at TP2/TP4, PP2, DP2 and other micro-batch sizes."""
import pytest
import torch

from test_distill_loss import (  # noqa: F401  (the module fixture `weights` too)
    LAYOUTS_BY_WORLD, _close, _tip, weights,
)
from test_distill_weights import _loss, _midpoint, _reference_logits
from tip_megatron.distill.spec import LossConfig
from tip_megatron.models.state import gather_full_state_dict
from tip_megatron.testing import reference_ops as ref
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch
from tip_megatron.tip import SelectionConfig

STUDENT = tiny_arch("qwen3")
V = STUDENT.vocab_size


def _teacher_entropy(t_logits):
    logq = torch.log_softmax(t_logits, -1)
    return -(logq.exp() * logq).sum(-1)


def _threshold(s_full, t_full):
    _, _, mb, _, t_logits = _reference_logits(s_full, t_full)
    return _midpoint(_teacher_entropy(t_logits)[mb.target_mask])


def _naive_mix(s_full, t_full, low, high, threshold, beta):
    """float64: sum over response tokens of (coefs . (rKL, fKL, JSD)) / their count."""
    student, g, mb, logits, t_logits = _reference_logits(s_full, t_full)
    gate = (_teacher_entropy(t_logits) > threshold).double()[..., None]
    coefs = torch.tensor(low, dtype=torch.float64) + (torch.tensor(high, dtype=torch.float64)
                                                      - torch.tensor(low, dtype=torch.float64)) * gate
    flat_s, flat_t = logits.reshape(-1, V), t_logits.reshape(-1, V)
    parts = torch.stack([ref.divergence(flat_s, flat_t, V, n, beta)
                         for n in ("reverse_kl", "forward_kl", "jsd")], -1).reshape(*logits.shape[:2], 3)
    per_token = (coefs * parts).sum(-1)
    resp = mb.target_mask
    assert 0 < int(gate[..., 0][resp].sum()) < int(resp.sum()), "both sides of the gate"
    loss = per_token[resp].sum() / resp.sum()
    loss.backward()
    return float(loss), gather_full_state_dict([student], g, STUDENT, tensor_of=lambda p: p.grad)


def _configs(threshold):
    return {
        "entropy_aware": ((1.0, 0.0, 0.0), (1.0, 1.0, 0.0),
                          LossConfig(mix="entropy_aware", mix_threshold=threshold, chunk_size=7)),
        "custom": ((0.5, 0.0, 1.0), (1.0, 0.7, 0.3),
                   LossConfig(mix="custom", mix_threshold=threshold, mix_low=(0.5, 0.0, 1.0),
                              mix_high=(1.0, 0.7, 0.3), jsd_beta=0.3, chunk_size=7)),
    }


def test_mix_vs_float64(weights):
    threshold = run_distributed_one(_threshold, weights)
    for name, (low, high, cfg) in _configs(threshold).items():
        ref_loss, ref_grads = run_distributed_one(_naive_mix, weights, low, high, threshold, cfg.jsd_beta)
        got = run_distributed(_tip, 1, args=((1, 1, 1, 2), *weights, SelectionConfig(rule="all"), cfg))
        loss, _, _ = _loss(got)
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        _close(got[0][2], ref_grads, f"mix {name} vs float64")


def _tip_mix(layouts, s_full, t_full, threshold):
    sel = SelectionConfig(rule="propose_verify", verify_top_k=120, reject_weight=0.25)
    return {(name, mix): _tip(layout, s_full, t_full, sel, cfg)
            for name, layout in layouts.items() for mix, (_, _, cfg) in _configs(threshold).items()}


def test_mix_with_weights_is_layout_invariant(weights):
    threshold = run_distributed_one(_threshold, weights)
    ref_run = run_distributed(_tip_mix, 1, args=({"ref": (1, 1, 1, 1)}, *weights, threshold))[0]
    for world, layouts in LAYOUTS_BY_WORLD.items():
        if world == 1:
            continue
        results = run_distributed(_tip_mix, world, args=(layouts, *weights, threshold))
        for name in layouts:
            for mix in _configs(threshold):
                got, want = [r[(name, mix)] for r in results], ref_run[("ref", mix)]
                assert _loss(got)[0] == pytest.approx(_loss([want])[0], rel=1e-5), f"{name} {mix}"
                for r in got:
                    _close(r[2], want[2], f"mix {mix} {name}")


def run_distributed_one(fn, weights, *args):
    return run_distributed(fn, 1, args=(*weights, *args))[0]
