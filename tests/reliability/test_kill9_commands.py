"""`kill -9` of a `tip-megatron` command leaves nothing running (slow tier).

For train, generate, eval, convert and study, as a user types them (`--nproc 2` / `--tp 2`,
so that the command starts a torchrun job or forks ranks): once the command's process tree
holds its ranks (and, for train, a checkpoint was written, so the saver's helpers exist),
the command is SIGKILLed, which runs none of its clean-up. Every process seen in its tree
(torchrun, the ranks, their guards and helpers, a parent's writer-queue manager) must be
gone within a bounded time: the kernel's PR_SET_PDEATHSIG chain, not the command, ends
them. "Gone" is checked by pid (a zombie counts as gone).
"""
import os
import signal
import sys
import time

import pytest

from tip_megatron.testing.assets import imported_hf_model, tiny_run_overrides, write_jsonl
from tip_megatron.checkpoint.layout import list_checkpoints

from signal_helpers import gone, kill_leftovers, spawn, tree

pytestmark = pytest.mark.slow

#: seconds the whole tree has to die once the command is SIGKILLed (PDEATHSIG is immediate;
#: the bound leaves room for a loaded machine).
GONE_WITHIN_S = 30


@pytest.fixture(scope="module")
def hf_work(tmp_path_factory):
    pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("kill9_hf")
    imported_hf_model(work / "hf", work / "ckpt", seed=3, corpus=["hello world, what is 12+34?"] * 20)
    write_jsonl(work / "prompts.jsonl", [{"prompt": f"what is {i}+{i}?", "answer": str(2 * i)}
                                         for i in range(64)])
    return work


def _kill9_and_check(argv, log, ready, timeout=600) -> set[int]:
    """Start `tip-megatron ARGV`; when `ready(pids)` holds, SIGKILL it; assert every pid of
    its tree is gone within GONE_WITHIN_S. Returns the pids seen."""
    cmd = spawn([sys.executable, "-m", "tip_megatron.apps.cli", *argv], log)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + timeout
        while True:
            now = tree(cmd.pid)
            seen |= now
            if ready(now):
                break
            if cmd.poll() is not None:
                pytest.fail(f"exited ({cmd.returncode}) before it was ready:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not ready within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        seen |= tree(cmd.pid)
        os.kill(cmd.pid, signal.SIGKILL)
        assert cmd.wait(timeout=10) == -signal.SIGKILL
        end = time.monotonic() + GONE_WITHIN_S
        while not all(gone(p) for p in seen) and time.monotonic() < end:
            time.sleep(0.1)
        alive = [p for p in seen if not gone(p)]
        assert not alive, f"alive {GONE_WITHIN_S} s after kill -9 of the command: {alive}"
    finally:
        if cmd.poll() is None:
            cmd.kill()
        kill_leftovers({p for p in seen if not gone(p)})
    return seen


def _at_least(n):
    return lambda pids: len(pids) >= n


def test_kill9_of_train(opd_assets, tmp_path):
    """command, torchrun, 2 ranks, their guards and savers' helpers: all die."""
    ckdir = tmp_path / "ck"
    args = tiny_run_overrides(opd_assets, **{"train.steps": 400, "checkpoint.dir": ckdir,
                                             "checkpoint.save_every": 1, "checkpoint.keep_last": 2})
    seen = _kill9_and_check(["train", "--nproc", "2", *args], tmp_path / "log.txt",
                            lambda pids: len(pids) >= 6 and bool(list_checkpoints(ckdir)))
    assert len(seen) >= 6
    steps = [p.name for p in list_checkpoints(ckdir)]
    time.sleep(3)  # nobody is left to write a newer step
    assert [p.name for p in list_checkpoints(ckdir)] == steps


def test_kill9_of_generate(hf_work, tmp_path):
    argv = ["generate", "--ckpt", str(hf_work / "ckpt"), "--prompts", str(hf_work / "prompts.jsonl"),
            "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "32", "--tp", "2"]
    _kill9_and_check(argv, tmp_path / "log.txt", _at_least(6))  # command, torchrun, 2 x (rank, guard)
    assert not (tmp_path / "out.jsonl").exists()


def test_kill9_of_eval(hf_work, tmp_path):
    argv = ["eval", "--ckpt", str(hf_work / "ckpt"), "--prompts", str(hf_work / "prompts.jsonl"),
            "--max-new-tokens", "32", "--tp", "2", "--grader", "exact", "--no-progress"]
    _kill9_and_check(argv, tmp_path / "log.txt", _at_least(6))


def test_kill9_of_convert(hf_work, tmp_path):
    """The command forks its ranks after starting the writer queue's manager itself: the
    ranks (PDEATHSIG), their guards, and the command's own manager all die."""
    argv = ["convert", "hf-to-mcore", "--hf", str(hf_work / "hf"), "--out", str(tmp_path / "ck"),
            "--tp", "2"]
    _kill9_and_check(argv, tmp_path / "log.txt", _at_least(6))  # manager, guard, 2 x (rank, guard)
    assert not (tmp_path / "ck").exists()


def test_kill9_of_study(opd_assets, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  steps: 400\n")
    args = tiny_run_overrides(opd_assets, **{"eval.prompts": f"[{opd_assets / 'prompts.jsonl'}]"})
    args = [a for a in args if a.partition("=")[0] not in ("train.steps", "selection.rule", "selection.rho",
                                                            "logging.log_every")]
    argv = ["study", "--config", str(config), "--rules", "soft_or@0.5", "--seeds", "1", "--nproc", "2",
            "--out", str(tmp_path / "study"), *args]
    _kill9_and_check(argv, tmp_path / "log.txt", _at_least(6))  # command, torchrun, 2 x (rank, guard)
