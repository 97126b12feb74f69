"""A student pass with loss.divergence = forward_kl / jsd through megatron's schedule: the
loss and every parameter gradient equal the float64 divergence of the kept tokens computed
the naive way (full logits, float64 log-softmax), and the kept set is the one reverse_kl
keeps (selection signals are the paper's statistics whatever the loss is).
"""
import pytest
import torch

from tip_megatron.runtime import parallel
from tip_megatron.distill.spec import DistillSpec, LossConfig
from tip_megatron.distill.step import (
    Microbatch, make_contexts, teacher_hidden_states, teacher_output_weight, train_pass,
)
from tip_megatron.models import build_model
from tip_megatron.models.init import init_full_state
from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
from tip_megatron.testing import reference_ops as ref
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch
from tip_megatron.tip import SelectionConfig
from tip_megatron.train.optimizer import OptimConfig, wrap_ddp

ROWS, SEQ = 4, 12
STUDENT = tiny_arch("qwen3")
TEACHER = tiny_arch("llama", hidden_size=96, ffn_hidden_size=128)
SELECTION = SelectionConfig(rule="soft_or", rho=0.5)
LOSSES = {"reverse_kl": LossConfig(chunk_size=5),
          "forward_kl": LossConfig(chunk_size=5, divergence="forward_kl"),
          "jsd": LossConfig(chunk_size=5, divergence="jsd", jsd_beta=0.3)}


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, STUDENT.vocab_size, (ROWS, SEQ), generator=gen)
    target = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    for r in range(ROWS):
        target[r, 2 + r:SEQ - 1] = True
    return Microbatch(ids, torch.arange(SEQ).expand(ROWS, SEQ).contiguous(), target, torch.arange(ROWS))


def _engine(g, s_full, t_full, loss_cfg):
    student, teacher = build_model(STUDENT, g), build_model(TEACHER, g, frozen=True)
    load_full_state_dict(student, s_full, g, STUDENT)
    load_full_state_dict(teacher, t_full, g, TEACHER)
    ddp = wrap_ddp(student, g, OptimConfig(use_distributed_optimizer=False))
    mbs, shape = [_batch()], dict(seq_length=SEQ, micro_batch_size=ROWS)
    hidden = teacher_hidden_states(teacher, g, mbs, **shape)
    contexts = make_contexts(g, mbs, hidden, teacher_output_weight(teacher))
    spec = DistillSpec(SELECTION, loss_cfg, STUDENT.vocab_size, g.tp_group)
    (result,) = train_pass(ddp, g, mbs, contexts, spec, **shape)
    grads = gather_full_state_dict(ddp, g, STUDENT, tensor_of=lambda p: p.main_grad)
    return result.metric_sums["distill"], result.kept_mask.view(ROWS, SEQ), grads


def _naive(g, s_full, t_full, kept, loss_cfg):
    (student,), (teacher,) = build_model(STUDENT, g), build_model(TEACHER, g)
    load_full_state_dict([student], s_full, g, STUDENT)
    load_full_state_dict([teacher], t_full, g, TEACHER)
    mb = _batch()
    logits = student(mb.input_ids, mb.position_ids, None).double()
    with torch.no_grad():
        t_logits = teacher(mb.input_ids, mb.position_ids, None).double()
    per_token = ref.divergence(logits[kept], t_logits[kept], STUDENT.vocab_size,
                               loss_cfg.divergence, loss_cfg.jsd_beta)
    (per_token.sum() / int(kept.sum())).backward()
    return float(per_token.sum()), gather_full_state_dict([student], g, STUDENT, tensor_of=lambda p: p.grad)


def _main():
    g = parallel.initialize(parallel.ParallelLayout(), seed=0)
    s_full = init_full_state(build_model(STUDENT, g), g, STUDENT, 1)
    t_full = init_full_state(build_model(TEACHER, g), g, TEACHER, 2)
    out = {}
    for name, cfg in LOSSES.items():
        loss, kept, grads = _engine(g, s_full, t_full, cfg)
        out[name] = (loss, kept, grads, _naive(g, s_full, t_full, kept, cfg))
    return out


def test_divergences_through_the_student_pass():
    results = run_distributed(_main, 1)[0]
    kept_rkl = results["reverse_kl"][1]
    losses = set()
    for name, (loss, kept, grads, (ref_loss, ref_grads)) in results.items():
        assert torch.equal(kept, kept_rkl), name  # same selection whatever the loss
        assert int(loss[1]) == int(kept.sum()) > 0
        assert float(loss[0]) == pytest.approx(ref_loss, rel=1e-5), name
        for p, r in ref_grads.items():
            err = (grads[p].double() - r.double()).abs().max().item()
            assert err <= 1e-5 * (r.abs().max().item() + 1e-12), f"{name}: {p} off by {err:.2e}"
        losses.add(round(float(loss[0]), 5))
    assert len(losses) == 3
