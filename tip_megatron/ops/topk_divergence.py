"""Top-k teacher signal (`teacher.signal: topk`): the divergence over the teacher's k most
likely tokens, plus one tail class holding the rest of each distribution, vocab-parallel.
A comparison mode: it measures what truncating the teacher costs against the exact
full-vocabulary loss of `fused_linear_divergence`.

Shapes: [n, h] / [n, h_t] = hidden states of the n loss tokens (TP-replicated); [V/tp, h] =
an output-weight shard; [c, w] = one token chunk's logits over the shard's true-vocab
columns; [c, k] = the chunk's top-k; [n] = per token.

Per token, with z_s / z_t the student / teacher logits over the true vocabulary:
    K      = the teacher's k largest logits (ties: the lower token id first), k <= V
    tail   = lse_{v not in K}(z)                      (one logit standing for the rest)
    topk_tail=True :  classes K + tail; log q = log_softmax([z[K], tail]) for each model:
                      q[v] = p[v] exactly for v in K, q[tail] = 1 - sum_K p (exact masses)
    topk_tail=False:  classes K; log q = log_softmax(z[K]): both renormalised over K
    D = reverse_kl / forward_kl / jsd (`ops.divergences`) of the k (+1)-class q_S, q_T.
At k >= V both reduce to the full-vocabulary divergence (the tail is empty and dropped).

K is found without gathering the vocabulary: every rank takes its shard's local top-k
(fewer if it holds fewer true columns; padding columns are never candidates), one
all_gather exchanges the [2, c, k] (logit, id) candidates, and every rank picks the same
global top-k from the tp * k of them. The global top-k is inside the union of the local
ones under the same order (a token beaten by fewer than k tokens overall is beaten by
fewer than k on its own shard). The student's logits at K come from the rank owning each
id (one SUM all-reduce of [c, k]); the tail logits of both models from one MAX and one SUM
all-reduce of [2, c]. Collectives per chunk: 4 with the tail, 2 without (1 at TP 1: none);
backward: the all-reduce of the hidden state's gradient.

Gradients by autograd. The reductions' backward is the identity: the loss is replicated on
every TP rank and each rank differentiates it w.r.t. its own shard only (as megatron's
vocab-parallel cross entropy). Memory kept for backward: the student logits of every loss
token, [n, V/tp] in the weight's dtype, plus [n, k] tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tip_megatron.ops._shard import (
    MAX, SUM, all_gather, all_reduce_, compute_dtype, finite_max, local_max, token_chunks,
    vocab_shard,
)
from tip_megatron.ops.divergences import REVERSE_KL, Divergence
from tip_megatron.ops.fused_linear_kl import DEFAULT_FUSED_CHUNK, _check_inputs, _CopyToTensorParallel
from tip_megatron.runtime.groups import group_size


@dataclass(frozen=True)
class TopkSignal:
    """Which truncated teacher signal the loss learns from (`teacher.topk`, `teacher.topk_tail`)."""

    k: int = 64
    """Teacher tokens kept per position (k >= V: the whole vocabulary, the exact divergence)."""
    tail: bool = True
    """Add one class holding the remaining mass of each distribution."""

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"teacher.topk={self.k!r}: must be an integer >= 1")
        if not isinstance(self.tail, bool):
            raise ValueError(f"teacher.topk_tail={self.tail!r}: must be true or false")


class _SumAcrossTP(torch.autograd.Function):
    """SUM all-reduce forward; identity backward (the upstream gradient is replicated)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, tp_group: Any) -> torch.Tensor:
        return all_reduce_(tensor.clone(), SUM, tp_group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _outside(ids: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """[c, width] bool: local column not in the chunk's top-k ids [c, k] (global ids)."""
    # Ids of other shards go to an extra last column, dropped after the scatter.
    mask = torch.ones((ids.shape[0], width + 1), dtype=torch.bool, device=ids.device)
    owned = (ids >= start) & (ids < start + width)
    mask.scatter_(1, torch.where(owned, ids - start, width), False)
    return mask[:, :width]


class _TailLogits(torch.autograd.Function):
    """[2, c] lse over the columns outside K of the whole (sharded) vocabulary, for the
    student (row 0, differentiable) and the teacher (row 1): one MAX + one SUM all-reduce.
    Each row's own max keeps a tail far below the top-k from underflowing."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor,
                start: int, tp_group: Any) -> torch.Tensor:
        outside = _outside(ids, start, student.shape[1])
        dtype = compute_dtype(student)
        masked = [x.to(dtype).masked_fill(~outside, -math.inf) for x in (student, teacher)]
        maxes = finite_max(all_reduce_(torch.stack([local_max(m) for m in masked]), MAX, tp_group))
        sums = torch.stack([(m - mx[:, None]).exp_().sum(dim=1) for m, mx in zip(masked, maxes)])
        lse = all_reduce_(sums, SUM, tp_group).log_() + maxes
        ctx.save_for_backward(student, ids, lse[0])
        ctx.start = start
        return lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        student, ids, lse = ctx.saved_tensors
        p = (student.to(lse.dtype) - lse[:, None]).exp_()
        p.masked_fill_(~_outside(ids, ctx.start, student.shape[1]), 0.0)
        return (p * grad[0][:, None]).to(student.dtype), None, None, None, None


def _take_topk(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([c, k] values, [c, k] ids) of the k largest `values` [c, m], ties broken by the lower
    id; `ids` [c, m] must ascend along each row (the position order is the id order)."""
    key = torch.nan_to_num(values, nan=-math.inf) if values.isnan().any() else values
    kth = key.topk(k, dim=1).values[:, -1:]
    above, tied = key > kth, key == kth
    need = k - above.sum(dim=1, keepdim=True)
    take = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= need))
    cols = take.nonzero()[:, 1].view(-1, k)
    return values.gather(1, cols), ids.gather(1, cols)


@torch.no_grad()
def teacher_topk(teacher: torch.Tensor, k: int, start: int, vocab_size: int,
                 tp_group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The global top-k ([c, k] float64 logits, [c, k] int64 global ids) of the teacher's
    true-vocab shard columns `teacher` [c, w], without gathering the vocabulary; k is
    clamped to `vocab_size`."""
    rows, width = teacher.shape
    k = min(k, vocab_size)
    local_k = min(k, width)
    positions = torch.arange(width, device=teacher.device).expand(rows, width)
    vals, cols = (_take_topk(teacher, positions, local_k) if local_k else
                  (teacher.new_zeros((rows, 0)), positions[:, :0]))
    if group_size(tp_group) == 1:
        return vals.double(), cols + start
    # Pad to k with (-inf, vocab_size): after every true id of any rank, never taken.
    cand = torch.full((2, rows, k), -math.inf, dtype=torch.float64, device=teacher.device)
    cand[1].fill_(vocab_size)
    cand[0, :, :local_k], cand[1, :, :local_k] = vals.double(), (cols + start).double()
    every = all_gather(cand, tp_group)  # [tp, 2, c, k]; ids < 2^53 are exact in float64
    values = every[:, 0].permute(1, 0, 2).reshape(rows, -1)
    ids = every[:, 1].permute(1, 0, 2).reshape(rows, -1).long()
    order = ids.argsort(dim=1, stable=True)
    return _take_topk(values.gather(1, order), ids.gather(1, order), k)


def _small_divergence(ls: torch.Tensor, lt: torch.Tensor, divergence: Divergence) -> torch.Tensor:
    """[c] divergence of the [c, k(+1)] class log-probabilities (0 log 0 = 0)."""
    def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        p = lp.exp()
        return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(dim=1)
    if divergence.name == "reverse_kl":
        return kl(ls, lt)
    if divergence.name == "forward_kl":
        return kl(lt, ls)
    beta = float(divergence.beta)
    log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * kl(lt, log_m) + (1.0 - beta) * kl(ls, log_m)


def topk_linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    tp_group: Any,
    vocab_size: int,
    signal: TopkSignal = TopkSignal(),
    chunk_size: int = DEFAULT_FUSED_CHUNK,
    token_weights: Optional[torch.Tensor] = None,
    reduce_hidden_grad: bool = True,
    divergence: Divergence = REVERSE_KL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i token_weights[i] * D_k[i], D_k = `divergence` over the teacher's top-k classes
    (+ tail): the contract of `fused_linear_divergence` (same arguments and returns), with
    gradients by autograd (memory: module docstring)."""
    _check_inputs(hidden, weight, teacher_hidden, teacher_weight, token_weights)
    shard = vocab_shard(weight.shape[0], tp_group, vocab_size)
    k = min(signal.k, vocab_size)
    tail = signal.tail and k < vocab_size  # k = V: the tail is empty, no class for it
    # The copy-to-TP region all-reduces hidden's gradient once (hidden is TP-replicated).
    student_in = _CopyToTensorParallel.apply(hidden, tp_group) if reduce_hidden_grad else hidden
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    # Starts at an empty product so every rank's weight and hidden get a gradient at n = 0.
    loss = (student_in[:0] @ weight.t()).sum().to(dtype)
    per_token = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
    width = shard.valid_width
    for sl in token_chunks(hidden.shape[0], chunk_size):
        student = student_in[sl] @ weight.t()  # [c, V/tp], padding rows included
        with torch.no_grad():
            teacher = (teacher_hidden[sl].detach() @ teacher_weight.detach()[:width].t())
        top_t, ids = teacher_topk(teacher, k, shard.start, vocab_size, tp_group)
        owned = (ids >= shard.start) & (ids < shard.start + width)
        local = (ids - shard.start).clamp(0, student.shape[1] - 1)
        mine = torch.where(owned, student.gather(1, local).to(dtype), torch.zeros((), dtype=dtype))
        top_s = _SumAcrossTP.apply(mine, tp_group)
        top_t = top_t.to(dtype)
        if tail:
            tails = _TailLogits.apply(student[:, :width], teacher, ids, shard.start, tp_group)
            top_s = torch.cat([top_s, tails[0][:, None]], dim=1)
            top_t = torch.cat([top_t, tails[1][:, None].detach()], dim=1)
        value = _small_divergence(top_s.log_softmax(dim=1), top_t.log_softmax(dim=1), divergence)
        scale = 1.0 if token_weights is None else token_weights[sl].detach().to(dtype)
        loss = loss + (value * scale).sum()
        per_token[sl] = value.detach()
    return loss, per_token
