"""Candidate-set statistics on vocab-parallel logits: the teacher's mass inside the
student's top-K (teachability) and the teacher's rank of a given token (propose-and-verify).

Shapes: [tokens, V/tp] = one rank's logit shard; [tokens, K] = candidates; [tokens] = result.

Top-K across vocab shards without gathering the vocabulary: each rank takes its own K best
columns, the TP group all-gathers those [tokens, K] (value, global id) pairs (tp * K per
token), and every rank merges them identically. Order: higher logit first, then the lower
global id (ties are broken by id, so the set does not depend on the layout). The teacher's
probability of each candidate is summed by the rank that owns it; one SUM all-reduce.
The rank of a token (0 = the argmax) counts the columns ahead of it in the same order:
logit greater, or equal with a lower id; one SUM all-reduce of the per-rank counts.
Padding columns (>= the true vocabulary) are never candidates and never counted.
"""
from __future__ import annotations

from typing import Any

import torch

from tip_megatron.ops._shard import (
    MAX, SUM, VocabShard, all_gather, all_reduce_, check_logits, check_pair, chunk_tokens,
    finite_max, local_max, token_chunks, vocab_shard,
)


def _blocks(logits: torch.Tensor):
    """Row blocks of about one cache-sized chunk of elements (ops._shard's budget): every
    [rows, w] temporary below is one block's, whatever the number of tokens."""
    return token_chunks(logits.shape[0], chunk_tokens(max(1, logits.shape[1]), None, logits.device))


def _local_top(logits: torch.Tensor, k: int, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """([c, k] values, [c, k] global ids): this shard's k best columns in the module's order
    (value descending, id ascending); missing entries (a narrow shard) are -inf / id -1."""
    rows, width = logits.shape[0], shard.valid_width
    values = torch.full((rows, k), float("-inf"), dtype=torch.float64, device=logits.device)
    ids = torch.full((rows, k), -1, dtype=torch.int64, device=logits.device)
    kk = min(k, width)
    if kk == 0:
        return values, ids
    # Comparisons in the logits' own dtype (exact; no float64 copy of the chunk). NaN
    # (diverged weights) ranks last: the statistics report it, the set stays well formed.
    x = logits[:, :width]
    if bool(torch.isnan(x).any()):
        x = x.nan_to_num(nan=float("-inf"))
    # The kk-th largest value is exact whatever topk picks among ties; then every column
    # above it plus the lowest-id columns equal to it, up to kk: a set that no tie can change.
    kth = torch.topk(x, kk, dim=1).values[:, -1:]
    above = x > kth
    tied = x == kth
    room = kk - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, dim=1, dtype=torch.int32) <= room))
    cols = chosen.nonzero()[:, 1].reshape(rows, kk)  # row-major: kk per row, in id order
    picked = x.gather(1, cols).double()
    order = torch.sort(picked, dim=1, descending=True, stable=True).indices  # ids ascending in ties
    values[:, :kk] = picked.gather(1, order)
    ids[:, :kk] = cols.gather(1, order) + shard.start
    return values, ids


def global_top_k(logits: torch.Tensor, k: int, *, tp_group: Any, vocab_size: int) -> torch.Tensor:
    """[tokens, k] global ids of the k best columns of the whole (sharded) vocabulary, in
    order (logit descending, id ascending); identical on every TP rank. No vocabulary is
    gathered: tp * k candidates per token are."""
    check_logits("logits", logits)
    if not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"k={k!r}: must be an integer in [1, vocab_size={vocab_size}]")
    shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
    parts = [_local_top(logits[sl], k, shard) for sl in _blocks(logits)]
    values = torch.cat([v for v, _ in parts]) if parts else torch.zeros(0, k, dtype=torch.float64)
    ids = torch.cat([i for _, i in parts]) if parts else torch.zeros(0, k, dtype=torch.int64)
    all_values = all_gather(values, tp_group).permute(1, 0, 2).reshape(logits.shape[0], -1)
    all_ids = all_gather(ids, tp_group).permute(1, 0, 2).reshape(logits.shape[0], -1)
    # Lexicographic (value desc, id asc): stable sorts from the least significant field.
    by_id = torch.sort(torch.where(all_ids < 0, vocab_size, all_ids), dim=1, stable=True).indices
    vals = all_values.gather(1, by_id)
    by_value = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return all_ids.gather(1, by_id).gather(1, by_value)[:, :k]


def _log_normalizer(logits: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """[tokens] float64 logsumexp over the true-vocab columns of every shard (the
    exponentials in the compute dtype, fp32 for bf16/fp32 logits: one [c, w] temporary)."""
    mx = finite_max(all_reduce_(local_max(logits), MAX, tp_group))
    total = torch.zeros_like(mx, dtype=torch.float64)
    if logits.shape[1]:
        for sl in _blocks(logits):
            # logits - max promotes bf16 to the fp32 max; the sum accumulates in float64.
            total[sl] = (logits[sl] - mx[sl, None]).exp_().sum(dim=1, dtype=torch.float64)
    return mx.double() + all_reduce_(total, SUM, tp_group).log()


def vocab_parallel_topk_mass(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, *, tp_group: Any,
    vocab_size: int,
) -> torch.Tensor:
    """[tokens] float64: sum of P_T(v) over the student's top-k ids v (`global_top_k`).

    Collectives: an all-gather of [tokens, k] candidates, a MAX and two SUM all-reduces of
    [tokens]. No grad; inputs are never modified."""
    check_pair(student_logits, teacher_logits)
    with torch.no_grad():
        shard = vocab_shard(student_logits.shape[-1], tp_group, vocab_size)
        ids = global_top_k(student_logits, k, tp_group=tp_group, vocab_size=vocab_size)
        teacher = teacher_logits[:, :shard.valid_width]
        lse = _log_normalizer(teacher, tp_group)
        local = ids - shard.start
        owned = (local >= 0) & (local < shard.valid_width)
        if shard.valid_width == 0:
            mass = torch.zeros_like(lse)
        else:
            picked = teacher.gather(1, local.clamp(0, shard.valid_width - 1)).double()
            mass = torch.where(owned, torch.exp(picked - lse[:, None]), 0.0).sum(dim=1)
        return all_reduce_(mass, SUM, tp_group).clamp(0.0, 1.0)


def vocab_parallel_rank(
    logits: torch.Tensor, token_ids: torch.Tensor, *, tp_group: Any, vocab_size: int,
) -> torch.Tensor:
    """[tokens] float64 rank of `token_ids` (global ids in the true vocabulary) under
    `logits`: the number of columns with a greater logit, or an equal one and a lower id
    (0 = the argmax, ties to the lower id). Two SUM all-reduces of [tokens]."""
    check_logits("logits", logits)
    if tuple(token_ids.shape) != (logits.shape[0],):
        raise ValueError(f"token_ids must be [tokens] = [{logits.shape[0]}]; got {tuple(token_ids.shape)}")
    if bool(((token_ids < 0) | (token_ids >= vocab_size)).any()):
        raise ValueError(f"token_ids: every id must be in [0, vocab_size={vocab_size})")
    with torch.no_grad():
        shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
        x = logits[:, :shard.valid_width]  # compared in its own dtype: exact, no copy
        local = token_ids.long() - shard.start
        owned = (local >= 0) & (local < shard.valid_width)
        if shard.valid_width == 0:
            own = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
        else:
            picked = x.gather(1, local.clamp(0, shard.valid_width - 1)[:, None])[:, 0].double()
            own = torch.where(owned, picked, 0.0)
        # The token's logit, from its owner (0 + ... + x is exact); back in x's dtype exactly.
        value = all_reduce_(own, SUM, tp_group).to(x.dtype)
        cols = torch.arange(shard.valid_width, device=logits.device) + shard.start
        count = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
        for sl in _blocks(x):
            xs, v = x[sl], value[sl, None]
            ahead = (xs > v) | ((xs == v) & (cols[None, :] < token_ids[sl, None]))
            count[sl] = ahead.sum(dim=1, dtype=torch.int64).double()
        return all_reduce_(count, SUM, tp_group)
