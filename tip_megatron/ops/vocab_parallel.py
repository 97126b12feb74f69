"""Per-token statistics of vocab-parallel logits: logsumexp, entropy, log-probs, KL both ways.

Shapes: [tokens, V/tp] = one rank's logit shard; [tokens] = per-token result.

All statistics of one call come from two collectives over the TP group: a MAX all-reduce of
the per-token maxima (student and teacher stacked) and one SUM all-reduce of every per-token
partial sum concatenated ([P, tokens], P <= 7; computed by `ops.partials`, which the
reverse KL shares). With x = logits - global max and
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
Callers import the ops from `tip_megatron.ops`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch

from tip_megatron.ops._shard import (
    VocabShard, Workspace, check_logits, check_pair, chunk_tokens, vocab_shard,
)
from tip_megatron.ops.partials import global_maxima, reduced_partials


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
                "if both tokenizers agree on the first N tokens, set shared_vocab_size=N (at most "
                f"{min(student_vocab, teacher_vocab)}); otherwise this teacher cannot be "
                "distilled into this student"
            )
        return student_vocab
    if not isinstance(shared_vocab, int) or not 2 <= shared_vocab <= min(student_vocab, teacher_vocab):
        raise ValueError(
            f"shared_vocab_size={shared_vocab!r}: must be an integer in [2, "
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
    shard_width: Optional[int] = None,
    work: Optional[Workspace] = None,
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
        shard_width: the padded shard width when the logits given are only its true-vocab
            prefix [tokens, valid_width] (the fused loss's chunks, distill.one_pass);
            None: the logits' own width.
        work: scratch buffers to use instead of allocating them (>= 3 of [r, valid_width]
            with r >= chunk_size; the fused loss's, `fused_linear_divergence(observe=)`).
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
    shard = vocab_shard(student_logits.shape[-1] if shard_width is None else shard_width,
                        tp_group, vocab_size)
    if student_logits.shape[-1] < shard.valid_width:
        raise ValueError(f"student_logits hold {student_logits.shape[-1]} columns, fewer than the "
                         f"shard's {shard.valid_width} true-vocab columns (shard_width={shard_width})")
    chunk = chunk_tokens(shard.shard_width, chunk_size, student_logits.device)
    with torch.no_grad():
        student = student_logits[:, : shard.valid_width]
        teacher = None if teacher_logits is None else teacher_logits[:, : shard.valid_width]
        maxes = global_maxima(student, teacher, tp_group)
        owned = None if token_ids is None else partial(_owned_rows, student, maxes[0], token_ids, shard)
        partials = reduced_partials(student, teacher, maxes, tp_group, chunk, moments=True,
                                    work=work, extra_row=owned)
        return _finish(partials, maxes, shard, token_ids, teacher is not None)


def _owned_rows(student: torch.Tensor, max_s: torch.Tensor, token_ids: torch.Tensor,
                shard: VocabShard, sl: slice) -> torch.Tensor:
    return _owned_logit(student[sl], max_s[sl], token_ids[sl], shard)


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
    rows = iter(partials)  # S_s, A_s, S_t, A_t, W_s, W_t, D (ops.partials), then x[id]
    sum_s, xlogx_s = next(rows), next(rows)
    log_norm_s = sum_s.log()
    # Entropy >= 0 exactly; rounding of log S - E[x] can leave -1e-7.
    entropy = (log_norm_s - xlogx_s / sum_s).clamp_min(0.0)
    stats = TokenStats(
        student_logsumexp=maxes[0] + log_norm_s,
        student_entropy=entropy,
        student_entropy_norm=entropy / math.log(shard.vocab_size),
    )
    if has_teacher:
        sum_t, xlogx_t, diff_s, diff_t, norm_diff = (next(rows) for _ in range(5))
        log_norm_t = sum_t.log()
        # E_p[x_s - x_t] = E_p[s - t] - (max_s - max_t), for p = p_s and p = p_t.
        shift = maxes[0] - maxes[1]
        # log S_s - log S_t without cancelling two numbers near log V (ops.partials).
        log_ratio = torch.log1p(norm_diff / sum_t)
        # KL >= 0 and H >= 0 exactly; the clamps only remove rounding below zero.
        stats.reverse_kl = (diff_s / sum_s - shift - log_ratio).clamp_min(0.0)
        stats.forward_kl = (shift - diff_t / sum_t + log_ratio).clamp_min(0.0)
        stats.teacher_entropy = (log_norm_t - xlogx_t / sum_t).clamp_min(0.0)
    if token_ids is not None:
        in_vocab = (token_ids >= 0) & (token_ids < shard.vocab_size)
        logprob = next(rows) - log_norm_s
        stats.token_logprob = torch.where(in_vocab, logprob, torch.full_like(logprob, -math.inf))
    return stats
