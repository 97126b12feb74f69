"""checkpoint/rundir.py: the run directory's lock (live, stale, foreign holders) and
lineages (which steps a chain owns; moving a former lineage or newer steps aside, byte for
byte). Real processes stand for the holders: a sleeping child (live), a reaped one (dead)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tip_megatron.checkpoint import rundir
from tip_megatron.checkpoint.layout import COMPLETE, LINEAGE, LOCK, step_dir
from tip_megatron.checkpoint.rundir import Lineage, RunDirLocked


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def sleeper():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait()


def _write_lock(root, record):
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK).write_text(json.dumps(record))


def test_lock_taken_released_and_refused_to_a_second_live_holder(tmp_path, sleeper):
    root = tmp_path / "run"
    assert rundir.acquire_lock(root, command="test") == ""
    record = json.loads((root / LOCK).read_text())
    assert record["host"] == socket.gethostname() and record["command"] == "test"
    assert rundir.acquire_lock(root) == ""  # already ours
    assert rundir.release_lock(root) and not (root / LOCK).exists()
    # held by another live process of this host: refused in one line naming it
    _write_lock(root, rundir.lock_record(sleeper.pid, "tip-megatron train"))
    with pytest.raises(RunDirLocked) as err:
        rundir.acquire_lock(root)
    text = str(err.value)
    assert "\n" not in text and f"pid {sleeper.pid} on host {socket.gethostname()}" in text
    assert "tip-megatron train" in text and str(root / LOCK) in text
    assert not rundir.release_lock(root), "released a lock this process does not hold"
    # ... unless it is the launcher of this rank
    assert rundir.acquire_lock(root, owner_pid=sleeper.pid) == ""
    assert json.loads((root / LOCK).read_text())["pid"] == sleeper.pid


def test_stale_lock_of_a_dead_process_or_a_reused_pid_is_taken_over(tmp_path, sleeper):
    root = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(root, rundir.lock_record(dead) | {"started": 1.0, "started_utc": "1970"})
    note = rundir.acquire_lock(root)
    assert f"took over the lock {root / LOCK} of pid {dead}" in note and "process is gone" in note
    assert json.loads((root / LOCK).read_text())["pid"] != dead
    rundir.release_lock(root)
    # the pid runs, but it is a process started after the lock was written: stale too
    reused = rundir.lock_record(sleeper.pid)
    _write_lock(root, dict(reused, started=reused["started"] - 3600))
    assert "took over" in rundir.acquire_lock(root)


def test_lock_stays_live_while_a_rank_of_a_killed_launcher_runs(tmp_path, sleeper):
    root = tmp_path / "run"
    _write_lock(root, dict(rundir.lock_record(_dead_pid()), started=1.0))  # the launcher: gone
    rank = rundir.lock_record(sleeper.pid)
    record = json.loads((root / LOCK).read_text())
    (root / LOCK).write_text(json.dumps(dict(record, workers=[{"pid": sleeper.pid, "started": rank["started"]}])))
    with pytest.raises(RunDirLocked, match=f"pid {record['pid']} on host"):
        rundir.acquire_lock(root)
    sleeper.kill()
    sleeper.wait()
    assert "took over" in rundir.acquire_lock(root)


def test_add_worker_records_this_process(tmp_path, sleeper):
    root = tmp_path / "run"
    _write_lock(root, rundir.lock_record(sleeper.pid))
    rundir.add_worker(root)
    workers = json.loads((root / LOCK).read_text())["workers"]
    assert [w["pid"] for w in workers] == [os.getpid()]
    sleeper.kill()
    sleeper.wait()
    assert rundir.lock_state(rundir.read_lock(root)) == "live"  # this process still runs


def test_lock_of_another_host_is_honoured_unless_broken(tmp_path):
    root = tmp_path / "run"
    _write_lock(root, dict(rundir.lock_record(), host="elsewhere", pid=1))
    with pytest.raises(RunDirLocked, match="another host.*checkpoint.break_lock=true"):
        rundir.acquire_lock(root)
    assert "checkpoint.break_lock=true" in rundir.acquire_lock(root, break_lock=True)
    assert json.loads((root / LOCK).read_text())["host"] == socket.gethostname()


def test_lineage_owns_its_steps_and_its_ancestors_up_to_the_branch_points():
    a = Lineage("A")
    b = a.branch("B", "A", 4)
    c = b.branch("C", "B", 6)
    assert b.parent_run == "A" and b.parent_step == 4
    assert [a.owns("A", s) for s in (1, 8)] == [True, True]
    assert [b.owns("A", s) for s in (4, 5)] == [True, False] and b.owns("B", 9)
    assert c.ancestors == (("B", 6), ("A", 4))
    assert [c.owns("A", 4), c.owns("A", 5), c.owns("B", 6), c.owns("B", 7), c.owns("C", 7)] == \
        [True, False, True, False, True]
    # branching back to an ancestor's step drops the chain after it
    d = c.branch("D", "A", 2)
    assert d.ancestors == (("A", 2),) and not d.owns("B", 5)
    assert Lineage.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def _step(root, step, run):
    path = step_dir(root, step)
    path.mkdir(parents=True)
    (path / "state.pt").write_bytes(f"{run}-{step}".encode())
    if run is not None:
        (path / LINEAGE).write_text(json.dumps({"run_id": run}))
    (path / COMPLETE).write_text("{}")
    return path


def test_owned_checkpoints_skip_steps_of_another_lineage(tmp_path):
    root = tmp_path / "run"
    for step, run in ((1, "A"), (2, "A"), (3, "B"), (4, "X"), (5, "A")):
        _step(root, step, run)
    mine, others = rundir.owned_checkpoints(root, Lineage("A").branch("B", "A", 2))
    assert [p.name for p in mine] == ["step_000001", "step_000002", "step_000003"]
    assert [p.name for p in others] == ["step_000004", "step_000005"]
    # a directory of the older layout (no lineage): every step, legacy ones included
    _step(tmp_path / "old", 1, None)
    assert rundir.owned_checkpoints(tmp_path / "old", None)[0][0].name == "step_000001"
    assert rundir.step_run(step_dir(tmp_path / "old", 1)) == rundir.LEGACY_RUN


def test_branch_and_move_aside_keep_every_byte(tmp_path):
    root = tmp_path / "run"
    for step in (1, 2, 3):
        _step(root, step, "A")
    (root / "hf" / "step_000003").mkdir(parents=True)
    (root / "hf" / "step_000003" / "model.safetensors").write_bytes(b"w3")
    (root / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    (root / "config.yaml").write_text("a: 1\n")
    rundir.write_lineage(root, Lineage("A"))
    before = _tree(root)
    dest = rundir.branch_newer(root, 1, "A")
    assert dest == root / "branches" / "A-after-step_000001"
    after = _tree(root)
    for rel in ("step_000002/state.pt", "step_000003/state.pt", "hf/step_000003/model.safetensors",
                "metrics.jsonl", "config.yaml", "lineage.json"):
        assert after[f"branches/A-after-step_000001/{rel}"] == before[rel], rel
    assert not step_dir(root, 2).exists() and step_dir(root, 1).is_dir()
    assert rundir.branch_newer(root, 1, "A") is None  # nothing newer any more
    assert "checkpoint.overwrite=true" in rundir.fresh_start_problem(root, "none")
    before = _tree(root)
    aside = rundir.move_aside(root, "A")
    assert aside == root / "previous" / "A"
    after = _tree(root)
    assert {k: v for k, v in after.items() if k.startswith("previous/A/")} == {
        f"previous/A/{k}": v for k, v in before.items() if not k.startswith("branches/")}
    assert rundir.fresh_start_problem(root, "none") == ""
