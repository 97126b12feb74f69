"""Per-step selection metrics as sums and counts: add over micro-batches and DP ranks, then
`finalize` divides once (a mean of micro-batch means would weight tokens unequally).

Shapes: inputs `[tokens]`; sums are 0-dim float64 tensors keyed by `METRIC_SUM_KEYS`.

    sums = sum_metric_sums([selection_metric_sums(s, kept, labels) for ...])
    report = finalize(all_reduce_metric_sums(sums, dp_group))

The loss of a token is the divergence the loss trains (`loss.divergence`: the reverse KL,
the forward KL or the JSD; the loss op's per-token values, `token_loss`) if kept, else 0;
`q*_loss_share` splits the step's loss sum by quadrant (the shares sum to 1).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.runtime.collectives import all_reduce_sum
from tip_megatron.tip.quadrants import QUADRANTS
from tip_megatron.tip.signals import TokenSignals

_SIGNALS = (("entropy", "entropy_norm"), ("reverse_kl", "reverse_kl"), ("forward_kl", "forward_kl"))
_Q = tuple(f"q{int(q)}" for q in QUADRANTS)
METRIC_SUM_KEYS = (
    ("num_response", "num_kept")
    + tuple(f"num_{q}_{part}" for part in ("all", "kept") for q in _Q)
    + tuple(f"sum_{name}_{part}" for name, _ in _SIGNALS for part in ("all", "kept"))
    + tuple(f"loss_{q}" for q in _Q)
)


def selection_metric_sums(
    signals: TokenSignals, kept_mask: torch.Tensor, labels: torch.Tensor,
    token_loss: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Sums and counts of one micro-batch; `labels` from `quadrant_labels`. Nothing kept is fine.

    token_loss: [num kept] per-token loss of the kept tokens in token order (the loss op's
    second output); None: the reverse KL of `signals` (the loss under `reverse_kl`)."""
    resp = signals.response_mask
    if kept_mask.shape != resp.shape or kept_mask.dtype != torch.bool:
        raise ValueError(f"kept_mask: must be a bool [tokens] tensor like response_mask, "
                         f"got {kept_mask.dtype} {tuple(kept_mask.shape)}")
    if bool((kept_mask & ~resp).any()):
        raise ValueError("kept_mask keeps tokens outside the response (prompt or padding)")
    sums: dict[str, torch.Tensor] = {
        "num_response": resp.sum(), "num_kept": kept_mask.sum(),
    }
    for part, mask in (("all", resp), ("kept", kept_mask)):
        for q, quadrant in zip(_Q, QUADRANTS):
            sums[f"num_{q}_{part}"] = (mask & (labels == int(quadrant))).sum()
        for name, attr in _SIGNALS:
            values = getattr(signals, attr).double()
            sums[f"sum_{name}_{part}"] = torch.where(mask, values, 0.0).sum()
    loss = _token_loss(signals, kept_mask, token_loss)
    for q, quadrant in zip(_Q, QUADRANTS):
        sums[f"loss_{q}"] = torch.where(kept_mask & (labels == int(quadrant)), loss, 0.0).sum()
    return {k: sums[k].double() for k in METRIC_SUM_KEYS}


def teacher_metric_sums(
    signals: TokenSignals, kept_mask: torch.Tensor, labels: torch.Tensor,
    token_loss: Optional[torch.Tensor], num_teachers: int,
) -> list[dict[str, torch.Tensor]]:
    """`selection_metric_sums` of each teacher's tokens (`signals.teacher_ids`), in index
    order; a teacher without tokens here gets zeros (every rank reports every teacher)."""
    if signals.teacher_ids is None:
        raise ValueError("teacher_metric_sums: the signals carry no teacher_ids (one teacher)")
    loss = _token_loss(signals, kept_mask, token_loss)
    out = []
    for t in range(num_teachers):
        mine = signals.teacher_ids == t
        part = replace(signals, response_mask=signals.response_mask & mine)
        kept = kept_mask & mine
        out.append(selection_metric_sums(part, kept, labels, loss[kept]))
    return out


def _token_loss(signals: TokenSignals, kept_mask: torch.Tensor, token_loss) -> torch.Tensor:
    """[tokens] float64 loss of each token (0 where not kept)."""
    if token_loss is None:
        return signals.reverse_kl.double()
    num_kept = int(kept_mask.sum())
    if token_loss.dim() != 1 or token_loss.numel() != num_kept:
        raise ValueError(f"token_loss: must be a 1-D tensor of the {num_kept} kept tokens' "
                         f"losses, got shape {tuple(token_loss.shape)}")
    full = torch.zeros(kept_mask.numel(), dtype=torch.float64, device=kept_mask.device)
    full[kept_mask] = token_loss.detach().double().to(kept_mask.device)
    return full


def sum_metric_sums(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Add the sums of several micro-batches (or steps)."""
    if not parts:
        raise ValueError("sum_metric_sums: needs at least one dict of sums")
    return {k: torch.stack([p[k] for p in parts]).sum() for k in METRIC_SUM_KEYS}


def all_reduce_metric_sums(
    sums: dict[str, torch.Tensor], dp_group: Optional[dist.ProcessGroup]
) -> dict[str, torch.Tensor]:
    """Sum over the DP ranks of `dp_group` in one all-reduce (None: no DP)."""
    total = all_reduce_sum(torch.stack([sums[k] for k in METRIC_SUM_KEYS]), dp_group)
    return dict(zip(METRIC_SUM_KEYS, total.unbind()))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """num / den as a float; NaN when den is 0 (the quantity is undefined, not zero)."""
    return float(num / den) if float(den) != 0.0 else float("nan")


def finalize_teachers(sums: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """`teacher/<name>/<metric>` for each teacher's summed sums: `finalize`'s metrics, plus
    `loss_share` (its part of the step's loss sum) and `tokens_share` (of response tokens)."""
    loss = {n: sum(s[f"loss_{q}"] for q in _Q) for n, s in sums.items()}
    total_loss = sum(loss.values())
    total_tokens = sum(s["num_response"] for s in sums.values())
    out = {}
    for name, s in sums.items():
        row = finalize(s)
        row["loss_share"] = _ratio(loss[name], total_loss)
        row["tokens_share"] = _ratio(s["num_response"], total_tokens)
        out.update({f"teacher/{name}/{k}": v for k, v in row.items()})
    return out


def finalize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fractions and means from summed sums. Undefined ratios (0 / 0) are NaN."""
    n_all, n_kept = sums["num_response"], sums["num_kept"]
    out = {"num_response": float(n_all), "num_kept": float(n_kept),
           "kept_fraction": _ratio(n_kept, n_all)}
    loss_kept = sum(sums[f"loss_{q}"] for q in _Q)  # every kept token has one quadrant
    for q in _Q:
        out[f"{q}_fraction_all"] = _ratio(sums[f"num_{q}_all"], n_all)
        out[f"{q}_fraction_kept"] = _ratio(sums[f"num_{q}_kept"], n_kept)
        out[f"{q}_loss_share"] = _ratio(sums[f"loss_{q}"], loss_kept)
    for name, _ in _SIGNALS:
        out[f"mean_{name}_all"] = _ratio(sums[f"sum_{name}_all"], n_all)
        out[f"mean_{name}_kept"] = _ratio(sums[f"sum_{name}_kept"], n_kept)
    return out
