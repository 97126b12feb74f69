"""Output layer + a divergence (reverse KL, forward KL or JSD: `ops.divergences`), fused so
that no [k, V/tp] tensor outlives one token chunk.

Shapes: [k, h] = hidden states of the k tokens in the loss (TP-replicated); [V/tp, h] =
this rank's output-weight shard (column-parallel: rows = vocab); [c, w] = one chunk's
logits over the shard's true-vocab columns; [k] = per-token divergence.

Fused path (Liger-style). For each chunk of c tokens the forward computes both logit
chunks (two [c, w] buffers for the whole call), the divergence (two [c]-sized collectives
for the KLs, see `reverse_kl`; one more for JSD), its logit gradient g (reverse KL:
w_i * p_s (log p_s - log p_t - KL)) into the teacher chunk's buffer, and immediately
    grad_hidden[chunk] = g @ W          ([c, h], this rank's partial)
    grad_weight       += g^T @ hidden   ([V/tp, h], accumulated in fp32)
then drops the chunk. Backward only scales the stored gradients by the scalar upstream
gradient and all-reduces grad_hidden (SUM over tp_group): the hidden state is replicated
across TP and feeds every shard, so its gradient is the sum of the shards' partials;
megatron's ColumnParallelLinear does the same through `copy_to_tensor_model_parallel_region`
(identity forward, all-reduce backward). Callers must therefore pass the TP-replicated
hidden state and must NOT wrap it in that region again (that would reduce twice).
Sequence parallelism: the caller gathers the sequence-sharded hidden state with
`ops.sequence_parallel.gather_sequence`, whose backward reduce-scatters the partials; it
passes `reduce_hidden_grad=False`, so both paths hand back this rank's partial unreduced
(reducing here too would count every shard tp times).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from tip_megatron.ops._shard import SUM, Workspace, all_reduce_, chunk_tokens, token_chunks, vocab_shard
from tip_megatron.ops.divergences import REVERSE_KL, Divergence
from tip_megatron.ops.reverse_kl import vocab_parallel_reverse_kl

#: Default tokens per chunk of the fused path.
DEFAULT_FUSED_CHUNK = 1024
#: Workspace buffers an observer may use (`fused_linear_divergence(observe=)`): what
#: `vocab_parallel_stats` needs with a teacher.
OBSERVER_BUFFERS = 3


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward, SUM all-reduce of the gradient over tp_group in backward.

    The semantics of megatron's `_CopyToModelParallelRegion`, with an explicit group.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, tp_group: Any) -> torch.Tensor:
        ctx.tp_group = tp_group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce_(grad.clone(), SUM, ctx.tp_group), None


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                  teacher_weight: torch.Tensor, token_weights: Optional[torch.Tensor]) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [k, h] and weight [V/tp, h] do not match: "
                         f"{tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if (teacher_hidden.dim() != 2 or teacher_weight.dim() != 2
            or teacher_hidden.shape[1] != teacher_weight.shape[1]):
        raise ValueError(f"teacher_hidden [k, h_t] and teacher_weight [V/tp, h_t] do not match: "
                         f"{tuple(teacher_hidden.shape)} vs {tuple(teacher_weight.shape)}")
    if teacher_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"student has {hidden.shape[0]} tokens, teacher {teacher_hidden.shape[0]}")
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student shard width {weight.shape[0]} != teacher shard width {teacher_weight.shape[0]}: "
            "build both output layers with the same padded vocabulary"
        )
    if token_weights is not None and tuple(token_weights.shape) != (hidden.shape[0],):
        raise ValueError(f"token_weights must be [k] = [{hidden.shape[0]}]; "
                         f"got {tuple(token_weights.shape)}")


def _fused_forward(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_weight: torch.Tensor, scale: torch.Tensor, tp_group: Any,
                   valid_width: int, chunk: int, need_grad: tuple[bool, bool],
                   divergence: Divergence = REVERSE_KL, observe: Optional[Callable] = None) -> tuple:
    """(divergence [k], grad_hidden [k, h] or None, grad_weight [V/tp, h] fp32 or None);
    `need_grad` = (hidden, weight) flags: a gradient nobody needs is not computed;
    `observe(sl, student, teacher)`: see `fused_linear_divergence`."""
    w_s, w_t = weight[:valid_width], teacher_weight[:valid_width]  # padding rows: no logits
    kl = torch.empty(hidden.shape[0], dtype=scale.dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad[0] else None
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    grad_weight = (torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
                   if need_grad[1] else None)
    rows = min(chunk, hidden.shape[0])
    # Reused per chunk: both logit chunks (the second then takes the logit gradient) and an
    # fp32 workspace for the elementwise KL math, run in cache-sized blocks of `inner` tokens.
    logits = [torch.empty((rows, valid_width), dtype=x.dtype, device=x.device)
              for x in (hidden, teacher_hidden)]
    # The logit gradient overwrites the teacher chunk: the gradient reads each teacher row
    # block before writing it, and nothing reads the teacher logits after. Two [c, w]
    # buffers instead of three (a different dtype needs its own buffer).
    # A divergence that re-reads the teacher chunk after writing the gradient (the
    # `loss.mix` of ops.mixed) gets a buffer of its own.
    shared = teacher_hidden.dtype == weight.dtype and not getattr(divergence, "rereads_teacher", False)
    grad_logits = (logits[1] if shared else
                   torch.empty((rows, valid_width), dtype=weight.dtype, device=weight.device))
    inner = chunk_tokens(valid_width, None, hidden.device)
    # An observer's statistics (3 buffers, ops.partials) share the divergence's workspace.
    count = max(divergence.buffers, OBSERVER_BUFFERS if observe is not None else 0)
    work = Workspace(min(inner, rows), valid_width, logits[0], count=count)
    for sl in token_chunks(hidden.shape[0], chunk):
        count = sl.stop - sl.start
        student = torch.matmul(hidden[sl], w_s.t(), out=logits[0][:count])
        teacher = torch.matmul(teacher_hidden[sl], w_t.t(), out=logits[1][:count])
        if observe is not None:  # before the gradient overwrites the teacher chunk
            observe(sl, student, teacher, work)
        # Per-token parameters (ops.mixed's coefficients) follow the chunk's tokens.
        div = divergence.rows(sl) if hasattr(divergence, "rows") else divergence
        state = div.forward(student, teacher, tp_group, inner, work)
        kl[sl] = state.kl
        if any(need_grad):
            g = div.grad(student, teacher, state, scale[sl], valid_width, inner,
                         out=grad_logits[:count], work=work)
            if grad_hidden is not None:
                torch.matmul(g, w_s, out=grad_hidden[sl])
            if grad_weight is not None:
                _accumulate(grad_weight[:valid_width], g.t(), hidden[sl])
    return kl, grad_hidden, grad_weight


def _accumulate(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """acc += left @ right, in place in the fp32 accumulator (one temp for bf16 inputs)."""
    if left.dtype == acc.dtype:
        acc.addmm_(left, right)
    else:
        acc += (left @ right).to(acc.dtype)


class _FusedLinearDivergence(torch.autograd.Function):
    """Forward: loss, per-token divergence and (stored) gradients. Backward: scale and reduce them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, scale: torch.Tensor, tp_group: Any, valid_width: int,
                chunk: int, need_grad: tuple[bool, bool],
                reduce_hidden_grad: bool, divergence: Divergence,
                observe: Optional[Callable]) -> tuple[torch.Tensor, torch.Tensor]:
        kl, grad_hidden, grad_weight = _fused_forward(
            hidden, weight, teacher_hidden, teacher_weight, scale, tp_group,
            valid_width, chunk, need_grad, divergence, observe,
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.tp_group, ctx.weight_dtype = tp_group, weight.dtype
        ctx.reduce_hidden_grad = reduce_hidden_grad
        ctx.mark_non_differentiable(kl)
        return (kl * scale).sum(), kl

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_kl: Any) -> tuple:
        grad_hidden, grad_weight = ctx.saved_tensors
        # grad_loss is a scalar, identical on every TP rank (the loss is replicated).
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
            if grad_hidden.numel() > 0 and ctx.reduce_hidden_grad:
                all_reduce_(grad_hidden, SUM, ctx.tp_group)  # == ColumnParallelLinear input grad
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def fused_linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    tp_group: Any,
    vocab_size: int,
    chunk_size: int = DEFAULT_FUSED_CHUNK,
    token_weights: Optional[torch.Tensor] = None,
    reduce_hidden_grad: bool = True,
    divergence: Divergence = REVERSE_KL,
    observe: Optional[Callable[[slice, torch.Tensor, torch.Tensor], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i token_weights[i] * D[i], D = `divergence` (ops.divergences; default the reverse
    KL(P_S || P_T)), with P_S = softmax(hidden @ weight^T) and P_T likewise, vocab-sharded.

    Args:
        hidden: [k, h] student hidden states of the tokens in the loss, TP-replicated.
        weight: [V/tp, h] student output-weight shard (requires grad).
        teacher_hidden: [k, h_t] teacher hidden states (no grad).
        teacher_weight: [V/tp, h_t] teacher output-weight shard, same padded width.
        tp_group: the group the vocabulary is split over; None = unsharded.
        vocab_size: TRUE vocabulary size; rows >= it of either weight are never used.
        chunk_size: tokens per chunk; memory ~ a few [chunk, V/tp] fp32 temporaries.
        token_weights: [k] weights of the per-token divergence (default 1); no grad.
        reduce_hidden_grad: True: all-reduce hidden's gradient over tp_group (hidden is
            TP-replicated). False: return this rank's partial; the caller reduces it (the
            reduce-scatter of `gather_sequence` under sequence parallelism).
        divergence: which divergence D is (default: the reverse KL of the paper); an
            `ops.mixed.MixedDivergence` mixes the three per token (`loss.mix`).
        observe: called as `observe(rows, student, teacher, work)` with each chunk's token
            slice, its [c, valid_width] student and teacher logits (after both are
            computed, before the divergence reads them; not to be modified) and the
            chunk loop's scratch `Workspace` (>= OBSERVER_BUFFERS buffers of [r, valid_width],
            free to overwrite: pass it to `vocab_parallel_stats(work=, chunk_size=r)`, so
            the statistics allocate nothing more). Statistics read there come from the
            same logits as the loss (distill.one_pass: one logit pass per token). Every TP
            rank calls it for the same chunks, in order.
    Returns:
        (loss_sum, per_token): a differentiable fp32 scalar and the detached [k] divergence.
        Gradients are computed in the forward (when grad is enabled and hidden or weight
        requires it); the memory kept for backward is [k, h] + [V/tp, h] fp32.
    """
    _check_inputs(hidden, weight, teacher_hidden, teacher_weight, token_weights)
    coefs = getattr(divergence, "coefs", None)  # ops.mixed: one row of coefficients per token
    if coefs is not None and tuple(coefs.shape) != (hidden.shape[0], 3):
        raise ValueError(f"mixed divergence coefficients must be [k, 3] = [{hidden.shape[0]}, 3]; "
                         f"got {tuple(coefs.shape)}")
    shard = vocab_shard(weight.shape[0], tp_group, vocab_size)
    chunk = chunk_tokens(shard.shard_width, chunk_size, hidden.device)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    scale = (torch.ones(hidden.shape[0], dtype=dtype, device=hidden.device)
             if token_weights is None else token_weights.detach().to(dtype))
    grad_on = torch.is_grad_enabled()
    need_grad = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return _FusedLinearDivergence.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), scale, tp_group,
        shard.valid_width, chunk, need_grad, reduce_hidden_grad, divergence, observe,
    )


def unfused_linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    tp_group: Any,
    vocab_size: int,
    chunk_size: Optional[int] = None,
    token_weights: Optional[torch.Tensor] = None,
    reduce_hidden_grad: bool = True,
    divergence: Divergence = REVERSE_KL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `fused_linear_divergence`, from ordinary autograd: the full
    [k, V/tp] student logits are materialized and kept for backward. The reference for
    the fused path and a benchmark row; `chunk_size` only bounds the KL's fp32 chunks.
    `divergence`: the reverse KL only (the forward KL and JSD have no unfused twin)."""
    if divergence.name != REVERSE_KL.name:
        raise ValueError(f"unfused_linear_divergence: divergence={divergence.name!r}; accepted: "
                         f"{REVERSE_KL.name!r} (use fused_linear_divergence)")
    _check_inputs(hidden, weight, teacher_hidden, teacher_weight, token_weights)
    # The copy-to-TP region is the all-reduce of hidden's gradient; without it each rank
    # keeps its partial for the caller's reduce-scatter (sequence parallelism).
    student = (_CopyToTensorParallel.apply(hidden, tp_group) if reduce_hidden_grad else hidden) @ weight.t()
    with torch.no_grad():
        teacher = teacher_hidden @ teacher_weight.t()
    kl = vocab_parallel_reverse_kl(
        student, teacher, tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size
    )
    weighted = kl if token_weights is None else kl * token_weights.detach().to(kl.dtype)
    return weighted.sum(), kl.detach()
