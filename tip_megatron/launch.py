"""The one process launcher: torchrun detection, local torchrun jobs, forked local ranks.

    if launch.under_torchrun(): worker()                      # this process is one rank
    else: launch.run_local(nproc=4, module="tip_megatron.demo", args=["--worker"])
    results = launch.run_forked(fn, world_size=4, args=(x,))   # fn on 4 forked ranks

`rank_env()` is the only reader of torchrun's RANK / WORLD_SIZE / LOCAL_RANK variables.
`run_local` starts a torchrun job (the launcher users run) for CLI commands started from a
plain shell; `supervise` forwards signals to it and returns only once none of its
processes is alive. `run_forked` forks ranks that inherit this process's imports (saving
~10 s of `import megatron.core` per rank on a small machine); checkpoint conversion and the
multi-process tests use it. Forked ranks die with their parent (a killed parent leaves no
rank behind) and are killed when the parent stops waiting for them. `guard_rank_helpers`
makes a rank's helper processes die with the rank. See docs/design_notes.md, "Signals".
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

#: prctl(2) option: the signal a process gets when its parent exits (Linux).
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankEnv:
    """This process's place in a torchrun world (rank 0 of 1 outside torchrun)."""

    rank: int
    world_size: int
    local_rank: int


def under_torchrun() -> bool:
    """True when a launcher (torchrun, or `run_forked`) made this process one rank of a world."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_env() -> RankEnv:
    if not under_torchrun():
        return RankEnv(rank=0, world_size=1, local_rank=0)
    return RankEnv(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Signals the launcher passes on to a local torchrun job (torchrun hands them to its
#: workers, waits up to 30 s, then kills them).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Signals the launcher passes straight to the ranks, torchrun being started immune to
#: them (it would die of them: it handles only the ones above). Slurm's
#: `--signal=USR1@120` asks for a checkpoint this way (`train.exit_signal`).
RANK_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

#: prctl(2) option: orphaned descendants are re-parented to this process (Linux).
_PR_SET_CHILD_SUBREAPER = 36


def run_local(nproc: int, module: str, args: Sequence[str], threads_per_proc: int = 0,
              grace_s: float = 45.0) -> int:
    """Run `python -m module *args` on `nproc` local ranks via torch.distributed.run.

    threads_per_proc: intra-op threads per rank (0: cores / nproc, at least 1), so N ranks
    do not oversubscribe the machine. SIGINT / SIGTERM / SIGHUP to this process go to the
    job (`supervise`); this call returns only once no process of the job is alive.
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: must be >= 1")
    threads = threads_per_proc or max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", module, *args,
    ]
    return supervise(cmd, env, grace_s)


def needs_own_ranks(nproc: int) -> bool:
    """True when a command wants `nproc` > 1 ranks and was started from a plain shell."""
    return nproc > 1 and not under_torchrun()


def run_cli_ranks(nproc: int, argv: Sequence[str]) -> int:
    """`tip-megatron *argv` again, on `nproc` local ranks (each then runs the command as
    one rank of the torchrun world)."""
    return run_local(nproc, "tip_megatron.cli", list(argv))


def supervise(cmd: Sequence[str], env: Optional[dict[str, str]] = None, grace_s: float = 45.0) -> int:
    """Run `cmd` in its own session and wait for it; return its exit code.

    A terminal's Ctrl-C reaches only this process (the job has its own session), which
    forwards SIGINT / SIGTERM / SIGHUP to the job's process group; `grace_s` after the
    first signal, or at a second one, every process of the job is SIGKILLed. SIGUSR1 /
    SIGUSR2 go to every process of the job but its leader, which ignores them. torchrun
    starts each worker in a session of its own, so the job is tracked as a process tree:
    this process becomes a child subreaper (orphans of the job are re-parented here, not to
    init) and kills and reaps whatever is left when the job's leader exits.
    """
    import psutil

    _become_subreaper()
    before = {p.pid for p in psutil.Process().children()}
    immune = _install(signal.SIG_IGN, RANK_SIGNALS)  # inherited by the job: set before it starts
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    forward = _Forwarder(proc.pid)
    previous = {**_install(forward, FORWARDED_SIGNALS), **_install(forward.to_ranks, RANK_SIGNALS),
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
        _restore(previous)
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


def _install(handler: Any, signals: Sequence[int]) -> dict:
    """Set `handler` for `signals`; returns the previous handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}  # signals are delivered to the main thread only: nothing to forward here
    return {s: signal.signal(s, handler) for s in signals}


def _restore(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _become_subreaper() -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _kill_job(pid: int, not_ours: set[int]) -> None:
    """SIGKILL the job: its leader `pid`, its process group, every descendant, and orphans
    re-parented to this subreaper since the job started (children not in `not_ours`);
    then reap them."""
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
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------ a rank's helpers
#: The guard's death signal: a real-time signal nobody sends to a process group by habit
#: (torchrun and Slurm signal whole groups with SIGTERM / SIGINT / SIGUSR1, which the guard
#: ignores so that the rank alone decides how to stop).
_GUARD_SIGNAL = signal.SIGRTMIN + 3

_GUARD = """
import ctypes, os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, signal.SIG_IGN)
signal.signal(int(sys.argv[2]), lambda *_: os.killpg(0, signal.SIGKILL))
ctypes.CDLL(None).prctl(1, int(sys.argv[2]), 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    os.killpg(0, signal.SIGKILL)
while True:
    signal.pause()
"""

_guarded_pid: Optional[int] = None


def guard_rank_helpers() -> bool:
    """Make this rank's helper processes (dist_checkpointing's multiprocessing manager and
    resource tracker, dataloader workers...) die with it, however it dies.

    Only for a rank that leads a session of its own (torchrun starts each worker so;
    `run_forked` ranks call setsid): its helpers share its process group and nothing else
    does. A small guard process of that group waits for the rank's death (PR_SET_PDEATHSIG)
    and then SIGKILLs the group, itself included. Linux only; idempotent. Returns whether a
    guard runs.
    """
    global _guarded_pid
    if _guarded_pid == os.getpid():
        return True
    if sys.platform != "linux" or os.getsid(0) != os.getpid():
        return False
    subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARD, str(os.getpid()), str(int(_GUARD_SIGNAL))],
                     stdin=subprocess.DEVNULL, close_fds=True)
    _guarded_pid = os.getpid()
    return True


# ------------------------------------------------------------------ forked ranks
class RankFailure(RuntimeError):
    """A forked rank failed or hung; the message carries its traceback."""


def run_forked(
    fn: Callable,
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 600.0,
    env: Optional[dict[str, str]] = None,
    start_method: Optional[str] = None,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` local ranks; return each rank's result by rank.

    Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun
    would set them (plus `env`) and one intra-op thread. Results must pickle. An exception
    on any rank, a rank that dies, or `timeout_s` passing raises RankFailure; the other
    ranks are then killed.
    """
    method = start_method or ("fork" if sys.platform == "linux" else "spawn")
    ctx = mp.get_context(method)
    results = ctx.Queue()
    port = free_port()
    child_args = (fn, world_size, port, tuple(args), dict(env or {}), results, os.getpid())
    procs = [ctx.Process(target=_child, args=(rank, *child_args), daemon=False)
             for rank in range(world_size)]
    outputs: dict[int, Any] = {}
    try:
        # SIGTERM ends this process through `finally` (as Ctrl-C does), so the ranks are
        # killed and reaped and atexit clean-up (multiprocessing managers) runs; from
        # before the first fork, or a rank started alone would wait for its peers and
        # multiprocessing's atexit would wait for it.
        with exit_on_signals():
            exit_if_signalled()  # one that landed before this call, its exception swallowed
            for p in procs:
                p.start()
            _collect(procs, results, outputs, timeout_s)
    finally:
        # Also on KeyboardInterrupt or any error here: no rank outlives this call.
        started = [p for p in procs if p.pid is not None]
        for p in started:
            p.join(timeout=10 if len(outputs) == world_size else 0.5)
        for p in started:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [outputs[r] for r in range(world_size)]


@contextlib.contextmanager
def exit_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block `signals` raise SystemExit(128 + signum), as Ctrl-C raises
    KeyboardInterrupt, so `finally` clauses and atexit clean-up run (the default action
    kills the process without either). Main thread only; elsewhere a no-op.

    A handler's exception is lost when the signal lands while a finalizer or weakref
    callback runs (Python prints "Exception ignored" and goes on), so the signal is also
    recorded: `exit_if_signalled` (called where the block waits) and the block's end raise
    it again."""
    previous = _install(_exit_on_signal, signals)
    try:
        yield
    except SystemExit:
        _pending_signals.clear()  # delivered
        raise
    finally:
        _restore(previous)
    exit_if_signalled()


_pending_signals: list[int] = []


def _exit_on_signal(signum: int, _frame: Any) -> None:
    _pending_signals.append(signum)
    raise SystemExit(128 + signum)


def exit_if_signalled() -> None:
    """Raise SystemExit(128 + signum) for a signal `exit_on_signals` caught whose exception
    was swallowed; a no-op otherwise."""
    if _pending_signals:
        signum = _pending_signals[0]
        _pending_signals.clear()
        raise SystemExit(128 + signum)


def _collect(procs: list, results: Any, outputs: dict[int, Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(outputs) < len(procs):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(len(procs))) - set(outputs))
            raise RankFailure(f"ranks {missing} did not finish within {timeout_s:.0f} s")
        exit_if_signalled()
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
            if dead:
                raise RankFailure(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                  "before reporting (killed by a signal or os._exit)") from None
            continue
        if not ok:
            raise RankFailure(f"rank {rank} failed:\n{value}")
        outputs[rank] = _from_bytes(value)


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits, however it exits
    (a SIGKILLed parent runs no `finally`). Linux only; elsewhere the parent's finally is
    the only clean-up."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child(
    rank: int, fn: Callable, world_size: int, port: int, args: Sequence[Any],
    env: dict[str, str], results: Any, parent_pid: int,
) -> None:
    _die_with_parent(parent_pid)
    os.setsid()  # a session (and process group) of its own, so that its helpers die with it
    guard_rank_helpers()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    try:
        value = fn(*args)
        results.put((rank, True, _to_bytes(value)))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        _teardown()


def _to_bytes(value: Any) -> bytes:
    # Serialized eagerly: torch's queue reducers would share tensor storage through file
    # descriptors that vanish when this rank exits before the parent reads them.
    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _teardown() -> None:
    if "megatron.core.parallel_state" not in sys.modules:
        # Nothing megatron was set up here; importing it just to tear down costs seconds.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return
    try:
        from tip_megatron import parallel

        parallel.destroy()
    except Exception:  # noqa: BLE001 - teardown must not mask the real result
        pass
