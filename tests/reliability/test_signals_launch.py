"""Signals and process trees without a model: the launcher's forwarding and kill of a
whole job (`supervise`), a rank's helper processes dying with it, the ranks'
agreement on a stop request (`train.preemption`), and `--help` importing nothing heavy.

Every process involved is real; "gone" is checked by pid (a zombie counts as gone).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tip_megatron.runtime.processes import run_forked
from tip_megatron.runtime.signals import parse_signals
from tip_megatron.train.preemption import StopOnSignal

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for(path: Path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited early: {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return json.loads(path.read_text())


# A stand-in for torchrun: starts two "workers" in sessions of their own (as torchrun
# does), writes every pid, and forwards nothing; all of them ignore SIGTERM and SIGINT
# (ranks stuck in a collective). `orphan` makes the leader exit at once, leaving the
# workers behind.
_JOB = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    out, mode = sys.argv[1], sys.argv[2]
    worker = ("import signal, sys, time\\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\\n"
              "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))\\n"
              "open(sys.argv[1], 'w').close()\\n"
              "time.sleep(600)")
    procs = [subprocess.Popen([sys.executable, "-c", worker, f"{out}.ready{i}"], start_new_session=True)
             for i in range(2)]
    with open(out + ".tmp", "w") as f:
        json.dump([os.getpid()] + [p.pid for p in procs], f)
    os.replace(out + ".tmp", out)
    if mode == "orphan":
        sys.exit(3)
    if mode == "usr1":  # the workers stop on SIGUSR1; the leader (torchrun) must not see it
        sys.exit(sum(p.wait() for p in procs))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(600)
""")

_LAUNCHER = textwrap.dedent("""
    import sys
    from tip_megatron.apps.launch import supervise
    from tip_megatron.runtime.env import rank_env
    from tip_megatron.runtime.processes import run_forked
    rc = supervise([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]],
                          grace_s=float(sys.argv[4]))
    print("launcher returned", rc, flush=True)
    sys.exit(rc)
""")


def _launcher(tmp_path, mode, grace_s):
    pids = tmp_path / "pids.json"
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _JOB, str(pids), mode, str(grace_s)],
                            env=ENV, stdout=subprocess.PIPE, text=True)
    return proc, pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_ends_every_process_of_the_job(tmp_path, sig):
    """The job ignores the forwarded signal: after the grace period every process of it,
    workers in their own sessions included, is killed before the launcher returns."""
    proc, pids_file = _launcher(tmp_path, "stubborn", grace_s=2.0)
    pids = _wait_for(pids_file, proc)
    assert not any(_gone(p) for p in pids)
    start = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 20, "the launcher did not stop promptly"
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    assert "launcher returned" in out and proc.returncode != 0


def test_a_second_signal_kills_at_once(tmp_path):
    proc, pids_file = _launcher(tmp_path, "stubborn", grace_s=300.0)
    pids = _wait_for(pids_file, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None, "one signal within the grace period must not kill yet"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert all(_gone(p) for p in pids)


def test_sigusr1_to_the_launcher_goes_to_the_workers_only(tmp_path):
    """SIGUSR1 (Slurm's early warning) reaches the workers, which stop; torchrun, which
    would die of it, is started immune and sees its workers end well: exit code 0."""
    proc, pids_file = _launcher(tmp_path, "usr1", grace_s=300.0)
    pids = _wait_for(pids_file, proc)
    for i in range(2):  # the workers have their handler
        while not (tmp_path / f"pids.json.ready{i}").exists():
            time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "launcher returned 0" in out
    assert all(_gone(p) for p in pids)


def test_orphaned_workers_do_not_outlive_the_launcher(tmp_path):
    """The job's leader exits leaving its workers (in their own sessions) running: the
    launcher, their subreaper, kills them before it returns the leader's exit code."""
    proc, pids_file = _launcher(tmp_path, "orphan", grace_s=2.0)
    out, _ = proc.communicate(timeout=60)
    pids = json.loads(pids_file.read_text())
    assert proc.returncode == 3 and "launcher returned 3" in out
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]


# ------------------------------------------------------------------ a rank's helpers
_RANKS = textwrap.dedent("""
    import json, multiprocessing as mp, os, sys, time
    from tip_megatron.apps.launch import supervise
    from tip_megatron.runtime.env import rank_env
    from tip_megatron.runtime.processes import run_forked

    def rank(out_dir):
        # what dist_checkpointing does in every rank: a spawned multiprocessing manager
        q = mp.get_context("spawn").Manager().Queue()
        helpers = [p.pid for p in __import__("psutil").Process().children(recursive=True)]
        path = os.path.join(out_dir, f"rank{rank_env().rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"rank": os.getpid(), "helpers": helpers}, f)
        os.replace(path + ".tmp", path)
        time.sleep(600)

    if __name__ == "__main__":
        own = []
        if sys.argv[2] == "parent-helper":
            # the parent's own helper, as `convert` starts one before forking (preload_for_fork)
            q = mp.get_context("spawn").Manager().Queue()
            own = [p.pid for p in __import__("psutil").Process().children(recursive=True)]
        with open(os.path.join(sys.argv[1], "parent.json"), "w") as f:
            json.dump(own, f)
        run_forked(rank, 2, args=(sys.argv[1],), timeout_s=600)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_helpers_of_a_killed_rank_die_with_it(tmp_path, sig):
    """SIGKILL the parent of two forked ranks: the ranks die (PDEATHSIG) and so do their
    helper processes (a spawned multiprocessing manager and its resource tracker), which
    would otherwise be re-parented to init and live on. SIGTERM: the parent also stops
    its own helpers on the way out (a SIGKILLed parent cannot: not part of this test)."""
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    mode = "parent-helper" if sig == signal.SIGTERM else "ranks-only"
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], env=ENV)
    pids = []
    try:
        infos = [_wait_for(tmp_path / f"rank{r}.json", parent, timeout=120) for r in (0, 1)]
        pids = [i["rank"] for i in infos] + [h for i in infos for h in i["helpers"]]
        if sig == signal.SIGTERM:
            pids += json.loads((tmp_path / "parent.json").read_text())
        assert all(i["helpers"] for i in infos) and not any(_gone(p) for p in pids)
        parent.send_signal(sig)
        assert parent.wait(timeout=60) == (-9 if sig == signal.SIGKILL else 128 + sig)
        deadline = time.monotonic() + 30
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    finally:  # hygiene after a failure: nothing of this test keeps running
        if parent.poll() is None:
            parent.kill()
        for pid in (p for p in pids if not _gone(p)):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ stop requests
def _stop_agreement(signalling_rank: int) -> list:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    stop = StopOnSignal.install(["SIGUSR1"])
    try:
        seen = [stop.requested()]
        if dist.get_rank() == signalling_rank:
            os.kill(os.getpid(), signal.SIGUSR1)  # only this rank is signalled
        seen.append(stop.requested())
        return seen + [stop.received.name]
    finally:
        stop.close()
        dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step():
    results = run_forked(_stop_agreement, 3, args=(2,), timeout_s=120)
    assert results == [[False, True, "SIGUSR1"]] * 3


def test_exit_signal_names():
    assert parse_signals(["SIGTERM", "usr1", "SIGTERM"]) == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals([]) == ()
    for bad in ("SIGFOO", "SIGKILL"):
        with pytest.raises(ValueError, match=rf"^train.exit_signal: '{bad}' is not a signal .* accepted: .*SIGUSR1"):
            parse_signals([bad])


def test_exit_signal_is_validated_with_the_run():
    from tip_megatron.config import load_config, validate_run

    cfg = load_config(None, ["train.exit_signal=[SIGTERM, SIGSEGV2]", "student.builtin=quickstart-student",
                             "teacher.builtin=quickstart-teacher"])
    with pytest.raises(ValueError, match="train.exit_signal: 'SIGSEGV2'"):
        validate_run(cfg, 1)


# ------------------------------------------------------------------ --help
_HEAVY = ("torch", "megatron", "transformers", "numpy", "safetensors")

_IMPORTS = textwrap.dedent("""
    import json, sys
    from tip_megatron.apps.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(%r)))
    print("HEAVY=" + json.dumps(heavy))
    sys.exit(code)
""") % (json.dumps(_HEAVY),)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["generate", "--help"],
                                  ["eval", "--help"], ["convert", "hf-to-mcore", "--help"],
                                  ["study", "--help"]])
def test_help_imports_nothing_heavy(argv):
    """In a fresh interpreter: `tip-megatron ... --help` prints the usage and leaves torch,
    megatron and transformers unimported (they take seconds; help must not)."""
    out = subprocess.run([sys.executable, "-c", _IMPORTS, *argv], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: tip-megatron" in out.stdout
    heavy = json.loads(out.stdout.rsplit("HEAVY=", 1)[1])
    assert heavy == [], f"--help imported {heavy}"
