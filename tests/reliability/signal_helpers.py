"""Helpers of the reliability tests: a training rank body that returns the losses, process-
tree helpers that check "gone" by pid (the assets: tip_megatron.testing.assets)."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tip_megatron.testing.assets import train_history

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")


def train(overrides_list):
    """Run the trainer in this (forked) rank; the logging rank returns its losses."""
    return [m["loss"] for m in train_history(overrides_list)]


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


def saved_once_after_usr1(job: subprocess.Popen, log, ckdir, steps: int) -> int:
    """A job stopped by SIGUSR1 exited 0 with one checkpoint, at a step in [2, steps), and
    printed the stop line naming it; returns that step."""
    from tip_megatron.checkpoint.layout import list_checkpoints  # light; only these tests use it

    text = log.read_text()
    assert job.returncode == 0, text[-3000:]
    saved = list_checkpoints(ckdir)
    assert len(saved) == 1, saved
    step = int(saved[0].name.split("_")[1])
    assert 2 <= step < steps, f"stopped at step {step}\n{text[-3000:]}"
    assert f"received SIGUSR1: stopped after step {step}, saved checkpoint {saved[0]}" in text, text[-3000:]
    return step

