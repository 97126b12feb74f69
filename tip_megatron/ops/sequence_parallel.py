"""The sequence-parallel gather at the output layer, with an explicit TP group.

Shapes: [s/tp, b, h] = this rank's sequence shard (megatron's SP layout: rank r holds
positions [r * s/tp, (r + 1) * s/tp)); [s, b, h] = the whole sequence, on every TP rank.

Under sequence parallelism the decoder hands the output layer [s/tp, b, h]. Scoring and
the kept-token loss need every token's hidden state on every TP rank (each rank holds a
vocabulary shard), so the loss path gathers the sequence first. The gradient of the
gathered tensor on rank r is rank r's PARTIAL (its vocabulary shard's contribution) for
every position; the gradient of the local shard is the sum of all ranks' partials at its
own positions: a reduce-scatter (SUM) over the sequence dimension. That reduce-scatter is
the only reduction of the hidden state's gradient: the fused/unfused loss ops must then
not all-reduce it again (`reduce_hidden_grad=False`). megatron's
`gather_from_sequence_parallel_region(..., tensor_parallel_output_grad=True)` has the same
semantics but reads megatron's global TP group when none is passed and allocates on CUDA.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tip_megatron.runtime.groups import group_size


def _gather_first_dim(tensor: torch.Tensor, tp_group: Any) -> torch.Tensor:
    tensor = tensor.contiguous()
    out = torch.empty((group_size(tp_group) * tensor.shape[0], *tensor.shape[1:]),
                      dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor, group=tp_group)
    return out


def _reduce_scatter_first_dim(tensor: torch.Tensor, tp_group: Any) -> torch.Tensor:
    tensor = tensor.contiguous()
    out = torch.empty((tensor.shape[0] // group_size(tp_group), *tensor.shape[1:]),
                      dtype=tensor.dtype, device=tensor.device)
    dist.reduce_scatter_tensor(out, tensor, op=dist.ReduceOp.SUM, group=tp_group)
    return out


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 forward; reduce-scatter (SUM) along dim 0 backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, tp_group: Any) -> torch.Tensor:
        ctx.tp_group = tp_group
        return _gather_first_dim(tensor, tp_group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_first_dim(grad, ctx.tp_group), None


def gather_sequence(hidden: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h] in TP-rank order; backward reduce-scatters (module doc).

    tp_group None or of size 1: returned as is (nothing is sharded).
    """
    if group_size(tp_group) == 1:
        return hidden
    return _GatherSequence.apply(hidden, tp_group)
