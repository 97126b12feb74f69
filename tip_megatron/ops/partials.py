"""Per-rank partial sums of sharded softmaxes against the global maxima, reduced once.

Shapes: [tokens, w] = the true-vocab columns of one rank's logit shard; [c, w] = a chunk;
[P, tokens] = P partial sums per token.

With x = logits - global max (one MAX all-reduce), each rank's sums over its own columns
simply add across the TP group, so every statistic of a call needs one SUM all-reduce of
the stacked partials:
    S = sum_v exp(x)    A = sum_v exp(x) x    W_s = sum_v exp(x_s) (s - t)    W_t = sum_v exp(x_t) (s - t)
    D = sum_v (exp(x_s) - exp(x_t))
The reverse KL takes rows (S_s, S_t, W_s, D); the statistics op (`moments=True`) takes
(S_s, A_s, S_t, A_t, W_s, W_t, D), for the entropies and the forward KL (student only:
S_s, A_s). One implementation, so both ops read the same arithmetic.
D gives the difference of the log-normalisers without cancellation: log S_s - log S_t =
log1p(D / S_t). Formed as log S_s - log S_t, two numbers near log V (~10) would cancel to a
KL of ~1e-3 on near-uniform rows (fp32: ~1e-4 relative error); D is a sum of elementwise
differences, each exact to its own rounding.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from tip_megatron.ops._shard import (
    MAX, SUM, Workspace, all_reduce_, compute_dtype, diff_into, finite_max, local_max,
    shift_into, token_chunks,
)

def global_maxima(student: torch.Tensor, teacher: Optional[torch.Tensor], tp_group: Any) -> torch.Tensor:
    """[1 or 2, tokens]: global max of student (and teacher), one MAX all-reduce."""
    dtype = compute_dtype(student)
    local = [local_max(student)] + ([] if teacher is None else [local_max(teacher).to(dtype)])
    return finite_max(all_reduce_(torch.stack(local), MAX, tp_group))


def workspace(rows: int, width: int, like: torch.Tensor, *, moments: bool, teacher: bool) -> Workspace:
    """The buffers `chunk_partials` needs: 3 for moments with a teacher, else 2."""
    return Workspace(rows, width, like, count=3 if moments and teacher else 2)


def chunk_partials(student: torch.Tensor, teacher: Optional[torch.Tensor], maxes: torch.Tensor,
                   work: Workspace, *, moments: bool) -> list[torch.Tensor]:
    """The [c] partial rows of one chunk (module docstring), against `maxes` [1|2, c].

    Every step writes into the workspace; exp(x_s) stays in its second buffer until the
    teacher's weighted difference has read it.
    """
    views = work.views(student.shape[0])
    x, e_s = views[0], views[1]
    torch.exp(shift_into(x, student, maxes[0]), out=e_s)
    # nansum: a -inf logit has exp(x) == 0 and x == -inf; 0 * -inf = NaN must count as 0.
    rows = [e_s.sum(dim=-1)] + ([x.mul_(e_s).nansum(dim=-1)] if moments else [])
    if teacher is None:
        return rows
    shift_into(x, teacher, maxes[1])
    e_t = torch.exp(x, out=views[2]) if moments else x.exp_()
    rows.append(e_t.sum(dim=-1))
    if moments:
        rows.append(x.mul_(e_t).nansum(dim=-1))
    # D: elementwise differences first (module docstring); x is free again (e_t, when it
    # lived in x, is not read after this).
    norm_diff = torch.sub(e_s, e_t, out=x).sum(dim=-1)
    diff = diff_into(x, student, teacher)
    # As above, 0 * (+-inf or NaN) where a probability is 0 counts as 0; a genuine +-inf
    # (one model -inf where the other has mass) is kept: that KL is infinite.
    if not moments:
        return [rows[0], rows[1], diff.mul_(e_s).nansum(dim=-1), norm_diff]
    return rows + [e_s.mul_(diff).nansum(dim=-1), e_t.mul_(diff).nansum(dim=-1), norm_diff]


def reduced_partials(
    student: torch.Tensor, teacher: Optional[torch.Tensor], maxes: torch.Tensor, tp_group: Any,
    chunk: int, *, moments: bool, work: Optional[Workspace] = None,
    extra_row: Optional[Callable[[slice], torch.Tensor]] = None,
) -> torch.Tensor:
    """[P, tokens] partial rows summed over the TP group (one SUM all-reduce).

    `extra_row(slice)` adds one more per-token row (e.g. a logit held by one rank only)
    to the same all-reduce, as the last row.
    """
    num_rows = _num_rows(teacher is not None, moments)
    out = torch.zeros(num_rows + (extra_row is not None), student.shape[0], dtype=maxes.dtype,
                      device=student.device)
    work = work or workspace(min(chunk, student.shape[0]), student.shape[1], student,
                             moments=moments, teacher=teacher is not None)
    for sl in token_chunks(student.shape[0], chunk):
        rows = chunk_partials(student[sl], None if teacher is None else teacher[sl],
                              maxes[:, sl], work, moments=moments)
        if extra_row is not None:
            rows.append(extra_row(sl))
        out[:, sl] = torch.stack(rows)
    return all_reduce_(out, SUM, tp_group)


def _num_rows(has_teacher: bool, moments: bool) -> int:
    if moments:
        return 7 if has_teacher else 2
    return 4 if has_teacher else 1
