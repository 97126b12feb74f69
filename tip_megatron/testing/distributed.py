"""Run a test body on N local processes joined by a gloo (or nccl) process group.

    results = run_distributed(fn, world_size=4, args=(x,))

The names tests use for `tip_megatron.runtime.processes.run_forked` (the launcher production code
uses too): `fn(*args)` runs on every rank with the torchrun environment set, so the code
under test initializes exactly as in production; each rank's return value comes back; an
exception on any rank is raised here (DistributedTestError) with that rank's traceback; a
hung rank is killed after `timeout_s`. Ranks are forked (they inherit the imported
modules) and use one intra-op thread each.
"""
from __future__ import annotations

from tip_megatron.runtime.processes import RankFailure as DistributedTestError
from tip_megatron.runtime.env import free_port
from tip_megatron.runtime.processes import run_forked as run_distributed

__all__ = ["DistributedTestError", "free_port", "run_distributed"]
