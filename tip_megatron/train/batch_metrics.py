"""Metrics of one rollout batch that the trainer's step adds to what each update reports:
several updates folded into one line, and the global batch's generated tokens and
rollouts (summed over the DP replicas)."""
from __future__ import annotations

import torch

from tip_megatron.distill.spec import MicrobatchResult
from tip_megatron.rollout.types import Rollouts
from tip_megatron.runtime.collectives import all_reduce_sum
from tip_megatron.train.run_state import Run
from tip_megatron.train.skip import reduce_results


def rollout_batch_metrics(run: Run, updates: list[tuple[list[MicrobatchResult], dict]]) -> dict:
    """The first update's metrics; with several updates, lr / grad_norm of the first update,
    loss and selection metrics over the whole rollout batch (every update's kept tokens),
    plus each update's own loss."""
    metrics = dict(updates[0][1])
    if len(updates) > 1 and "loss" in metrics:
        metrics.update(reduce_results(run, [r for res, _ in updates for r in res])[0])
        metrics["loss_updates"] = [m["loss"] for _, m in updates]
        metrics["loss_last_update"] = updates[-1][1]["loss"]
        metrics["skipped"] = sum(m["skipped"] for _, m in updates)
    return metrics


def global_response_counts(run: Run, out: Rollouts) -> tuple[float, float]:
    """(generated tokens, rollouts) of the global batch: summed over the DP replicas, whose
    response lengths differ (one tiny all-reduce on every rank: the logging rank need not
    be on the last stage, where the metric reduction runs). Observation tokens of
    multi-turn rollouts are not generated: not counted."""
    local = torch.stack([out.response_mask.sum().double(),
                         torch.tensor(float(out.response_lengths.numel()), dtype=torch.float64,
                                      device=out.response_lengths.device)])
    tokens, rows = all_reduce_sum(local, run.groups.dp_group).tolist()
    return tokens, rows
