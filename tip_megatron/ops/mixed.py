"""A per-token mix of reverse KL, forward KL and JSD for the fused output-layer loss
(`loss.mix`): D_i = a_i KL(P_S||P_T) + b_i KL(P_T||P_S) + c_i JSD_beta, with per-token
coefficients (a_i, b_i, c_i) >= 0 chosen by the caller from the token's signals.

Shapes: [c, w] = a chunk's logits over one rank's true-vocab columns; [c] = per token;
[k, 3] = the coefficients of the k tokens in the loss (columns: reverse, forward, JSD).

One pass over each logit chunk (the fused loop computes it once): both KLs come from one
MAX [2, c] and one SUM [7, c] all-reduce of the moments partials (`ops.partials`, the same
rows `vocab_parallel_stats` reads); the JSD, only when some coefficient c_i can be > 0,
adds its own MAX + two SUMs. The gradient w.r.t. the student logits is the coefficient-
weighted sum of the three divergences' local gradients (no collective). It re-reads the
teacher chunk for each part, so the fused loop gives it a gradient buffer of its own
(`rereads_teacher`): one more [chunk, w] buffer, nothing [k, V/tp].
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from tip_megatron.ops._shard import Workspace
from tip_megatron.ops.divergences import (
    JSDState, _forward_kl_grad_chunk, _jsd_forward, _jsd_grad_chunk,
)
from tip_megatron.ops.partials import global_maxima, reduced_partials
from tip_megatron.ops.reverse_kl import KLState, reverse_kl_grad, reverse_kl_grad_chunk

MIX_PARTS = ("reverse_kl", "forward_kl", "jsd")


@dataclass
class MixState(KLState):
    """KLState with `kl` = the mixed value; the parts for the gradient; [c] each, coefs [c, 3]."""

    reverse: torch.Tensor = None  # type: ignore[assignment]
    forward: torch.Tensor = None  # type: ignore[assignment]
    jsd: Optional[torch.Tensor] = None
    kl_student_mix: Optional[torch.Tensor] = None
    coefs: torch.Tensor = None  # type: ignore[assignment]

    def rows(self, sl: slice) -> "MixState":
        return type(self)(*(None if getattr(self, f) is None else getattr(self, f)[sl]
                            for f in self.__dataclass_fields__))


@dataclass(frozen=True, eq=False)
class MixedDivergence:
    """The `Divergence` strategy of `loss.mix` (same chunk contract as ops.divergences)."""

    coefs: torch.Tensor
    """[k, 3] float coefficients (reverse KL, forward KL, JSD) of the tokens in the loss, >= 0."""
    beta: float = 0.5
    """JSD's teacher weight in M = beta P_T + (1 - beta) P_S, in (0, 1)."""
    use_jsd: bool = True
    """False: every JSD coefficient is 0 (skips its collectives); set from the config."""
    name: str = "mix"
    rereads_teacher: bool = True
    buffers: int = 5

    def rows(self, sl: slice) -> "MixedDivergence":
        """This divergence for the tokens `sl` of the loss (the fused loop's chunk)."""
        return replace(self, coefs=self.coefs[sl])

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, tp_group: Any, inner: int,
                work: Workspace) -> MixState:
        maxes = global_maxima(student, teacher, tp_group)
        p = reduced_partials(student, teacher, maxes, tp_group, inner, moments=True, work=work)
        sum_s, sum_t, diff_s, diff_t, norm_diff = p[0], p[2], p[4], p[5], p[6]
        shift = maxes[0] - maxes[1]
        log_ratio = torch.log1p(norm_diff / sum_t)  # log S_s - log S_t (ops.partials)
        # Each KL >= 0 exactly; the clamps only remove rounding below zero.
        reverse = (diff_s / sum_s - shift - log_ratio).clamp_min(0.0)
        forward = (shift - diff_t / sum_t + log_ratio).clamp_min(0.0)
        coefs = self.coefs.to(reverse.dtype)
        value = coefs[:, 0] * reverse + coefs[:, 1] * forward
        jsd = kl_sm = None
        if self.use_jsd:
            js: JSDState = _jsd_forward(student, teacher, float(self.beta), tp_group, inner, work)
            jsd, kl_sm = js.kl, js.kl_student_mix
            value = value + coefs[:, 2] * jsd
        return MixState(maxes[0], maxes[1], sum_s.log(), sum_t.log(), value,
                        reverse, forward, jsd, kl_sm, coefs)

    def grad(self, student: torch.Tensor, teacher: torch.Tensor, state: MixState,
             scale: torch.Tensor, valid_width: int, inner: int, out: torch.Tensor,
             work: Workspace) -> torch.Tensor:
        """[c, V/tp] gradient of sum_i scale_i D_i w.r.t. the student logits, into `out`."""
        return reverse_kl_grad(student, teacher, state, scale, valid_width, inner, out=out,
                               work=work, chunk_grad=self._grad_chunk)

    def _grad_chunk(self, student, teacher, state: MixState, scale, work: Workspace,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        views = work.views(student.shape[0])
        acc = views[4] if out is None else out
        coefs = state.coefs.to(scale.dtype)
        base = KLState(state.max_s, state.max_t, state.log_norm_s, state.log_norm_t, state.reverse)
        reverse_kl_grad_chunk(student, teacher, base, scale * coefs[:, 0], work, out=acc)
        acc.add_(_forward_kl_grad_chunk(student, teacher, base, scale * coefs[:, 1], work))
        if self.use_jsd:
            js = JSDState(state.max_s, state.max_t, state.log_norm_s, state.log_norm_t, state.jsd,
                          state.kl_student_mix)
            acc.add_(_jsd_grad_chunk(student, teacher, js, scale * coefs[:, 2], work, float(self.beta)))
        return acc
