"""The few DP collectives of the selection layer, on `[tokens]`-sized tensors only.

`group=None` means "no data parallelism": every function is then a local no-op.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from tip_megatron.runtime.groups import group_size


def all_gather_varlen(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate `[n_r]` tensors of every rank of `group`, in rank order."""
    if group_size(group) == 1:
        return x
    world = dist.get_world_size(group)
    size = torch.tensor([x.numel()], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes_int = [int(s.item()) for s in sizes]
    if max(sizes_int) == 0:
        return x
    padded = torch.zeros(max(sizes_int), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([c[:n] for c, n in zip(chunks, sizes_int)])


def all_reduce_min_max(
    x: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (min, max) of `x` as `[1]` float64; (0, 0) if every rank is empty."""
    x = x.double()
    inf = torch.full((1,), float("inf"), dtype=torch.float64, device=x.device)
    # An empty rank contributes +inf to the min and -inf to the max: neutral elements.
    lo = x.min().reshape(1) if x.numel() else inf
    hi = x.max().reshape(1) if x.numel() else -inf
    if group_size(group) > 1:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    empty = torch.isinf(lo)
    return torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)


def all_reduce_sum(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum of `x` over the ranks of `group`, as a new tensor (`x` is left untouched)."""
    out = x.clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
