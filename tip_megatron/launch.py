"""The one process launcher: torchrun detection, local torchrun jobs, forked local ranks.

    if launch.under_torchrun(): worker()                      # this process is one rank
    else: launch.run_local(nproc=4, module="tip_megatron.demo", args=["--worker"])
    results = launch.run_forked(fn, world_size=4, args=(x,))   # fn on 4 forked ranks

`rank_env()` is the only reader of torchrun's RANK / WORLD_SIZE / LOCAL_RANK variables.
`run_local` starts a torchrun job (the launcher users run) for CLI commands started from a
plain shell. `run_forked` forks ranks that inherit this process's imports (saving ~10 s of
`import megatron.core` per rank on a small machine); checkpoint conversion and the
multi-process tests use it. Forked ranks die with their parent (a killed parent leaves no
rank behind) and are killed when the parent stops waiting for them.
"""
from __future__ import annotations

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
from typing import Any, Callable, Optional, Sequence

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


def run_local(nproc: int, module: str, args: Sequence[str], threads_per_proc: int = 0) -> int:
    """Run `python -m module *args` on `nproc` local ranks via torch.distributed.run.

    threads_per_proc: intra-op threads per rank (0: cores / nproc, at least 1), so N ranks
    do not oversubscribe the machine.
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
    return subprocess.call(cmd, env=env)


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
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    try:
        _collect(procs, results, outputs, timeout_s)
    finally:
        # Also on KeyboardInterrupt or any error here: no rank outlives this call.
        for p in procs:
            p.join(timeout=10 if len(outputs) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [outputs[r] for r in range(world_size)]


def _collect(procs: list, results: Any, outputs: dict[int, Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(outputs) < len(procs):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(len(procs))) - set(outputs))
            raise RankFailure(f"ranks {missing} did not finish within {timeout_s:.0f} s")
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
