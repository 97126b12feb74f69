"""How the loss path reads a micro-batch's teacher(s): one view over every token (one
teacher), or one per `TeacherPart` (several teachers, distill/teachers.py).

Shapes: hidden [s, b, h] -> flat [b*s, h] (batch-major, like the [b, s] masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def teacher_states(ctx) -> torch.Tensor:
    """The micro-batch's teacher hidden states [s, b, h_t], waiting for them if they are
    still on their way from the teacher's grid."""
    hidden = ctx.teacher_hidden
    return hidden if isinstance(hidden, torch.Tensor) else hidden.get()


def flat_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """[s, b, h] -> [b*s, h], batch-major like the [b, s] masks."""
    return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])


@dataclass(frozen=True)
class TeacherView:
    """One teacher's tokens of a micro-batch, as the loss path reads them."""

    flat: torch.Tensor
    """[n_t*s, h_t] its hidden states of its rows, batch-major."""
    weight: torch.Tensor
    """[V/tp, h_t] its output-weight shard."""
    tokens: Optional[torch.Tensor] = None
    """[b*s] bool: the micro-batch's tokens it scored; None: all (one teacher)."""
    local: Optional[torch.Tensor] = None
    """[b*s] int64 row of `flat` holding each of its tokens (-1 elsewhere); None: identity."""


def teacher_views(ctx, device) -> list[TeacherView]:
    """The micro-batch's teachers: one view over every token, or one per `TeacherPart`."""
    if ctx.teacher_parts is None:
        return [TeacherView(flat_tokens(teacher_states(ctx)), ctx.teacher_weight)]
    b, s = ctx.target_mask.shape
    views = []
    for part in ctx.teacher_parts:
        rows = part.rows.to(device)
        local_row = torch.full((b,), -1, dtype=torch.int64, device=device)
        local_row[rows] = torch.arange(rows.numel(), device=device)
        cols = torch.arange(s, device=device)
        local = torch.where(local_row[:, None] >= 0, local_row[:, None] * s + cols, -1).reshape(-1)
        views.append(TeacherView(flat_tokens(part.states()), part.weight, local >= 0, local))
    return views


def token_teacher_ids(ctx, device) -> Optional[torch.Tensor]:
    """[b*s] int64 teacher index of each token (several teachers); None: one teacher."""
    if ctx.teacher_parts is None:
        return None
    b, s = ctx.target_mask.shape
    row_teacher = torch.zeros(b, dtype=torch.int64, device=device)
    for part in ctx.teacher_parts:
        row_teacher[part.rows.to(device)] = part.index
    return row_teacher.repeat_interleave(s)
