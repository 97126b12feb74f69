"""Per-token statistics of vocab-parallel logits: logsumexp, entropy, log-probs, KL both ways.

Shapes: [tokens, V/tp] = one rank's logit shard; [tokens] = per-token result.

All statistics of one call come from two collectives over the TP group: a MAX all-reduce of
the per-token maxima (student and teacher stacked) and one SUM all-reduce of every per-token
partial sum concatenated ([P, tokens], P <= 7). With x = logits - global max and
S = sum_v exp(x) (each rank sums its own columns against the global max, so the per-rank
sums simply add):
    logsumexp = max + log S
    entropy   = log S - sum_v exp(x) x / S
    log p(id) = x[id] - log S                                  (x[id] from the owning rank)
    KL(S||T)  = sum_v exp(x_s)(s - t) / S_s - (max_s - max_t) + log S_t - log S_s
    KL(T||S)  = (max_s - max_t) - sum_v exp(x_t)(s - t) / S_t + log S_s - log S_t
The raw difference s - t is taken elementwise before any sum, so identical student and
teacher logits give exactly zero KL and no large terms cancel.
No rank ever holds more than its own shard, and fp32 temporaries are one token chunk.
This module also re-exports the differentiable reverse KL, the fused output-layer loss
and sampling, so `tip_megatron.ops.vocab_parallel` is the one import for callers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tip_megatron.ops._shard import (
    MAX,
    SUM,
    VocabShard,
    Workspace,
    all_reduce_,
    check_logits,
    check_pair,
    chunk_tokens,
    compute_dtype,
    diff_into,
    finite_max,
    local_max,
    token_chunks,
    vocab_shard,
)
from tip_megatron.ops.fused_linear_kl import fused_linear_reverse_kl, unfused_linear_reverse_kl
from tip_megatron.ops.reverse_kl import vocab_parallel_reverse_kl
from tip_megatron.ops.sampling import vocab_parallel_sample

__all__ = [
    "TokenStats",
    "check_vocab_compat",
    "fused_linear_reverse_kl",
    "unfused_linear_reverse_kl",
    "vocab_parallel_reverse_kl",
    "vocab_parallel_sample",
    "vocab_parallel_stats",
]


@dataclass
class TokenStats:
    """Per-token statistics, each [tokens] fp32 (fp64 for fp64 logits), no autograd."""

    student_logsumexp: torch.Tensor
    student_entropy: torch.Tensor
    """H(P_S) in nats."""
    student_entropy_norm: torch.Tensor
    """H(P_S) / log(true vocab size), in [0, 1]."""
    token_logprob: Optional[torch.Tensor] = None
    """log P_S(token_ids); -inf for ids outside the true vocabulary. None without ids."""
    reverse_kl: Optional[torch.Tensor] = None
    """KL(P_S || P_T); None without teacher logits."""
    forward_kl: Optional[torch.Tensor] = None
    """KL(P_T || P_S); None without teacher logits."""
    teacher_entropy: Optional[torch.Tensor] = None
    """H(P_T) in nats; None without teacher logits."""


def check_vocab_compat(
    student_vocab: int, teacher_vocab: int, shared_vocab: Optional[int] = None
) -> int:
    """The TRUE vocabulary size the student and teacher distributions are compared over.

    Equal sizes are returned as is. Different sizes are rejected unless `shared_vocab`
    names the size of the prefix both tokenizers share (entries beyond it are then treated
    as padding: zero probability for both models).
    """
    if shared_vocab is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student vocab size {student_vocab} != teacher vocab size {teacher_vocab}: "
                "if both tokenizers agree on the first N tokens, set shared_vocab=N (at most "
                f"{min(student_vocab, teacher_vocab)}); otherwise this teacher cannot be "
                "distilled into this student"
            )
        return student_vocab
    if not isinstance(shared_vocab, int) or not 2 <= shared_vocab <= min(student_vocab, teacher_vocab):
        raise ValueError(
            f"shared_vocab={shared_vocab!r}: must be an integer in [2, "
            f"{min(student_vocab, teacher_vocab)}] (student {student_vocab}, teacher {teacher_vocab})"
        )
    return shared_vocab


def vocab_parallel_stats(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    tp_group: Any,
    vocab_size: int,
    token_ids: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> TokenStats:
    """Per-token statistics of the student (and teacher) from `[tokens, V/tp]` shards.

    Args:
        student_logits: [tokens, V/tp] student shard, any float dtype (math in fp32).
        teacher_logits: [tokens, V/tp] teacher shard of the same width, or None.
        tp_group: the group the vocabulary is split over (rank r holds columns
            [r * V/tp, (r + 1) * V/tp)); None = unsharded.
        vocab_size: TRUE vocabulary size; columns >= it get zero probability.
        token_ids: [tokens] int64 GLOBAL ids whose student log-prob is wanted, or None.
        chunk_size: tokens per chunk (default: 2^20 elements on CPU, 2^25 elsewhere).
    Not differentiable (runs under no_grad); inputs are never modified.
    """
    if teacher_logits is None:
        check_logits("student_logits", student_logits)
    else:
        check_pair(student_logits, teacher_logits)
    if token_ids is not None and tuple(token_ids.shape) != (student_logits.shape[0],):
        raise ValueError(
            f"token_ids must be [tokens] = [{student_logits.shape[0]}]; got {tuple(token_ids.shape)}"
        )
    shard = vocab_shard(student_logits.shape[-1], tp_group, vocab_size)
    chunk = chunk_tokens(shard.shard_width, chunk_size, student_logits.device)
    with torch.no_grad():
        student = student_logits[:, : shard.valid_width]
        teacher = None if teacher_logits is None else teacher_logits[:, : shard.valid_width]
        maxes = _global_maxima(student, teacher, tp_group)
        partials = _partial_sums(student, teacher, maxes, shard, token_ids, chunk)
        all_reduce_(partials, SUM, tp_group)
        return _finish(partials, maxes, shard, token_ids, teacher is not None)


def _global_maxima(
    student: torch.Tensor, teacher: Optional[torch.Tensor], tp_group: Any
) -> torch.Tensor:
    """[1 or 2, tokens]: global max of student (and teacher), one MAX all-reduce."""
    dtype = compute_dtype(student)
    local = [local_max(student)] + ([] if teacher is None else [local_max(teacher).to(dtype)])
    return finite_max(all_reduce_(torch.stack(local), MAX, tp_group))


def _partial_sums(
    student: torch.Tensor, teacher: Optional[torch.Tensor], maxes: torch.Tensor,
    shard: VocabShard, token_ids: Optional[torch.Tensor], chunk: int,
) -> torch.Tensor:
    """[P, tokens] per-rank partial sums, rows in the order `_finish` reads them."""
    num_rows = 2 + (token_ids is not None) + (4 if teacher is not None else 0)
    out = torch.zeros(num_rows, student.shape[0], dtype=maxes.dtype, device=student.device)
    work = Workspace(min(chunk, student.shape[0]), student.shape[1], student,
                     count=2 if teacher is None else 3)
    for sl in token_chunks(student.shape[0], chunk):
        rows = _student_partials(student[sl], maxes[0, sl], work)
        if token_ids is not None:
            rows.append(_owned_logit(student[sl], maxes[0, sl], token_ids[sl], shard))
        if teacher is not None:
            rows += _teacher_partials(student[sl], teacher[sl], maxes[1, sl], work)
        out[:, sl] = torch.stack(rows)
    return out


def _student_partials(student: torch.Tensor, max_s: torch.Tensor, work: Workspace) -> list:
    """[S_s, A_s] of a chunk (x = logits - max, S = sum exp(x), A = sum exp(x) x); leaves
    exp(x_s) in the workspace's second buffer for `_teacher_partials`."""
    x_s, e_s = work.views(student.shape[0])[:2]
    torch.sub(student, max_s[:, None], out=x_s)
    torch.exp(x_s, out=e_s)
    # nansum: a -inf logit has exp(x) == 0 and x == -inf; 0 * -inf = NaN must count as 0.
    return [e_s.sum(dim=-1), x_s.mul_(e_s).nansum(dim=-1)]


def _teacher_partials(student: torch.Tensor, teacher: torch.Tensor, max_t: torch.Tensor,
                      work: Workspace) -> list:
    """[S_t, A_t, sum exp(x_s)(s - t), sum exp(x_t)(s - t)] of a chunk; reads exp(x_s)
    from the workspace (see `_finish` for how the last two become the KLs)."""
    x_t, e_s, e_t = work.views(student.shape[0])
    torch.sub(teacher, max_t[:, None], out=x_t)
    torch.exp(x_t, out=e_t)
    rows = [e_t.sum(dim=-1), x_t.mul_(e_t).nansum(dim=-1)]
    diff = diff_into(x_t, student, teacher)
    # As above, 0 * (+-inf or NaN) where a probability is 0 counts as 0; a genuine +-inf
    # (one model -inf where the other has mass) is kept: that KL is infinite.
    return rows + [e_s.mul_(diff).nansum(dim=-1), e_t.mul_(diff).nansum(dim=-1)]


def _owned_logit(student: torch.Tensor, max_s: torch.Tensor, token_ids: torch.Tensor,
                 shard: VocabShard) -> torch.Tensor:
    """[c] logit - max of each id on the rank that owns it, 0 elsewhere (so SUM = x[id])."""
    if student.shape[-1] == 0:
        return torch.zeros_like(max_s)
    local = token_ids.to(torch.long) - shard.start
    owned = (local >= 0) & (local < student.shape[-1])
    picked = student.gather(1, local.clamp(0, student.shape[-1] - 1)[:, None]).squeeze(1)
    return torch.where(owned, picked.to(max_s.dtype) - max_s, torch.zeros_like(max_s))


def _finish(
    partials: torch.Tensor, maxes: torch.Tensor, shard: VocabShard,
    token_ids: Optional[torch.Tensor], has_teacher: bool,
) -> TokenStats:
    """Per-token statistics from the all-reduced partial sums (formulas: module docstring)."""
    rows = iter(partials)
    sum_s, xlogx_s = next(rows), next(rows)
    log_norm_s = sum_s.log()
    # Entropy >= 0 exactly; rounding of log S - E[x] can leave -1e-7.
    entropy = (log_norm_s - xlogx_s / sum_s).clamp_min(0.0)
    stats = TokenStats(
        student_logsumexp=maxes[0] + log_norm_s,
        student_entropy=entropy,
        student_entropy_norm=entropy / math.log(shard.vocab_size),
    )
    if token_ids is not None:
        in_vocab = (token_ids >= 0) & (token_ids < shard.vocab_size)
        logprob = next(rows) - log_norm_s
        stats.token_logprob = torch.where(in_vocab, logprob, torch.full_like(logprob, -math.inf))
    if has_teacher:
        sum_t, xlogx_t, diff_s, diff_t = (next(rows) for _ in range(4))
        log_norm_t = sum_t.log()
        # E_p[x_s - x_t] = E_p[s - t] - (max_s - max_t), for p = p_s and p = p_t.
        shift = maxes[0] - maxes[1]
        # KL >= 0 and H >= 0 exactly; the clamps only remove rounding below zero.
        stats.reverse_kl = (diff_s / sum_s - shift + log_norm_t - log_norm_s).clamp_min(0.0)
        stats.forward_kl = (shift - diff_t / sum_t + log_norm_s - log_norm_t).clamp_min(0.0)
        stats.teacher_entropy = (log_norm_t - xlogx_t / sum_t).clamp_min(0.0)
    return stats
