"""The one process launcher: local torchrun jobs for commands started from a plain shell.

    if under_torchrun(): worker()                             # this process is one rank
    else: launch.run_local(nproc=4, module="tip_megatron.apps.demo_worker", args=[...])

`run_local` starts a torchrun job (the launcher users run) and returns the ranks' exit
code, printing a failed rank's one error line last; `supervise` forwards signals to it,
makes it die with this process (SIGKILL included) and returns only once none of its
processes is alive. The rank side (rank environment,
forked ranks, a rank's helpers) lives in `tip_megatron.runtime`. See docs/design_notes.md,
"Signals".
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tip_megatron.runtime.env import free_port, under_torchrun
from tip_megatron.runtime.errors import REPORTS_ENV, read_rank_reports
from tip_megatron.runtime.processes import LAUNCHER_PID_ENV, set_death_signal
from tip_megatron.runtime.signals import install_handlers, restore_handlers

#: Signals the launcher passes on to a local torchrun job (torchrun hands them to its
#: workers, waits up to 30 s, then kills them).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Signals the launcher passes straight to the ranks, torchrun being started immune to
#: them (it would die of them: it handles only the ones above). Slurm's
#: `--signal=USR1@120` asks for a checkpoint this way (`train.exit_signal`).
RANK_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

#: prctl(2) option: orphaned descendants are re-parented to this process (Linux).
_PR_SET_CHILD_SUBREAPER = 36


#: Seconds between torchrun's checks of its workers (see `run_local`).
MONITOR_INTERVAL_S = 2.0


def run_local(nproc: int, module: str, args: Sequence[str], threads_per_proc: int = 0,
              grace_s: float = 45.0) -> int:
    """Run `python -m module *args` on `nproc` local ranks via torch.distributed.run.

    threads_per_proc: intra-op threads per rank (0: cores / nproc, at least 1), so N ranks
    do not oversubscribe the machine. SIGINT / SIGTERM / SIGHUP to this process go to the
    job (`supervise`); this call returns only once no process of the job is alive.

    Returns the ranks' exit code (torchrun's own is 1 after any failure or signal): each
    rank reports its code and error line into a run-scoped temp folder
    (`runtime.errors.rank_exit`); the first failed rank's line is printed here, after
    torchrun's failure dump. Ranks that did not all report: torchrun's code.
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: must be >= 1")
    threads = threads_per_proc or max(1, (os.cpu_count() or 1) // nproc)
    reports = Path(tempfile.mkdtemp(prefix="tip-megatron-ranks-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **{REPORTS_ENV: str(reports)})
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        # torchrun polls its workers every MONITOR_INTERVAL_S (its default: 0.1 s) and stops
        # all of them as soon as one has died: the pause lets a rank that saw a peer die
        # (a teacher rank's broken link) report its one line before it is stopped.
        "--monitor-interval", str(MONITOR_INTERVAL_S),
        "-m", module, *args,
    ]
    try:
        code, line = read_rank_reports(reports, nproc, supervise(cmd, env, grace_s))
    finally:
        shutil.rmtree(reports, ignore_errors=True)
    if line:
        print(line, file=sys.stderr, flush=True)
    return code


def needs_own_ranks(nproc: int) -> bool:
    """True when a command wants `nproc` > 1 ranks and was started from a plain shell."""
    return nproc > 1 and not under_torchrun()


def run_cli_ranks(nproc: int, argv: Sequence[str]) -> int:
    """`tip-megatron *argv` again, on `nproc` local ranks (each then runs the command as
    one rank of the torchrun world)."""
    return run_local(nproc, "tip_megatron.apps.cli", list(argv))


def supervise(cmd: Sequence[str], env: Optional[dict[str, str]] = None, grace_s: float = 45.0) -> int:
    """Run `cmd` in its own session and wait for it; return its exit code.

    A terminal's Ctrl-C reaches only this process (the job has its own session), which
    forwards SIGINT / SIGTERM / SIGHUP to the job's process group; `grace_s` after the
    first signal, or at a second one, every process of the job is SIGKILLed. SIGUSR1 /
    SIGUSR2 go to every process of the job but its leader, which ignores them. torchrun
    starts each worker in a session of its own, so the job is tracked as a process tree:
    this process becomes a child subreaper (orphans of the job are re-parented here, not to
    init) and kills and reaps whatever is left when the job's leader exits. When this
    process dies without doing so (SIGKILL), the leader gets SIGKILL from the kernel
    (PR_SET_PDEATHSIG), and torchrun's workers die with torchrun the same way
    (`runtime.processes.die_with_torchrun`, which reads this process's pid from the
    environment to tell a worker whose torchrun died before it started).
    """
    import psutil  # a dependency; imported here so that `--help` stays fast

    _become_subreaper()
    before = {p.pid for p in psutil.Process().children()}
    immune = install_handlers(signal.SIG_IGN, RANK_SIGNALS)  # inherited by the job: set before it starts
    env = dict(os.environ if env is None else env, **{LAUNCHER_PID_ENV: str(os.getpid())})
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, preexec_fn=_die_with(os.getpid()))
    forward = _Forwarder(proc.pid)
    previous = {**install_handlers(forward, FORWARDED_SIGNALS), **install_handlers(forward.to_ranks, RANK_SIGNALS),
                **immune}  # what was there before this call
    try:
        while proc.poll() is None:
            if forward.must_kill(grace_s):
                _kill_job(proc.pid, before)
            time.sleep(0.1)
    finally:
        _kill_job(proc.pid, before)  # every process of the job still alive
        proc.wait()
        _kill_job(proc.pid, before)  # and orphans re-parented here as the leader exited
        restore_handlers(previous)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


class _Forwarder:
    """Signal handler: the first signal goes to the job's process group; a second one, or
    `grace_s` without the job exiting, means kill."""

    def __init__(self, pgid: int) -> None:
        self.pgid, self.count, self.first = pgid, 0, 0.0

    def __call__(self, signum: int, _frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.first = time.monotonic()
            _signal_group(self.pgid, signum)

    def to_ranks(self, signum: int, _frame: Any) -> None:
        # only the supervising parent needs psutil; kept off the --help path
        import psutil

        try:
            ranks = psutil.Process(self.pgid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in ranks:
            try:
                p.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    def must_kill(self, grace_s: float) -> bool:
        return self.count > 1 or (self.count == 1 and time.monotonic() - self.first > grace_s)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _die_with(parent: int):
    """preexec_fn: the child gets SIGKILL when this process dies (and at once when it
    already has: the race between fork and prctl)."""
    def preexec() -> None:
        set_death_signal(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(137)
    return preexec


def _become_subreaper() -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _kill_job(pid: int, not_ours: set[int]) -> None:
    """SIGKILL the job: its leader `pid`, its process group, every descendant, and orphans
    re-parented to this subreaper since the job started (children not in `not_ours`);
    then reap them."""
    # only the supervising parent needs psutil; kept off the --help path
    import psutil

    family = []
    for child in psutil.Process().children():
        if child.pid == pid or child.pid not in not_ours:
            try:
                family += [child, *child.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
    _signal_group(pid, signal.SIGKILL)
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    # The leader is left to its Popen to reap (else Popen would report exit code 0).
    _wait_dead({p.pid for p in family} - {pid}, timeout_s=30.0)


def _wait_dead(pids: set[int], timeout_s: float) -> None:
    """Until none of `pids` runs (zombies count as dead); reaps those that are children of
    this process (orphans re-parented here become so while we wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for pid in list(pids):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _running(pid):
                pids.discard(pid)
        if not pids or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _running(pid: int) -> bool:
    # only the supervising parent needs psutil; kept off the --help path
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
