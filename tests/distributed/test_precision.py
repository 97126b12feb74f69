"""bf16 training against fp32, and activation recompute against none (CPU, gloo, 1 rank).

The engine's own stages (trainer set-up, teacher pass, student pass with the TIP loss,
megatron's optimizer) on tiny random Llamas. Rollouts are the fp32 student's, generated
once and replayed in every run, so the runs differ only in the precision (or recompute)
under test. Measured numbers are recorded in docs/precision.md.
"""
from types import SimpleNamespace

import pytest
import torch

from tip_megatron.config import load_config
from tip_megatron.testing.assets import opd_assets, tiny_run_overrides
from tip_megatron.testing.distributed import run_distributed

STEPS = 5
#: bf16 vs fp32, per step (docs/precision.md has the measured values).
LOSS_REL_TOL = 0.02
KEPT_AGREEMENT_MIN = 0.9


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    # Made on the CPU (tests/gpu reuses this fixture; see opd_assets).
    return opd_assets(tmp_path_factory.mktemp("precision"), teacher_layers=3)


def _overrides(assets, **extra):
    return tiny_run_overrides(assets, **{"data.prompts_per_step": 8, "rollout.max_new_tokens": 12,
                                         "train.steps": STEPS, "train.micro_batch_size": 4, **extra})


def _student_update(run, mbs, contexts, shape, want_grads):
    """One update through the trainer's stage; optionally the fp32 main grads before it."""
    from tip_megatron.distill.step import train_pass
    from tip_megatron.train import trainer

    if not want_grads:
        results, metrics = trainer.update(run, mbs, contexts, shape)
        return metrics, None, results
    for chunk in run.ddp:
        chunk.zero_grad_buffer()
    results = train_pass(run.ddp, run.groups, mbs, contexts, trainer._spec(run), **shape._asdict())
    loss = (sum(float(r.metric_sums["distill"][0]) for r in results)
            / sum(float(r.metric_sums["distill"][1]) for r in results))
    grads = [p.main_grad.detach().cpu().clone() for c in run.ddp for p in c.parameters()]
    return {"loss": loss}, grads, results


def _opd_run(overrides, rollouts=None, want_grads=False, steps=STEPS):
    """`steps` trainer steps (with `rollouts` replayed when given): per-step losses, kept
    masks, the rollouts used, and (want_grads) the first step's main grads; all on the CPU."""
    from tip_megatron.runtime.device import current_device
    from tip_megatron.distill.step import (
        ScheduleShape, make_contexts, teacher_hidden_states, teacher_output_weight,
    )
    from tip_megatron.train import trainer

    run = trainer.setup(load_config(None, overrides))
    device = current_device()
    dtype = next(run.ddp[0].parameters()).dtype
    attention_calls = _count_core_attention_calls(run.ddp)
    losses, kept, used, grads = [], [], [], None
    for step in range(steps):
        out = trainer.generate_rollouts(run, run.prompts.next()) if rollouts is None else rollouts[step]
        out = SimpleNamespace(token_ids=out.token_ids.to(device),
                              response_mask=out.response_mask.to(device))
        used.append(SimpleNamespace(token_ids=out.token_ids.cpu(), response_mask=out.response_mask.cpu()))
        mbs = [mb for group in trainer.microbatches(run, out) for mb in group]  # one update
        shape = ScheduleShape(out.token_ids.shape[1], run.cfg.train.micro_batch_size)
        hidden = teacher_hidden_states(run.models.teacher, run.groups, mbs, **shape._asdict())
        contexts = make_contexts(run.groups, mbs, hidden, teacher_output_weight(run.models.teacher))
        metrics, step_grads, results = _student_update(run, mbs, contexts, shape, want_grads)
        grads = grads if grads is not None else step_grads
        losses.append(metrics["loss"])
        kept.append(torch.cat([r.kept_mask for r in results]).cpu())
        run.step += 1
        if want_grads:  # one step is enough to compare gradients
            break
    main_params = [p for g in run.optimizer.param_groups for p in g["params"]]
    return {"dtype": dtype, "losses": losses, "kept": kept, "rollouts": used, "grads": grads,
            "attention_calls": attention_calls[0],
            "main_grad_dtypes": {p.main_grad.dtype for c in run.ddp for p in c.parameters()},
            "optimizer_param_dtypes": {p.dtype for p in main_params}}


def _count_core_attention_calls(chunks):
    """A counter of the student's core-attention forwards (recompute runs them twice)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for chunk in chunks:
        for name, module in chunk.named_modules():
            if name.endswith("self_attention.core_attention"):
                module.register_forward_hook(hook)
    return calls


def _bf16_vs_fp32(overrides_fp32, overrides_bf16):
    fp32 = _opd_run(overrides_fp32)
    bf16 = _opd_run(overrides_bf16, rollouts=fp32["rollouts"])
    return fp32, bf16


def _kept_agreement(a, b):
    """Share of in-loss tokens whose kept/dropped decision agrees (both masks over [b*s])."""
    return float((a == b).float().mean())


def test_bf16_tracks_fp32_over_five_opd_steps(assets):
    fp32, bf16 = run_distributed(_bf16_vs_fp32, 1, args=(
        _overrides(assets, **{"model.dtype": "fp32"}), _overrides(assets, **{"model.dtype": "bf16"})))[0]
    assert fp32["dtype"] == torch.float32 and bf16["dtype"] == torch.bfloat16
    # bf16 model, fp32 grad buffer and fp32 main params in the (distributed) optimizer.
    assert bf16["main_grad_dtypes"] == bf16["optimizer_param_dtypes"] == {torch.float32}
    rel = [abs(b - a) / a for a, b in zip(fp32["losses"], bf16["losses"])]
    agree = []
    for k32, k16, out in zip(fp32["kept"], bf16["kept"], fp32["rollouts"]):
        from tip_megatron.train.batches import target_mask

        in_loss = target_mask(out.response_mask).reshape(-1)
        agree.append(_kept_agreement(k32[in_loss], k16[in_loss]))
    print(f"bf16 vs fp32: loss rel diff per step {[round(r, 4) for r in rel]}, "
          f"kept agreement {[round(a, 3) for a in agree]}")
    assert all(torch.isfinite(torch.tensor(bf16["losses"])))
    assert max(rel) <= LOSS_REL_TOL, rel
    assert min(agree) >= KEPT_AGREEMENT_MIN, agree
    # Not vacuous: the runs really differ (bf16 rounding), and training moved the loss.
    assert max(rel) > 0
    assert fp32["losses"][-1] != fp32["losses"][0]


def _recompute_runs(overrides_by_mode):
    return {mode: _opd_run(o, want_grads=True) for mode, o in overrides_by_mode.items()}


def test_activation_recompute_gives_the_same_loss_and_gradients(assets):
    modes = {"none": "null", "selective": "selective", "full": "full"}
    runs = run_distributed(_recompute_runs, 1, args=({
        m: _overrides(assets, **{"model.dtype": "fp32", "model.recompute_granularity": v})
        for m, v in modes.items()},))[0]
    ref = runs["none"]
    # 2 layers x 2 micro-batches; recompute runs each core attention again in backward.
    assert ref["attention_calls"] == 4
    assert runs["selective"]["attention_calls"] == runs["full"]["attention_calls"] == 8
    for mode in ("selective", "full"):
        got = runs[mode]
        assert got["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-6), mode
        assert len(got["grads"]) == len(ref["grads"]) > 0
        for g, r in zip(got["grads"], ref["grads"]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=mode)
        assert any(float(r.abs().max()) > 0 for r in ref["grads"])
