"""Single-process float64 references for the vocab-parallel ops, on UNSHARDED logits.

Shapes: [tokens, V_pad] = full (padded) logits; [tokens, V] = their true-vocab columns;
[tokens] = per-token value.

Plain torch, written for clarity, not memory: the tests compare every op (any TP size, any
input dtype) against these, and the tolerances the ops promise live here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from tip_megatron.ops.vocab_parallel import TokenStats

#: fp32 ops vs the float64 reference on the same input values (logits of order 10).
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}
#: bf16 inputs vs the float64 reference on the bf16 values themselves: the ops upcast
#: exactly, so only fp32 math error remains.
BF16_SAME_VALUES_TOL = FP32_TOL
#: bf16 inputs vs the float64 reference on the unrounded fp32 logits: dominated by the
#: rounding of each logit (relative 2^-9); valid for |logits| <= ~8.
BF16_ROUNDED_TOL = {"rtol": 2e-2, "atol": 5e-2}


def log_softmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[tokens, V] float64 log-probabilities over the true vocabulary."""
    return logits[:, :vocab_size].to(torch.float64).log_softmax(dim=-1)


def _plogq(logp: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_v p * value with 0 where p == 0 (value may be -inf there)."""
    p = logp.exp()
    return torch.where(p > 0, p * value, torch.zeros_like(p)).sum(dim=-1)


def stats(
    student: torch.Tensor, teacher: Optional[torch.Tensor], vocab_size: int,
    token_ids: Optional[torch.Tensor] = None,
) -> TokenStats:
    """Every statistic of `vocab_parallel_stats`, in float64."""
    ls = log_softmax(student, vocab_size)
    entropy = -_plogq(ls, ls)
    out = TokenStats(
        student_logsumexp=student[:, :vocab_size].to(torch.float64).logsumexp(dim=-1),
        student_entropy=entropy,
        student_entropy_norm=entropy / math.log(vocab_size),
    )
    if token_ids is not None:
        in_vocab = (token_ids >= 0) & (token_ids < vocab_size)
        picked = ls.gather(1, token_ids.clamp(0, vocab_size - 1)[:, None]).squeeze(1)
        out.token_logprob = torch.where(in_vocab, picked, torch.full_like(picked, -math.inf))
    if teacher is not None:
        lt = log_softmax(teacher, vocab_size)
        out.reverse_kl = _plogq(ls, ls - lt)
        out.forward_kl = _plogq(lt, lt - ls)
        out.teacher_entropy = -_plogq(lt, lt)
    return out


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[tokens] float64 KL(P_S || P_T), differentiable w.r.t. `student` by autograd
    (finite logits only: autograd through the p == 0 mask of -inf entries gives NaN)."""
    ls = log_softmax(student, vocab_size)
    lt = log_softmax(teacher.detach(), vocab_size)
    return (ls.exp() * (ls - lt)).sum(dim=-1)


def sampling_probs(
    logits: torch.Tensor, vocab_size: int, temperature: float = 1.0, top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """[tokens, V] float64 probabilities of the truncated sampling distribution, by sorting
    the full vocabulary (top-k first, then top-p on the renormalized top-k; ties at a
    threshold are kept, as in `vocab_parallel_sample`)."""
    z = logits[:, :vocab_size].to(torch.float64) / temperature
    if 0 < top_k < vocab_size:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = torch.where(z >= kth, z, -math.inf)
    if top_p < 1.0:
        ordered = z.sort(dim=-1, descending=True).values
        cum = ordered.softmax(dim=-1).cumsum(dim=-1)
        index = (cum < top_p).sum(dim=-1, keepdim=True).clamp(max=vocab_size - 1)
        z = torch.where(z >= ordered.gather(1, index), z, -math.inf)
    return z.softmax(dim=-1)


def divergence(student: torch.Tensor, teacher: torch.Tensor, vocab_size: int, name: str,
               beta: float = 0.5) -> torch.Tensor:
    """[tokens] float64 `name` divergence (ops.divergences), differentiable w.r.t. `student`
    by autograd (finite logits): the textbook formulas, the JSD's mixture M built from
    probabilities (no log-space tricks)."""
    ls = log_softmax(student, vocab_size)
    lt = log_softmax(teacher.detach(), vocab_size)
    kl = lambda lp, lq: (lp.exp() * (lp - lq)).sum(dim=-1)  # noqa: E731
    if name == "reverse_kl":
        return kl(ls, lt)
    if name == "forward_kl":
        return kl(lt, ls)
    if name == "jsd":
        log_m = (beta * lt.exp() + (1.0 - beta) * ls.exp()).log()
        return beta * kl(lt, log_m) + (1.0 - beta) * kl(ls, log_m)
    raise ValueError(f"unknown divergence {name!r}")


def linear_divergence(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, token_weights: torch.Tensor, vocab_size: int,
                      name: str, beta: float = 0.5) -> tuple[torch.Tensor, ...]:
    """float64 (loss_sum, per-token divergence, grad_hidden, grad_weight) of the fused
    output-layer loss, on the full [V_pad, h] weights, by autograd."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    per_token = divergence(h @ w.t(), teacher_hidden.double() @ teacher_weight.double().t(),
                           vocab_size, name, beta)
    loss = (per_token * token_weights.double()).sum()
    loss.backward()
    return loss.detach(), per_token.detach(), h.grad, w.grad


def topk_ids(teacher: torch.Tensor, vocab_size: int, k: int) -> torch.Tensor:
    """[tokens, min(k, V)] ids of the teacher's k largest true-vocab logits, ties by the lower
    id: a stable descending sort of the whole vocabulary."""
    z = teacher[:, :vocab_size].to(torch.float64)
    return z.sort(dim=-1, descending=True, stable=True).indices[:, :min(k, vocab_size)]


def topk_divergence(student: torch.Tensor, teacher: torch.Tensor, vocab_size: int, name: str,
                    k: int, tail: bool, beta: float = 0.5) -> torch.Tensor:
    """[tokens] float64 `name` divergence over the teacher's top-k classes (docs/ops.md, "Top-k
    teacher signal"), from probabilities: with `tail`, q = (p[K], sum of p outside K) of each
    full-vocabulary softmax; without, q = p[K] / sum p[K]. No tail class when k >= V (it is
    empty). Differentiable w.r.t. `student` by autograd (finite logits)."""
    ids = topk_ids(teacher, vocab_size, k)
    p_s = log_softmax(student, vocab_size).exp()
    p_t = log_softmax(teacher.detach(), vocab_size).exp()
    outside = torch.ones_like(p_t, dtype=torch.bool).scatter(1, ids, False)
    qs, qt = p_s.gather(1, ids), p_t.gather(1, ids)
    if tail and ids.shape[1] < vocab_size:
        qs = torch.cat([qs, (p_s * outside).sum(dim=1, keepdim=True)], dim=1)
        qt = torch.cat([qt, (p_t * outside).sum(dim=1, keepdim=True)], dim=1)
    elif not tail:
        qs, qt = qs / qs.sum(dim=1, keepdim=True), qt / qt.sum(dim=1, keepdim=True)
    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(dim=1)
    if name == "reverse_kl":
        return kl(qs, qt)
    if name == "forward_kl":
        return kl(qt, qs)
    if name == "jsd":
        m = beta * qt + (1.0 - beta) * qs
        return beta * kl(qt, m) + (1.0 - beta) * kl(qs, m)
    raise ValueError(f"unknown divergence {name!r}")


def linear_topk_divergence(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_weight: torch.Tensor, token_weights: torch.Tensor, vocab_size: int,
                           name: str, k: int, tail: bool, beta: float = 0.5) -> tuple[torch.Tensor, ...]:
    """float64 (loss_sum, per-token divergence, grad_hidden, grad_weight) of the top-k
    output-layer loss on the full [V_pad, h] weights, by autograd."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    per_token = topk_divergence(h @ w.t(), teacher_hidden.double() @ teacher_weight.double().t(),
                                vocab_size, name, k, tail, beta)
    loss = (per_token * token_weights.double()).sum()
    loss.backward()
    return loss.detach(), per_token.detach(), h.grad, w.grad
