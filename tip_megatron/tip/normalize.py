"""`selection.normalize`: how h^ and d^ are scaled, for every rule that reads them
(soft_or, soft_or_bottom, q3, capped quadrants).

Shapes: signals `[tokens]`; `NormStats` rows `[groups]`; `RunningNorm` holds scalars.

    batch     the paper: entropy clipped at the group's 98th percentile, then min-max
              scaled within the group; d min-max scaled within the group (tip.scores).
    running   the same formulas, with the clip and the min/max taken from an exponential
              moving average over steps of the global batch's statistics (scope `global`
              only: one group per step, the same on every rank):
                  ema_0 = batch statistics of the first step,
                  ema_t = decay * ema_{t-1} + (1 - decay) * batch statistics of step t,
              and step t scores with ema_t. The state is saved in the checkpoint (train
              run state `selection_norm`), so a resume continues the same average.
    absolute  no batch statistics: h^ = h (already H / log|V| in [0, 1]) and
              d^ = 1 - exp(-d) (a fixed monotone map of nats into [0, 1)).

Why: at a few hundred tokens per step the batch's top 2% by entropy always get h^ = 1 and a
Q3 score of 0 whatever their divergence (docs/tip.md, "Normalisation at small batches").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tip_megatron.tip.scores import NormStats, absolute_hats  # noqa: F401  (absolute's formula)

from tip_megatron.tip.rules import NORMALIZE_MODES  # noqa: E402,F401  (the accepted values)
_FIELDS = ("entropy_clip", "entropy_min", "div_min", "div_max")


@dataclass(frozen=True)
class RunningNorm:
    """The moving average of `selection.normalize=running` (scalars, float64)."""

    steps: int = 0
    """Steps averaged so far (0: no state yet, the next step starts it)."""
    entropy_clip: float = 0.0
    entropy_min: float = 0.0
    div_min: float = 0.0
    div_max: float = 0.0

    def update(self, stats: NormStats, decay: float) -> "RunningNorm":
        """The average after one more step's global statistics (unchanged when the step has
        no response token: nothing was measured)."""
        if stats.scope != "global":
            raise ValueError(f"selection.normalize='running' needs scope 'global' statistics, got {stats.scope!r}")
        if int(stats.num_tokens.sum()) == 0:
            return self
        now = {f: float(getattr(stats, f)[0]) for f in _FIELDS}
        if self.steps == 0:
            return RunningNorm(1, **now)
        return RunningNorm(self.steps + 1, **{
            f: decay * getattr(self, f) + (1.0 - decay) * now[f] for f in _FIELDS})

    def apply(self, stats: NormStats) -> NormStats:
        """`stats` with the clip and min/max replaced by the average (one global group)."""
        if self.steps == 0:
            return stats
        like = stats.entropy_clip
        return dataclasses.replace(stats, **{
            f: torch.full_like(like, getattr(self, f)) for f in _FIELDS})

    def to_tensor(self) -> torch.Tensor:
        """[5] float64 (steps, clip, entropy min, div min, div max): broadcast and saved."""
        return torch.tensor([float(self.steps), *(getattr(self, f) for f in _FIELDS)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "RunningNorm":
        values = [float(x) for x in t.double().cpu()]
        return cls(int(values[0]), *values[1:])

