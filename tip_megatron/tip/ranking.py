"""Top-k machinery shared by every rule: per-rollout random draws, counts, ranked keeping.

Shapes: `[tokens]` for one micro-batch; `[rows]` for the eligible tokens being ranked.

A rule turns signals into a `Ranking` (a key per token, which tokens may be kept, what
fraction to keep and over which group to count); this module turns a Ranking into a kept
mask, either within groups of one micro-batch or over the global batch across DP ranks.
Order within a group: key descending, then `secondary` descending, then (rollout id,
index among the rollout's response tokens) ascending — a total order that does not
depend on how rollouts are split into micro-batches or DP ranks.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.runtime.groups import group_rank
from tip_megatron.runtime.collectives import all_gather_varlen, all_reduce_sum
from tip_megatron.tip.signals import TokenSignals, response_index, response_order

RHO_MAX_DENOMINATOR = 10**6


@dataclass(frozen=True)
class Ranking:
    """What a rule asks for; `keep_top` / `keep_top_global` turn it into a kept mask."""

    key: torch.Tensor
    """[tokens] float64: higher is kept first."""
    eligible: torch.Tensor
    """[tokens] bool: tokens that may be kept (a subset of the response)."""
    fraction: float
    """Keep floor(fraction * m) per count group (m: its response tokens); >= 1.0 keeps all."""
    per_rollout: bool
    """Count per rollout (Soft-OR) instead of per normalization-scope group."""
    secondary: Optional[torch.Tensor] = None
    """[tokens] float64 tie-break applied before position (e.g. a random draw), or None."""
    weights: Optional[torch.Tensor] = None
    """[tokens] float64 weight in [0, 1] of each token if kept (a weighted rule), or None
    (every kept token weighs 1: a mask). A kept token of weight 0 is dropped."""


def _rollout_seed(seed: int, step: int, rollout_id: int) -> int:
    digest = hashlib.blake2b(struct.pack("<qqq", seed, step, rollout_id), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rollout_uniforms(signals: TokenSignals, seed: int, step: int) -> torch.Tensor:
    """`[tokens]` float64 U[0, 1) draws on response tokens, 0 elsewhere.

    Each rollout draws from its own CPU generator seeded by hash(seed, step, rollout id),
    one value per response token in order, so a token's draw does not depend on the
    micro-batch or DP rank that holds its rollout, nor on the device.
    """
    out = torch.zeros(signals.num_tokens, dtype=torch.float64)
    order = response_order(signals).cpu()
    if order.numel() == 0:
        return out.to(signals.device)
    rids, counts = torch.unique_consecutive(signals.rollout_ids.cpu()[order], return_counts=True)
    draws = []
    for rid, n in zip(rids.tolist(), counts.tolist()):
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_rollout_seed(seed, step, rid))
        draws.append(torch.rand(n, generator=gen, dtype=torch.float64))
    out[order] = torch.cat(draws)
    return out.to(signals.device)


def counts_to_keep(fraction: float, num_response: torch.Tensor, min_keep: int) -> torch.Tensor:
    """`[groups]` int64 floor(fraction * m), at least min(min_keep, m).

    `fraction` is read as the nearest fraction p/q with q <= 10^6 (0.29 -> 29/100, 1/3 ->
    1/3) and the floor is taken in integers, so 0.29 * 100 keeps 29, not float's 28.
    """
    frac = Fraction(repr(float(fraction))).limit_denominator(RHO_MAX_DENOMINATOR)
    k = (num_response * frac.numerator) // frac.denominator
    return torch.maximum(k, num_response.clamp(max=min_keep))


def rank_within_groups(
    group: torch.Tensor, key: torch.Tensor, secondary: torch.Tensor,
    rollout_ids: torch.Tensor, resp_index: torch.Tensor,
) -> torch.Tensor:
    """`[rows]` int64 rank of each row within its group in the module's total order."""
    order = torch.arange(group.numel(), device=group.device)
    # Stable sorts from the least to the most significant field give a lexicographic order.
    for field in (resp_index, rollout_ids, -secondary, -key, group):
        order = order[torch.sort(field[order], stable=True).indices]
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts
    sorted_group = group[order]
    pos = torch.arange(group.numel(), device=group.device) - starts[sorted_group]
    return torch.empty_like(pos).index_put((order,), pos)


def _rows(ranking: Ranking, signals: TokenSignals) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eligible token indices and their [key, secondary, rollout id, response index]."""
    rows = torch.nonzero(ranking.eligible & signals.response_mask, as_tuple=False).flatten()
    secondary = ranking.secondary
    if secondary is None:
        secondary = torch.zeros_like(ranking.key)
    fields = [ranking.key.double(), secondary.double(), signals.rollout_ids,
              response_index(signals)]
    return rows, [f[rows] for f in fields]


def keep_top(
    ranking: Ranking, signals: TokenSignals, group: torch.Tensor, min_keep: int
) -> torch.Tensor:
    """`[tokens]` bool: the top `counts_to_keep` eligible tokens of each group.

    `group` is `[tokens]` int64 in [0, groups): the counting unit of each token.
    """
    resp = signals.response_mask
    num_groups = int(group.max()) + 1 if group.numel() else 1
    m = torch.bincount(group[resp], minlength=num_groups)
    rows, fields = _rows(ranking, signals)
    n_eligible = torch.bincount(group[rows], minlength=num_groups)
    k = torch.minimum(counts_to_keep(ranking.fraction, m, min_keep), n_eligible)
    rank = rank_within_groups(group[rows], *fields)
    kept = torch.zeros(signals.num_tokens, dtype=torch.bool, device=signals.device)
    return kept.index_put((rows,), rank < k[group[rows]])


def _all_gather_rows(
    x: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> tuple[torch.Tensor, int]:
    """Gather `[n_r, c]` rows of every rank; also return where this rank's rows start."""
    local = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = all_gather_varlen(local, group)
    rank = group_rank(group)
    gathered = all_gather_varlen(x.reshape(-1), group).reshape(-1, x.shape[1])
    return gathered, int(sizes[:rank].sum())


def keep_top_global(
    rankings: Sequence[Ranking], parts: Sequence[TokenSignals],
    dp_group: Optional[dist.ProcessGroup], min_keep: int,
    groups: Optional[Sequence[torch.Tensor]] = None,
) -> list[torch.Tensor]:
    """Kept masks of this rank's micro-batches, counted over the global batch.

    Collectives on `dp_group`: the eligible tokens' (key, secondary) and (rollout id,
    response index) are all-gathered — `[eligible tokens]`-sized — and every rank ranks
    the same rows identically, then reads back its own slice.

    groups: per part, `[tokens]` int64 in [0, num_groups): count floor(rho x m_g) within
    each group of the global batch (`selection.budget_per_teacher`); None: one group. The
    number of groups is agreed over `dp_group` (a rank may hold no token of a group).
    """
    if groups is None:
        groups = [torch.zeros(p.num_tokens, dtype=torch.int64, device=p.device) for p in parts]
        num_groups = 1
    else:
        top = torch.tensor([max((int(g.max()) for g in groups if g.numel()), default=0)])
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            top = top.to(parts[0].device)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=dp_group)
        num_groups = int(top.item()) + 1
    local = [_rows(r, p) for r, p in zip(rankings, parts)]
    floats = torch.cat([torch.stack(f[:2], 1) for _, f in local])
    ints = torch.cat([torch.stack([g[rows], *f[2:]], 1) for (rows, f), g in zip(local, groups)])
    floats_all, offset = _all_gather_rows(floats, dp_group)
    ints_all, _ = _all_gather_rows(ints, dp_group)
    m_local = sum(torch.bincount(g[p.response_mask], minlength=num_groups)
                  for g, p in zip(groups, parts))
    m = all_reduce_sum(m_local.to(floats.device), dp_group)
    group_all = ints_all[:, 0]
    n_eligible = torch.bincount(group_all, minlength=num_groups).to(m.device)
    k = torch.minimum(counts_to_keep(rankings[0].fraction, m, min_keep), n_eligible)
    rank = rank_within_groups(group_all, *floats_all.unbind(1), *ints_all[:, 1:].unbind(1))
    mine = (rank < k[group_all])[offset: offset + floats.shape[0]]
    out, start = [], 0
    for (rows, _), p in zip(local, parts):
        kept = torch.zeros(p.num_tokens, dtype=torch.bool, device=p.device)
        out.append(kept.index_put((rows,), mine[start: start + rows.numel()]))
        start += rows.numel()
    return out
