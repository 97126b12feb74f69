"""Teacher ranks of their own (`teacher.placement: separate`) under faults (slow tier).

- A teacher rank killed mid-run: the job does not hang. Every process of `tip-megatron
  train` exits, non-zero, within a bounded time, and the one error line the command prints
  names the dead rank.
- SIGUSR1 to the teacher's rank alone (of a bare torchrun job): the student hears of it
  after the step, saves, stops the teacher; the job exits 0 and resuming gives the
  uninterrupted losses bit for bit."""
import os
import signal
import sys
import time

import psutil
import pytest

from tip_megatron.testing.assets import tiny_run_overrides
from tip_megatron.testing.distributed import free_port, run_distributed

from signal_helpers import saved_once_after_usr1, gone, kill_leftovers, losses_of, spawn, train, tree, wait_until

pytestmark = pytest.mark.slow

#: seconds every process has to be gone once the teacher rank is SIGKILLed.
EXIT_WITHIN_S = 60


def _rank_of(pid: int):
    try:
        env = psutil.Process(pid).environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if env.get("TORCHELASTIC_RUN_ID") is None or "RANK" not in env:
        return None
    # a rank is the torchrun worker itself, not one of its helpers (same environment)
    return int(env["RANK"]) if "tip_megatron.train" in " ".join(psutil.Process(pid).cmdline()) else None


def test_killed_teacher_rank_stops_every_rank(opd_assets, tmp_path):
    log = tmp_path / "train.log"
    argv = ["train", *tiny_run_overrides(opd_assets, **{
        "train.steps": 500, "teacher.placement": "separate", "checkpoint.dir": tmp_path / "run"}),
        "--nproc", "2"]
    cmd = spawn([sys.executable, "-m", "tip_megatron.apps.cli", *argv], log)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        while "step 2/" not in log.read_text():
            seen |= tree(cmd.pid)
            assert cmd.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        seen |= tree(cmd.pid)
        teacher = [p for p in seen if _rank_of(p) == 1]
        assert len(teacher) == 1, {p: _rank_of(p) for p in seen}
        os.kill(teacher[0], signal.SIGKILL)
        code = cmd.wait(timeout=EXIT_WITHIN_S)
        assert code != 0
        end = time.monotonic() + 10
        while not all(gone(p) for p in seen) and time.monotonic() < end:
            time.sleep(0.1)
        assert all(gone(p) for p in seen), [p for p in seen if not gone(p)]
        text = log.read_text()
        last = text.strip().splitlines()[-1]
        # receiving hidden states or anything else from it, or sending to it
        assert "rank 1 failed: that rank has stopped or died" in last \
            or "to teacher rank 1 failed" in last, text[-3000:]
    finally:
        kill_leftovers(seen | {cmd.pid})


SEPARATE = {"teacher.placement": "separate"}
STEPS = 6


def _sigusr1_to_one_rank_saves_and_resumes_exactly(overrides, world: int, victim: int, tmp_path) -> None:
    """A bare torchrun job of `world` ranks: SIGUSR1 to rank `victim` alone after step 2; the
    job saves once and exits 0, and resuming gives the uninterrupted losses bit for bit.
    `overrides(**more)`: the run's overrides with `more` keys."""
    straight = losses_of(run_distributed(train, world, args=(overrides(**{"train.steps": STEPS}),)))
    ckdir, log = tmp_path / "ck", tmp_path / "log.txt"
    args = overrides(**{"train.steps": STEPS, "checkpoint.dir": ckdir})
    agent = spawn([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "tip_megatron.train",
                   *args], log)
    seen: set[int] = set()
    try:
        wait_until(lambda: "step 2/" in log.read_text(), agent, 600, seen, "step 2", log)
        target = [p for p in tree(agent.pid) if _rank_of(p) == victim]
        assert len(target) == 1
        os.kill(target[0], signal.SIGUSR1)
        agent.wait(timeout=300)
    finally:
        kill_leftovers({p for p in seen if not gone(p)})
    step = saved_once_after_usr1(agent, log, ckdir, STEPS)
    rest = losses_of(run_distributed(train, world, args=(overrides(
        **{"train.steps": STEPS, "checkpoint.dir": ckdir}),)))
    assert len(rest) == STEPS - step
    assert rest == straight[step:]


def test_sigusr1_to_the_teacher_rank_alone_saves_and_resumes_exactly(opd_assets, tmp_path):
    _sigusr1_to_one_rank_saves_and_resumes_exactly(
        lambda **more: tiny_run_overrides(opd_assets, **SEPARATE, **more), 2, 1, tmp_path)


def _two_separate_teachers(opd_assets, tmp_path, **more):
    """Overrides of a run with two teachers, each on a rank of its own (ranks 1 and 2); the
    prompts alternate between their domains."""
    import json

    rows = [json.loads(line) for line in (opd_assets / "prompts.jsonl").read_text().splitlines()]
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps(dict(r, domain="ab"[i % 2])) + "\n" for i, r in enumerate(rows)))
    teachers = [{"name": n, "ckpt": str(opd_assets / "teacher"), "serves": [n], "placement": "separate"}
                for n in "ab"]
    args = tiny_run_overrides(opd_assets, **{"teachers": json.dumps(teachers), "data.route_field": "domain",
                                             "data.prompts": f"[{routed}]", **more})
    return [o for o in args if not o.startswith("teacher.ckpt=")]


def test_killed_rank_of_the_second_teacher_stops_every_rank(opd_assets, tmp_path):
    """Three worlds (student, teacher a, teacher b): SIGKILL to b's rank ends every process of
    the command, and its one error line names rank 2."""
    log = tmp_path / "train.log"
    argv = ["train", *_two_separate_teachers(opd_assets, tmp_path, **{
        "train.steps": 500, "checkpoint.dir": tmp_path / "run"}), "--nproc", "3"]
    cmd = spawn([sys.executable, "-m", "tip_megatron.apps.cli", *argv], log)
    seen: set[int] = set()
    try:
        wait_until(lambda: "step 2/" in log.read_text(), cmd, 600, seen, "step 2", log)
        seen |= tree(cmd.pid)
        victim = [p for p in seen if _rank_of(p) == 2]
        assert len(victim) == 1, {p: _rank_of(p) for p in seen}
        os.kill(victim[0], signal.SIGKILL)
        assert cmd.wait(timeout=EXIT_WITHIN_S) != 0
        end = time.monotonic() + 10
        while not all(gone(p) for p in seen) and time.monotonic() < end:
            time.sleep(0.1)
        assert all(gone(p) for p in seen), [p for p in seen if not gone(p)]
        last = log.read_text().strip().splitlines()[-1]
        assert "rank 2 failed: that rank has stopped or died" in last \
            or "to teacher rank 2 failed" in last, log.read_text()[-3000:]
    finally:
        kill_leftovers(seen | {cmd.pid})


def test_sigusr1_to_the_second_teachers_rank_saves_and_resumes_exactly(opd_assets, tmp_path):
    """The stop signal reaches only teacher b's rank: rank 0 hears of it through b's link,
    saves, stops both teachers; resuming gives the uninterrupted losses bit for bit."""
    _sigusr1_to_one_rank_saves_and_resumes_exactly(
        lambda **more: _two_separate_teachers(opd_assets, tmp_path, **more), 3, 2, tmp_path)
