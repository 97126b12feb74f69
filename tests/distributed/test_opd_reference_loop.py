"""The engine's training loop against an independent plain-PyTorch OPD loop.

Same start (the engine's initial student and teacher weights), same rollouts (the
engine's, recorded as it trains, so sampling is out of the comparison), same optimizer
(torch.optim.AdamW with megatron's no-decay rule for 1-D parameters and biases, global
grad-norm clipping, linear warm-up then cosine decay written out here). The plain loop
computes full-vocabulary logits for every position, the reverse KL with torch ops, and
for q3 its own batch-normalized Q3 scores (98th-percentile clip, min-max, top floor(rho m)
over the batch). Per-step losses agree to fp32 rounding over 20 steps: the engine's
convergence is its recipe's, not a defect's.
"""
import math

import pytest
import torch

from tip_megatron.config import load_config
from tip_megatron.testing.assets import tiny_run_overrides
from tip_megatron.testing.distributed import run_distributed

STEPS, LR, MIN_LR, WARMUP, WD, CLIP = 20, 3e-3, 3e-4, 3, 0.01, 0.5


def _lr_at(step):
    """Linear warm-up from 0 over WARMUP optimizer steps, then cosine to MIN_LR at STEPS."""
    if step <= WARMUP:
        return LR * step / WARMUP
    ratio = (step - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (LR - MIN_LR)


def _plain_kl(model, teacher, token_ids, response_mask, vocab, rho):
    """(mean reverse KL over the kept positions, with grad). Position t predicts t+1."""
    target = torch.zeros_like(response_mask, dtype=torch.bool)
    target[:, :-1] = response_mask[:, 1:].bool()
    pos = torch.arange(token_ids.shape[1]).expand_as(token_ids)
    logp = torch.log_softmax(model(token_ids, pos, None)[..., :vocab].float(), -1)[target]
    with torch.no_grad():
        logq = torch.log_softmax(teacher(token_ids, pos, None)[..., :vocab].float(), -1)[target]
    kl = (logp.exp() * (logp - logq)).sum(-1)
    if rho >= 1.0:
        return kl.mean()
    with torch.no_grad():  # Q3 over the batch: w = KL(T || S) (1 - h^)
        p = logp.double().exp()
        h = -(p * logp.double()).sum(-1) / math.log(vocab)
        fwd = (logq.double().exp() * (logq.double() - logp.double())).sum(-1)
        clip = torch.quantile(h, 0.98)
        h_hat = (torch.minimum(h, clip) - h.min()) / (clip - h.min())
        k = math.floor(rho * 10) * h.numel() // 10
        kept = torch.topk(fwd * (1 - h_hat), k).indices
    return kl[kept].mean()


def _reference_loop(student, teacher, batches, vocab, rho):
    opt_groups = [
        {"params": [p for n, p in student.named_parameters() if p.ndim > 1 and not n.endswith(".bias")],
         "weight_decay": WD},
        {"params": [p for n, p in student.named_parameters() if p.ndim == 1 or n.endswith(".bias")],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(opt_groups, lr=LR, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for step, (token_ids, response_mask) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step)
        opt.zero_grad()
        loss = _plain_kl(student, teacher, token_ids, response_mask, vocab, rho)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        opt.step()
        losses.append(float(loss))
    return losses


def _both(overrides, rho):
    from tip_megatron.models import build_model
    from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
    from tip_megatron.train import trainer

    run = trainer.setup(load_config(None, overrides))
    g, m = run.groups, run.models
    start = gather_full_state_dict(run.ddp, g, m.student_arch)
    teacher_state = gather_full_state_dict(m.teacher, g, m.teacher_arch)
    recorded = []
    real_rollouts = trainer.generate_rollouts

    def recording(run_, prompts):  # the real generation; we only keep its output
        out = real_rollouts(run_, prompts)
        recorded.append((out.token_ids.clone(), out.response_mask.clone()))
        return out

    trainer.generate_rollouts = recording
    trainer.loop(run)
    engine = [h["loss"] for h in run.history]
    (student,), (teacher,) = build_model(m.student_arch, g), build_model(m.teacher_arch, g, frozen=True)
    load_full_state_dict([student], start, g, m.student_arch)
    load_full_state_dict([teacher], teacher_state, g, m.teacher_arch)
    return engine, _reference_loop(student, teacher, recorded, m.vocab_size, rho)


@pytest.mark.parametrize("rule,rho", [("all", 1.0), ("q3", 0.2)])
def test_engine_equals_plain_pytorch_loop(opd_assets, rule, rho):
    overrides = tiny_run_overrides(opd_assets, **{
        "data.prompts_per_step": 8, "selection.rule": rule, "selection.rho": rho,
        "train.steps": STEPS, "optim.lr": LR, "optim.min_lr": MIN_LR, "optim.warmup_steps": WARMUP,
        "optim.weight_decay": WD, "optim.clip_grad": CLIP})
    engine, plain = run_distributed(_both, 1, args=(overrides, rho), timeout_s=900)[0]
    assert len(engine) == len(plain) == STEPS
    assert plain[-1] < plain[0]  # the loop learns: the comparison is not between constants
    assert engine == pytest.approx(plain, rel=2e-5), list(zip(engine, plain))
