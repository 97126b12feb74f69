"""torch.distributed + megatron parallel_state initialization; explicit process groups.

This is the only module that reads megatron's global process groups. Everything else
receives the groups it needs as arguments (`tp_group=`, `pp_group=`, `dp_group=`).

Works under `torchrun` (single node, or multi-node with `--nnodes N --rdzv-backend c10d`):
rank, world size and the rendezvous come from the environment torchrun sets. A bare
`python` process with no torchrun environment becomes a world of one.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from tip_megatron.runtime.device import default_backend
from tip_megatron.runtime.env import free_port, rank_env
from tip_megatron.runtime.gpu_memory import gpu_memory_gib
from tip_megatron.runtime.megatron_compat import apply_cpu_compat

if TYPE_CHECKING:  # megatron loads on first use (`initialize`), not on import
    from megatron.core.process_groups_config import ProcessGroupCollection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """How a world of processes is cut. DP is derived: world / (TP * PP)."""

    tp: int = 1
    """Tensor-parallel size: vocab, heads and MLP columns are split this many ways."""
    pp: int = 1
    """Pipeline-parallel size: transformer layers are split into this many stages."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B schedule); None disables it."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1): activations outside the TP regions
    are split over the sequence; the TIP loss path gathers them at the output layer."""
    cp: int = 1
    """Context-parallel size. Only 1: TIP selection under context parallelism is not
    implemented (see docs/design_notes.md, "Context parallelism")."""
    gpu_memory_gib: Union[float, str, None] = None
    """Memory of one GPU (GiB, or a name: h100, h200, a100-40gb, ...); preflight warns when
    `tip-megatron plan` puts a rank above it (docs/plan.md). null: no check."""

    def validate(self, world_size: int, prefix: str = "parallel.") -> None:
        """Raise ValueError naming `<prefix><field>` and what is accepted, before any
        process group exists."""
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{prefix}{name}={value!r}: must be an integer >= 1")
        if self.vpp is not None and (not isinstance(self.vpp, int) or self.vpp < 1):
            raise ValueError(f"{prefix}vpp={self.vpp!r}: must be None or an integer >= 1")
        if self.vpp is not None and self.vpp > 1 and self.pp < 2:
            raise ValueError(f"{prefix}vpp={self.vpp} needs {prefix}pp >= 2 (got pp={self.pp})")
        if world_size % (self.tp * self.pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = "
                f"{self.tp * self.pp}; accepted: world sizes that are multiples of tp*pp"
            )
        if self.cp != 1:
            raise ValueError(
                f"{prefix}cp={self.cp!r}: context parallelism is not supported (a rollout's "
                "TIP statistics would span CP ranks; see docs/design_notes.md); accepted: 1"
            )
        if self.sequence_parallel and self.tp < 2:
            raise ValueError(f"{prefix}sequence_parallel=True needs {prefix}tp >= 2")
        if self.gpu_memory_gib is not None:
            gpu_memory_gib(self.gpu_memory_gib, f"{prefix}gpu_memory_gib")

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups and ranks of this process, handed to everything else."""

    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dp_group_gloo: Optional[dist.ProcessGroup]
    """The DP group on gloo (megatron's distributed optimizer's CPU-side collectives)."""
    embd_group: Optional[dist.ProcessGroup]
    """First and last pipeline stage (tied embeddings); megatron may leave it unset."""
    mp_group: dist.ProcessGroup
    pg_collection: ProcessGroupCollection
    """megatron's view of the same groups (what its model classes take)."""
    layout: ParallelLayout
    world_size: int
    rank: int

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp_group)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_group)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def init_torch_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialize the default process group from the torchrun environment (idempotent).

    A process started without torchrun becomes rank 0 of a world of one, on a free local
    port. Returns (rank, world_size).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = rank_env()
    rank, world, local_rank = env.rank, env.world_size, env.local_rank
    device = default_backend()
    if device.is_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if "MASTER_ADDR" not in os.environ:
        if world != 1:
            raise ValueError(
                f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun "
                "(it sets MASTER_ADDR/MASTER_PORT), or run a single process"
            )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(
        backend=device.backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return rank, world


def set_seeds(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker.

    The tracker must be seeded even without dropout: megatron's attention forks it.
    The data-parallel seed is the same on every rank, so with `use_cpu_initialization`
    every TP shard is cut from the same master weight.
    """
    # megatron loads on first use: importing this module (config, --help) stays light.
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize(
    layout: ParallelLayout,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelGroups:
    """Initialize torch.distributed and megatron parallel_state for `layout`.

    Validates the layout against the world size first, so a bad layout is a ValueError
    rather than a hang in a collective.
    """
    world = rank_env().world_size
    if dist.is_initialized():
        world = dist.get_world_size()
    layout.validate(world)
    apply_cpu_compat()
    rank, world = init_torch_distributed(timeout_minutes)

    # megatron loads on first use: importing this module (config, --help) stays light.
    from megatron.core import parallel_state
    # heavy: megatron loads on the first initialize, not on import
    from megatron.core.process_groups_config import ProcessGroupCollection

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=True,
    )
    set_seeds(seed)
    groups = ParallelGroups(
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        dp_group_gloo=parallel_state.get_data_parallel_group_gloo(),
        embd_group=parallel_state.get_embedding_group(check_initialized=False),
        mp_group=parallel_state.get_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        layout=layout,
        world_size=world,
        rank=rank,
    )
    if rank == 0:
        logger.info(
            "parallel layout: world=%d tp=%d pp=%d dp=%d vpp=%s backend=%s",
            world, layout.tp, layout.pp, layout.dp(world), layout.vpp,
            default_backend().backend,
        )
    return groups


def destroy() -> None:
    """Tear down megatron parallel_state and the default process group."""
    from megatron.core import parallel_state  # loaded by `initialize` already; light here

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
