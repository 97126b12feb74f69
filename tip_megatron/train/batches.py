"""Rollouts -> training micro-batches.

Shapes: rollouts [B, L] (right-padded: token j at position j); a micro-batch holds
input_ids / position_ids / target_mask [mbs, L] and rollout_ids [mbs].

Several updates per rollout batch: update u trains on the global rollouts whose id is
u modulo the number of updates, whatever the DP size; each DP replica takes the ones it
holds (`update_microbatches`). So DP=1 and DP=2 see the same mini-batch at every update.

Position t predicts token t+1, so the loss mask of position t is "token t+1 was
generated": target_mask[:, t] = response_mask[:, t+1] (the last position has no target).
"""
from __future__ import annotations

from typing import Optional

import torch

from tip_megatron.distill.step import Microbatch


def target_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: position t is in the loss iff token t+1 is a response token."""
    out = torch.zeros_like(response_mask, dtype=torch.bool)
    out[:, :-1] = response_mask[:, 1:].bool()
    return out


def make_microbatches(
    token_ids: torch.Tensor, response_mask: torch.Tensor, rollout_ids: torch.Tensor,
    micro_batch_size: int, seq_multiple: int = 1, teacher_ids: Optional[torch.Tensor] = None,
) -> list[Microbatch]:
    """Cut this rank's rollouts into micro-batches of `micro_batch_size` rows
    (`teacher_ids`: [B] each row's teacher, several teachers; None: one).

    `seq_multiple`: right-pad the length to a multiple of it (sequence parallelism splits
    the sequence over TP ranks); padded positions are in no loss, and causal attention
    keeps them from changing any earlier position.
    """
    rows, seq = token_ids.shape
    if rows % micro_batch_size != 0:
        raise ValueError(f"{rows} rollouts are not divisible by micro_batch_size={micro_batch_size}")
    extra = -seq % seq_multiple
    if extra:
        token_ids = torch.nn.functional.pad(token_ids, (0, extra))
        response_mask = torch.nn.functional.pad(response_mask, (0, extra))
        seq += extra
    targets = target_mask(response_mask)
    positions = torch.arange(seq, device=token_ids.device).expand(rows, seq)
    return [
        Microbatch(
            input_ids=token_ids[i:i + micro_batch_size].contiguous(),
            position_ids=positions[i:i + micro_batch_size].contiguous(),
            target_mask=targets[i:i + micro_batch_size].contiguous(),
            rollout_ids=rollout_ids[i:i + micro_batch_size].contiguous(),
            teacher_ids=None if teacher_ids is None else teacher_ids[i:i + micro_batch_size].contiguous(),
        )
        for i in range(0, rows, micro_batch_size)
    ]


def update_rows(rollout_ids: torch.Tensor, updates: int) -> list[torch.Tensor]:
    """This replica's row indices of each update: update u holds the global rollouts with
    id % updates == u (in row order). A fixed set of global ids per update, so the
    mini-batches do not depend on how the global batch is split over DP replicas."""
    rows = [torch.nonzero(rollout_ids % updates == u).flatten() for u in range(updates)]
    if len({r.numel() for r in rows}) > 1:
        raise ValueError(f"rollout ids {rollout_ids.tolist()} do not split evenly into "
                         f"{updates} updates")
    return rows


def update_microbatches(
    token_ids: torch.Tensor, response_mask: torch.Tensor, rollout_ids: torch.Tensor,
    updates: int, micro_batch_size: int, seq_multiple: int = 1,
    teacher_ids: Optional[torch.Tensor] = None,
) -> list[list[Microbatch]]:
    """This replica's micro-batches of each update (see `update_rows`)."""
    return [make_microbatches(token_ids[rows], response_mask[rows], rollout_ids[rows],
                              micro_batch_size, seq_multiple=seq_multiple,
                              teacher_ids=None if teacher_ids is None else teacher_ids[rows])
            for rows in update_rows(rollout_ids, updates)]

