"""A run directory has one owner and one lineage; a resume with changed settings follows
a stated rule. Every launch is `tip-megatron train` as a user types it (slow tier): exit
code, the one-line message, nothing lost (files byte-identical where they were moved), no
process of the launch alive afterwards.

- a second launch into the directory of a live one: refused (exit 2) naming the holder,
  before any rank starts; the first run finishes unharmed;
- a stale lock (its process is dead) is taken over with a message; resume=none into a
  directory with steps: refused; with checkpoint.overwrite=true: the old lineage moved to
  previous/<run_id>/ byte for byte, metrics.jsonl of the new run only;
- resume=<older step>: the newer steps move to branches/<run_id>-after-step_N/ byte for
  byte; a later resume=auto stays in the new lineage; metrics rows carry their run id;
- raising train.steps and changing optim.lr on resume: the schedule of the new config from
  the resume step on (checked against the cosine formula in float64), said once.
"""
import json
import math
import shutil
import socket
import subprocess
import sys
import time

import pytest

from _reliability_assets import make_assets, overrides, tree_hashes
from signal_helpers import ENV, gone, kill_leftovers, tree
from tip_megatron.checkpoint import rundir
from tip_megatron.checkpoint.layout import LINEAGE, LOCK, list_checkpoints

pytestmark = pytest.mark.slow

LR = 0.003


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("rundir"))


def _args(assets, ckdir, **extra):
    return overrides(assets, **{"checkpoint.dir": ckdir, "checkpoint.save_every": 1,
                                "checkpoint.keep_last": 0, "optim.lr": LR, **extra})


def _start(args, log):
    cmd = [sys.executable, "-m", "tip_megatron.apps.cli", "train", "--nproc", "1", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc, log, timeout=900) -> tuple[int, str]:
    """Wait for `proc` (collecting its process tree); its exit code and output. Every
    process it started must be gone once it returned."""
    seen, deadline = set(), time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= tree(proc.pid)
            time.sleep(0.05)
        assert proc.poll() is not None, f"no exit within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
        alive = [p for p in seen if not gone(p)]
        assert not alive, f"alive after the launcher returned: {alive}"
    finally:
        if proc.poll() is not None:
            kill_leftovers({p for p in seen if not gone(p)})
    return proc.returncode, log.read_text()


def _train(args, log) -> tuple[int, str]:
    return _finish(_start(args, log), log)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _rows(ckdir) -> list[dict]:
    return [json.loads(line) for line in (ckdir / "metrics.jsonl").read_text().splitlines()]


def _run_id(path) -> str:
    return json.loads((path / LINEAGE).read_text())["run_id"]


@pytest.fixture(scope="module")
def first(assets, tmp_path_factory):
    """A 3-step run (a checkpoint every step) and, once it holds the lock, a second launch
    into its directory: (run directory, the lock's record, the first launcher's pid, the
    second launch's exit code and output, the first's output)."""
    tmp = tmp_path_factory.mktemp("first")
    ckdir = tmp / "ck"
    proc = _start(_args(assets, ckdir, **{"train.steps": 3}), tmp / "first.log")
    seen = set()
    try:
        deadline = time.monotonic() + 900
        while rundir.read_lock(ckdir) in (None, {}) and proc.poll() is None and time.monotonic() < deadline:
            seen |= tree(proc.pid)
            time.sleep(0.05)
        assert proc.poll() is None, f"the first run ended early:\n{(tmp / 'first.log').read_text()[-3000:]}"
        holder = rundir.read_lock(ckdir)
        second = _train(_args(assets, ckdir, **{"train.steps": 3}), tmp / "second.log")
        code, text = _finish(proc, tmp / "first.log")
    finally:
        kill_leftovers({p for p in seen | tree(proc.pid) if not gone(p)})
    assert code == 0, text[-3000:]
    return ckdir, holder, proc.pid, second, text


def test_second_launch_into_a_live_run_dir_is_refused_and_the_first_is_unharmed(first):
    ckdir, holder, pid, (code, text), _ = first
    assert holder["pid"] == pid  # the launcher holds it while its ranks run
    assert code == 2, text[-3000:]
    errors = _error_lines(text)
    assert len(errors) == 1, text[-3000:]
    assert f"checkpoint.dir={str(ckdir)!r}: in use by pid {pid} on host" in errors[0]
    assert "tip-megatron train" in errors[0] and "Traceback" not in text
    # the first run: its three steps, one run id in every row, the lock released
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_000001", "step_000002", "step_000003"]
    rows = _rows(ckdir)
    run_id = _run_id(ckdir)
    assert [r["step"] for r in rows] == [1, 2, 3] and {r["run_id"] for r in rows} == {run_id}
    assert {_run_id(p) for p in list_checkpoints(ckdir)} == {run_id}
    assert not (ckdir / LOCK).exists()


def _copy(first, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(first[0], dst)
    return dst


def test_stale_lock_taken_over_resume_none_refused_then_overwrite_moves_aside(assets, first, tmp_path):
    ckdir = _copy(first, tmp_path)
    old_run = _run_id(ckdir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"host": socket.gethostname(), "pid": dead.pid, "started": 1.0, "started_utc": "1970-01-01 00:00:00 UTC",
            "command": "tip-megatron train"}
    (ckdir / LOCK).write_text(json.dumps(lock))
    before = tree_hashes(ckdir)
    code, text = _train(_args(assets, ckdir, **{"checkpoint.resume": "none"}), tmp_path / "none.log")
    assert code == 2, text[-3000:]
    errors = _error_lines(text)
    assert len(errors) == 1 and "checkpoint.resume=none" in errors[0], text[-3000:]
    assert f"holds the steps of run {old_run}" in errors[0] and "checkpoint.overwrite=true" in errors[0]
    assert tree_hashes(ckdir) == before, "a refused launch changed the directory"

    code, text = _train(_args(assets, ckdir, **{"checkpoint.resume": "none", "checkpoint.overwrite": "true",
                                                "train.steps": 1}), tmp_path / "overwrite.log")
    assert code == 0, text[-3000:]
    assert f"took over the lock {ckdir / LOCK} of pid {dead.pid}" in text and "process is gone" in text
    aside = ckdir / "previous" / old_run
    assert f"moved aside to {aside}" in text
    after = tree_hashes(ckdir)
    for rel, digest in before.items():
        if rel != LOCK:
            assert after[f"previous/{old_run}/{rel}"] == digest, rel
    new_run = _run_id(ckdir)
    assert new_run != old_run and [p.name for p in list_checkpoints(ckdir)] == ["step_000001"]
    assert [(r["step"], r["run_id"]) for r in _rows(ckdir)] == [(1, new_run)]
    assert not (ckdir / LOCK).exists()


def test_older_step_resume_branches_the_newer_steps_and_auto_stays_in_the_new_lineage(assets, first, tmp_path):
    ckdir = _copy(first, tmp_path)
    old_run = _run_id(ckdir)
    before = tree_hashes(ckdir)
    code, text = _train(_args(assets, ckdir, **{"checkpoint.resume": ckdir / "step_000001", "train.steps": 2}),
                        tmp_path / "branch.log")
    assert code == 0, text[-3000:]
    branch = ckdir / "branches" / f"{old_run}-after-step_000001"
    assert f"moved to {branch} (not deleted)" in text
    after = tree_hashes(ckdir)
    for rel, digest in before.items():
        if rel.startswith(("step_000002", "step_000003")) or rel in ("metrics.jsonl", "config.yaml", LINEAGE):
            assert after[f"branches/{branch.name}/{rel}"] == digest, rel
        if rel.startswith("step_000001"):
            assert after[rel] == digest, rel
    lineage = json.loads((ckdir / LINEAGE).read_text())
    new_run = lineage["run_id"]
    assert (lineage["parent_run"], lineage["parent_step"]) == (old_run, 1) and new_run != old_run
    assert [_run_id(p) for p in list_checkpoints(ckdir)] == [old_run, new_run]
    assert [(r["step"], r["run_id"]) for r in _rows(ckdir)] == [(1, old_run), (2, new_run)]

    code, text = _train(_args(assets, ckdir, **{"train.steps": 3}), tmp_path / "auto.log")
    assert code == 0, text[-3000:]
    assert f"resumed from {ckdir / 'step_000002'} at step 2" in text
    assert [_run_id(p) for p in list_checkpoints(ckdir)] == [old_run, new_run, new_run]
    assert [(r["step"], r["run_id"]) for r in _rows(ckdir)] == [(1, old_run), (2, new_run), (3, new_run)]
    assert tree_hashes(branch) == {k.split("/", 2)[2]: v for k, v in after.items()
                                   if k.startswith(f"branches/{branch.name}/")}


def _cosine(lr: float, updates: int, total: int) -> float:
    """megatron's cosine decay to min_lr=0 without warm-up, after `updates` updates (float64)."""
    return lr * 0.5 * (math.cos(math.pi * min(updates, total) / total) + 1.0)


def test_raising_train_steps_and_changing_lr_on_resume_apply_from_the_resume_step(assets, first, tmp_path):
    ckdir = _copy(first, tmp_path)
    assert [r["lr"] for r in _rows(ckdir)] == pytest.approx([_cosine(LR, k, 3) for k in (1, 2, 3)], abs=1e-12)
    new_lr = 2 * LR
    code, text = _train(_args(assets, ckdir, **{"train.steps": 6, "optim.lr": new_lr}), tmp_path / "more.log")
    assert code == 0, text[-3000:]
    said = [line for line in text.splitlines() if "changed learning-rate schedule" in line]
    assert len(said) == 1, text[-3000:]
    assert f"optim.lr {LR:g} -> {new_lr:g}" in said[0] and "3 -> 6" in said[0]
    assert "applies from update 3 on" in said[0] and "KeyError" not in text
    rows = _rows(ckdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # the lr after each update (logged with the step) follows the new schedule from update 3 on
    assert [r["lr"] for r in rows[3:]] == pytest.approx([_cosine(new_lr, k, 6) for k in (4, 5)] + [0.0],
                                                        rel=1e-9, abs=1e-15)
    assert all(r["lr"] > 0 for r in rows[3:5]) and all(r["loss"] == r["loss"] for r in rows)
