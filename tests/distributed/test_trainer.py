"""The OPD trainer end to end on tiny random models (CPU, gloo).

Fixture: a student and a teacher model checkpoint (random tiny Llamas of different width
and depth), a JSONL of addition prompts, the character tokenizer.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tip_megatron.config import load_config
from tip_megatron.testing.assets import char_spm_model, opd_assets
from tip_megatron.testing.assets import tiny_run_overrides as _overrides
from tip_megatron.testing.assets import train_history as _train
from tip_megatron.testing.distributed import DistributedTestError, free_port, run_distributed
from tip_megatron.checkpoint.layout import list_checkpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return opd_assets(tmp_path_factory.mktemp("opd"), teacher_layers=4, other=True)


def _losses(results):
    hist = [h for h in results if h]
    assert len(hist) == 1, "exactly one rank logs"
    return [m["loss"] for m in hist[0]], hist[0]


def test_tp1_resume_equals_uninterrupted(assets, tmp_path):
    """4 steps straight == 2 steps, save, resume, 2 more (fp32, equal losses)."""
    straight, _ = _losses(run_distributed(_train, 1, args=(_overrides(assets, **{"train.steps": 4}),)))
    ckdir = tmp_path / "ck"
    first, _ = _losses(run_distributed(_train, 1, args=(_overrides(
        assets, **{"train.steps": 4, "train.exit_after_steps": 2, "checkpoint.dir": ckdir}),)))
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_000002"]
    rest, _ = _losses(run_distributed(_train, 1, args=(_overrides(
        assets, **{"train.steps": 4, "checkpoint.dir": ckdir}),)))
    assert first + rest == straight, (first, rest, straight)
    assert all(torch.isfinite(torch.tensor(straight)))


def test_layouts_agree_and_loss_falls(assets):
    """TP=2 x PP=2 (4 ranks) and DP=2 give TP=1's loss at every step; loss falls on average."""
    ref, ref_hist = _losses(run_distributed(_train, 1, args=(_overrides(assets),)))
    # rho * tokens is rounded per rollout: 0.5 only when every rollout has an even count.
    assert ref_hist[0]["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    assert sum(ref[1:]) / 2 < ref[0], ref
    tp_pp, _ = _losses(run_distributed(_train, 4, args=(_overrides(
        assets, **{"parallel.tp": 2, "parallel.pp": 2}),)))
    assert len(tp_pp) == len(ref) == 3
    assert tp_pp == pytest.approx(ref, rel=1e-5)
    dp, _ = _losses(run_distributed(_train, 2, args=(_overrides(assets),)))
    assert dp == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("override,message", [
    ({"student.ckpt": "/nonexistent/model"}, "student.ckpt='/nonexistent/model': no such file"),
    ({"rollout.max_new_tokens": 60}, "exceed the student's max_position_embeddings=64"),
    ({"data.prompts_per_step": 6, "train.micro_batch_size": 4},
     "global batch of 6 rollouts .* not divisible by dp x updates_per_rollout x micro_batch_size"),
    ({"selection.rule": "topk"}, "registered rules are"),
])
def test_bad_input_fails_before_the_first_step(assets, override, message):
    with pytest.raises(DistributedTestError, match=message):
        run_distributed(_train, 1, args=(_overrides(assets, **override),))


def test_tokenizer_mismatch_is_refused(assets, tmp_path):
    from tip_megatron.data.tokenizers import CharTokenizer  # noqa: F401

    tok_a, tok_b = tmp_path / "a.model", tmp_path / "b.model"
    char_spm_model(tok_a, "0123456789+= abc"), char_spm_model(tok_b, "0123456789+= xyz")
    student = _copy_ckpt_with_tokenizer(assets / "student", tmp_path / "s", tok_a)
    teacher = _copy_ckpt_with_tokenizer(assets / "teacher", tmp_path / "t", tok_b)
    with pytest.raises(DistributedTestError, match="teacher tokenizer .* differs"):
        run_distributed(_train, 1, args=(_overrides(assets, **{
            "student.ckpt": student, "teacher.ckpt": teacher, "data.tokenizer": "null"}),))


def test_checkpoint_of_another_architecture_is_refused(assets, tmp_path):
    ckdir = tmp_path / "ck"
    run_distributed(_train, 1, args=(_overrides(assets, **{"train.steps": 1, "checkpoint.dir": ckdir}),))
    with pytest.raises(DistributedTestError, match="was saved for a different student architecture"):
        run_distributed(_train, 1, args=(_overrides(assets, **{
            "train.steps": 2, "checkpoint.dir": ckdir, "student.ckpt": assets / "other"}),))


def _copy_ckpt_with_tokenizer(src, dst, spm_model):
    import shutil

    shutil.copytree(src, dst)
    (dst / "tokenizer").mkdir()
    shutil.copy(spm_model, dst / "tokenizer" / "tokenizer.model")
    return dst


def _torchrun(args, env, nnodes=1, node_rank=0, nproc=4, port=None, log=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--node-rank={node_rank}", "--rdzv-id=tip-test"]
    else:
        cmd += ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd += ["-m", "tip_megatron.train", *args]
    return subprocess.Popen(cmd, env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _kill_tree(proc):
    """SIGKILL a torchrun agent and every descendant at once (workers may run in their own
    sessions, so a process-group kill can miss them)."""
    import psutil

    agent = psutil.Process(proc.pid)
    family = agent.children(recursive=True) + [agent]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait()


@pytest.mark.slow
def test_torchrun_tp2_pp2_saves_a_checkpoint(assets, tmp_path):
    ckdir = tmp_path / "ck"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = _torchrun(_overrides(assets, **{"parallel.tp": 2, "parallel.pp": 2, "checkpoint.dir": ckdir}), env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    lines = [json.loads(line) for line in (ckdir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[1:]) / 2 < losses[0], losses
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_000003"]
    # The console of a torchrun job: rank 0's INFO summary once, a progress line per step
    # from the logging rank, a line for the checkpoint; the full config in config.yaml.
    assert out.count(": run: student ckpt ") == 1, out[-4000:]
    assert [f"step {i}/3 | " in out for i in (1, 2, 3)] == [True] * 3 and "ETA" in out
    assert out.count("checkpoint saved: ") == 1 and f"{ckdir / 'step_000003'} (" in out
    saved = load_config(str(ckdir / "config.yaml"))
    assert (saved.parallel.tp, saved.parallel.pp, saved.checkpoint.dir) == (2, 2, str(ckdir))


@pytest.mark.slow
def test_multinode_two_agents_on_loopback(assets, tmp_path):
    """torchrun --nnodes 2 --rdzv-backend c10d: two node agents x 2 ranks (TP=2 x DP=2)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = _overrides(assets, **{"parallel.tp": 2, "train.steps": 2, "logging.jsonl": tmp_path / "m.jsonl"})
    procs = [_torchrun(args, env, nnodes=2, node_rank=r, nproc=2, port=port) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_kill_during_save_keeps_the_last_good_checkpoint(assets, tmp_path):
    """SIGKILL the job while it writes its second checkpoint: the first still loads."""
    ckdir = tmp_path / "ck"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = _overrides(assets, **{"train.steps": 40, "checkpoint.dir": ckdir, "checkpoint.save_every": 1,
                                 "checkpoint.keep_last": 0})
    log = open(tmp_path / "log.txt", "w")
    proc = _torchrun(args, env, nproc=1, log=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(ckdir.glob(".step_000002.tmp-*")):
        if proc.poll() is not None:
            pytest.fail("training ended before the second save: " + (tmp_path / "log.txt").read_text()[-3000:])
        time.sleep(0.05)
    _kill_tree(proc)  # the agent, its worker and the saver processes: a crash, no clean-up
    complete = list_checkpoints(ckdir)
    assert complete and complete[0].name == "step_000001"
    # the last complete checkpoint loads and resumes
    last = int(complete[-1].name.split("_")[1])
    resumed, _ = _losses(run_distributed(_train, 1, args=(_overrides(
        assets, **{"train.steps": last + 1, "checkpoint.dir": ckdir, "checkpoint.resume": complete[-1]}),)))
    assert len(resumed) == 1 and torch.isfinite(torch.tensor(resumed)).all()


def test_resume_under_another_layout_continues_the_curve(assets, tmp_path):
    """Saved at TP=1, resumed at TP=2 (dist_checkpointing reshards model and optimizer
    state): steps 3-4 match the uninterrupted TP=1 run."""
    straight, _ = _losses(run_distributed(_train, 1, args=(_overrides(assets, **{"train.steps": 4}),)))
    ckdir = tmp_path / "ck"
    run_distributed(_train, 1, args=(_overrides(
        assets, **{"train.steps": 4, "train.exit_after_steps": 2, "checkpoint.dir": ckdir}),))
    rest, _ = _losses(run_distributed(_train, 2, args=(_overrides(
        assets, **{"train.steps": 4, "checkpoint.dir": ckdir, "parallel.tp": 2}),)))
    assert rest == pytest.approx(straight[2:], rel=1e-4)


def test_global_scope_prepass_is_dp_invariant(assets):
    """scope=global (a scoring pre-pass, then q3 counted over the global batch) keeps the
    same tokens and gives the same losses at DP=2 as at DP=1."""
    extra = {"selection.rule": "q3", "selection.rho": 0.2, "selection.scope": "global",
             "train.steps": 2}
    one, hist = _losses(run_distributed(_train, 1, args=(_overrides(assets, **extra),)))
    two, hist2 = _losses(run_distributed(_train, 2, args=(_overrides(assets, **extra),)))
    assert two == pytest.approx(one, rel=1e-5)
    assert hist[0]["kept_fraction"] == pytest.approx(0.2, abs=0.02)
    assert [h["num_kept"] for h in hist2] == [h["num_kept"] for h in hist]


def test_several_updates_per_rollout(assets):
    """updates_per_rollout=2: two optimizer steps per rollout batch (the schedule advances
    twice), each on half of the rollouts."""
    extra = {"train.steps": 2, "train.updates_per_rollout": 2, "optim.warmup_steps": 4}
    _, hist = _losses(run_distributed(_train, 1, args=(_overrides(assets, **extra),)))
    assert all("loss_last_update" in h for h in hist)
    # linear warm-up over 4 optimizer steps; the reported lr is that after each rollout
    # batch's first update: optimizer steps 1 and 3
    assert hist[0]["lr"] == pytest.approx(0.003 * 1 / 4)
    assert hist[1]["lr"] == pytest.approx(0.003 * 3 / 4)
    # selection metrics over both updates' rollouts: more than one update's 8 rollouts x 6
    # new tokens can hold (rows may stop early)
    assert 8 * 6 < hist[0]["num_response"] <= 16 * 6
    assert all(len(h["loss_updates"]) == 2 for h in hist)
