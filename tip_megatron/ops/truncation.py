"""Truncation before the draw: the logit threshold of the kept set under top-k and top-p,
over vocab-parallel logit shards (scaled float64 logits z [rows, w] of this rank, their
global max z_max [rows]). Used by `ops.sampling` (the draw, `vocab_parallel_logprob`).

- top-k: each rank's top-k scaled logits, all-gathered ([rows, tp * k]); the k-th largest
  of those is the global threshold.
- top-p with top-k: exact, over the whole top-k set (ties at the k-th value included, as
  HF and vLLM keep them): the gathered candidates above the k-th value plus the ties'
  mass, counted on the shards (one SUM all-reduce of an integer count).
- top-p alone: every rank's `TOP_P_CANDIDATES` largest logits and its mass, one
  all-gather; the threshold found on the merged candidates is exact when it is not below
  any rank's last candidate. Otherwise (flat distributions) bisection on a logit threshold
  with one SUM all-reduce of [rows] per step (`TOP_P_BISECT_STEPS`, float64).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from tip_megatron.ops._shard import SUM, all_gather, all_reduce_

#: Bisection steps of the top-p threshold (float64: the interval ends below any logit gap).
TOP_P_BISECT_STEPS = 64
#: Largest logits each rank contributes to the merged top-p candidates.
TOP_P_CANDIDATES = 64
#: The threshold search starts this far below the max: exp(-1000) is 0 in float64.
_TOP_P_SEARCH_SPAN = 1000.0


def _top_k_candidates(z: torch.Tensor, top_k: int, tp_group: Any) -> torch.Tensor:
    """[rows, tp * k] descending-sorted union of every rank's local top-k (-inf padded)."""
    k_local = min(top_k, z.shape[-1])
    local = torch.full((z.shape[0], top_k), -math.inf, dtype=z.dtype, device=z.device)
    if k_local > 0:
        local[:, :k_local] = z.topk(k_local, dim=-1).values
    gathered = all_gather(local, tp_group)  # [tp, rows, k]: k * tp values per row, not V
    return gathered.permute(1, 0, 2).reshape(z.shape[0], -1).sort(dim=-1, descending=True).values


def _top_p_over_candidates(z: torch.Tensor, z_max: torch.Tensor, cands: torch.Tensor,
                           top_k: int, top_p: float, tp_group: Any) -> torch.Tensor:
    """[rows] threshold: smallest descending prefix of the top-k set with mass >= top_p of it.

    The top-k set is every logit >= the k-th value, ties included (HF's `TopKLogitsWarper`,
    vLLM): it can hold more than k logits. The gathered candidates hold every logit above
    the k-th value (fewer than k of them exist) but maybe not every tie AT it (each rank
    sent only its k largest), so the ties are counted on the shards: one SUM all-reduce of
    an exact integer count, so every layout computes bitwise the same mass.
    """
    kth = cands[:, top_k - 1]
    ties = all_reduce_((z == kth[:, None]).sum(dim=-1).to(z.dtype), SUM, tp_group)
    above = cands > kth[:, None]  # a descending prefix of the sorted candidates
    cum = torch.where(above, (cands - z_max[:, None]).exp(), 0.0).cumsum(dim=-1)
    total = cum[:, -1] + ties * (kth - z_max).exp()
    # Candidates above the k-th value strictly before the cut; none reaching top_p: the
    # cut falls among the ties, which are kept together.
    index = ((cum < top_p * total[:, None]) & above).sum(dim=-1)
    crossing = cands.gather(1, index.clamp(max=cands.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(index < above.sum(dim=-1), crossing, kth)


def _top_p_bisect(z: torch.Tensor, z_max: torch.Tensor, top_p: float, tp_group: Any) -> torch.Tensor:
    """[rows] largest theta with mass(z >= theta) >= top_p * total, by bisection.

    Invariant: mass(lo) >= target > mass(hi). Every rank sees the same all-reduced masses
    and maxima, so all ranks take the same branches and run the same collectives.
    """
    e = (z - z_max[:, None]).exp()
    target = all_reduce_(e.sum(dim=-1), SUM, tp_group) * top_p
    lo, hi = z_max - _TOP_P_SEARCH_SPAN, z_max + 1.0
    for _ in range(TOP_P_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        mass = all_reduce_(torch.where(z >= mid[:, None], e, 0.0).sum(dim=-1), SUM, tp_group)
        ok = mass >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


def _top_p_shard_candidates(z: torch.Tensor, z_max: torch.Tensor, top_p: float,
                            tp_group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows] threshold, [rows] exact) from every rank's TOP_P_CANDIDATES largest logits.

    The merged candidates are the true global top list down to `cutoff` (the largest of
    the ranks' last candidates): a threshold at or above it is exact. One all-gather.
    """
    rows, width = z.shape
    count = min(TOP_P_CANDIDATES, width)
    pack = torch.full((rows, TOP_P_CANDIDATES + 2), -math.inf, dtype=z.dtype, device=z.device)
    if count:
        pack[:, :count] = z.topk(count, dim=-1).values
        if count < width:  # a rank that sent all its values has no cutoff (-inf)
            pack[:, TOP_P_CANDIDATES + 1] = pack[:, count - 1]
    pack[:, TOP_P_CANDIDATES] = (z - z_max[:, None]).exp().sum(dim=-1)
    gathered = all_gather(pack, tp_group)  # [tp, rows, C + 2]
    total = gathered[..., TOP_P_CANDIDATES].sum(dim=0)
    cutoff = gathered[..., TOP_P_CANDIDATES + 1].amax(dim=0)
    cands = gathered[..., :TOP_P_CANDIDATES].permute(1, 0, 2).reshape(rows, -1)
    cands = cands.sort(dim=-1, descending=True).values
    mass = (cands - z_max[:, None]).exp().cumsum(dim=-1)
    index = (mass < top_p * total[:, None]).sum(dim=-1)  # first candidate reaching top_p
    covered = index < cands.shape[1]
    theta = cands.gather(1, index.clamp(max=cands.shape[1] - 1)[:, None]).squeeze(1)
    return theta, covered & (theta >= cutoff)


def keep_threshold(z: torch.Tensor, z_max: torch.Tensor, top_k: int, top_p: float,
                   vocab_size: int, tp_group: Any) -> Optional[torch.Tensor]:
    """[rows] logit threshold of the kept set (keep z >= it), or None to keep everything."""
    if 0 < top_k < vocab_size:
        cands = _top_k_candidates(z, top_k, tp_group)
        if top_p < 1.0:
            return _top_p_over_candidates(z, z_max, cands, top_k, top_p, tp_group)
        return cands[:, top_k - 1]
    if top_p < 1.0:
        theta, exact = _top_p_shard_candidates(z, z_max, top_p, tp_group)
        if not bool(exact.all()):  # the same on every rank: the gathered values are
            theta = torch.where(exact, theta, _top_p_bisect(z, z_max, top_p, tp_group))
        return theta
    return None
