"""The global normalisation of a weighted loss: sum_i w_i D_i / sum_i w_i over the global
batch, on top of megatron's per-token contract.

Shapes: scalars only ([2] float64: kept count, weight sum).

Megatron's schedules add each micro-batch's `num_tokens` into an int tensor and
`finalize_model_grads` divides the gradients once by the global total (clamped at 1). A
float weight sum cannot travel that way (adding a float into the int tensor raises, and the
clamp would be wrong for a sum below 1), so the loss function keeps returning the integer
kept count N (every kept token has a weight > 0) and, for a weighted rule, `train_pass`
multiplies the already-divided gradients by N_global / W_global once the schedule has
finished: (sum w D / N) * N / W = sum w D / W. The factor is broadcast from the last
pipeline stage (the only one that sees the loss) and summed over DP, the same groups
megatron reduces its count over. A mask (weights None) never reaches this: its gradients
are megatron's, bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from tip_megatron.runtime.device import current_device
from tip_megatron.runtime.groups import group_size
from tip_megatron.runtime.parallel import ParallelGroups


def global_count_and_weight(groups: ParallelGroups, results: Sequence) -> tuple[float, float]:
    """(global kept count N, global weight sum W) of a training pass: the last stage's
    `MicrobatchResult` reports, broadcast over PP, summed over DP. Every rank calls it."""
    local = torch.zeros(2, dtype=torch.float64)
    for r in results:
        report = r.metric_sums.get("distill")
        if report is not None:
            local += report[1:3].double().cpu()
    device = current_device()
    total = local.to(device)
    if group_size(groups.pp_group) > 1:
        last = dist.get_global_rank(groups.pp_group, group_size(groups.pp_group) - 1)
        dist.broadcast(total, src=last, group=groups.pp_group)
    if group_size(groups.dp_group) > 1:
        dist.all_reduce(total, group=groups.dp_group)
    return float(total[0]), float(total[1])


def rescale_weighted_grads(chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
                           results: Sequence) -> float:
    """Turn megatron's division by the kept count into a division by the weight sum (module
    docstring); returns the factor applied (1.0: nothing to do, e.g. all weights 1)."""
    count, weight = global_count_and_weight(groups, results)
    if weight <= 0.0 or count == weight:
        return 1.0
    factor = count / weight
    for chunk in chunks:
        chunk.scale_gradients(factor)  # megatron DDP: scales the grad buffers in place
    return factor
