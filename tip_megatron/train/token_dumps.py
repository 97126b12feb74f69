"""Per-token dumps of a training step (`logging.dump_tokens_every`), for `tip-megatron plot`.

    maybe_dump_tokens(cfg, groups, step, microbatches, results)   # every rank calls it

The signals and kept masks come from the student pass's results (distill/step.py: one
`MicrobatchResult` per micro-batch on the last pipeline stage, `signals` over its [b*s]
tokens, the `kept_mask` the loss used and the quadrant `labels`). Gathered over DP to the logging rank (last stage, TP rank 0,
DP rank 0), which writes ONE file per dump with train/dump_file.py's writer: signals are
identical on the TP ranks of a stage, so only DP shards differ. The sample is uniform over
the global batch's response tokens: every DP rank draws the same global indices
(`capped_sample(N, cap, seed=step)`) and sends only the rows that fall in its own range,
so at most `dump_tokens_max` rows cross the network whatever the batch size.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from tip_megatron.config import RunConfig, logging_dir
from tip_megatron.distill.spec import MicrobatchResult
from tip_megatron.train.dump_file import TokenDump, capped_sample, dump_path, write_token_dump
from tip_megatron.runtime.collectives import all_gather_varlen

#: float columns travel as float64 (exact for the int columns too) in one gathered tensor.
_COLUMNS = ("entropy_norm", "reverse_kl", "forward_kl", "kept", "quadrant", "rollout_id", "position",
            "weight")


def due(cfg: RunConfig, step: int) -> bool:
    every = cfg.logging.dump_tokens_every
    return bool(every) and step % every == 0


def local_columns(cfg: RunConfig, microbatches: Sequence,
                  results: Sequence[MicrobatchResult]) -> torch.Tensor:
    """[8, n_local] float64: this rank's response tokens (micro-batch order, row-major)."""
    parts = []
    for mb, result in zip(microbatches, results):
        s, kept = result.signals, result.kept_mask
        b = mb.input_ids.shape[0]
        response = s.response_mask
        # Index within its response: running count of response tokens along the row.
        position = response.view(b, -1).long().cumsum(1).view(-1) - 1
        # The labels the loss path used (a quantile rule needs the scope's statistics).
        labels = result.labels
        weight = kept.double() if result.weights is None else result.weights.to(kept.device)
        cols = (s.entropy_norm, s.reverse_kl, s.forward_kl, kept, labels, s.rollout_ids, position, weight)
        parts.append(torch.stack([c[response].double() for c in cols]))
    if not parts:
        return torch.zeros(len(_COLUMNS), 0, dtype=torch.float64)
    # float64 holds every column exactly (ids < 2^53).
    return torch.cat(parts, dim=1)


def gather_sample(columns: torch.Tensor, cap: int, seed: int, dp_group,
                  dp_rank: int) -> tuple[torch.Tensor, int]:
    """([8, n] sampled rows of the whole DP group, in DP-rank order; N tokens before capping)."""
    n_local = torch.tensor([columns.shape[1]], dtype=torch.int64, device=columns.device)
    counts = all_gather_varlen(n_local, dp_group).cpu()
    rank = dp_rank
    total, offset = int(counts.sum()), int(counts[:rank].sum())
    picked = torch.as_tensor(capped_sample(total, cap, seed), dtype=torch.int64)
    mine = picked[(picked >= offset) & (picked < offset + columns.shape[1])] - offset
    rows = columns[:, mine.to(columns.device)]
    gathered = [all_gather_varlen(rows[i].contiguous(), dp_group) for i in range(rows.shape[0])]
    return torch.stack(gathered), total


def maybe_dump_tokens(cfg: RunConfig, groups, step: int, microbatches: Sequence,
                      results: Sequence[MicrobatchResult]) -> None:
    """Write the step's dump when due; a no-op off the last pipeline stage."""
    if not due(cfg, step) or not groups.is_last_stage:
        return
    columns = local_columns(cfg, microbatches, results)
    rows, total = gather_sample(columns, cfg.logging.dump_tokens_max, step, groups.dp_group,
                                groups.dp_rank)
    if groups.tp_rank != 0 or groups.dp_rank != 0:
        return
    rule = cfg.selection.quadrant_rule
    fixed = rule.kind == "fixed"
    c = dict(zip(_COLUMNS, rows.cpu()))
    write_token_dump(dump_path(logging_dir(cfg), step), TokenDump(
        entropy_norm=c["entropy_norm"], reverse_kl=c["reverse_kl"], forward_kl=c["forward_kl"],
        kept=c["kept"] > 0.5, quadrant=c["quadrant"].long(), rollout_id=c["rollout_id"].long(),
        position=c["position"].long(), step=step, num_response_tokens=total, weight=c["weight"],
        entropy_threshold=float(rule.entropy_threshold) if fixed else math.nan,
        div_threshold_nats=float(rule.div_threshold_nats) if fixed else math.nan))
