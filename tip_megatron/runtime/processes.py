"""Processes a rank or a command starts, and how they die with it.

    results = run_forked(fn, world_size=4, args=(x,))   # fn on 4 forked local ranks
    die_with_torchrun()                                 # a torchrun worker dies with torchrun
    guard_rank_helpers()                                # a rank's helpers die with it

`run_forked` forks ranks that inherit this process's imports (saving ~10 s of
`import megatron.core` per rank on a small machine); checkpoint conversion and the
multi-process tests use it. Forked ranks die with their parent (a killed parent leaves no
rank behind) and are killed when the parent stops waiting for them; helpers the parent
started before forking (a writer queue's manager) die with the parent too. A torchrun
worker dies with torchrun (`die_with_torchrun`), whom the launcher makes die with the
command (`launch.supervise`). `guard_rank_helpers` makes a rank's helper processes die
with the rank. See docs/design_notes.md, "Signals".
"""
from __future__ import annotations

import ctypes
import io
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

from tip_megatron.runtime.env import free_port, under_torchrun
from tip_megatron.runtime.errors import JOB_ENV
from tip_megatron.runtime.signals import exit_if_signalled, exit_on_signals

#: prctl(2) option: the signal a process gets when its parent exits (Linux).
_PR_SET_PDEATHSIG = 1
#: set by the launcher in torchrun's environment: its pid (a child subreaper, so a worker
#: whose torchrun died before it could ask to die with it is re-parented there).
LAUNCHER_PID_ENV = "TIP_MEGATRON_LAUNCHER_PID"


def set_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits, however it
    exits (a SIGKILLed parent runs no clean-up). Linux only; elsewhere a no-op. Safe in a
    Popen preexec_fn (no Python-level locks)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def die_with_torchrun() -> None:
    """A torchrun worker: SIGKILL it when torchrun (its parent) dies; torchrun itself
    kills its workers on every exit it lives through, so this only acts when torchrun is
    SIGKILLed (as the launcher's own death does to it). A worker whose torchrun already
    died (re-parented to init or to the launcher, a subreaper) exits now. A no-op outside
    torchrun (no RANK / WORLD_SIZE) and off Linux."""
    if sys.platform != "linux" or not under_torchrun():
        return
    set_death_signal(signal.SIGKILL)
    if os.getppid() in (1, int(os.environ.get(LAUNCHER_PID_ENV, "1") or 1)):
        os._exit(137)



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


_HELPERS_GUARD = """
import os, signal, sys
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
def kill(*_):
    for item in sys.argv[3:]:
        pid, start = item.split(":")
        if started(pid) == start:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    os._exit(0)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, signal.SIG_IGN)
signal.signal(int(sys.argv[2]), kill)
import ctypes
ctypes.CDLL(None).prctl(1, int(sys.argv[2]), 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    kill()
while True:
    signal.pause()
"""


def _guard_own_helpers() -> Optional[subprocess.Popen]:
    """A guard that SIGKILLs this process's current descendants (its helpers: a writer
    queue's spawned manager, a resource tracker) when this process dies, SIGKILL
    included; None when there are none (or off Linux). The caller kills the guard once
    it has stopped the helpers itself. Unlike `guard_rank_helpers` it needs no session of
    its own: it kills the pids it was given (checked by start time, never a reused pid)."""
    if sys.platform != "linux":
        return None
    import psutil  # a dependency; only the parent of forked ranks needs it

    helpers = []
    for p in psutil.Process().children(recursive=True):
        try:
            helpers.append(f"{p.pid}:{_start_ticks(p.pid)}")
        except OSError:
            continue
    if not helpers:
        return None
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _HELPERS_GUARD, str(os.getpid()),
                             str(int(_GUARD_SIGNAL)), *helpers], stdin=subprocess.DEVNULL, close_fds=True)


def _start_ticks(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


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
    job = {JOB_ENV: os.urandom(8).hex()}  # names this job (a rank's error line prints once)
    child_args = (fn, world_size, port, tuple(args), {**job, **(env or {})}, results, os.getpid())
    procs = [ctx.Process(target=_child, args=(rank, *child_args), daemon=False)
             for rank in range(world_size)]
    outputs: dict[int, Any] = {}
    guard = _guard_own_helpers()  # a SIGKILL of this process must not leave them behind
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
        if guard is not None:
            guard.kill()
            guard.wait()
    return [outputs[r] for r in range(world_size)]


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
    set_death_signal(signal.SIGKILL)
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
    import torch  # lazy: apps.cli imports this module and --help must not import torch

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
    import torch  # lazy: apps.cli imports this module and --help must not import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _teardown() -> None:
    if "megatron.core.parallel_state" not in sys.modules:
        # Nothing megatron was set up here; importing it just to tear down costs seconds.
        import torch.distributed as dist  # lazy: --help imports this module, not torch

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return
    try:
        # lazy: parallel imports torch; --help imports this module
        from tip_megatron.runtime import parallel

        parallel.destroy()
    except Exception:  # noqa: BLE001 - teardown must not mask the real result
        pass


def stop_checkpoint_writer_helpers() -> None:
    """Kill this process's multiprocessing helpers (dist_checkpointing's results-queue
    manager, a spawned process megatron caches in `filesystem_async._results_queue`) and
    drop megatron's cached queue, so that a later save in this process starts a new one.
    Used by the converter's parent process, which must not leave the manager behind."""
    for helper in mp.active_children():
        helper.kill()
        helper.join(timeout=5)
    module = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    if module is not None:
        module._results_queue = None
