"""Synthetic per-rollout signals and micro-batch packing, for tests and demos of selection.

Shapes: a `Rollout` holds `[response tokens]` float64 arrays; `pack` returns `[tokens]`.
Entropies are skewed towards 0 like a distilled student's (most tokens near-deterministic).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from tip_megatron.tip.signals import TokenSignals


@dataclass(frozen=True)
class Rollout:
    rollout_id: int
    num_prompt: int
    entropy_norm: np.ndarray
    reverse_kl: np.ndarray
    forward_kl: np.ndarray

    @property
    def num_response(self) -> int:
        return int(self.entropy_norm.size)


def synthetic_rollouts(
    seed: int, num_rollouts: int, max_response: int = 12, max_prompt: int = 3,
    first_id: int = 0,
) -> list[Rollout]:
    """Rollouts with 1..max_prompt prompt tokens and 0..max_response response tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_rollouts):
        m = int(rng.integers(0, max_response + 1))
        h = rng.random(m) ** 4
        d = rng.exponential(0.5, m)
        out.append(Rollout(first_id + i, int(rng.integers(1, max_prompt + 1)), h, d,
                           rng.exponential(0.5, m)))
    return out


def pack(rollouts: Sequence[Rollout], pad_to: Optional[int] = None, seed: int = 0) -> TokenSignals:
    """Flatten rollouts into one micro-batch: [prompt | response | padding] per rollout.

    Prompt and padding tokens get large random signal values (they must never matter).
    `pad_to` pads every sequence to that length (default: the longest in the micro-batch).
    """
    rng = np.random.default_rng(seed)
    lengths = [r.num_prompt + r.num_response for r in rollouts]
    width = max(lengths, default=0) if pad_to is None else pad_to
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("h", "d", "f", "mask", "rid", *_OPTIONAL)}
    for r, n in zip(rollouts, lengths):
        pad = width - n
        for key, values in (("h", r.entropy_norm), ("d", r.reverse_kl), ("f", r.forward_kl),
                            *zip(_OPTIONAL, _optional_signals(r))):
            j = rng.random(r.num_prompt + pad) * 50.0
            cols[key].append(np.concatenate([j[: r.num_prompt], values, j[r.num_prompt:]]))
        cols["mask"].append(np.r_[np.zeros(r.num_prompt, bool), np.ones(r.num_response, bool),
                                  np.zeros(pad, bool)])
        cols["rid"].append(np.full(width, r.rollout_id, np.int64))
    def cat(key: str, dtype: type) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(cols[key]) if cols[key] else np.zeros(0, dtype))

    return TokenSignals(
        entropy_norm=cat("h", np.float64), reverse_kl=cat("d", np.float64),
        forward_kl=cat("f", np.float64), response_mask=cat("mask", bool),
        rollout_ids=cat("rid", np.int64), **{k: cat(k, np.float64) for k in _OPTIONAL},
    )


_OPTIONAL = ("teacher_entropy", "teachability", "teacher_rank")


def _optional_signals(r: Rollout) -> tuple[np.ndarray, ...]:
    """Teacher entropy (nats), teachability in [0, 1] and a teacher rank in 0..3 per
    response token, drawn from the rollout id alone (the same in any packing)."""
    rng = np.random.default_rng(10**6 + r.rollout_id)
    m = r.num_response
    return rng.exponential(0.5, m), rng.random(m), rng.integers(0, 4, m).astype(np.float64)
