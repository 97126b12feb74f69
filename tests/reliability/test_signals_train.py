"""Signals to real training jobs (slow tier: each test starts torchrun ranks).

- SIGINT / SIGTERM / SIGUSR1 to `tip-megatron train` started from a plain shell (it starts
  its own torchrun job): it exits promptly, no process of the job is alive afterwards
  (every pid of the tree collected while it ran), and the newest checkpoint loads and
  trains on; SIGTERM and SIGUSR1 (train.exit_signal) save at the next step first.
- SIGUSR1 to one rank of a bare torchrun job (what Slurm's `--signal=USR1@120` does):
  every rank saves at the next step boundary and the job exits 0 saying so; resuming
  gives the losses of an uninterrupted run, bit for bit.
- SIGKILL of one rank: nothing of the job survives; resuming from the newest complete
  checkpoint gives the uninterrupted losses, bit for bit.
"""
import json
import re
import signal
import sys
import time

import psutil
import pytest

from tip_megatron.testing.distributed import free_port, run_distributed
from tip_megatron.testing.assets import tiny_run_overrides as overrides
from tip_megatron.checkpoint.layout import list_checkpoints

from signal_helpers import saved_once_after_usr1, gone, kill_leftovers, losses_of, spawn, train, wait_until

pytestmark = pytest.mark.slow

STEPS = 8


def _steps_done(ckdir) -> int:
    found = list_checkpoints(ckdir)
    return int(found[-1].name.split("_")[1]) if found else 0


def _logged(path) -> dict[int, float]:
    """step -> loss from a metrics.jsonl (the last line of a step wins)."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            out[m["step"]] = m["loss"]
    return out


@pytest.fixture(scope="module")
def straight(opd_assets):
    """Losses of the uninterrupted DP=2 run, the reference of every resume below."""
    return losses_of(run_distributed(train, 2, args=(overrides(opd_assets, **{"train.steps": STEPS}),)))


def _torchrun(args, log, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "tip_megatron.train", *args]
    return spawn(cmd, log)


def _workers(agent_pid: int) -> list[psutil.Process]:
    procs = [p for p in psutil.Process(agent_pid).children()
             if "tip_megatron.train" in " ".join(p.cmdline())]
    return sorted(procs, key=lambda p: p.environ().get("RANK", ""))


def _resume_rest(assets, ckdir) -> list[float]:
    return losses_of(run_distributed(train, 2, args=(overrides(
        assets, **{"train.steps": STEPS, "checkpoint.dir": ckdir}),)))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_the_train_launcher_stops_every_rank(opd_assets, tmp_path, sig):
    ckdir, log = tmp_path / "ck", tmp_path / "log.txt"
    args = overrides(opd_assets, **{"train.steps": 400, "checkpoint.dir": ckdir,
                                    "checkpoint.save_every": 1, "checkpoint.keep_last": 0})
    launcher = spawn([sys.executable, "-m", "tip_megatron.apps.cli", "train", "--nproc", "2", *args], log)
    seen: set[int] = set()
    try:
        wait_until(lambda: _steps_done(ckdir) >= 2, launcher, 600, seen, "a second checkpoint", log)
        assert len(seen) >= 4, f"expected launcher, torchrun and 2 ranks, saw {len(seen)} processes"
        start = time.monotonic()
        launcher.send_signal(sig)
        launcher.wait(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        kill_leftovers({p for p in seen if not gone(p)})
    text = log.read_text()
    assert elapsed < 60, f"{sig.name}: the launcher took {elapsed:.0f} s to stop"
    assert all(gone(p) for p in seen), f"alive after the launcher returned: {[p for p in seen if not gone(p)]}"
    last = _steps_done(ckdir)
    assert last < 400, "the run ended before the signal"
    if sig != signal.SIGINT:  # in train.exit_signal: the ranks saved at a step boundary
        assert re.search(rf"received {sig.name}: stopped after step {last}, saved checkpoint", text), text[-3000:]
    if sig == signal.SIGUSR1:  # passed to the ranks alone: torchrun saw them finish well
        assert launcher.returncode == 0, text[-3000:]
    # the newest complete checkpoint loads and training continues from it
    more = losses_of(run_distributed(train, 1, args=(overrides(
        opd_assets, **{"train.steps": last + 1, "checkpoint.dir": ckdir}),)))
    assert len(more) == 1 and more[0] == more[0]


def test_sigusr1_to_one_rank_saves_everywhere_and_resumes_exactly(opd_assets, tmp_path, straight):
    ckdir, log = tmp_path / "ck", tmp_path / "log.txt"
    agent = _torchrun(overrides(opd_assets, **{"train.steps": STEPS, "checkpoint.dir": ckdir}), log)
    seen: set[int] = set()
    try:
        wait_until(lambda: len(_logged(ckdir / "metrics.jsonl")) >= 2, agent, 600, seen, "step 2", log)
        _workers(agent.pid)[1].send_signal(signal.SIGUSR1)  # rank 1 only, as a late signal would
        agent.wait(timeout=300)
    finally:
        kill_leftovers({p for p in seen if not gone(p)})
    step = saved_once_after_usr1(agent, log, ckdir, STEPS)
    first = _logged(ckdir / "metrics.jsonl")
    assert sorted(first) == list(range(1, step + 1))
    rest = _resume_rest(opd_assets, ckdir)
    assert [first[s] for s in sorted(first)] + rest == straight


def test_sigkill_of_one_rank_then_resume_is_exact(opd_assets, tmp_path, straight):
    ckdir, log = tmp_path / "ck", tmp_path / "log.txt"
    agent = _torchrun(overrides(opd_assets, **{"train.steps": STEPS, "checkpoint.dir": ckdir,
                                               "checkpoint.save_every": 1, "checkpoint.keep_last": 0}), log)
    seen: set[int] = set()
    try:
        wait_until(lambda: _steps_done(ckdir) >= 3, agent, 600, seen, "a third checkpoint", log)
        _workers(agent.pid)[1].send_signal(signal.SIGKILL)
        agent.wait(timeout=120)
        deadline = time.monotonic() + 30
        while not all(gone(p) for p in seen) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        kill_leftovers({p for p in seen if not gone(p)})
    assert agent.returncode != 0
    assert all(gone(p) for p in seen), f"alive after the job ended: {[p for p in seen if not gone(p)]}"
    step = _steps_done(ckdir)
    assert 3 <= step < STEPS
    first = _logged(ckdir / "metrics.jsonl")
    rest = _resume_rest(opd_assets, ckdir)
    assert [first[s] for s in range(1, step + 1)] + rest == straight
