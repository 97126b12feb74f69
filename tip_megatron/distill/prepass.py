"""The global pre-pass (selection scope `global`): score every micro-batch of the global
batch, select over all of them, hand the choice to the training pass.

    contexts = global_preselection(student_chunks, groups, microbatches, contexts, spec,
                                   shape, rollouts=rollouts)

Shapes: signals and kept masks are [b*s] per micro-batch (batch-major like the [b, s]
masks); the generation engine's kept hidden states are [response tokens, h] per replica.

Two sources of the signals (`selection.prepass_source`): `recompute`, a forward-only
student pass (`step.scoring_pass`); `generation`, the student's final hidden states the
generation engine kept (`Rollouts.response_hidden`), scored against the teacher without a
student forward. Either way the selection runs over the global batch (DP collectives),
and the returned contexts carry signals, kept masks, quadrant labels and `finite`, so the
training pass neither scores nor selects again.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, ContextManager, Optional, Sequence

import torch

from tip_megatron.distill.loss import build_signals
from tip_megatron.distill.spec import DistillSpec, MicrobatchContext, Preselection
from tip_megatron.distill.step import Microbatch, ScheduleShape, Scored, output_weight, scoring_pass
from tip_megatron.rollout.types import Rollouts
from tip_megatron.runtime.parallel import ParallelGroups
from tip_megatron.tip import SelectionConfig, TokenSignals, select_global_weighted, selection_labels
from tip_megatron.tip.normalize import RunningNorm


def global_preselection(
    student_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], contexts: Sequence[MicrobatchContext | None],
    spec: DistillSpec, shape: ScheduleShape, *, rollouts: Optional[Rollouts] = None,
    scoring_timer: Callable[[], ContextManager] = contextlib.nullcontext,
) -> list[MicrobatchContext | None]:
    """`contexts` with the pre-pass's selection (scope `global`; unchanged otherwise).

    Every rank calls it (pipeline and DP collectives). `microbatches` with every DP
    replica's are the global batch selected over. `rollouts`: read (and its hidden states
    released) by the `generation` source. `scoring_timer`: wraps the scoring only (the
    trainer's `student` stage time)."""
    if not spec.selection.needs_prepass:
        return list(contexts)
    with scoring_timer():
        if spec.selection.prepass_from_generation:
            scored = score_generated(student_chunks, groups, microbatches, contexts, spec, rollouts)
        else:
            scored = scoring_pass(student_chunks, groups, microbatches, contexts, spec, **shape._asdict())
    if not groups.is_last_stage:
        return list(contexts)
    masks, labels, weights, running = select_prepass(
        spec.selection, scored.signals, groups.dp_group, step=spec.step, with_weights=True,
        running=spec.running_norm)
    out = with_preselection(contexts, scored.signals, masks, labels, scored.finite, weights)
    return [replace(c, preselection=replace(c.preselection, running_norm=running)) for c in out]


def score_generated(
    student_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], contexts: Sequence[MicrobatchContext | None],
    spec: DistillSpec, rollouts: Optional[Rollouts],
) -> Scored:
    """The `generation` source's signals from `rollouts.response_hidden`, which is released
    here (the training pass does not need it). Last stage; empty elsewhere."""
    if not groups.is_last_stage:
        return Scored([], [])
    if rollouts is None or rollouts.response_hidden is None:
        raise ValueError("selection.prepass_source=generation: these rollouts kept no hidden states")
    # generated tokens per row (multi-turn: observations are not targets)
    rows = response_rows(rollouts.response_mask.sum(1), microbatches,
                         first_rollout_id=groups.dp_rank * rollouts.num_rows)
    hidden, rollouts.response_hidden = rollouts.response_hidden, None
    return scoring_from_generation(student_chunks, groups, contexts, spec, hidden, rows)


@torch.no_grad()
def scoring_from_generation(
    student_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    contexts: Sequence[MicrobatchContext | None], spec: DistillSpec,
    response_hidden: torch.Tensor | None, student_rows: Sequence[torch.Tensor],
) -> Scored:
    """The scoring pre-pass without a student forward (`selection.prepass_source=generation`):
    the same no-grad vocab-parallel scoring as `scoring_pass`, on the student's final hidden
    states the generation engine kept (`Rollouts.response_hidden` [response tokens, h]),
    against the teacher hidden states of `contexts`. `student_rows[i]`: the rows of
    `response_hidden` at micro-batch i's target positions, in order (`response_rows`).
    Last stage only (an empty list elsewhere)."""
    if not groups.is_last_stage:
        return Scored([], [])
    if response_hidden is None:
        raise ValueError("selection.prepass_source=generation: the rollouts carry no hidden states "
                         "(generate with keep_hidden=True)")
    if len(student_rows) != len(contexts):
        raise ValueError(f"{len(student_rows)} row sets for {len(contexts)} micro-batches")
    weight = output_weight(student_chunks)
    scored = [build_signals(response_hidden, weight, ctx, spec, student_rows=rows)
              for ctx, rows in zip(contexts, student_rows)]
    return Scored([s for s, _ in scored], [f for _, f in scored])


def response_rows(response_lengths: torch.Tensor, microbatches: Sequence[Microbatch],
                  first_rollout_id: int) -> list[torch.Tensor]:
    """Per micro-batch, the rows of the generation engine's packed hidden states
    (`Rollouts.response_hidden` [response tokens, h], row-major over this replica's
    rollouts) at its target positions, in their order (row by row, position by position).

    A micro-batch's rollouts are found by id (local row = rollout id - `first_rollout_id`),
    so any update split, micro-batch size or sequence padding lines up. [n_mb] int64 each.
    """
    lengths = response_lengths.long().cpu()
    starts = torch.cumsum(lengths, 0) - lengths
    out = []
    for mb in microbatches:
        rows = mb.rollout_ids.long().cpu() - first_rollout_id
        lens = lengths[rows]
        # Row r's tokens are starts[r] .. starts[r] + lens[r] - 1; concatenated row by row.
        shift = starts[rows] - (torch.cumsum(lens, 0) - lens)
        index = torch.repeat_interleave(shift, lens) + torch.arange(int(lens.sum()))
        num_targets = int(mb.target_mask.sum())
        if index.numel() != num_targets:
            raise ValueError(f"micro-batch of rollouts {rows.tolist()}: {num_targets} target positions "
                             f"but {index.numel()} generated tokens (rollouts and micro-batches differ)")
        out.append(index.to(mb.target_mask.device))
    return out


def select_prepass(
    selection: SelectionConfig, signals: Sequence[TokenSignals], dp_group, *, step: int,
    with_weights: bool = False, running: Optional[RunningNorm] = None,
) -> tuple:
    """(kept masks, quadrant labels[, weights, moving average]) of this rank's
    micro-batches, chosen over the global batch (every DP rank calls it: collectives of
    `select_global`). The labels use the same global statistics, so a `quantile` quadrant
    rule splits at the batch's quantiles. `with_weights`: also the per-token weights (None
    each for a mask rule) and the `selection.normalize=running` average after this step
    (`running`: the one before it)."""
    masks, weights, stats, running = select_global_weighted(selection, signals, dp_group,
                                                            step=step, running=running)
    labels = [selection_labels(selection, s, stats) for s in signals]
    return (masks, labels, weights, running) if with_weights else (masks, labels)


def with_preselection(
    contexts: Sequence[MicrobatchContext], signals: Sequence[TokenSignals],
    kept_masks: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None = None,
    finite: Sequence[bool] | None = None, weights: Sequence[torch.Tensor | None] | None = None,
) -> list[MicrobatchContext]:
    """New contexts carrying the pre-pass's signals, kept masks (and quadrant labels): the
    student pass then neither scores nor selects again. `finite` (`Scored.finite`; None:
    all finite) marks micro-batches whose scored statistics were not finite: their
    `MicrobatchResult.finite` is False, so the update is skipped as when the loss path
    scores itself."""
    if not len(contexts) == len(signals) == len(kept_masks):
        raise ValueError(f"{len(contexts)} contexts, {len(signals)} signals, {len(kept_masks)} kept masks")
    labels = [None] * len(contexts) if labels is None else labels
    finite = [True] * len(contexts) if finite is None else finite
    weights = [None] * len(contexts) if weights is None else weights
    return [replace(c, preselection=Preselection(s, m, q, bool(f), w))
            for c, s, m, q, f, w in zip(contexts, signals, kept_masks, labels, finite, weights)]
