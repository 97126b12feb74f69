"""Batch-normalized TIP scores: clipped, min-max scaled entropy h^ and divergence d^,
Soft-OR s = h^ + d^ - h^ d^ and the Q3 score w = d_fwd (1 - h^).

Shapes: signals are `[tokens]`; `NormStats` fields are `[groups]`, one row per
normalization group (a rollout for scope `rollout`, the micro-batch or the global batch
otherwise). Statistics run in float64: they are `[tokens]`-sized, so precision is free.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.runtime.collectives import all_gather_varlen, all_reduce_min_max
from tip_megatron.tip.signals import TokenSignals

SCOPES = ("rollout", "microbatch", "global")
ENTROPY_CLIP_QUANTILE = 0.98
"""Entropy is clipped at this quantile of its normalization group before min-max scaling."""


@dataclass(frozen=True)
class NormStats:
    """Normalization statistics over the response tokens of each group. Empty groups hold 0.

    The max of the clipped entropy is `entropy_clip` itself (a quantile never exceeds the
    max), so it is not stored twice.
    """

    scope: str
    group_ids: torch.Tensor
    """[groups] int64: the rollout ids for scope `rollout`; `[0]` for the other scopes."""
    num_tokens: torch.Tensor
    """[groups] int64: response tokens in each group."""
    entropy_clip: torch.Tensor
    """[groups] float64: the 98th percentile of h; also the max of the clipped entropy."""
    entropy_min: torch.Tensor
    """[groups] float64: min of h."""
    div_min: torch.Tensor
    """[groups] float64: min of d (nats)."""
    div_max: torch.Tensor
    """[groups] float64: max of d (nats)."""
    entropy_split: Optional[torch.Tensor] = None
    """[groups] float64: quantile of h for a `quantile` quadrant rule, else None."""
    div_split: Optional[torch.Tensor] = None
    """[groups] float64: quantile of d (nats) for a `quantile` quadrant rule, else None."""


@dataclass(frozen=True)
class Scores:
    """[tokens] float64 scores; 0 on tokens outside the response."""

    entropy_hat: torch.Tensor
    div_hat: torch.Tensor
    soft_or: torch.Tensor
    q3: torch.Tensor


def quantile_per_group(
    values: torch.Tensor, group: torch.Tensor, num_groups: int, q: float
) -> torch.Tensor:
    """`[num_groups]` q-quantile of `values` `[n]` within each group; 0 for an empty group.

    Definition (the one used by every scope): numpy's default `linear` method, i.e.
    `torch.quantile(interpolation="linear")`: sort the group's n values v_0 <= ... <= v_{n-1},
    take position p = q (n - 1) and interpolate v_floor(p) + (p - floor(p)) (v_ceil(p) -
    v_floor(p)). Written with a sort so it has no size limit (torch.quantile refuses
    inputs over 2^24 elements) and handles all groups in one pass.
    """
    out = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
    if values.numel() == 0:
        return out
    order = torch.sort(values.double(), stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    sorted_values = values.double()[order]
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    pos = q * (counts - 1).clamp_min(0).double()
    lo, hi = pos.floor(), pos.ceil()
    last = values.numel() - 1
    v_lo = sorted_values[(starts + lo.long()).clamp(max=last)]
    v_hi = sorted_values[(starts + hi.long()).clamp(max=last)]
    return torch.where(counts > 0, v_lo + (pos - lo) * (v_hi - v_lo), out)


def _group_reduce(
    values: torch.Tensor, group: torch.Tensor, num_groups: int, op: str
) -> torch.Tensor:
    init = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
    return init.scatter_reduce(0, group, values.double(), reduce=op, include_self=False)


def _stats_from_values(
    scope: str, group_ids: torch.Tensor, h: torch.Tensor, h_group: torch.Tensor,
    d: torch.Tensor, d_group: torch.Tensor, split_quantiles: Optional[tuple[float, float]],
) -> NormStats:
    num_groups = group_ids.numel()
    splits = (None, None)
    if split_quantiles is not None:
        splits = (quantile_per_group(h, h_group, num_groups, split_quantiles[0]),
                  quantile_per_group(d, d_group, num_groups, split_quantiles[1]))
    return NormStats(
        scope=scope, group_ids=group_ids,
        num_tokens=torch.bincount(h_group, minlength=num_groups),
        entropy_clip=quantile_per_group(h, h_group, num_groups, ENTROPY_CLIP_QUANTILE),
        entropy_min=_group_reduce(h, h_group, num_groups, "amin"),
        div_min=_group_reduce(d, d_group, num_groups, "amin"),
        div_max=_group_reduce(d, d_group, num_groups, "amax"),
        entropy_split=splits[0], div_split=splits[1],
    )


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: accepted values are {list(SCOPES)}")


def compute_norm_stats(
    signals: TokenSignals, scope: str, *, split_quantiles: Optional[tuple[float, float]] = None
) -> NormStats:
    """Statistics of one micro-batch for scope `rollout` (a group per rollout) or `microbatch`.

    `split_quantiles=(q_h, q_d)` also stores quantile splits for a `quantile` quadrant rule.
    Scope `global` spans micro-batches and DP ranks: use `global_norm_stats`.
    """
    check_scope(scope)
    if scope == "global":
        raise ValueError("scope='global' needs the whole global batch: use global_norm_stats "
                         "(a scoring pre-pass) instead of compute_norm_stats")
    resp = signals.response_mask
    h, d = signals.entropy_norm[resp], signals.reverse_kl[resp]
    if scope == "rollout":
        group_ids, group = torch.unique(signals.rollout_ids[resp], return_inverse=True)
    else:
        group_ids, group = _one_group(1, signals.device), _one_group(h.numel(), signals.device)
    return _stats_from_values(scope, group_ids, h, group, d, group, split_quantiles)


def _one_group(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64, device=device)


def global_norm_stats(
    parts: Sequence[TokenSignals], dp_group: Optional[dist.ProcessGroup],
    *, split_quantiles: Optional[tuple[float, float]] = None,
) -> NormStats:
    """Statistics over the global batch: all of this rank's micro-batches, all DP ranks.

    Collectives on `dp_group` (every DP rank must call this; `None` means no data
    parallelism): the response entropies are all-gathered — `[response tokens]` floats, a
    few MB even for millions of tokens, far below one logit row per token — because the
    98th percentile needs the values themselves; min/max of d are all-reduced. A quantile
    quadrant rule also gathers d. The result is identical on every rank, and identical to
    `compute_norm_stats(concat, "microbatch")` of one process holding the whole batch.
    """
    if not parts:
        raise ValueError("global_norm_stats: needs this rank's micro-batch signals (got none)")
    h = torch.cat([p.entropy_norm[p.response_mask].double() for p in parts])
    d = torch.cat([p.reverse_kl[p.response_mask].double() for p in parts])
    h_all = all_gather_varlen(h, dp_group)
    d_all = all_gather_varlen(d, dp_group) if split_quantiles is not None else d
    stats = _stats_from_values(
        "global", _one_group(1, h.device), h_all, _one_group(h_all.numel(), h.device),
        d_all, _one_group(d_all.numel(), d.device), split_quantiles,
    )
    if split_quantiles is not None:
        return stats
    div_min, div_max = all_reduce_min_max(d, dp_group)
    return dataclasses.replace(stats, div_min=div_min, div_max=div_max)


def token_groups(signals: TokenSignals, stats: NormStats) -> torch.Tensor:
    """`[tokens]` int64 row of `stats` that normalizes each token (0 for non-response)."""
    if stats.scope != "rollout":
        return torch.zeros(signals.num_tokens, dtype=torch.int64, device=signals.device)
    num_groups = stats.group_ids.numel()
    if num_groups == 0:
        if bool(signals.response_mask.any()):
            raise ValueError("norm_stats hold no rollout, but the signals have response tokens")
        return torch.zeros(signals.num_tokens, dtype=torch.int64, device=signals.device)
    idx = torch.searchsorted(stats.group_ids, signals.rollout_ids).clamp(max=num_groups - 1)
    missing = signals.response_mask & (stats.group_ids[idx] != signals.rollout_ids)
    if bool(missing.any()):
        rid = int(signals.rollout_ids[missing][0])
        raise ValueError(f"norm_stats (scope 'rollout') hold no statistics for rollout {rid}")
    return torch.where(signals.response_mask, idx, 0)


def min_max_scale(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(x - lo) / (hi - lo) clamped to [0, 1]; 0 where hi == lo (a constant group)."""
    span = hi - lo
    scaled = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled.clamp(0.0, 1.0), torch.zeros_like(scaled))


def absolute_hats(h: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h^, d^) of `selection.normalize=absolute` (tip.normalize): h clamped to [0, 1] and
    1 - exp(-d), float64."""
    return h.clamp(0.0, 1.0), -torch.expm1(-d.clamp_min(0.0))


def compute_scores(signals: TokenSignals, stats: NormStats, normalize: str = "batch") -> Scores:
    """h^, d^, Soft-OR s and Q3 score w of every token, normalized by `stats`
    (`normalize="absolute"`: by no statistics, tip.normalize; `running` passes the moving
    average as `stats`)."""
    resp = signals.response_mask
    zero = torch.zeros(signals.num_tokens, dtype=torch.float64, device=signals.device)
    h, d = signals.entropy_norm.double(), signals.reverse_kl.double()
    if normalize == "absolute":
        h_hat, d_hat = absolute_hats(h, d)
    elif stats.group_ids.numel() == 0:
        return Scores(zero, zero, zero, zero)
    else:
        g = token_groups(signals, stats)
        clip = stats.entropy_clip[g]
        h_hat = min_max_scale(torch.minimum(h, clip), stats.entropy_min[g], clip)
        d_hat = min_max_scale(d, stats.div_min[g], stats.div_max[g])
    h_hat, d_hat = torch.where(resp, h_hat, zero), torch.where(resp, d_hat, zero)
    soft_or = h_hat + d_hat - h_hat * d_hat
    q3 = torch.where(resp, signals.forward_kl.double() * (1.0 - h_hat), zero)
    return Scores(entropy_hat=h_hat, div_hat=d_hat, soft_or=soft_or, q3=q3)
