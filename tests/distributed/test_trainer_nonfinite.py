"""A non-finite TIP signal skips the update under every scope: one teacher hidden state
set to inf makes that micro-batch's statistics non-finite; its `MicrobatchResult.finite` is
False, the step's loss is reported as NaN and `train.skip.should_skip` skips the update on
every rank. Scope `global` (q3, div_topk, random, the entropy rules) scores in a pre-pass,
whose `finite` flag must reach the micro-batch's result:
checked through the real `train_step` for scope `rollout` (the reference behaviour), and
scope `global` with both pre-pass sources, at DP=1 and DP=2 (the inf on one replica only).

Also what the trainer reports around such a step: the stop line after a skipped update
(a refused save names the newest checkpoint on disk, no directory that does not exist),
and the step's throughput and response length over every DP replica.

Tiny random models (CPU, gloo), character tokenizer, addition prompts.
"""
import pytest
import torch

from tip_megatron.config import load_config
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.checkpoint.layout import latest_checkpoint


def _overrides(assets, **extra):
    base = {
        "student.ckpt": assets / "student", "teacher.ckpt": assets / "teacher",
        "data.prompts": f"[{assets / 'prompts.jsonl'}]", "data.tokenizer": "char",
        "data.prompts_per_step": 4, "data.max_prompt_len": 16, "rollout.max_new_tokens": 4,
        "selection.rule": "div_topk", "selection.rho": 0.5,
        "optim.lr": 0.003, "optim.warmup_steps": 0, "train.steps": 4,
        "train.micro_batch_size": 2, "train.max_skipped_steps": 3, "logging.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _step_with_inf(overrides, poison_rank):
    """Rank body: one clean step, then one with an inf in a teacher hidden state at a
    response position of the first micro-batch (on DP rank `poison_rank` only); returns
    (metrics of both steps, whether the weights changed in each, skip counters)."""
    from tip_megatron.train import teacher as teacher_side  # where teacher_contexts looks it up
    from tip_megatron.train import trainer

    run = trainer.setup(load_config(None, overrides))
    real = teacher_side.teacher_hidden_states
    poison = {"on": False}

    def teacher_with_inf(*args, **kwargs):
        hidden = real(*args, **kwargs)
        if poison["on"] and run.groups.dp_rank == poison_rank:
            mb = args[2][0]
            b, t = mb.target_mask.nonzero()[0].tolist()
            hidden[0][t, b, 0] = float("inf")  # [s, b, h]
        return hidden

    teacher_side.teacher_hidden_states = teacher_with_inf
    out = []
    try:
        for step in range(2):
            poison["on"] = step == 1
            before = [p.detach().clone() for c in run.ddp for p in c.parameters()]
            metrics = trainer.train_step(run)
            run.step += 1
            after = [p.detach() for c in run.ddp for p in c.parameters()]
            changed = any(not torch.equal(a, b) for a, b in zip(before, after))
            out.append((metrics["loss_sum"], metrics["skipped"], changed))
    finally:
        teacher_side.teacher_hidden_states = real
    return out, run.num_skipped, run.skip_streak


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["dp1", "dp2"])
@pytest.mark.parametrize("scope,source", [
    ("rollout", "recompute"), ("global", "recompute"), ("global", "generation")])
def test_inf_teacher_hidden_state_skips_the_update(opd_assets, world, scope, source):
    overrides = _overrides(opd_assets, **{"selection.scope": scope, "selection.prepass_source": source})
    results = run_distributed(_step_with_inf, world, args=(overrides, world - 1))
    for steps, num_skipped, streak in results:  # every rank alike
        (loss0, skipped0, changed0), (loss1, skipped1, changed1) = steps
        assert torch.isfinite(torch.tensor(loss0)) and skipped0 == 0 and changed0
        assert not torch.isfinite(torch.tensor(loss1)), (scope, source, loss1)
        assert skipped1 == 1 and not changed1
        assert (num_skipped, streak) == (1, 1)  # counted toward train.max_skipped_steps


def _signalled_in_step_2(overrides, poisoned):
    """Rank body: `loop` with checkpoints every step; the exit signal arrives during step
    2, whose teacher pass gets an inf when `poisoned` (so its update is skipped and its
    save refused). Returns what rank 0 printed."""
    import contextlib
    import io
    import os
    import signal

    from tip_megatron.train import teacher as teacher_side  # where teacher_contexts looks it up
    from tip_megatron.train import trainer

    run = trainer.setup(load_config(None, overrides))
    real = teacher_side.teacher_hidden_states

    def teacher_with_inf(*args, **kwargs):
        hidden = real(*args, **kwargs)
        if run.step == 1:
            if poisoned:
                hidden[0][:, :, 0] = float("inf")
            os.kill(os.getpid(), signal.SIGUSR1)
        return hidden

    teacher_side.teacher_hidden_states = teacher_with_inf
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            trainer.loop(run)
    finally:
        teacher_side.teacher_hidden_states = real
    return printed.getvalue(), run.step, run.num_skipped


@pytest.mark.parametrize("scope", ["rollout", "global"])
def test_stop_report_after_a_skipped_update_names_the_checkpoint_on_disk(opd_assets, tmp_path, scope):
    ckdir = tmp_path / "ck"
    overrides = _overrides(opd_assets, **{"selection.scope": scope, "checkpoint.dir": ckdir,
                                          "checkpoint.save_every": 1, "train.exit_signal": "[SIGUSR1]"})
    printed, step, num_skipped = run_distributed(_signalled_in_step_2, 1, args=(overrides, True))[0]
    assert (step, num_skipped) == (2, 1)
    lines = [x for x in printed.splitlines() if x.startswith("received SIGUSR1")]
    assert len(lines) == 1, printed
    newest = ckdir / "step_000001"
    assert [p.name for p in ckdir.iterdir() if p.name.startswith("step_")] == [newest.name]
    assert lines[0] == ("received SIGUSR1: stopped after step 2, nothing saved (the last update was "
                        f"skipped); newest checkpoint: {newest}; exiting 0")


def _step_metrics_and_rollouts(overrides):
    """Rank body: one real train_step; (its metrics, this replica's response lengths)."""
    from tip_megatron.train import teacher as teacher_side  # where teacher_contexts looks it up
    from tip_megatron.train import trainer

    run = trainer.setup(load_config(None, overrides))
    real, seen = trainer.generate_rollouts, []

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.response_lengths.clone())
        return out

    trainer.generate_rollouts = recording
    try:
        metrics = trainer.train_step(run)
    finally:
        trainer.generate_rollouts = real
    return metrics, seen[0].tolist()


def test_throughput_and_response_len_count_every_replica(opd_assets):
    """DP=2: `response_len` is the mean over both replicas' rollouts, `tokens_per_s` their
    summed response tokens over the step time (not rank 0's alone, not x dp_size)."""
    overrides = _overrides(opd_assets, **{"rollout.max_new_tokens": 12, "rollout.n": 2,
                                          "data.prompts_per_step": 8, "selection.rule": "soft_or"})
    results = run_distributed(_step_metrics_and_rollouts, 2, args=(overrides,))
    lengths = [lens for _, lens in results]
    assert sum(lengths[0]) != sum(lengths[1]), lengths  # the replicas' responses differ
    every = lengths[0] + lengths[1]
    for metrics, _ in results:  # every rank computes the same values
        assert metrics["response_len"] == pytest.approx(sum(every) / len(every), rel=1e-12)
        assert metrics["tokens_per_s"] * metrics["step_s"] == pytest.approx(sum(every), rel=1e-9)


def test_stop_report_after_a_good_update_names_the_saved_checkpoint(opd_assets, tmp_path):
    ckdir = tmp_path / "ck"
    overrides = _overrides(opd_assets, **{"checkpoint.dir": ckdir, "checkpoint.save_every": 1,
                                          "train.exit_signal": "[SIGUSR1]"})
    printed, step, num_skipped = run_distributed(_signalled_in_step_2, 1, args=(overrides, False))[0]
    assert (step, num_skipped) == (2, 0)
    lines = [x for x in printed.splitlines() if x.startswith("received SIGUSR1")]
    saved = ckdir / "step_000002"
    assert lines == [f"received SIGUSR1: stopped after step 2, saved checkpoint {saved}; continue "
                     "with checkpoint.resume=auto; exiting 0"], printed
    assert latest_checkpoint(ckdir) == saved  # complete, on disk
