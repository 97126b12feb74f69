"""Whether an update is applied: the metrics of its micro-batches, the skip decision (the
same on every rank) and the count of consecutive skips that stops a diverged run.

    metrics, finite = reduce_results(run, results)
    reason = should_skip(run, metrics, finite)      # '' = apply the update
    if reason: count_skip(run, reason)              # raises TrainingDiverged at the limit
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist

from tip_megatron.distill.spec import MicrobatchResult
from tip_megatron.runtime.collectives import all_reduce_sum
from tip_megatron.train.metrics import reduce_reports
from tip_megatron.train.run_state import Run

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """`train.max_skipped_steps` consecutive updates were skipped: the run stops."""


def reduce_results(run: Run, results: Sequence[MicrobatchResult]) -> tuple[dict, bool]:
    """(the micro-batches' metrics over DP, whether every replica's statistics were finite):
    last stage; ({}, True) elsewhere. Statistics that were not finite were zeroed for the
    selection, so the loss over them means nothing: it is reported as NaN."""
    if not run.groups.is_last_stage:
        return {}, True
    metrics = reduce_reports([r.metric_sums for r in results], run.groups.dp_group)
    bad = torch.tensor([float(sum(not r.finite for r in results))], dtype=torch.float64,
                       device=next(run.ddp[0].parameters()).device)
    finite = not all_reduce_sum(bad, run.groups.dp_group).item()
    if not finite:
        metrics.update(loss=float("nan"), loss_sum=float("nan"))
    return metrics, finite


SKIP_REASONS = {1: "nothing kept in the global batch", 2: "non-finite gradient",
                3: "non-finite loss or TIP signals"}


def should_skip(run: Run, metrics: dict, finite: bool) -> str:
    """Why the update must be skipped ('' = apply it), the same on every rank: non-finite
    TIP signals (`finite`, see `MicrobatchResult.finite`) or loss, a non-finite gradient,
    or no token kept in the global batch. One MAX all-reduce of a reason code over the
    world: no rank steps alone."""
    code = 0
    if run.groups.is_last_stage:
        if not finite or not torch.isfinite(torch.tensor(metrics["loss_sum"])):
            code = 3
        elif metrics["num_kept"] == 0:
            code = 1
    if code < 2 and any(not torch.isfinite(p.main_grad).all() for c in run.ddp for p in c.parameters()
                        if getattr(p, "main_grad", None) is not None):
        code = 2
    flag = torch.tensor([float(code)], device=next(run.ddp[0].parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return SKIP_REASONS.get(int(flag.item()), "")


def count_skip(run: Run, reason: str) -> None:
    """Count a skipped update; after `train.max_skipped_steps` in a row the run stops (every
    rank raises alike: the counts are equal everywhere)."""
    run.skip_streak += 1
    run.num_skipped += 1
    step, limit = run.step + 1, run.cfg.train.max_skipped_steps
    if run.groups.rank == 0:
        logger.warning("step %d: update skipped (%s); %d in a row (train.max_skipped_steps=%d)",
                       step, reason, run.skip_streak, limit)
    if run.skip_streak >= limit:
        first = step - run.skip_streak + 1
        cause = (f"a learning rate too high for this model (optim.lr={run.cfg.optim.lr:g}) or bad "
                 "data in those steps' prompts" if reason != SKIP_REASONS[1] else
                 "a selection that keeps no token (selection.rule, selection.rho) or empty responses")
        raise TrainingDiverged(
            f"stopped at step {step}: {run.skip_streak} consecutive updates skipped since step "
            f"{first} ({reason}); likely cause: {cause}; the checkpoints on disk were saved "
            "before it (a resume keeps their learning-rate schedule: change optim.lr in a fresh "
            "run), or raise train.max_skipped_steps")
