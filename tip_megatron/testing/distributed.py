"""Run a function on N local processes joined by a gloo (or nccl) process group.

    results = run_distributed(fn, world_size=4, args=(x,))

`fn(*args)` runs on every rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set as torchrun would set them (so code under test initializes exactly as in
production). The return value of each rank comes back to the caller (it must pickle).
An exception on any rank stops the others and is raised here with that rank's traceback.
A rank that hangs (e.g. a collective nobody else joins) is killed after `timeout_s`.

Processes are forked by default: a forked child inherits the parent's imported modules,
which saves ~10 s of `import megatron.core` per rank on a 2-core machine. Each child uses
one intra-op thread so that N ranks do not oversubscribe the cores.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

from tip_megatron.launch import free_port  # noqa: F401 - re-exported for tests


class DistributedTestError(RuntimeError):
    """A rank failed or hung; the message carries its traceback."""


def _child(
    fn: Callable, rank: int, world_size: int, port: int, args: Sequence[Any],
    env: dict[str, str], results: Any,
) -> None:
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


def run_distributed(
    fn: Callable,
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 600.0,
    env: Optional[dict[str, str]] = None,
    start_method: Optional[str] = None,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` ranks; return each rank's result, ordered by rank."""
    method = start_method or ("fork" if sys.platform == "linux" else "spawn")
    ctx = mp.get_context(method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child, args=(fn, rank, world_size, port, tuple(args), dict(env or {}), results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise DistributedTestError(f"ranks {missing} did not finish within {timeout_s:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
                if dead:
                    raise DistributedTestError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                        "before reporting (killed by a signal or os._exit)"
                    ) from None
                continue
            if not ok:
                raise DistributedTestError(f"rank {rank} failed:\n{value}")
            outputs[rank] = _from_bytes(value)
    finally:
        for p in procs:
            p.join(timeout=10 if len(outputs) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [outputs[r] for r in range(world_size)]
