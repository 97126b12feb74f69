"""A KV cache hooked into megatron's attention at the core-attention seam.

Shapes: query [sq, b, np, hn] (np = heads / tp), key/value [sq, b, ng, hn] (ng = query
groups / tp), cache buffers [b, ng, max_len, hn], attention mask [b, 1, sq, sk] bool
(True = may attend), context [sq, b, np * hn].

Why here, and not megatron's `StaticInferenceContext`:
- megatron's static context rotates queries/keys by the cache column, the same for every
  row, so prompts of different lengths need either a per-row padding mask (which TE's
  fused attention ignores once the context switches to `no_mask` decoding) or megatron's
  "decode every prompt token after the shortest prompt one at a time" scheme.
- megatron's `Attention.forward` hands `core_attention` the query and the already-rotated
  keys/values of the new tokens only. Replacing `core_attention` (and nothing else) with
  `CachedCoreAttention` keeps megatron's own QKV projection, q/k norms, RoPE, output
  projection and TP collectives, and lets us own exactly three things: where keys/values
  are stored, the per-row mask, and the attention kernel (torch SDPA: the math kernel on
  CPU, flash/memory-efficient kernels on GPU). RoPE positions come in per row through the
  `rotary_pos_emb` argument of `TransformerBlock.forward` ([s, b, 1, d] broadcasts the
  same way megatron's [s, 1, 1, d] does), so left padding keeps HF's position ids. The
  functional layers of `rollout/decode.py` call the same swapped module.
The swap is scoped: `install(chunks, cache)` puts the cached modules in and restores the
originals on exit, so training never sees them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from tip_megatron.models.state import unwrap


@dataclass
class KVCache:
    """Key/value buffers of this rank's layers, and the step they are working on.

    `enabled=False` turns it into "no cache": each forward attends over the keys of its own
    tokens only (the caller passes the whole sequence every step). Used as the reference
    of the cached path and by the benchmark.
    """

    max_len: int
    """Columns of each buffer: longest prompt + max new tokens."""
    enabled: bool = True
    start: int = 0
    """Cache column of the first token of the current forward."""
    allowed: Optional[torch.Tensor] = None
    """[b, 1, sq, start + sq] bool: which keys each query may attend to (`set_window`)."""
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _bias: Optional[torch.Tensor] = None

    def set_window(self, start: int, allowed: torch.Tensor) -> None:
        """The next forward writes columns [start, start + sq) and attends as `allowed` says."""
        self.start, self.allowed, self._bias = start, allowed, None

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`allowed` as an additive mask (0 / -inf), built once per forward for all layers:
        SDPA would otherwise convert the boolean mask in every layer."""
        if self._bias is None or self._bias.dtype != dtype:
            bias = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            self._bias = bias.masked_fill_(~self.allowed, float("-inf"))
        return self._bias

    def repeat_rows(self, repeats: int) -> None:
        """Row i becomes rows i*repeats .. i*repeats+repeats-1 (prefill once, sample n)."""
        if repeats == 1:
            return
        self.buffers = {
            key: (k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0))
            for key, (k, v) in self.buffers.items()
        }

    def update(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `slot`'s new keys/values [b, ng, sq, hn]; return the [b, ng, sk, hn]
        keys/values to attend over: cached ones plus the new ones."""
        if not self.enabled:
            return k, v
        end = self.start + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache of {self.max_len} columns cannot hold column {end - 1}")
        if slot not in self.buffers:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.buffers[slot] = (k.new_empty(shape), v.new_empty(shape))
        k_buf, v_buf = self.buffers[slot]
        k_buf[:, :, self.start:end] = k
        v_buf[:, :, self.start:end] = v
        return k_buf[:, :, :end], v_buf[:, :, :end]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.buffers.values() for t in kv)

    def clear(self) -> None:
        self.buffers.clear()
        self.set_window(0, None)


@dataclass
class SlotCache:
    """Key/value buffers of `capacity` row slots for the dynamic engine (rollout/batching.py).

    Each row keeps its own tokens from column 0 (position = column, right padding), so rows
    of different lengths and admission times share one buffer. A forward works on the
    contiguous slots [row_start, row_start + b): a prefill writes columns [0, sq) of every
    row, a decode step writes column `columns[r]` of row r (sq = 1). Finished rows leave by
    `move_rows` (the engine moves live rows from the tail into the holes, so the batch stays
    a contiguous prefix of the buffer and attention costs follow the live rows).
    """

    capacity: int
    max_len: int
    row_start: int = 0
    columns: Optional[torch.Tensor] = None
    """[b] int64 first column each row writes (a decode step: its one column; an
    extension: its first new column); None = prefill from column 0."""
    rows: Optional[torch.Tensor] = None
    """[b] int64 slots of an extension (multi-turn observations: any slots, not a
    contiguous range); None = the contiguous slots from `row_start`."""
    valid: Optional[torch.Tensor] = None
    """[b, sq] bool: the extension's real (not padding) tokens, the only ones stored."""
    num_keys: int = 0
    """Columns attended over in this forward: [0, num_keys)."""
    allowed: Optional[torch.Tensor] = None
    segments: Optional[list[Segment]] = None
    """A decode step's rows in contiguous runs, each attending over its own longest row's
    keys only (`key_segments`); None = every row over `num_keys` columns."""
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _bias: Optional[torch.Tensor] = None
    _index: Optional[torch.Tensor] = None

    def set_window(self, row_start: int, columns: Optional[torch.Tensor], num_keys: int,
                   allowed: torch.Tensor, rows: Optional[torch.Tensor] = None,
                   valid: Optional[torch.Tensor] = None,
                   segments: Optional[list[Segment]] = None) -> None:
        self.row_start, self.columns, self.num_keys = row_start, columns, num_keys
        self.allowed, self._bias, self.rows, self.valid = allowed, None, rows, valid
        self.segments, self._index = segments, None

    attention_bias = KVCache.attention_bias

    def update(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `slot`'s new keys/values [b, ng, sq, hn]; return [b, ng, num_keys, hn]."""
        b, sq = k.shape[0], k.shape[2]
        if slot not in self.buffers:
            # Zeros, not empty: a row attends over columns other rows have filled, masked to
            # -inf; an uninitialised NaN there would still poison its softmax (NaN * 0).
            shape = (self.capacity, k.shape[1], self.max_len, k.shape[3])
            self.buffers[slot] = (k.new_zeros(shape), v.new_zeros(shape))
        k_buf, v_buf = self.buffers[slot]
        if self.rows is not None:  # an extension: sq new columns per row from `columns`
            cols = self.columns[:, None] + torch.arange(sq, device=k.device)[None, :]
            index = self.rows[:, None].expand(b, sq)
            # Only the real tokens: a padding column may lie beyond the buffer.
            k_buf[index[self.valid], :, cols[self.valid]] = k.permute(0, 2, 1, 3)[self.valid]
            v_buf[index[self.valid], :, cols[self.valid]] = v.permute(0, 2, 1, 3)[self.valid]
            return k_buf[self.rows, :, :self.num_keys], v_buf[self.rows, :, :self.num_keys]
        rows = slice(self.row_start, self.row_start + b)
        if self.columns is None:
            k_buf[rows, :, :sq], v_buf[rows, :, :sq] = k, v
        else:  # one new column per row, each at its own position
            index = self._decode_index(k_buf)
            hn = k.shape[3]
            k_buf.view(-1, hn).index_copy_(0, index, k[:, :, 0].reshape(-1, hn))
            v_buf.view(-1, hn).index_copy_(0, index, v[:, :, 0].reshape(-1, hn))
        return k_buf[rows, :, :self.num_keys], v_buf[rows, :, :self.num_keys]

    def _decode_index(self, buf: torch.Tensor) -> torch.Tensor:
        """[b * ng] flat positions of a decode step's (row, group) key vectors in a buffer
        viewed as [capacity * ng * max_len, hn]; the same for every layer, so computed once
        per window. One `index_copy_` of whole rows writes them (about half the time of
        the advanced-index write `buf[rows, :, columns] = k` on CPU)."""
        if self._index is None:
            ng = buf.shape[1]
            b = self.columns.shape[0]
            slots = torch.arange(self.row_start, self.row_start + b, device=buf.device)
            groups = torch.arange(ng, device=buf.device)
            self._index = ((slots[:, None] * ng + groups[None, :]) * self.max_len
                           + self.columns[:, None]).reshape(-1)
        return self._index

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, num_cols: int) -> None:
        """Copy columns [0, num_cols) of rows `src` into rows `dst` in every layer (the
        right-hand side is gathered first, so `src` and `dst` may overlap)."""
        for k_buf, v_buf in self.buffers.values():
            k_buf[dst, :, :num_cols] = k_buf[src, :, :num_cols]
            v_buf[dst, :, :num_cols] = v_buf[src, :, :num_cols]

    num_bytes = KVCache.num_bytes

    def column_bytes(self) -> int:
        """Bytes of one row's keys and values at one column of one layer (0 before the
        first forward allocates the buffers)."""
        if not self.buffers:
            return 0
        k_buf, _ = next(iter(self.buffers.values()))
        return 2 * k_buf.shape[1] * k_buf.shape[3] * k_buf.element_size()

    def clear(self) -> None:
        self.buffers.clear()
        self.allowed, self._bias, self.columns, self.rows, self.valid = None, None, None, None, None
        self.segments, self._index = None, None


@dataclass(frozen=True)
class Segment:
    """Rows [lo, hi) of a decode step attend over keys [0, num_keys); `full`: every one of
    them sees all of those keys (no mask needed)."""

    lo: int
    hi: int
    num_keys: int
    full: bool


#: What one more attention call costs, in bytes of keys and values it could have skipped
#: reading instead: a run of rows is attended on its own only when that skips more. CPU:
#: measured (2-core VM, torch 2.13: ~25 us per SDPA call, keys and values read at ~8 GB/s).
#: CUDA: an estimate, not measured (a ~10 us launch at ~2 TB/s).
SEGMENT_CALL_BYTES = {"cpu": 200 * 1024, "cuda": 20 * 1024 * 1024}


def segment_call_cost(device: torch.device, column_bytes: int) -> int:
    """One more attention call's cost in row x key-column units, for keys and values of
    `column_bytes` per row and column (one layer: 2 * groups * head dim * element size)."""
    per_call = SEGMENT_CALL_BYTES.get(torch.device(device).type, SEGMENT_CALL_BYTES["cuda"])
    return max(per_call // max(column_bytes, 1), 1)


def key_segments(columns: Sequence[int], call_cost: int) -> list[Segment]:
    """Split a decode step's rows (each feeding the token at cache column `columns[r]`, so
    attending over columns [0, columns[r]]) into contiguous runs that each attend over
    their own longest row's keys, instead of every row over the longest row's.

    Greedy, in row order: a run of equal columns joins the segment before it when the
    row-columns that adds (to the run, or to the segment) cost less than one more call
    (`segment_call_cost`). The masked columns a row skips this way contribute exactly zero
    to its softmax either way; what can change is the rounding of sums over another number
    of columns, as with any other batch shape (docs/generate.md, "Consequences").
    """
    out: list[list[int]] = []  # [lo, hi, max column, min column]
    i, n = 0, len(columns)
    while i < n:
        j = i + 1
        while j < n and columns[j] == columns[i]:
            j += 1
        col = columns[i]
        if out:
            lo, hi, top, low = out[-1]
            extra = (j - i) * (top - col) if col <= top else (hi - lo) * (col - top)
            if extra < call_cost:
                out[-1] = [lo, j, max(top, col), min(low, col)]
                i = j
                continue
        out.append([i, j, col, col])
        i = j
    return [Segment(lo, hi, top + 1, low == top) for lo, hi, top, low in out]


class CachedCoreAttention(torch.nn.Module):
    """Drop-in for megatron's `core_attention` (DotProductAttention / TEDotProductAttention)
    during generation: stores the new keys/values, attends over the cached ones."""

    def __init__(self, cache, slot: int, softmax_scale: float, num_heads: int,
                 num_groups: int):
        super().__init__()
        self.cache = cache
        self.slot = slot
        self.softmax_scale = softmax_scale
        self.gqa = num_heads != num_groups

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        # megatron's mask and mask type are ignored on purpose: the per-row mask of this
        # step is `cache.allowed`, built by the generation loop.
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("generation does not support attention bias or packed sequences")
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k, v = self.cache.update(self.slot, key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3))
        allowed = self.cache.allowed
        if allowed is None or allowed.shape[-1] != k.shape[2] or allowed.shape[-2] != q.shape[2]:
            raise RuntimeError(
                f"KV cache mask {None if allowed is None else tuple(allowed.shape)} does not "
                f"match queries {q.shape[2]} x keys {k.shape[2]}"
            )
        # Every row sees at least itself (see the mask's builder), so no all -inf row.
        segments = getattr(self.cache, "segments", None)
        if segments:  # a decode step: each run of rows over its own keys
            ctx = torch.cat([self._attend(q, k, v, s) for s in segments])
        else:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.cache.attention_bias(q.dtype), scale=self.softmax_scale,
                enable_gqa=self.gqa,
            )
        sq, b = query.shape[0], query.shape[1]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _attend(self, q, k, v, s: Segment) -> torch.Tensor:
        """Rows [s.lo, s.hi) of a decode step (one query each) over keys [0, s.num_keys):
        no mask when all of them are allowed (adding a zero bias changes no bit). With GQA
        the heads of a group are that group's query rows ([b, ng, np / ng, hn]): one pass
        over each group's keys for all its heads (SDPA's `enable_gqa` makes one per head;
        this is ~17% faster on CPU at 2 heads a group, the same up to rounding)."""
        rows = slice(s.lo, s.hi)
        mask = None if s.full else self.cache.attention_bias(q.dtype)[rows, ..., :s.num_keys]
        k, v = k[rows, :, :s.num_keys], v[rows, :, :s.num_keys]
        b, heads, _, hn = q[rows].shape
        folded = q[rows].reshape(b, k.shape[1], heads // k.shape[1], hn)
        ctx = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=self.softmax_scale)
        return ctx.reshape(b, heads, 1, hn)


def _softmax_scale(core: torch.nn.Module, config) -> float:
    """The scale megatron's core attention would apply to q.k (its own, if it kept one)."""
    scale = getattr(core, "softmax_scale", None)
    if scale is None:
        scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
    if getattr(core, "apply_query_key_layer_scaling", False) or config.apply_query_key_layer_scaling:
        raise ValueError("generation does not support apply_query_key_layer_scaling")
    return float(scale)


def _attention_modules(chunks: Sequence[torch.nn.Module]) -> Iterator[torch.nn.Module]:
    for chunk in map(unwrap, chunks):
        for layer in chunk.decoder.layers:
            attention = getattr(layer, "self_attention", None)
            if attention is None or not hasattr(attention, "core_attention"):
                raise ValueError(f"layer {layer.layer_number} has no self_attention.core_attention; "
                                 "generation supports the GPT attention layers only")
            yield attention


@contextlib.contextmanager
def install(chunks: Sequence[torch.nn.Module], cache) -> Iterator:
    """Swap every layer's core attention for a `CachedCoreAttention` sharing `cache` (a
    `KVCache` or a `SlotCache`);
    restore the originals on exit (also on error)."""
    swapped = []
    try:
        for slot, attention in enumerate(_attention_modules(chunks)):
            config = attention.config
            if getattr(config, "apply_rope_fusion", False):
                # The fused RoPE kernel takes [s, 1, 1, d] frequencies; ours are per row.
                raise ValueError("generation needs apply_rope_fusion=False (per-row RoPE positions)")
            core = attention.core_attention
            tp = attention.num_attention_heads_per_partition
            groups = attention.num_query_groups_per_partition
            attention.core_attention = CachedCoreAttention(
                cache, slot, _softmax_scale(core, config), tp, groups
            )
            swapped.append((attention, core))
        yield cache
    finally:
        for attention, core in swapped:
            attention.core_attention = core
        cache.clear()
