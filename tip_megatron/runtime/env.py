"""This process's place in a torchrun world: the only reader of RANK / WORLD_SIZE /
LOCAL_RANK, and a free port for a local rendezvous."""
from __future__ import annotations

import os
import random
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
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral
    range: the port the kernel hands out for `bind(0)` is an ephemeral one, which any
    outgoing connection (every gloo pair of every other job on the machine) may take before
    our rendezvous server listens on it (EADDRINUSE under load); ports below the range are
    only ever taken by a listener that asks for them by number."""
    low = _ephemeral_low()
    rng = random.Random(os.urandom(8))
    for _ in range(64):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: any free one
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
