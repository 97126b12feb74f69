"""The sampler's counter-based hash (ops/sampling.py): a pure function of (seed, step,
stream, row, counter) -> 32-bit words and one uniform per row.

murmur3-style mixing in 32-bit arithmetic on int64 tensors (and on python ints for the
per-call key), identical on every device. Shapes: rows / counters [r] int64 in [0, 2^32).
"""
from __future__ import annotations

from typing import Any

import torch

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


def uniform_rows(seed: int, step: int, rows: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """[r] float64 uniforms in (0, 1) for global row ids and per-row counters [r] int64 in
    [0, 2^32); a pure function of (seed, step, row, counter)."""
    high = hash_u32(seed, step, 0, rows, counters)
    low = hash_u32(seed, step, 1, rows, counters)
    # 52 random bits; (n + 0.5) / 2^52 lies strictly inside (0, 1) and is exact in float64.
    n = (high << 20) | (low >> 12)
    return (n.to(torch.float64) + 0.5) * 2.0**-52
