"""Per-turn metrics of multi-turn rollouts (`rollout.env`): how many turns, how long, and
where the selection keeps tokens and finds Q3 (overconfident) ones.

Shapes: rollouts [B, L]; a micro-batch's results [b*s] target positions (position t
predicts token t+1, so its turn is the turn of token t+1); sums [K] float64 reduced over DP.

    metrics = turn_metrics(rollouts, microbatches, results, row_offset, max_turns, dp_group)

Observation tokens are in no count here but `observation_tokens_per_rollout`: the response
mask (hence the selection and every TIP statistic) excludes them already.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tip_megatron.rollout.types import Rollouts
from tip_megatron.runtime.collectives import all_reduce_sum
from tip_megatron.tip.quadrants import Quadrant


def turn_positions(turn_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] int64: each generated token's index within its turn (-1 elsewhere)."""
    gen = turn_ids >= 0
    count = gen.long().cumsum(1)
    # tokens before the turn's first one: the running count where each turn starts
    first = torch.zeros_like(turn_ids)
    start = gen & torch.nn.functional.pad(turn_ids[:, :-1] != turn_ids[:, 1:], (1, 0), value=True)
    first[start] = count[start]
    first = torch.cummax(first, dim=1).values
    return torch.where(gen, count - first, -1)


def _local_sums(out: Rollouts, microbatches: Sequence, results: Sequence, row_offset: int,
                max_turns: int) -> torch.Tensor:
    """[4 + 3 * max_turns + 2] float64: rollouts, turns, generated and observation tokens;
    per turn index: response tokens, kept tokens, Q3 tokens; Q3 position sum and count."""
    k = max_turns
    sums = torch.zeros(4 + 3 * k + 2, dtype=torch.float64)
    sums[0] = out.num_rows
    sums[1] = float(out.num_turns.sum())
    sums[2] = float(out.response_mask.sum())
    sums[3] = float(out.observation_mask.sum())
    pos = turn_positions(out.turn_ids)
    lengths = torch.zeros_like(out.turn_ids)  # each generated token's turn length
    for row in range(out.num_rows):
        ids = out.turn_ids[row]
        for t in ids[ids >= 0].unique().tolist():
            where = ids == t
            lengths[row, where] = int(where.sum())
    for mb, res in zip(microbatches, results):
        if res.kept_mask is None:
            continue
        rows = (mb.rollout_ids - row_offset).long().cpu()
        b, s = mb.input_ids.shape
        width = min(s - 1, out.turn_ids.shape[1] - 1)
        turn = torch.full((b, s), -1, dtype=torch.long)
        turn[:, :width] = out.turn_ids[rows, 1:width + 1].cpu()  # position t predicts token t+1
        where_in = torch.zeros((b, s), dtype=torch.float64)
        rel = pos[rows, 1:width + 1].double() / (lengths[rows, 1:width + 1].double() - 1).clamp(min=1)
        where_in[:, :width] = rel.cpu()
        turn, where_in = turn.view(-1), where_in.view(-1)
        resp = res.signals.response_mask.cpu()
        kept = res.kept_mask.cpu() & resp
        q3 = (res.labels.cpu() == int(Quadrant.Q3)) & resp
        for t in range(k):
            in_turn = turn == t
            sums[4 + t] += float((resp & in_turn).sum())
            sums[4 + k + t] += float((kept & in_turn).sum())
            sums[4 + 2 * k + t] += float((q3 & in_turn).sum())
        sums[-2] += float(where_in[q3].sum())
        sums[-1] += float(q3.sum())
    return sums


def turn_metrics(out: Rollouts, microbatches: Sequence, results: Sequence, row_offset: int,
                 max_turns: int, dp_group) -> dict:
    """The global batch's per-turn metrics (collective over `dp_group`; the last pipeline
    stage, where the results are)."""
    device = out.token_ids.device
    sums = all_reduce_sum(_local_sums(out, microbatches, results, row_offset, max_turns).to(device),
                          dp_group).cpu().tolist()
    k = max_turns
    rollouts, turns, gen, obs = sums[:4]
    metrics = {"turns/per_rollout": turns / max(rollouts, 1), "turns/tokens_per_turn": gen / max(turns, 1),
               "turns/observation_tokens_per_rollout": obs / max(rollouts, 1)}
    q3_total = sum(sums[4 + 2 * k:4 + 3 * k])
    for t in range(k):
        resp, kept, q3 = sums[4 + t], sums[4 + k + t], sums[4 + 2 * k + t]
        if resp:
            metrics[f"turns/kept_share_turn{t}"] = kept / resp
            metrics[f"turns/q3_share_turn{t}"] = q3 / q3_total if q3_total else 0.0
    if sums[-1]:
        metrics["turns/q3_position_in_turn"] = sums[-2] / sums[-1]
    return metrics
