"""Helpers of the reliability tests: tiny model checkpoints, the trainer overrides of a
tiny run (as tests/distributed/test_trainer.py), process-tree helpers that check "gone"
by pid."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")


def make_model(out, hidden, layers, seed):
    from tip_megatron import parallel
    from tip_megatron.models import build_model
    from tip_megatron.models.checkpoint import save_model_checkpoint
    from tip_megatron.models.init import init_full_state
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.testing.models import tiny_arch

    arch = tiny_arch("llama", hidden_size=hidden, num_layers=layers, max_position_embeddings=64)
    g = parallel.initialize(parallel.ParallelLayout(), seed=seed)
    chunks = build_model(arch, g)
    load_full_state_dict(chunks, init_full_state(chunks, g, arch, seed), g, arch)
    save_model_checkpoint(chunks, g, arch, out)


def overrides(assets, **extra) -> list[str]:
    base = {
        "student.ckpt": assets / "student", "teacher.ckpt": assets / "teacher",
        "data.prompts": f"[{assets / 'prompts.jsonl'}]", "data.tokenizer": "char",
        "data.prompts_per_step": 16, "data.max_prompt_len": 16,
        "rollout.max_new_tokens": 6, "selection.rule": "soft_or", "selection.rho": 0.5,
        "optim.lr": 0.003, "optim.warmup_steps": 0, "train.steps": 3, "train.micro_batch_size": 2,
        "logging.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(overrides_list):
    """Run the trainer in this (forked) rank; the logging rank returns its losses."""
    from tip_megatron.config import load_config
    from tip_megatron.train.trainer import run

    return [m["loss"] for m in run(load_config(None, overrides_list))]


def losses_of(results) -> list[float]:
    logged = [r for r in results if r]
    assert len(logged) == 1, "exactly one rank logs"
    return logged[0]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tree(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def wait_until(cond, proc, timeout: float, seen: set, what: str, log) -> None:
    """Poll `cond()`; meanwhile collect `proc`'s process tree into `seen`."""
    deadline = time.monotonic() + timeout
    while not cond():
        seen |= tree(proc.pid)
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    seen |= tree(proc.pid)


def spawn(cmd: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_leftovers(pids: set[int]) -> None:
    """Test hygiene after a failure: nothing of ours keeps running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
