"""Per-token TIP signals of one micro-batch, and the per-rollout bookkeeping built on them.

Shapes: every tensor is `[tokens]` — the micro-batch's sequences flattened in order.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

_FLOAT_FIELDS = ("entropy_norm", "reverse_kl", "forward_kl")
#: Signals computed only when something reads them (a rule, `loss.mix`); None otherwise.
OPTIONAL_SIGNALS = ("teacher_entropy", "teachability", "teacher_rank")


@dataclass(frozen=True)
class TokenSignals:
    """The `[tokens]` statistics a selection rule reads. Validated on construction.

    Rollout ids must be unique across the whole global batch (all micro-batches and DP
    ranks), and a rollout's tokens must never straddle micro-batches: sampled rules seed
    their generator from the rollout id, and `global` scope breaks ties by it.
    """

    entropy_norm: torch.Tensor
    """h = H(P_S) / log|V| in [0, 1], float."""
    reverse_kl: torch.Tensor
    """d = KL(P_S || P_T) in nats, float; the per-token loss."""
    forward_kl: torch.Tensor
    """d_fwd = KL(P_T || P_S) in nats, float; ranks overconfident tokens (Q3)."""
    response_mask: torch.Tensor
    """bool; False for prompt and padding tokens, which are never kept."""
    rollout_ids: torch.Tensor
    """int64; global id of the rollout each token belongs to."""
    teacher_entropy: Optional[torch.Tensor] = None
    """H(P_T) in nats, float (free with the scoring statistics); None if not scored."""
    teachability: Optional[torch.Tensor] = None
    """Teacher probability mass inside the student's top-K candidates, in [0, 1], float
    (`ops.vocab_parallel_topk_mass`); None unless a rule reads it."""
    teacher_rank: Optional[torch.Tensor] = None
    """Rank of the sampled (student-proposed) token under the teacher, float (0 = the
    teacher's argmax; ties by lower id first; `ops.vocab_parallel_rank`); None unless read."""
    teacher_ids: Optional[torch.Tensor] = None
    """int64 index of the teacher that scored each token (several teachers, `teachers:`);
    None: one teacher. `selection.budget_per_teacher` counts rho within each."""

    def __post_init__(self) -> None:
        n = self.entropy_norm.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in OPTIONAL_SIGNALS + ("teacher_ids",):
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                raise ValueError(f"TokenSignals.{f.name}: must be a 1-D [tokens] tensor")
            if value.shape != n:
                raise ValueError(
                    f"TokenSignals.{f.name}: has {value.numel()} tokens, entropy_norm has {n[0]}"
                )
            if value.device != self.entropy_norm.device:
                raise ValueError(f"TokenSignals.{f.name}: on {value.device}, others on "
                                 f"{self.entropy_norm.device}")
        for name in _FLOAT_FIELDS + OPTIONAL_SIGNALS:
            value = getattr(self, name)
            if value is None:
                continue
            if not value.is_floating_point():
                raise ValueError(f"TokenSignals.{name}: must be a float tensor, got {value.dtype}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"TokenSignals.{name}: contains NaN or inf")
        if self.response_mask.dtype != torch.bool:
            raise ValueError(f"TokenSignals.response_mask: must be bool, "
                             f"got {self.response_mask.dtype}")
        if self.teacher_ids is not None and self.teacher_ids.dtype != torch.int64:
            raise ValueError(f"TokenSignals.teacher_ids: must be int64, got {self.teacher_ids.dtype}")
        if self.rollout_ids.dtype != torch.int64:
            raise ValueError(f"TokenSignals.rollout_ids: must be int64, "
                             f"got {self.rollout_ids.dtype}")

    @property
    def num_tokens(self) -> int:
        return self.entropy_norm.numel()

    @property
    def device(self) -> torch.device:
        return self.entropy_norm.device


def concat_signals(parts: Sequence[TokenSignals]) -> TokenSignals:
    """Concatenate micro-batches' signals along tokens (e.g. a reference over a global batch)."""
    if not parts:
        raise ValueError("concat_signals: needs at least one TokenSignals")
    out = {}
    for f in fields(TokenSignals):
        values = [getattr(p, f.name) for p in parts]
        if any(v is None for v in values):
            if not all(v is None for v in values):
                raise ValueError(f"concat_signals: {f.name} is present in some parts only")
            out[f.name] = None
        else:
            out[f.name] = torch.cat(values)
    return TokenSignals(**out)


def response_order(signals: TokenSignals) -> torch.Tensor:
    """`[num_response]` token indices of the response tokens, sorted by (rollout id, position).

    A rollout's response tokens appear in the same order whatever micro-batch holds them,
    so this order (and anything derived from it) does not depend on the layout.
    """
    idx = torch.nonzero(signals.response_mask, as_tuple=False).flatten()
    by_rollout = torch.sort(signals.rollout_ids[idx], stable=True).indices
    return idx[by_rollout]


def response_index(signals: TokenSignals) -> torch.Tensor:
    """`[tokens]` int64: a token's index among its rollout's response tokens; -1 elsewhere."""
    order = response_order(signals)
    rids = signals.rollout_ids[order]
    out = torch.full((signals.num_tokens,), -1, dtype=torch.int64, device=signals.device)
    if order.numel() == 0:
        return out
    _, counts = torch.unique_consecutive(rids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(order.numel(), device=signals.device)
    ranks = positions - torch.repeat_interleave(starts, counts)
    return out.index_put((order,), ranks)
