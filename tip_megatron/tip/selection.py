"""Apply a selection rule: signals in, kept mask (and, for a weighted rule, per-token
weights) out, for one micro-batch or over the global batch across DP ranks.

Shapes: `[tokens]` for one micro-batch (sequences flattened in order).

    kept_mask = select(config, signals, step=step)                     # rollout / microbatch
    kept_mask, weights = select_weighted(config, signals, step=step)   # weights None: a mask
    kept_masks = select_global(config, microbatches, dp_group, step=step)   # global scope

Weights: a weighted rule's Ranking carries a weight in [0, 1] per token; the kept mask is
the counted/eligible tokens with a weight > 0 (a weight-0 token never reaches the loss),
and `weights` is 0 outside it. A rule without weights returns `weights=None`, so the loss
path runs exactly as for a mask.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.tip.normalize import RunningNorm
from tip_megatron.tip.ranking import Ranking, keep_top, keep_top_global
from tip_megatron.tip.rules import RULES, RuleInputs, SelectionConfig, _check_stats, selection_labels
from tip_megatron.tip.scores import NormStats, global_norm_stats
from tip_megatron.tip.signals import TokenSignals

__all__ = ["select", "select_global", "select_global_with_stats", "select_global_weighted",
           "select_weighted", "selection_labels"]


def _rollout_groups(signals: TokenSignals) -> torch.Tensor:
    return torch.unique(signals.rollout_ids, return_inverse=True)[1]


def budget_groups(config: SelectionConfig, signals: TokenSignals) -> torch.Tensor:
    """`[tokens]` int64 count group of each token below the scope: its teacher under
    `selection.budget_per_teacher` with several teachers, else one group (0)."""
    if config.budget_per_teacher and signals.teacher_ids is not None:
        return signals.teacher_ids
    return torch.zeros(signals.num_tokens, dtype=torch.int64, device=signals.device)


def _rank(config: SelectionConfig, signals: TokenSignals, step: int,
          norm_stats: Optional[NormStats]) -> Ranking:
    ranking = RULES[config.rule](RuleInputs(signals, config, step, norm_stats))
    if config.weighted and ranking.weights is None:
        raise ValueError(f"rule {config.rule!r} is registered as weighted but returned no weights")
    return ranking


def apply_weights(ranking: Ranking, kept: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(kept mask without the weight-0 tokens, [tokens] float32 weights 0 outside it), or
    (kept, None) for a rule without weights."""
    if ranking.weights is None:
        return kept, None
    weights = torch.where(kept, ranking.weights.double(), 0.0)
    kept = kept & (weights > 0)
    return kept, weights.float()


def select_weighted(
    config: SelectionConfig, signals: TokenSignals, *, step: int = 0,
    norm_stats: Optional[NormStats] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(`[tokens]` bool kept mask, `[tokens]` float32 weights or None) of one micro-batch.
    Pure: inputs are not modified.

    Scopes `rollout` and `microbatch` compute their statistics here when `norm_stats` is
    None. Scope `global` takes `norm_stats` from `global_norm_stats` and supports rules
    counted per rollout (soft_or, soft_or_bottom) or not counted (all, uncapped
    quadrants, the weighted rules at rho 1); the others count over the global batch: use
    `select_global`.
    """
    _check_stats(config, norm_stats)
    ranking = _rank(config, signals, step, norm_stats)
    if ranking.fraction >= 1.0:
        return apply_weights(ranking, ranking.eligible & signals.response_mask)
    if ranking.per_rollout or config.effective_scope == "rollout":
        group = _rollout_groups(signals)
    elif config.effective_scope == "microbatch":
        group = budget_groups(config, signals)
    else:
        raise ValueError(f"rule {config.rule!r} with scope 'global' counts over the global "
                         "batch: use select_global")
    return apply_weights(ranking, keep_top(ranking, signals, group, config.min_keep))


def select(
    config: SelectionConfig, signals: TokenSignals, *, step: int = 0,
    norm_stats: Optional[NormStats] = None,
) -> torch.Tensor:
    """`[tokens]` bool kept mask of one micro-batch (`select_weighted` without the weights)."""
    return select_weighted(config, signals, step=step, norm_stats=norm_stats)[0]


def select_global(
    config: SelectionConfig, parts: Sequence[TokenSignals],
    dp_group: Optional[dist.ProcessGroup], *, step: int = 0,
) -> list[torch.Tensor]:
    """Kept masks of this rank's micro-batches `parts` under scope `global`.

    Run in the scoring pre-pass, on every DP rank of `dp_group` (None: no DP), with the
    signals of all of this rank's micro-batches of the step, and the same `step` on every
    rank. Collectives: those of `global_norm_stats`, plus, for rules counted over the
    group, an all-gather of the eligible tokens' keys. Same masks as one process selecting
    over the concatenation.
    """
    return select_global_with_stats(config, parts, dp_group, step=step)[0]


def select_global_with_stats(
    config: SelectionConfig, parts: Sequence[TokenSignals],
    dp_group: Optional[dist.ProcessGroup], *, step: int = 0,
) -> tuple[list[torch.Tensor], NormStats]:
    """`select_global`, also returning the global `NormStats` it used (for the labels of a
    `quantile` quadrant rule, see `selection_labels`)."""
    masks, _, stats, _ = select_global_weighted(config, parts, dp_group, step=step)
    return masks, stats


def select_global_weighted(
    config: SelectionConfig, parts: Sequence[TokenSignals],
    dp_group: Optional[dist.ProcessGroup], *, step: int = 0,
    running: Optional[RunningNorm] = None,
) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]], NormStats, Optional[RunningNorm]]:
    """(kept masks, weights (None for a rule without them), the NormStats used, the moving
    average after this step) of this rank's micro-batches under scope `global`
    (collectives: `select_global`). `selection.normalize=running`: `running` is the
    average so far (None: the first step), the returned one includes this step's global
    statistics, and the rules score with it; otherwise the average is returned as given."""
    if config.effective_scope != "global":
        raise ValueError("select_global needs an effective selection.scope='global', got "
                         f"{config.effective_scope!r}")
    split_quantiles = config.quadrant_rule.split_quantiles
    stats = global_norm_stats(parts, dp_group, split_quantiles=split_quantiles)
    if config.normalize == "running":
        running = (running or RunningNorm()).update(stats, config.normalize_decay)
        stats = running.apply(stats)
    rankings = [_rank(config, p, step, stats) for p in parts]
    if rankings[0].fraction >= 1.0:
        kept = [r.eligible & p.response_mask for r, p in zip(rankings, parts)]
    elif rankings[0].per_rollout:
        kept = [keep_top(r, p, _rollout_groups(p), config.min_keep) for r, p in zip(rankings, parts)]
    else:
        groups = [budget_groups(config, p) for p in parts]
        kept = keep_top_global(rankings, parts, dp_group, config.min_keep,
                               groups if config.budget_per_teacher else None)
    pairs = [apply_weights(r, k) for r, k in zip(rankings, kept)]
    return [m for m, _ in pairs], [w for _, w in pairs], stats, running
