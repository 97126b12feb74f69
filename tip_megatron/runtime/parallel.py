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

from tip_megatron.runtime.device import current_device, default_backend
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
            keys = "" if prefix == "parallel." else f" ({prefix}tp x {prefix}pp)"
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = "
                f"{self.tp * self.pp}{keys}; accepted: world sizes that are multiples of tp*pp"
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
    """Ranks of this model's grid."""
    rank: int
    """This process's rank in the default group (its side's world under a `Split`)."""
    world_group: Optional[dist.ProcessGroup] = None
    """Every rank of this model's grid: the group of the run-wide collectives (barriers,
    flags, checkpoints). None: the default group (this model's grid is the whole world)."""
    rank_offset: int = 0
    """The job-wide rank of the grid's first rank: its ranks are [rank_offset, rank_offset +
    world_size) of the job (nonzero for the teacher's side of a `Split`)."""

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


@dataclass(frozen=True)
class Split:
    """Several worlds in one job (`placement: separate`): global ranks [0, student) train the
    student, then each teacher on ranks of its own takes the next `teachers[i]` ranks, in
    the order of the config's teachers. Each world gets a default process group of its own
    (megatron's global state, checkpoints and every run-wide collective stay inside one
    model's ranks); a `Bridge` joins them."""

    student: int
    teachers: tuple[int, ...]
    """Ranks of each teacher world, in order (one entry per `separate` teacher)."""

    def world(self, global_rank: int) -> int:
        """-1: the student's world; i: the i-th teacher world."""
        if global_rank < self.student:
            return -1
        start = self.student
        for i, size in enumerate(self.teachers):
            if global_rank < start + size:
                return i
            start += size
        raise ValueError(f"rank {global_rank} is outside a job of {self.student} student ranks + "
                         f"teacher worlds of {list(self.teachers)} ranks")

    def offset(self, world: int) -> int:
        """Job-wide rank of world `world`'s first rank (-1: the student's)."""
        return 0 if world < 0 else self.student + sum(self.teachers[:world])

    def size(self, world: int) -> int:
        return self.student if world < 0 else self.teachers[world]

    def role(self, global_rank: int) -> str:
        return "student" if self.world(global_rank) < 0 else "teacher"


class Bridge:
    """Point-to-point sends between any two global ranks of the job, whatever world each
    belongs to: the default group when there is one world, a gloo group of its own over
    every rank of the job under a `Split` (on GPUs the tensors go through host memory:
    docs/teacher.md)."""

    def __init__(self, group: Optional[dist.ProcessGroup], global_rank: int, offset: int) -> None:
        self.group = group
        self.rank = global_rank
        self._offset = offset  # global rank of this world's rank 0 (the default group's ranks)
        self.device = torch.device("cpu") if group is not None else current_device()
        """Where tensors must be to travel: host memory on the gloo bridge, else the
        default group's device (a GPU under NCCL)."""

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0):
        """Send `tensor` (contiguous, kept alive by the caller until the work is done) to
        global rank `dst`; returns the work to wait on."""
        if self.group is None:
            return dist.isend(tensor, dst - self._offset, tag=tag)
        return self.group.send([tensor], dst, tag)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0):
        if self.group is None:
            return dist.irecv(tensor, src - self._offset, tag=tag)
        return self.group.recv([tensor], src, tag)


_BRIDGE: Optional[Bridge] = None


def bridge() -> Bridge:
    """The job's point-to-point transport (set by `init_torch_distributed`)."""
    if _BRIDGE is None:
        raise RuntimeError("bridge(): torch.distributed is not initialized (parallel.initialize)")
    return _BRIDGE


def init_torch_distributed(timeout_minutes: int = 30, split: Optional[Split] = None) -> tuple[int, int]:
    """Initialize the default process group from the torchrun environment (idempotent).

    A process started without torchrun becomes rank 0 of a world of one, on a free local
    port. Under a `Split` the default group is this rank's side only (its rank and size
    within it are returned) and the job-wide `bridge()` is a group of its own over the
    same rendezvous store. Returns (rank, world_size) of the default group.
    """
    global _BRIDGE
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
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if split is None:
        dist.init_process_group(backend=device.backend, rank=rank, world_size=world, timeout=timeout)
        _BRIDGE = Bridge(None, rank, 0)
        return rank, world
    if split.student + sum(split.teachers) != world:
        raise ValueError(f"world size {world} != {split.student} student ranks + teacher worlds of "
                         f"{' + '.join(map(str, split.teachers))} ranks")
    # The store torchrun's rendezvous gives every rank (env://), shared by the groups under
    # their own key prefixes: the student's world, each teacher's, and the bridge.
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    mine = split.world(rank)
    offset, size = split.offset(mine), split.size(mine)
    prefix = "tip/student" if mine < 0 else f"tip/teacher{mine}"
    dist.init_process_group(backend=device.backend, store=dist.PrefixStore(prefix, store),
                            rank=rank - offset, world_size=size, timeout=timeout)
    link = dist.ProcessGroupGloo(dist.PrefixStore("tip/bridge", store), rank, world, timeout)
    _BRIDGE = Bridge(link, rank, offset)
    return rank - offset, size


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
    split: Optional[Split] = None,
) -> ParallelGroups:
    """Initialize torch.distributed and megatron parallel_state for `layout`.

    Validates the layout against the world size first, so a bad layout is a ValueError
    rather than a hang in a collective. Under a `Split` the world is this rank's side (the
    student's or the teacher's ranks, `layout` being that side's).
    """
    world = rank_env().world_size
    if split is not None and not dist.is_initialized():
        world = split.size(split.world(rank_env().rank))
    if dist.is_initialized():
        world = dist.get_world_size()
    layout.validate(world)
    apply_cpu_compat()
    global_rank = rank_env().rank
    rank, world = init_torch_distributed(timeout_minutes, split)

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
        rank_offset=global_rank - rank,
    )
    if rank == 0:
        logger.info(
            "parallel layout: world=%d tp=%d pp=%d dp=%d vpp=%s backend=%s",
            world, layout.tp, layout.pp, layout.dp(world), layout.vpp,
            default_backend().backend,
        )
    return groups


def _enumerate(grid, dims: list[str]) -> list[list[int]]:
    """Global ranks of every `dims` group of `grid` (megatron's order; see HyperCommGrid)."""
    return grid._gen_rank_enum(dims)  # the enumeration create_pg uses, for the embedding groups


def _stage_pairs(grid, layout: ParallelLayout) -> tuple[list[list[int]], list[list[int]]]:
    """(embedding groups: the first and last pipeline stage of every TP/DP position,
    position-embedding groups: the first stage alone), as megatron pairs them."""
    pipelines = _enumerate(grid, ["pp"])
    embd = [sorted({ranks[0], ranks[-1]}) for ranks in pipelines]
    return embd, [[ranks[0]] for ranks in pipelines]


def grid_groups(layout: ParallelLayout, rank_offset: int, size: int,
                timeout_minutes: int = 30) -> Optional[ParallelGroups]:
    """Process groups of `layout` over the global ranks [rank_offset, rank_offset + size),
    built with megatron-core's HyperCommGrid (megatron's rank order: TP fastest, then DP,
    then PP), without megatron's global parallel_state: a model built with these groups
    (its `pg_collection`) may live beside another model of another layout.

    Collective over the whole world (every rank creates every group, as torch requires);
    returns None on ranks outside the grid."""
    # heavy: megatron loads on first use (`initialize`), not on import
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection  # heavy, as above

    layout.validate(size)
    dp = layout.dp(size)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    grid = HyperCommGrid([layout.tp, 1, 1, dp, layout.pp], ["tp", "cp", "ep", "dp", "pp"],
                         rank_offset=rank_offset)
    made = {name: grid.create_pg(dims, timeout=timeout) for name, dims in (
        ("tp", "tp"), ("pp", "pp"), ("dp", "dp"), ("cp", "cp"), ("ep", "ep"),
        ("mp", ["tp", "pp"]), ("tp_dp", ["tp", "dp"]), ("tp_pp_ep", ["tp", "ep", "pp"]))}
    embd_ranks, pos_ranks = _stage_pairs(grid, layout)
    embd, _ = dist.new_subgroups_by_enumeration(embd_ranks, timeout=timeout)
    pos_embd, _ = dist.new_subgroups_by_enumeration(pos_ranks, timeout=timeout)
    gloo, _ = dist.new_subgroups_by_enumeration(_enumerate(grid, ["dp"]), backend="gloo",
                                                timeout=timeout)
    world = dist.new_group(list(range(rank_offset, rank_offset + size)), timeout=timeout)
    rank = dist.get_rank()
    if not grid.is_current_rank_in_grid():
        return None
    tp, dp_group = made["tp"], made["dp"]
    # A dense model: expert groups are the dense ones (EP 1), context parallelism is 1.
    pgs = ProcessGroupCollection(
        tp=tp, pp=made["pp"], mp=made["mp"], embd=embd, pos_embd=pos_embd, cp=made["cp"],
        tp_cp=tp, hcp=None, ep=made["ep"], expt_tp=tp, tp_ep=tp, tp_ep_pp=made["tp_pp_ep"],
        tp_dp_cp=made["tp_dp"], dp=dp_group, dp_cp=dp_group, intra_dp_cp=dp_group,
        expt_dp=dp_group, intra_expt_dp=dp_group, inter_dist_opt=None, intra_dist_opt=world)
    return ParallelGroups(
        tp_group=tp, pp_group=made["pp"], dp_group=dp_group, dp_group_gloo=gloo, embd_group=embd,
        mp_group=made["mp"], pg_collection=pgs, layout=layout, world_size=size, rank=rank,
        world_group=world, rank_offset=rank_offset)


def destroy() -> None:
    """Tear down megatron parallel_state, the default process group and the bridge."""
    global _BRIDGE
    _BRIDGE = None
    from megatron.core import parallel_state  # loaded by `initialize` already; light here

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
