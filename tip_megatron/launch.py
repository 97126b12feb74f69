"""Start N local worker processes through torchrun (the same launcher users run).

    run_local(nproc=4, module="tip_megatron.demo", args=["--worker"])

Used by the CLI commands that run a multi-process job on one machine when the user did not
start them under torchrun themselves. Under torchrun already (RANK set), callers run the
worker directly instead.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


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
