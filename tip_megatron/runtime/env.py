"""This process's place in a torchrun world: the only reader of RANK / WORLD_SIZE /
LOCAL_RANK, and a free port for a local rendezvous."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


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
