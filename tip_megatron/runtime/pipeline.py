"""Run megatron's pipeline schedules (no pipelining, 1F1B, interleaved 1F1B) for our models.

The schedule is picked from the layout: PP=1 -> no pipelining; PP>1 -> 1F1B; PP>1 with
virtual stages -> interleaved 1F1B. Losses follow megatron's per-token contract: the loss
function returns (loss_sum, num_tokens, report) and the schedule returns the reports of the
last stage's micro-batches (empty elsewhere).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from tip_megatron.runtime.parallel import ParallelGroups


def forward_backward(
    forward_step_func: Callable,
    chunks: Sequence[torch.nn.Module],
    microbatches: Sequence[Any],
    groups: ParallelGroups,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[dict]:
    """Run one global step's micro-batches through the schedule for this layout.

    `microbatches` is this DP rank's list of micro-batches; every virtual chunk gets its own
    iterator over the same list (megatron's interleaved schedule asks for one per chunk).
    """
    # heavy: megatron.core takes ~10 s to import; config checks reach this module (built-ins)
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator  # heavy, as above

    layout = groups.layout
    func = get_forward_backward_func(pp_size=layout.pp, vp_size=layout.vpp)
    iterators: Any
    if len(chunks) > 1:
        iterators = [iter(microbatches) for _ in chunks]
    else:
        iterators = iter(microbatches)
    extra = {}
    if layout.pp > 1:
        # The pipelined schedules take explicit groups only together with a communicator.
        config = getattr(chunks[0], "config", None) or chunks[0].module.config
        extra["p2p_communicator"] = P2PCommunicator(pp_group=groups.pp_group, config=config)
    return func(
        forward_step_func=forward_step_func,
        data_iterator=iterators,
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        pg_collection=groups.pg_collection,
        **extra,
    )
