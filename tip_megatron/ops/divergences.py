"""The divergences the fused output-layer loss can learn from: one strategy per name,
each a chunk forward (value + state, on vocab-parallel logits) and a chunk gradient
w.r.t. the student logits, both local to a [c, w] chunk of true-vocab columns.

Shapes: [c, w] = a chunk's logits over one rank's true-vocab columns; [c] = per token.
P_S = softmax(student), P_T = softmax(teacher), over the whole (sharded) vocabulary.

    reverse_kl  KL(P_S || P_T)                          (the paper; `reverse_kl`)
    forward_kl  KL(P_T || P_S)          = reverse_kl with the roles swapped
                d/ds_v = p_s[v] - p_t[v]
    jsd         generalized JSD of GKD (Agarwal et al., 2024, Eq. for D_JSD(beta)):
                M = beta P_T + (1 - beta) P_S,
                JSD = beta KL(P_T || M) + (1 - beta) KL(P_S || M),   beta in (0, 1)
                d/ds_v = (1 - beta) p_s[v] (log p_s[v] - log m[v] - KL(P_S || M))

Collectives per chunk (tp_group): both KLs one MAX [2, c] + one SUM [3, c]; jsd one MAX
[2, c] + one SUM [3, c] (normalizers) + one SUM [2, c] (KL(P_T||M), KL(P_S||M)). The
gradients need no collective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tip_megatron.ops._shard import SUM, Workspace, all_reduce_, shift_into, token_chunks
from tip_megatron.ops.partials import global_maxima, reduced_partials
from tip_megatron.ops.reverse_kl import (
    KLState, reverse_kl_forward, reverse_kl_grad, reverse_kl_grad_chunk,
)

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


@dataclass
class JSDState(KLState):
    """KLState with `kl` = the JSD, plus KL(P_S || M) for the gradient."""

    kl_student_mix: torch.Tensor = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Divergence:
    """Which divergence the loss uses (`loss.divergence`, `loss.jsd_beta`)."""

    name: str = "reverse_kl"
    beta: float = 0.5
    """Teacher's weight in the JSD mixture M (GKD's beta); read by `jsd` only."""

    def __post_init__(self) -> None:
        if self.name not in DIVERGENCES:
            raise ValueError(f"loss.divergence={self.name!r}: accepted values are {list(DIVERGENCES)}")
        if not (isinstance(self.beta, (int, float)) and 0.0 < float(self.beta) < 1.0):
            raise ValueError(f"loss.jsd_beta={self.beta!r}: must be in the open interval (0, 1) "
                             "(at 0 and 1 the JSD is identically 0; use forward_kl or reverse_kl)")

    @property
    def buffers(self) -> int:
        """[inner, w] workspace buffers the chunk functions need."""
        return 4 if self.name == "jsd" else 2

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, tp_group: Any, inner: int,
                work: Workspace) -> KLState:
        if self.name == "reverse_kl":
            return reverse_kl_forward(student, teacher, tp_group, inner, work)
        if self.name == "forward_kl":
            st = reverse_kl_forward(teacher, student, tp_group, inner, work)
            return KLState(st.max_t, st.max_s, st.log_norm_t, st.log_norm_s, st.kl)
        return _jsd_forward(student, teacher, float(self.beta), tp_group, inner, work)

    def grad(self, student: torch.Tensor, teacher: torch.Tensor, state: KLState,
             scale: torch.Tensor, valid_width: int, inner: int, out: torch.Tensor,
             work: Workspace) -> torch.Tensor:
        """[c, V/tp] gradient of sum_i scale_i D_i w.r.t. the student logits, into `out`."""
        chunk_grad = {"reverse_kl": reverse_kl_grad_chunk, "forward_kl": _forward_kl_grad_chunk,
                      "jsd": self._jsd_grad_chunk}[self.name]
        return reverse_kl_grad(student, teacher, state, scale, valid_width, inner, out=out,
                               work=work, chunk_grad=chunk_grad)

    def _jsd_grad_chunk(self, student, teacher, state, scale, work, out=None):
        return _jsd_grad_chunk(student, teacher, state, scale, work, float(self.beta), out)


REVERSE_KL = Divergence()


def _log_probs(work_views, student, teacher, state: KLState):
    """(log p_s, log p_t) of a chunk into the first two workspace views."""
    ls = shift_into(work_views[0], student, state.max_s + state.log_norm_s)
    lt = shift_into(work_views[1], teacher, state.max_t + state.log_norm_t)
    return ls, lt


def _log_mix_into(out: torch.Tensor, ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """out = log m = logaddexp(log beta + log p_t, log(1 - beta) + log p_s); `lt` is consumed."""
    torch.add(ls, math.log1p(-beta), out=out)
    return torch.logaddexp(lt.add_(math.log(beta)), out, out=out)


def _forward_kl_grad_chunk(student, teacher, state: KLState, scale, work: Workspace,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """p_s - p_t (times scale): reads the teacher chunk before writing `out`."""
    p_s, p_t = (v.exp_() for v in _log_probs(work.views(student.shape[0]), student, teacher, state))
    grad = torch.sub(p_s, p_t, out=p_t if out is None else out)
    return grad.mul_(scale[:, None].to(grad.dtype))


def _jsd_grad_chunk(student, teacher, state: JSDState, scale, work: Workspace, beta: float,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    views = work.views(student.shape[0])
    ls, lt = _log_probs(views, student, teacher, state)  # teacher read here, before `out`
    grad = views[2] if out is None else out
    log_m = _log_mix_into(views[3], ls, lt, beta)
    torch.sub(ls, log_m, out=grad).sub_(state.kl_student_mix[:, None]).mul_(ls.exp_())
    # p_s == 0 with a -inf logit: 0 * -inf = NaN, the true value is 0.
    grad.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return grad.mul_((scale * (1.0 - beta))[:, None].to(grad.dtype))


def _jsd_forward(student: torch.Tensor, teacher: torch.Tensor, beta: float, tp_group: Any,
                 inner: int, work: Workspace) -> JSDState:
    maxes = global_maxima(student, teacher, tp_group)
    partials = reduced_partials(student, teacher, maxes, tp_group, inner, moments=False, work=work)
    base = KLState(maxes[0], maxes[1], partials[0].log(), partials[1].log(), partials[0])
    rows = torch.zeros(2, student.shape[0], dtype=maxes.dtype, device=student.device)
    for sl in token_chunks(student.shape[0], inner):
        views = work.views(sl.stop - sl.start)
        ls, lt = _log_probs(views, student[sl], teacher[sl], base.rows(sl))
        log_m = _log_mix_into(views[2], ls, views[3].copy_(lt), beta)
        # nansum: a probability of 0 (a -inf logit) times -inf is NaN and counts as 0.
        rows[1, sl] = torch.sub(ls, log_m, out=views[3]).mul_(ls.exp_()).nansum(dim=-1)
        rows[0, sl] = torch.sub(lt, log_m, out=views[3]).mul_(lt.exp_()).nansum(dim=-1)
    all_reduce_(rows, SUM, tp_group)
    # Each KL >= 0 exactly; rounding can leave a -1e-7.
    kl_tm, kl_sm = rows[0].clamp_min(0.0), rows[1].clamp_min(0.0)
    jsd = beta * kl_tm + (1.0 - beta) * kl_sm
    return JSDState(base.max_s, base.max_t, base.log_norm_s, base.log_norm_t, jsd, kl_sm)
