"""The 2026 per-token rules: teachability (TA-OPD), propose-and-verify weights (SelecTKD)
and TIP's type-aware soft weighting. Registered by importing this module (tip/__init__).

Shapes: `[tokens]` for one micro-batch. Definitions (docs/tip.md says where a paper's exact
definition could not be confirmed and which reading is implemented):

    teachability    score = sum of P_T(v) over the student's top-K ids v (`top_k`);
                    keep the top floor(rho * m) by score (global batch), optionally only
                    tokens with score >= `threshold`. A mask.
    propose_verify  the student proposes the token it sampled; the teacher accepts it when
                    it is among the teacher's `verify_top_k` most likely ids (greedy Top-k).
                    Weight 1 if accepted, `reject_weight` (beta) if rejected, 0 outside the
                    response: weights in {0, beta, 1}.
    tip_soft        weight = `quadrant_weights[q - 1]` for a token of quadrant q
                    (`quadrant_rule` labels): a soft, type-aware reading of TIP instead of
                    a hard cut.
"""
from __future__ import annotations

import torch

from tip_megatron.tip.ranking import Ranking
from tip_megatron.tip.rules import RuleInputs, register_rule


def _signal(x: RuleInputs, name: str) -> torch.Tensor:
    value = getattr(x.signals, name)
    if value is None:
        raise ValueError(f"rule {x.config.rule!r} reads the signal {name!r}, which was not scored "
                         "(build_signals computes it when SelectionConfig.signals_needed names it)")
    return value.double()


@register_rule("teachability", signals=("teachability",))
def rule_teachability(x: RuleInputs) -> Ranking:
    """Highest teacher mass inside the student's top-K; with `threshold`, only tokens at or
    above it are eligible."""
    score = _signal(x, "teachability")
    eligible = x.signals.response_mask
    if x.config.threshold is not None:
        eligible = eligible & (score >= float(x.config.threshold))
    return x.ranking(score, eligible=eligible)


@register_rule("propose_verify", paper_scope="rollout", weighted=True, counted=False,
               signals=("teacher_rank",))
def rule_propose_verify(x: RuleInputs) -> Ranking:
    """Weights {0, beta, 1}: accepted (teacher rank < verify_top_k) 1, rejected beta."""
    accepted = _signal(x, "teacher_rank") < x.config.verify_top_k
    weights = torch.where(accepted, 1.0, float(x.config.reject_weight))
    return x.ranking(torch.zeros_like(weights), fraction=1.0, weights=weights)


@register_rule("tip_soft", paper_scope="rollout", weighted=True, counted=False)
def rule_tip_soft(x: RuleInputs) -> Ranking:
    """Quadrant-dependent weights (Q1..Q4) instead of a hard cut."""
    table = torch.tensor((0.0, *x.config.quadrant_weights), dtype=torch.float64,
                         device=x.signals.device)
    weights = table[x.labels()]  # label 0 (not a response token) weighs 0
    return x.ranking(torch.zeros_like(weights), fraction=1.0, weights=weights)
