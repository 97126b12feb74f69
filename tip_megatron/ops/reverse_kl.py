"""Reverse KL(student || teacher) on vocab-parallel logits, with its analytic gradient.

Shapes: [tokens, V/tp] = one rank's logit shard; [tokens, w] = its true-vocab columns
(w = valid width, see `_shard`); [tokens] = per-token value.

Forward (per token; x = logits - global max, S = sum exp(x) over the whole vocabulary):
    KL = sum_v p_s (x_s - x_t) + log S_t - log S_s,    with p_s = exp(x_s) / S_s
Collectives: one MAX all-reduce of [2, tokens] (both maxima), one SUM all-reduce of
[3, tokens] (S_s, S_t and sum_v exp(x_s) (s - t)); sum_v p_s (x_s - x_t) is then
sum_v exp(x_s)(s - t) / S_s - (max_s - max_t). The difference s - t is taken elementwise
before the sum, so identical inputs give exactly 0 and no large terms cancel.

Backward needs no collective: with the per-token (max, log S, KL) kept from the forward,
    dKL/dlogit_s[v] = p_s[v] * (log p_s[v] - log p_t[v] - KL)
is local to each column. The logit shards themselves are saved (not an fp32 softmax), and
the exponentials are recomputed chunk by chunk into two reused [chunk, w] buffers, so the
only shard-sized allocation of forward + backward is the gradient itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from tip_megatron.ops._shard import (
    Workspace, check_pair, chunk_tokens, compute_dtype, diff_into, shift_into, token_chunks,
    vocab_shard,
)
from tip_megatron.ops.partials import global_maxima, reduced_partials


@dataclass
class KLState:
    """Per-token values that the forward leaves for the gradient; all [tokens]."""

    max_s: torch.Tensor
    max_t: torch.Tensor
    log_norm_s: torch.Tensor
    """log S_s = student logsumexp - max_s."""
    log_norm_t: torch.Tensor
    kl: torch.Tensor

    def rows(self, sl: slice) -> "KLState":
        return type(self)(*(getattr(self, f)[sl] for f in self.__dataclass_fields__))


def reverse_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, tp_group: Any, chunk: int,
    work: Optional[Workspace] = None,
) -> KLState:
    """KL(student || teacher) per token from the true-vocab columns `[tokens, w]` of both shards.

    Runs the two collectives of the module docstring; `chunk` bounds the fp32 temporaries
    (two [chunk, w] buffers, or the given workspace).
    """
    maxes = global_maxima(student, teacher, tp_group)
    # One SUM all-reduce for all four partials (S_s, S_t, sum_v exp(x_s)(s - t), D).
    partials = reduced_partials(student, teacher, maxes, tp_group, chunk, moments=False, work=work)
    log_norm_s, log_norm_t = partials[0].log(), partials[1].log()
    # E_ps[x_s - x_t] = E_ps[s - t] - (max_s - max_t); KL = that - (log S_s - log S_t),
    # the log-normalisers' difference as log1p(D / S_t) (ops.partials: no cancellation).
    mean_diff = partials[2] / partials[0] - (maxes[0] - maxes[1])
    # KL >= 0 exactly; rounding can leave a -1e-7, which would make sqrt/log of it NaN.
    kl = (mean_diff - torch.log1p(partials[3] / partials[1])).clamp_min(0.0)
    return KLState(maxes[0], maxes[1], log_norm_s, log_norm_t, kl)


def reverse_kl_grad_chunk(
    student: torch.Tensor, teacher: torch.Tensor, state: KLState, scale: torch.Tensor,
    work: Workspace, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[c, w] gradient of scale * KL w.r.t. the student columns of a chunk, written to `out`
    (a compute-dtype [c, w] view, e.g. of the final gradient) or to a workspace buffer.

    `state` and `scale` ([c]) are the chunk's rows. p_s * (log p_s - log p_t - KL), where
    log p_s - log p_t = (s - t) - (lse_s - lse_t); zero where p_s == 0.
    """
    p_s, buf = work.views(student.shape[0])[:2]
    lse_s = state.max_s + state.log_norm_s
    shift_into(p_s, student, lse_s).exp_()
    offset = lse_s - (state.max_t + state.log_norm_t) + state.kl
    grad = diff_into(buf if out is None else out, student, teacher)
    grad.sub_(offset[:, None]).mul_(p_s)
    # p_s == 0 gives 0 * (+-inf or NaN) = NaN (-inf logits): the true value is 0.
    grad.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return grad.mul_(scale[:, None].to(grad.dtype))


def reverse_kl_grad(
    student: torch.Tensor, teacher: torch.Tensor, state: KLState, scale: torch.Tensor,
    valid_width: int, chunk: int, out: Optional[torch.Tensor] = None,
    work: Optional[Workspace] = None, chunk_grad: Callable = reverse_kl_grad_chunk,
) -> torch.Tensor:
    """[tokens, V/tp] gradient of sum_i scale_i KL_i, in the student's dtype (or into
    `out`, any float dtype); padded columns get exactly zero. Chunked like the forward.
    `chunk_grad` (same contract as `reverse_kl_grad_chunk`) selects the divergence."""
    grad = torch.empty_like(student) if out is None else out
    grad[:, valid_width:] = 0.0
    work = work or Workspace(min(chunk, student.shape[0]), valid_width, student, count=2)
    direct = grad.dtype == compute_dtype(student)  # write straight into the result
    for sl in token_chunks(student.shape[0], chunk):
        rows = grad[sl, :valid_width]
        value = chunk_grad(student[sl, :valid_width], teacher[sl, :valid_width],
                                      state.rows(sl), scale[sl], work, rows if direct else None)
        if not direct:
            rows.copy_(value)
    return grad


class _VocabParallelReverseKL(torch.autograd.Function):
    """Forward: KL per token. Backward: analytic gradient for the student shard only."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, tp_group: Any,
                valid_width: int, chunk: int) -> torch.Tensor:
        state = reverse_kl_forward(
            student[:, :valid_width], teacher[:, :valid_width], tp_group, chunk
        )
        # Saving the inputs (not copies) ties them to autograd's version counter: an
        # in-place edit of either logit shard before backward raises instead of giving a
        # silently wrong gradient. Nothing here writes to them.
        ctx.save_for_backward(student, teacher, state.max_s, state.max_t,
                              state.log_norm_s, state.log_norm_t, state.kl)
        ctx.valid_width, ctx.chunk = valid_width, chunk
        return state.kl

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        student, teacher, *stats = ctx.saved_tensors
        grad = reverse_kl_grad(
            student, teacher, KLState(*stats), grad_kl, ctx.valid_width, ctx.chunk
        )
        # The teacher is frozen: it gets no gradient even if its logits require one.
        return grad, None, None, None, None


def vocab_parallel_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: Any,
    vocab_size: int,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token KL(P_S || P_T) over the full (sharded) vocabulary, differentiable in the student.

    Args:
        student_logits: [tokens, V/tp] student shard (bf16/fp16/fp32; fp64 for gradcheck).
        teacher_logits: [tokens, V/tp] teacher shard of the same width; never gets a grad.
        tp_group: the tensor-parallel group the vocab is split over; None = unsharded.
        vocab_size: TRUE vocabulary size; global columns >= it have zero probability and
            get zero gradient.
        chunk_size: tokens per chunk (default: 2^20 elements on CPU, 2^25 elsewhere).
    Returns:
        [tokens] KL in fp32 (fp64 for fp64 inputs). Inputs are never modified.
    """
    check_pair(student_logits, teacher_logits)
    shard = vocab_shard(student_logits.shape[-1], tp_group, vocab_size)
    chunk = chunk_tokens(shard.shard_width, chunk_size, student_logits.device)
    return _VocabParallelReverseKL.apply(
        student_logits, teacher_logits.detach(), tp_group, shard.valid_width, chunk
    )
