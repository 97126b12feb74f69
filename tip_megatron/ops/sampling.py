"""Sampling from vocab-parallel logits without gathering the vocabulary.

Shapes: [rows, V/tp] = one rank's logit shard (one row per sequence being decoded);
[rows, w] = its true-vocab columns; [rows] = one sampled token per row.

Gumbel-max: token = argmax_v (logits_v / T + G_v) with G_v ~ Gumbel(0, 1) i.i.d. is an
exact draw from softmax(logits / T). G for (row, global vocab index) is a pure function
of (seed, step, row, index): a counter-based hash (murmur3-style, 32-bit arithmetic in
int64 tensors so it is identical on every device) of those four numbers gives two 32-bit
words -> a 52-bit uniform u in (0, 1) -> G = -log(-log u). The noise of a column does not
depend on which rank holds it, so TP = 1 and TP = 2 draw exactly the same tokens. Each
rank takes its local argmax, and one all-gather of [tp, rows, 4] (score, global index,
logit, kept mass) picks the winner; ties go to the lowest global index on every layout.

Truncation, applied before the draw (vLLM order: top-k, then top-p on the renormalized
top-k distribution); both keep ties at the threshold value:
- top-k: each rank's top-k scaled logits, all-gathered ([rows, tp * k]); the k-th largest
  of those is the global threshold.
- top-p with top-k: exact, on the gathered candidates (sorted, cumulative softmax).
- top-p alone: bisection on a logit threshold theta with one SUM all-reduce of [rows]
  masses per step (`TOP_P_BISECT_STEPS` steps, float64), keeping the smallest set
  {z >= theta} whose mass reaches top_p. The masses are sums, so TP layouts can differ
  only if a cutoff falls within float64 summation rounding of top_p.
Greedy when temperature == 0 (log-prob 0: the sampling distribution is a point mass).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from tip_megatron.ops._shard import (
    MAX,
    SUM,
    VocabShard,
    all_gather,
    all_reduce_,
    check_logits,
    chunk_tokens,
    local_max,
    token_chunks,
    vocab_shard,
)

#: Bisection steps of the top-p threshold (float64: the interval ends below any logit gap).
TOP_P_BISECT_STEPS = 64
#: The threshold search starts this far below the max: exp(-1000) is 0 in float64.
_TOP_P_SEARCH_SPAN = 1000.0

_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------
# Counter-based hash. The same functions run on python ints (the per-call key) and on
# int64 tensors holding values in [0, 2^32); every intermediate stays below 2^49, so no
# signed overflow and no dependence on how a device shifts negative numbers.
# ----------------------------------------------------------------------------------------
def _mul32(x: Any, c: int) -> Any:
    """(x * c) mod 2^32, splitting the constant into 16-bit halves to stay below 2^49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _rotl32(x: Any, r: int) -> Any:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _mix_word(h: Any, k: Any) -> Any:
    """One murmur3_32 block: absorb the 32-bit word k into the state h."""
    k = _mul32(_rotl32(_mul32(k, 0xCC9E2D51), 15), 0x1B873593)
    h = _rotl32(h ^ k, 13)
    return (_mul32(h, 5) + 0xE6546B64) & _MASK32


def _fmix32(h: Any) -> Any:
    """murmur3's finalizer: full avalanche of the 32-bit state."""
    h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
    return h ^ (h >> 16)


def _call_key(seed: int, step: int, stream: int) -> int:
    """32-bit key of (seed, step, stream): low 64 bits of seed and step are used."""
    h = stream
    for value in (seed, step):
        h = _mix_word(_mix_word(h, value & _MASK32), (value >> 32) & _MASK32)
    return h


def hash_u32(seed: int, step: int, stream: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[rows, cols] int64 in [0, 2^32): hash of (seed, step, stream, row, col); rows [r, 1],
    cols [1, c] int64 in [0, 2^32)."""
    h = _mix_word(_call_key(seed, step, stream), rows)
    return _fmix32(_mix_word(h, cols) ^ 16)


def gumbel_noise(seed: int, step: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[r, c] float64 Gumbel(0, 1) noise for global (row, col) pairs; a pure function."""
    high = hash_u32(seed, step, 0, rows, cols)
    low = hash_u32(seed, step, 1, rows, cols)
    # 52 random bits; (n + 0.5) / 2^52 lies strictly inside (0, 1) and is exact in
    # float64 (n + 0.5 < 2^52 needs 53 significant bits), so both logs stay finite.
    n = (high << 20) | (low >> 12)
    u = (n.to(torch.float64) + 0.5) * 2.0**-52
    return -torch.log(-torch.log(u))


# ----------------------------------------------------------------------------------------
# Truncation masks
# ----------------------------------------------------------------------------------------
def _top_k_candidates(z: torch.Tensor, top_k: int, tp_group: Any) -> torch.Tensor:
    """[rows, tp * k] descending-sorted union of every rank's local top-k (-inf padded)."""
    k_local = min(top_k, z.shape[-1])
    local = torch.full((z.shape[0], top_k), -math.inf, dtype=z.dtype, device=z.device)
    if k_local > 0:
        local[:, :k_local] = z.topk(k_local, dim=-1).values
    gathered = all_gather(local, tp_group)  # [tp, rows, k]: k * tp values per row, not V
    return gathered.permute(1, 0, 2).reshape(z.shape[0], -1).sort(dim=-1, descending=True).values


def _top_p_over_candidates(cands: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[rows] threshold: smallest prefix of the top-k candidates with mass >= top_p."""
    kept = cands[:, :top_k]
    probs = torch.softmax(kept, dim=-1)
    below = (probs.cumsum(dim=-1) < top_p).sum(dim=-1)  # candidates strictly before the cut
    index = below.clamp(max=top_k - 1)
    return kept.gather(1, index[:, None]).squeeze(1)


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


def _keep_threshold(z: torch.Tensor, z_max: torch.Tensor, top_k: int, top_p: float,
                    vocab_size: int, tp_group: Any) -> Optional[torch.Tensor]:
    """[rows] logit threshold of the kept set (keep z >= it), or None to keep everything."""
    if 0 < top_k < vocab_size:
        cands = _top_k_candidates(z, top_k, tp_group)
        if top_p < 1.0:
            return _top_p_over_candidates(cands, top_k, top_p)
        return cands[:, top_k - 1]
    if top_p < 1.0:
        return _top_p_bisect(z, z_max, top_p, tp_group)
    return None


# ----------------------------------------------------------------------------------------
# The draw
# ----------------------------------------------------------------------------------------
def _sample_rows(logits: torch.Tensor, first_row: int, shard: VocabShard, tp_group: Any,
                 temperature: float, top_k: int, top_p: float, seed: int, step: int) -> tuple:
    """(ids [r] int64, logprob [r] float64) for a chunk of rows `[r, w]`."""
    greedy = temperature == 0
    z = logits.to(torch.float64) if greedy else logits.to(torch.float64) / temperature
    z_max = all_reduce_(local_max(z), MAX, tp_group)
    score = z
    if not greedy:
        threshold = _keep_threshold(z, z_max, top_k, top_p, shard.vocab_size, tp_group)
        if threshold is not None:
            z = torch.where(z >= threshold[:, None], z, -math.inf)
        rows = torch.arange(first_row, first_row + z.shape[0], device=z.device)[:, None]
        cols = torch.arange(shard.start, shard.start + z.shape[1], device=z.device)[None, :]
        score = z + gumbel_noise(seed, step, rows, cols)
    return _pick_winner(score, z, z_max, shard, tp_group, greedy)


def _pick_winner(score: torch.Tensor, z: torch.Tensor, z_max: torch.Tensor,
                 shard: VocabShard, tp_group: Any, greedy: bool) -> tuple:
    """Global argmax of `score` via one all-gather of per-rank (score, id, z, kept mass)."""
    rows = score.shape[0]
    if score.shape[-1] == 0:  # all-padding shard: it can never win
        best = torch.full((rows,), -math.inf, dtype=score.dtype, device=score.device)
        arg = torch.zeros(rows, dtype=torch.long, device=score.device)
        z_best = best.clone()
    else:
        best, arg = score.max(dim=-1)  # first maximum on ties = lowest index
        z_best = z.gather(1, arg[:, None]).squeeze(1)
    kept_mass = (z - z_max[:, None]).exp().sum(dim=-1)  # dropped entries are -inf -> 0
    local = torch.stack([best, (arg + shard.start).to(score.dtype), z_best, kept_mass], dim=-1)
    gathered = all_gather(local, tp_group)  # [tp, rows, 4]; global ids < 2^53: exact
    winner = gathered[..., 0].argmax(dim=0)  # first max = lowest rank = lowest index
    picked = gathered.gather(0, winner[None, :, None].expand(1, rows, 4)).squeeze(0)
    ids = picked[:, 1].to(torch.long)
    if greedy:
        return ids, torch.zeros(rows, dtype=torch.float64, device=score.device)
    return ids, picked[:, 2] - z_max - gathered[..., 3].sum(dim=0).log()


def _check_sampling_args(temperature: float, top_k: int, top_p: float, seed: int, step: int) -> None:
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0 = greedy)")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 0 (0 = no top-k)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}: must be in (0, 1] (1 = no top-p)")
    for name, value in (("seed", seed), ("step", step)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: must be an int")


def vocab_parallel_sample(
    logits: torch.Tensor,
    *,
    tp_group: Any,
    vocab_size: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int,
    step: int = 0,
    chunk_size: Optional[int] = None,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(logits / temperature), truncated by top-k/top-p.

    Args:
        logits: [rows, V/tp] shard (any float dtype; the draw runs in float64).
        tp_group: the group the vocabulary is split over; None = unsharded.
        vocab_size: TRUE vocabulary size; padded columns are never drawn.
        temperature: > 0 samples, 0 = greedy (argmax, lowest id on ties).
        top_k: keep the k largest logits (0 = all); ties at the k-th value are kept.
        top_p: keep the smallest top set with probability >= top_p (1 = all).
        seed, step: the noise is a pure function of (seed, step, row, id). Use a new
            `step` (or seed) for every call that must draw fresh tokens, e.g. the
            decoding position; the same (seed, step) on the same logits repeats the draw.
        chunk_size: rows per chunk (default: a budget of float64 temporaries).
        row_offset: global index of row 0 in the noise key. Data-parallel replicas pass the
            index of their first row in the global batch, so a row draws the same noise
            whichever replica holds it (DP=2 samples what DP=1 samples).
    Returns:
        (ids [rows] int64 global token ids, logprob [rows] fp32 of each id under the
        truncated, temperature-scaled sampling distribution; 0 when greedy).
    """
    check_logits("logits", logits)
    _check_sampling_args(temperature, top_k, top_p, seed, step)
    if not isinstance(row_offset, int) or isinstance(row_offset, bool) or row_offset < 0:
        raise ValueError(f"row_offset={row_offset!r}: must be an integer >= 0")
    shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
    # float64 temporaries: half the rows of the fp32 budget (hence the doubled width).
    chunk = chunk_tokens(2 * shard.shard_width, chunk_size, logits.device)
    ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    logprob = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        valid = logits[:, : shard.valid_width]
        for sl in token_chunks(logits.shape[0], chunk):
            ids[sl], logprob[sl] = _sample_rows(
                valid[sl], row_offset + sl.start, shard, tp_group, temperature, top_k, top_p, seed, step
            )
    return ids, logprob
