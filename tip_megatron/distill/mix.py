"""`loss.mix`: per-token coefficients of reverse KL, forward KL and JSD from the token's
signals, for the fused loss's `ops.mixed.MixedDivergence`.

Shapes: signals `[b*s]`; coefficients `[k, 3]` for the k kept tokens (reverse, forward, JSD).

General form (`loss.mix=custom`): for each kept token i with gating signal s_i
(`loss.mix_signal`, one of `MIX_SIGNALS`),

    g_i = 1 if s_i > loss.mix_threshold else 0
    (a_i, b_i, c_i) = mix_low + (mix_high - mix_low) * g_i
    D_i = a_i KL(P_S||P_T) + b_i KL(P_T||P_S) + c_i JSD_beta        (beta = loss.jsd_beta)

Presets fix the signal and both coefficient rows; `loss.mix_threshold` still applies:
    entropy_aware   signal teacher_entropy (nats), low (1, 0, 0), high (1, 1, 0): reverse KL
                    everywhere, plus forward KL where the teacher's entropy is high
                    (arXiv 2603.07079; its exact threshold is not stated, ours is a key).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from tip_megatron.ops.mixed import MixedDivergence
from tip_megatron.tip import TokenSignals

MIX_MODES = ("none", "entropy_aware", "custom")
MIX_SIGNALS = ("teacher_entropy", "entropy_norm", "reverse_kl", "forward_kl")
PRESETS = {"entropy_aware": {"mix_signal": "teacher_entropy", "mix_low": (1.0, 0.0, 0.0),
                             "mix_high": (1.0, 1.0, 0.0)}}
DEFAULTS = PRESETS["entropy_aware"]


def _row_ok(row: Any) -> bool:
    return (isinstance(row, (tuple, list)) and len(row) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    and x >= 0 for x in row)
            and sum(row) > 0)


def validate_mix(cfg: Any, prefix: str) -> None:
    """One-line ValueErrors for the `loss.mix*` keys of a LossConfig."""
    if cfg.mix not in MIX_MODES:
        raise ValueError(f"{prefix}mix={cfg.mix!r}: accepted values are {list(MIX_MODES)}")
    if cfg.mix_signal not in MIX_SIGNALS:
        raise ValueError(f"{prefix}mix_signal={cfg.mix_signal!r}: accepted values are {list(MIX_SIGNALS)}")
    t = cfg.mix_threshold
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise ValueError(f"{prefix}mix_threshold={t!r}: must be a finite number")
    for key in ("mix_low", "mix_high"):
        if not _row_ok(getattr(cfg, key)):
            raise ValueError(f"{prefix}{key}={getattr(cfg, key)!r}: three coefficients >= 0 "
                             "(reverse KL, forward KL, JSD), not all 0")
    for key, value in PRESETS.get(cfg.mix, {}).items():
        given = getattr(cfg, key)
        if (tuple(given) if isinstance(value, tuple) else given) != value:
            raise ValueError(f"{prefix}{key}={given!r}: set by the preset {prefix}mix={cfg.mix!r}; "
                             f"use {prefix}mix='custom' to change it")
    if cfg.mix != "none":
        if cfg.impl != "fused":
            raise ValueError(f"{prefix}mix={cfg.mix!r} needs {prefix}impl='fused'")
        if cfg.divergence != "reverse_kl":
            raise ValueError(f"{prefix}mix={cfg.mix!r} replaces {prefix}divergence; leave it "
                             f"'reverse_kl' (got {cfg.divergence!r})")


def mix_coefficients(cfg: Any, signals: TokenSignals, kept: torch.Tensor) -> torch.Tensor:
    """[k, 3] float32 coefficients of the kept tokens (module docstring)."""
    gate_signal = getattr(signals, cfg.mix_signal)
    if gate_signal is None:
        raise ValueError(f"loss.mix_signal={cfg.mix_signal!r}: the signals carry no {cfg.mix_signal}")
    s = gate_signal[kept].double()
    low = torch.tensor(cfg.mix_low, dtype=torch.float64, device=s.device)
    high = torch.tensor(cfg.mix_high, dtype=torch.float64, device=s.device)
    gate = (s > float(cfg.mix_threshold)).double()[:, None]
    return (low + (high - low) * gate).float()


def mixed_divergence(cfg: Any, signals: TokenSignals, kept: torch.Tensor) -> Optional[MixedDivergence]:
    """The fused loss's divergence under `loss.mix` (None when `loss.mix=none`)."""
    if cfg.mix == "none":
        return None
    use_jsd = cfg.mix_low[2] > 0 or cfg.mix_high[2] > 0
    return MixedDivergence(mix_coefficients(cfg, signals, kept), beta=float(cfg.jsd_beta),
                           use_jsd=bool(use_jsd))
