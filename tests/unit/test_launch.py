"""tip_megatron.apps.launch: forked ranks see a torchrun environment, report failures, and do
not outlive a killed parent."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tip_megatron.runtime.env import RankEnv, rank_env, under_torchrun
from tip_megatron.runtime.processes import RankFailure, run_forked


def _where_am_i():
    return under_torchrun(), rank_env()


def _fail_on_rank_one():
    if rank_env().rank == 1:
        raise ValueError("rank one refuses")
    return "ok"


def test_forked_ranks_get_the_torchrun_environment():
    results = run_forked(_where_am_i, 3)
    assert results == [(True, RankEnv(rank=r, world_size=3, local_rank=r)) for r in range(3)]


def test_rank_env_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not under_torchrun()
    assert rank_env() == RankEnv(rank=0, world_size=1, local_rank=0)


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 failed:.*ValueError: rank one refuses"):
        run_forked(_fail_on_rank_one, 2, timeout_s=60)


_PARENT = textwrap.dedent("""
    import os, sys, time
    from tip_megatron.runtime.env import RankEnv, rank_env, under_torchrun
    from tip_megatron.runtime.processes import RankFailure, run_forked

    def sleeper(out_dir):
        path = os.path.join(out_dir, f"rank{rank_env().rank}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
        time.sleep(600)

    run_forked(sleeper, 2, args=(sys.argv[1],), timeout_s=600)
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ranks_die_when_the_parent_is_killed(tmp_path):
    """SIGKILL the parent (no finally runs there): the kernel kills its ranks."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank*.pid"))) < 2:
            assert parent.poll() is None, "the parent exited before its ranks started"
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
        assert not any(_gone(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in pids), "a rank outlived its killed parent"
    finally:
        parent.kill()
        for p in tmp_path.glob("rank*.pid"):  # never leave a sleeper behind
            if not _gone(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)
