"""Sampling from vocab-parallel logits without gathering the vocabulary.

Shapes: [rows, V/tp] = one rank's logit shard (one row per sequence being decoded);
[rows, w] = its true-vocab columns; [rows] = one sampled token per row; [rows, nb] = the
probability mass of each block of `BLOCK` consecutive vocabulary columns.

Inverse-CDF draw, one uniform per row: token = the first id whose cumulative mass exceeds
u * total. u for a row is a pure function of (seed, step, global row id, per-row counter)
(the decoding engine passes the row's identity and its new-token count): a counter-based
hash (murmur3-style, 32-bit arithmetic in int64 tensors, identical on every device;
ops/_counter_hash.py) gives two 32-bit words -> a 52-bit uniform in (0, 1). It is
computed once per row, not per logit (hashing every logit for Gumbel noise cost 60 ms
per step at 128 rows x 8192 ids on one CPU thread; this draw costs ~3 ms,
docs/generate.md). Layout independence: masses
exp(z - z_max) are summed per block of global columns (one block never straddles two TP
shards when the shard width is a multiple of the block, as megatron's padding makes it),
one all-gather of the block masses [tp, rows, nb] gives every rank the same global block
CDF, the rank owning the chosen block finds the token inside it, and one [rows, 2]
all-reduce shares (id, logit). TP = 1 and TP = 2 compute bitwise the same CDF, hence draw
the same tokens.

Truncation, applied before the draw (vLLM order: top-k, then top-p on the renormalized
top-k distribution; both keep ties at the threshold value): `ops/truncation.py`.
Greedy when temperature == 0 (log-prob 0: the sampling distribution is a point mass).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from tip_megatron.ops._counter_hash import (  # noqa: F401 - hash names stay importable here
    _call_key, _fmix32, _mix_word, hash_u32, uniform_rows,
)
from tip_megatron.ops.truncation import (  # noqa: F401 - the constants stay importable here
    TOP_P_BISECT_STEPS, TOP_P_CANDIDATES, keep_threshold,
)
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

#: Vocabulary columns per block of the inverse-CDF draw (megatron pads the vocabulary to a
#: multiple of 128 * tp, so a block never straddles two shards).
BLOCK = 128
#: float64 elements of one chunk of rows the truncated draw works on, on CPU (~32 MiB; the
#: untruncated draw takes all rows, `_sample_chunk`). A draw makes four passes over a
#: chunk plus ~20 small per-row ops, which smaller chunks pay once per chunk. One thread,
#: 128 rows, before the exp pass below (tools/bench_generate.py's decode step; the same
#: bits at every size): V 32,000: 16-row chunks (the loss's 2^20 fp32 budget) 17 ms a draw, 64
#: rows 11.8, 128 rows 11.2; V 151,936: 3 rows 82 ms, 13 rows 61, 27 rows 59, 55 rows 75,
#: 128 rows 115. Accelerators keep the shared budget (`chunk_tokens`).
SAMPLE_CHUNK_ELEMENTS_CPU = 1 << 22
#: float64 elements of the untruncated draw's exp pass at a time on CPU (512 KiB: the
#: buffer stays in a core's L2 while it is cast, shifted, exponentiated and summed). One
#: thread, 128 rows, the whole draw (tools/bench_sampling.py, docs/generate.md): V 32,000
#: 14.7 ms with the pass over all rows at once (memory-bound, ~8 GB/s here), 7.4 ms at
#: 2^16 elements; V 151,936 97.5 ms and 41.8 ms.
MASS_PASS_ELEMENTS_CPU = 1 << 16

# ----------------------------------------------------------------------------------------
# The draw
# ----------------------------------------------------------------------------------------
class SamplingBuffers:
    """Two reusable float64 [rows, shard width] buffers (the scaled logits and their exp)
    for `vocab_parallel_sample`. A decoding loop that passes the same object every step
    allocates nothing per step: on CPU a fresh multi-MiB tensor costs page faults that take
    about as long as the arithmetic on it (docs/generate.md, decode-step profile). They
    grow to the largest chunk seen; nothing in them outlives a call."""

    def __init__(self) -> None:
        self.flat: list[torch.Tensor] = []

    def take(self, rows: int, z_width: int, e_width: int, device: torch.device) -> tuple:
        """Contiguous [rows, z_width] and [rows, e_width] float64 views."""
        need = rows * max(z_width, e_width)
        if not self.flat or self.flat[0].numel() < need or self.flat[0].device != device:
            self.flat = [torch.empty(need, dtype=torch.float64, device=device) for _ in range(2)]
        z, e = self.flat
        return z[:rows * z_width].view(rows, z_width), e[:rows * e_width].view(rows, e_width)


def _sample_rows(logits: torch.Tensor, u: torch.Tensor, shard: VocabShard, tp_group: Any,
                 temperature: float, top_k: int, top_p: float, buffers: SamplingBuffers) -> tuple:
    """(ids [r] int64, logprob [r] float64) for a chunk of rows `[r, w]` and their uniforms [r]."""
    if temperature == 0:
        z = logits.to(torch.float64)
        return _argmax(z, shard, tp_group), torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    rows, width = logits.shape
    if not _truncates(top_k, top_p, shard) and width == shard.shard_width:
        return _sample_untruncated(logits, u, shard, tp_group, temperature, buffers)
    z, e_buf = buffers.take(rows, width, shard.shard_width, logits.device)
    z.copy_(logits)  # the float64 values .to(float64) gives
    if temperature != 1.0:  # x / 1 == x exactly: the common case skips a pass over [r, w]
        z.div_(temperature)
    z_max = all_reduce_(local_max(z), MAX, tp_group)
    threshold = keep_threshold(z, z_max, top_k, top_p, shard.vocab_size, tp_group)
    if threshold is not None:
        z = torch.where(z >= threshold[:, None], z, -math.inf)
    e, local = _block_masses(z, z_max, shard, e_buf)
    rows, nb, block = e.shape

    def block_values(local_block: torch.Tensor) -> torch.Tensor:  # [r] -> [r, block]
        return e.gather(1, local_block[:, None, None].expand(rows, 1, block)).squeeze(1)

    return _inverse_cdf(local, block, block_values, lambda col: z.gather(1, col[:, None]).squeeze(1),
                        width, z_max, u, shard, tp_group)


def _truncates(top_k: int, top_p: float, shard: VocabShard) -> bool:
    """Whether top-k or top-p removes any id from the sampling distribution."""
    return 0 < top_k < shard.vocab_size or top_p < 1.0


def _sample_untruncated(logits: torch.Tensor, u: torch.Tensor, shard: VocabShard, tp_group: Any,
                        temperature: float, buffers: SamplingBuffers) -> tuple:
    """The draw without truncation on a shard without padding columns, the same bits as the
    general path with one float64 pass fewer: no float64 copy of the shard. Its max is
    taken on the logits as they are (max commutes with the exact cast to float64 and with
    the correctly rounded division by a positive temperature: both are monotone), and
    exp(z - max) is computed in a buffer of `_mass_pass_rows` rows at a time, which only
    the block sums outlive: the chosen block's masses are computed again from its logits
    (the same elementwise ops on the same values: the same bits)."""
    rows, width = logits.shape
    z_max = logits.amax(dim=-1).to(torch.float64)
    if temperature != 1.0:
        z_max = z_max / temperature
    all_reduce_(z_max, MAX, tp_group)
    block = math.gcd(shard.shard_width, BLOCK)
    local = torch.empty(rows, width // block, dtype=torch.float64, device=logits.device)
    step = _mass_pass_rows(rows, width, logits.device)
    _, buf = buffers.take(step, 0, width, logits.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        e = _masses(logits[r0:r1], z_max[r0:r1], temperature, buf[: r1 - r0])
        torch.sum(e.view(r1 - r0, -1, block), dim=-1, out=local[r0:r1])

    def block_values(local_block: torch.Tensor) -> torch.Tensor:  # [r] -> [r, block]
        cols = local_block[:, None] * block + torch.arange(block, device=logits.device)
        return _masses(logits.gather(1, cols), z_max, temperature)

    def z_at(col: torch.Tensor) -> torch.Tensor:  # the scaled float64 logit at col [r]
        z = logits.gather(1, col[:, None]).squeeze(1).to(torch.float64)
        return z / temperature if temperature != 1.0 else z

    return _inverse_cdf(local, block, block_values, z_at, width, z_max, u, shard, tp_group)


def _masses(logits: torch.Tensor, z_max: torch.Tensor, temperature: float,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """exp(float64(logits) / temperature - z_max[:, None]) of [r, c] logits, into `out`.
    The exact cast, then float64 arithmetic in place: a mixed float32 - float64 op computes
    the same bits but takes TensorIterator's per-element cast path, 3-6x slower on CPU."""
    e = logits.to(torch.float64) if out is None else out.copy_(logits)
    if temperature != 1.0:  # x / 1 == x exactly: the common case skips a pass
        e.div_(temperature)
    return e.sub_(z_max[:, None]).exp_()


def _mass_pass_rows(rows: int, width: int, device: torch.device) -> int:
    """Rows of the draw's exp pass at a time: on CPU `MASS_PASS_ELEMENTS_CPU` float64
    elements (the buffer stays in a core's cache between its four passes); elsewhere all
    rows (one kernel per pass)."""
    if device.type != "cpu":
        return max(1, rows)
    return max(1, min(rows, MASS_PASS_ELEMENTS_CPU // max(1, width)))


def _block_masses(z: torch.Tensor, z_max: torch.Tensor, shard: VocabShard, out: torch.Tensor) -> tuple:
    """(e [r, nb, block] = exp(z - z_max), zero-padded to the shard width, written into
    `out` [r, shard width]; its block sums)."""
    rows, width = z.shape
    block = math.gcd(shard.shard_width, BLOCK)
    if width == shard.shard_width:  # no padding columns: subtract and exp in place
        e = torch.sub(z, z_max[:, None], out=out).exp_()
    else:  # the exp on a contiguous tensor, as the draw always computed it (same bits)
        e = out
        e[:, width:] = 0.0
        e[:, :width] = (z - z_max[:, None]).exp()
    e = e.view(rows, -1, block)
    return e, e.sum(dim=-1)


def _inverse_cdf(local: torch.Tensor, block: int, block_values, z_at, width: int, z_max: torch.Tensor,
                 u: torch.Tensor, shard: VocabShard, tp_group: Any) -> tuple:
    """The first global id whose cumulative mass exceeds u * total, and its log-prob.
    local [r, nb]: the block sums of exp(z - z_max) over this shard's blocks of `block`
    columns; block_values(local block [r]) -> [r, block] float64 exp(z - z_max) inside a
    block of this shard; z_at(col [r]) -> [r] float64 scaled logits at local columns;
    width: true-vocab columns."""
    rows, nb = local.shape
    device = local.device
    masses = all_gather(local, tp_group).permute(1, 0, 2).reshape(rows, -1)  # global block order
    cum = masses.cumsum(dim=-1)
    total = cum[:, -1]
    target = u * total
    index = torch.arange(masses.shape[1], device=device)
    last = torch.where(masses > 0, index, -1).amax(dim=-1)  # rounding never picks empty blocks
    chosen = torch.minimum(torch.searchsorted(cum, target[:, None], right=True).squeeze(1), last)
    before = torch.where(chosen > 0, cum.gather(1, (chosen - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    local_block = (chosen - shard.tp_rank * nb).clamp(0, nb - 1)
    values = block_values(local_block)  # [r, block]
    inside = ((before[:, None] + values.cumsum(dim=-1)) <= target[:, None]).sum(dim=-1)
    positive = torch.where(values > 0, torch.arange(block, device=device), -1).amax(dim=-1)
    # A rank that does not own the row's block reads a block of its own (maybe empty): clamp.
    col = local_block * block + torch.minimum(inside, positive).clamp(min=0)
    mine = (chosen // nb == shard.tp_rank) & (col < width)
    z_id = z_at(col.clamp(max=max(width - 1, 0))) if width else z_max
    picked = torch.stack([torch.where(mine, (col + shard.start).to(torch.float64), 0.0),
                          torch.where(mine, z_id, 0.0)], dim=-1)
    all_reduce_(picked, SUM, tp_group)  # exactly one rank owns each row's block
    return picked[:, 0].to(torch.long), picked[:, 1] - z_max - total.log()


def _argmax(z: torch.Tensor, shard: VocabShard, tp_group: Any) -> torch.Tensor:
    """Global argmax (lowest id on ties) via one all-gather of per-rank (max, id)."""
    rows = z.shape[0]
    if z.shape[-1] == 0:  # all-padding shard: it can never win
        best = torch.full((rows,), -math.inf, dtype=z.dtype, device=z.device)
        arg = torch.zeros(rows, dtype=torch.long, device=z.device)
    else:
        best, arg = z.max(dim=-1)  # first maximum on ties = lowest index
    local = torch.stack([best, (arg + shard.start).to(z.dtype)], dim=-1)
    gathered = all_gather(local, tp_group)  # [tp, rows, 2]; global ids < 2^53: exact
    winner = gathered[..., 0].argmax(dim=0)  # first max = lowest rank = lowest index
    return gathered[..., 1].gather(0, winner[None, :]).squeeze(0).to(torch.long)


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
    row_ids: Optional[torch.Tensor] = None,
    counters: Optional[torch.Tensor] = None,
    buffers: Optional[SamplingBuffers] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(logits / temperature), truncated by top-k/top-p.

    Args:
        logits: [rows, V/tp] shard (any float dtype; the draw runs in float64).
        tp_group: the group the vocabulary is split over; None = unsharded.
        vocab_size: TRUE vocabulary size; padded columns are never drawn.
        temperature: > 0 samples, 0 = greedy (argmax, lowest id on ties).
        top_k: keep the k largest logits (0 = all); ties at the k-th value are kept.
        top_p: keep the smallest top set with probability >= top_p (1 = all).
        seed, step: the draw is a pure function of (seed, step, row id, counter) and the
            logits. Use a new `step`, seed or counter for every call that must draw fresh
            tokens; the same key on the same logits repeats the draw.
        chunk_size: rows per chunk (default: a budget of float64 temporaries).
        row_offset: global index of row 0 in the noise key. Data-parallel replicas pass the
            index of their first row in the global batch, so a row draws the same noise
            whichever replica holds it (DP=2 samples what DP=1 samples).
        row_ids: [rows] int64 global row ids in [0, 2^32) (default row_offset + 0..rows-1):
            a decoding engine that reorders or compacts its batch passes each row's identity.
        counters: [rows] int64 in [0, 2^32) per-row counters (default 0), e.g. the row's
            number of generated tokens.
        buffers: float64 work buffers to reuse (a decoding loop passes one object every
            step); default: fresh ones for this call. The draw does not depend on them.
    Returns:
        (ids [rows] int64 global token ids, logprob [rows] fp32 of each id under the
        truncated, temperature-scaled sampling distribution; 0 when greedy).
    """
    check_logits("logits", logits)
    _check_sampling_args(temperature, top_k, top_p, seed, step)
    if not isinstance(row_offset, int) or isinstance(row_offset, bool) or row_offset < 0:
        raise ValueError(f"row_offset={row_offset!r}: must be an integer >= 0")
    shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
    rows, counters = _row_keys(logits, row_offset, row_ids, counters)
    # The same on every TP rank (each chunk is a collective): no padding column anywhere.
    untruncated = temperature > 0 and not _truncates(top_k, top_p, shard) \
        and shard.vocab_size == shard.shard_width * shard.tp_size
    chunk = _sample_chunk(shard.shard_width, chunk_size, logits.device,
                          rows=logits.shape[0] if untruncated else 0)
    ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    logprob = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    buffers = buffers if buffers is not None else SamplingBuffers()
    with torch.no_grad():
        valid = logits[:, : shard.valid_width]
        # One hash over all rows (elementwise: the same uniforms as per chunk, fewer small ops).
        u = uniform_rows(seed, step, rows, counters) if temperature > 0 else None
        for sl in token_chunks(logits.shape[0], chunk):
            ids[sl], logprob[sl] = _sample_rows(
                valid[sl], None if u is None else u[sl], shard, tp_group, temperature, top_k, top_p, buffers)
    return ids, logprob


def _sample_chunk(shard_width: int, chunk_size: Optional[int], device: torch.device,
                  rows: int = 0) -> int:
    """Rows per chunk of the draw: `chunk_size` when given; on CPU all `rows` when given
    (the untruncated draw: its float64 work is in the exp pass's own small buffer, and
    its per-row small ops run once) or `SAMPLE_CHUNK_ELEMENTS_CPU` float64 elements;
    elsewhere half the rows of the shared fp32 budget (float64: twice the bytes)."""
    if chunk_size is None and device.type == "cpu":
        if rows:
            return rows
        return max(1, SAMPLE_CHUNK_ELEMENTS_CPU // max(1, shard_width))
    return chunk_tokens(2 * shard_width, chunk_size, device)


def _row_keys(logits: torch.Tensor, row_offset: int, row_ids: Optional[torch.Tensor],
              counters: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n, device = logits.shape[0], logits.device
    rows = torch.arange(row_offset, row_offset + n, device=device) if row_ids is None else row_ids
    counters = torch.zeros(n, dtype=torch.long, device=device) if counters is None else counters
    for name, value in (("row_ids", rows), ("counters", counters)):
        if value.shape != (n,) or value.dtype != torch.long:
            raise ValueError(f"{name}: must be a [{n}] int64 tensor, got {tuple(value.shape)} {value.dtype}")
    if n and (rows.min() < 0 or rows.max() >= 2**32 or counters.min() < 0 or counters.max() >= 2**32):
        raise ValueError("row_ids and counters must lie in [0, 2**32)")
    return rows, counters


def vocab_parallel_logprob(logits: torch.Tensor, ids: torch.Tensor, *, tp_group: Any, vocab_size: int,
                           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[rows] float64 log-prob of `ids` [rows] under the distribution `vocab_parallel_sample`
    draws from (temperature, top-k, top-p; 0 when greedy, -inf for a truncated id): the
    same thresholds on other logits, e.g. a training forward's, to measure how far the
    sampling engine's log-probs are from the trainer's."""
    check_logits("logits", logits)
    _check_sampling_args(temperature, top_k, top_p, 0, 0)
    shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
    out = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    if temperature == 0:
        return out
    with torch.no_grad():
        z = logits[:, : shard.valid_width].to(torch.float64) / temperature
        z_max = all_reduce_(local_max(z), MAX, tp_group)
        threshold = keep_threshold(z, z_max, top_k, top_p, shard.vocab_size, tp_group)
        if threshold is not None:
            z = torch.where(z >= threshold[:, None], z, -math.inf)
        total = all_reduce_((z - z_max[:, None]).exp().sum(dim=-1), SUM, tp_group)
        local = ids - shard.start
        mine = (local >= 0) & (local < z.shape[1])
        z_id = z.gather(1, local.clamp(0, max(z.shape[1] - 1, 0))[:, None]).squeeze(1) if z.shape[1] else out
        z_id = all_reduce_(torch.where(mine, z_id, 0.0), SUM, tp_group)
        return z_id - z_max - total.log()
