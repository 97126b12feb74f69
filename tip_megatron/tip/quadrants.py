"""The TIP taxonomy: a quadrant label per token from its entropy and its divergence.

Shapes: signals and labels are `[tokens]`.

|              | low divergence  | high divergence   |
|--------------|-----------------|-------------------|
| high entropy | Q2 stabilize    | Q1 correct        |
| low entropy  | Q4 solved       | Q3 overconfident  |

"High" is strict: h > threshold, d > threshold. Default: fixed thresholds (h > 0.05,
d > 0.5 nats), not batch medians — see docs/tip.md for why.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

import torch

from tip_megatron.tip.scores import NormStats, token_groups
from tip_megatron.tip.signals import TokenSignals

QUADRANT_KINDS = ("fixed", "quantile")


class Quadrant(enum.IntEnum):
    NONE = 0
    """Not a response token (prompt, padding)."""
    Q1 = 1
    """High entropy, high divergence: correct (the densest signal)."""
    Q2 = 2
    """High entropy, low divergence: stabilize."""
    Q3 = 3
    """Low entropy, high divergence: overconfident."""
    Q4 = 4
    """Low entropy, low divergence: solved."""


QUADRANTS = (Quadrant.Q1, Quadrant.Q2, Quadrant.Q3, Quadrant.Q4)


@dataclass(frozen=True)
class QuadrantRule:
    """How "high entropy" and "high divergence" are decided."""

    kind: str = "fixed"
    """`fixed`: absolute thresholds below; `quantile`: quantiles of the normalization group
    (needs `NormStats` computed with `split_quantiles`)."""
    entropy_threshold: float = 0.05
    """`fixed`: high entropy iff h = H / log|V| > this (unitless, in [0, 1])."""
    div_threshold_nats: float = 0.5
    """`fixed`: high divergence iff reverse KL d > this many nats."""
    entropy_quantile: float = 0.5
    """`quantile`: high entropy iff h > this quantile of h over the group."""
    div_quantile: float = 0.5
    """`quantile`: high divergence iff d > this quantile of d over the group."""

    def __post_init__(self) -> None:
        self.validate()  # built directly by the engine and tests too, not only from a config

    def validate(self, prefix: str = "quadrant_rule.") -> None:
        """ValueError naming `<prefix><field>` and what is accepted."""
        if self.kind not in QUADRANT_KINDS:
            raise ValueError(f"{prefix}kind={self.kind!r}: accepted values are "
                             f"{list(QUADRANT_KINDS)}")
        for name in ("entropy_threshold", "div_threshold_nats"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{prefix}{name}={value!r}: must be a finite number >= 0")
        for name in ("entropy_quantile", "div_quantile"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{prefix}{name}={value!r}: must be in [0, 1]")

    @property
    def split_quantiles(self) -> Optional[tuple[float, float]]:
        """(q_h, q_d) that `NormStats` must carry for this rule; None for `fixed`."""
        if self.kind == "quantile":
            return (float(self.entropy_quantile), float(self.div_quantile))
        return None


def quadrant_labels(
    signals: TokenSignals, rule: QuadrantRule, norm_stats: Optional[NormStats] = None
) -> torch.Tensor:
    """`[tokens]` int64 labels: `Quadrant.Q1..Q4` on response tokens, `Quadrant.NONE` elsewhere.

    A `quantile` rule reads its per-group splits from `norm_stats`, which must have been
    computed with `split_quantiles=rule.split_quantiles`.
    """
    h, d = signals.entropy_norm.double(), signals.reverse_kl.double()
    if rule.kind == "fixed":
        h_split = torch.full_like(h, float(rule.entropy_threshold))
        d_split = torch.full_like(d, float(rule.div_threshold_nats))
    else:
        if norm_stats is None or norm_stats.entropy_split is None or norm_stats.div_split is None:
            raise ValueError("quadrant_rule.kind='quantile' needs norm_stats computed with "
                             "split_quantiles=rule.split_quantiles")
        if norm_stats.group_ids.numel() == 0:
            return torch.zeros(signals.num_tokens, dtype=torch.int64, device=signals.device)
        g = token_groups(signals, norm_stats)
        h_split, d_split = norm_stats.entropy_split[g], norm_stats.div_split[g]
    high_h, high_d = h > h_split, d > d_split
    labels = torch.where(
        high_h,
        torch.where(high_d, int(Quadrant.Q1), int(Quadrant.Q2)),
        torch.where(high_d, int(Quadrant.Q3), int(Quadrant.Q4)),
    )
    return torch.where(signals.response_mask, labels, int(Quadrant.NONE)).long()
