"""One distillation step through megatron's pipeline schedules: the teacher's forward-only
pass (final hidden states kept on the last stage), then the student's pass with the TIP
loss at the output layer.

Shapes: a micro-batch holds input_ids / position_ids / target_mask [b, s] and rollout_ids
[b]; teacher hidden states are [s, b, h_t] (megatron layout), one per micro-batch, on the
last pipeline stage only (nothing on the host, no logits).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple, Sequence

import torch

from tip_megatron.runtime import pipeline
from tip_megatron.distill.loss import (
    DistillSpec, MicrobatchContext, Preselection, build_signals, full_sequence, loss_func,
    make_output_processor,
)
from tip_megatron.models.state import unwrap
from tip_megatron.runtime.parallel import ParallelGroups
from tip_megatron.tip import (
    SelectionConfig, TokenSignals, select_global_with_stats, selection_labels,
)


@dataclass
class Microbatch:
    input_ids: torch.Tensor
    """[b, s] token ids (prompt + response, right-padded)."""
    position_ids: torch.Tensor
    """[b, s]."""
    target_mask: torch.Tensor
    """[b, s] bool: the token at t+1 is a response token (position t is in the loss)."""
    rollout_ids: torch.Tensor
    """[b] int64 global rollout ids."""


class Scored(NamedTuple):
    """The scoring pre-pass's output for this rank's micro-batches (last stage)."""

    signals: list[TokenSignals]
    """Per micro-batch signals (non-finite statistics zeroed, see `build_signals`)."""
    finite: list[bool]
    """Per micro-batch: whether every scored statistic was finite (`with_preselection`)."""


def _hidden_only(tp_group, *, hidden_states, output_layer, **_):
    """The teacher's final hidden states, [s, b, h_t]: gathered over TP under sequence
    parallelism (forward-only, so stashed already gathered, as the loss path reads them)."""
    return full_sequence(hidden_states, output_layer, tp_group)[0]


def _stash(store: list, hidden: torch.Tensor):
    store.append(hidden.detach())
    zero = hidden.new_zeros(())
    return zero, torch.zeros((), dtype=torch.int), {}


def _teacher_step(store: list, tp_group, data_iterator, model):
    mb: Microbatch = next(data_iterator)
    out = model(mb.input_ids, mb.position_ids, None, output_processor=partial(_hidden_only, tp_group))
    return out, partial(_stash, store)


@torch.no_grad()
def teacher_hidden_states(
    teacher_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], *, seq_length: int, micro_batch_size: int,
) -> list[torch.Tensor]:
    """Forward-only teacher pass; returns [s, b, h_t] per micro-batch on the last stage
    (an empty list on other stages)."""
    check_sequence_parallel_length(groups, microbatches, seq_length)
    store: list[torch.Tensor] = []
    pipeline.forward_backward(
        partial(_teacher_step, store, groups.tp_group), teacher_chunks, list(microbatches), groups,
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True,
    )
    return store


def teacher_output_weight(teacher_chunks: Sequence[torch.nn.Module]) -> torch.Tensor:
    """[V/tp, h_t] output-weight shard of the teacher's last chunk (tied or not)."""
    return output_weight(teacher_chunks)


def output_weight(chunks: Sequence[torch.nn.Module]) -> torch.Tensor:
    """[V/tp, h] output-weight shard of the last chunk (tied or not), detached."""
    last = unwrap(chunks[-1])
    if not last.post_process:
        raise ValueError("output_weight: this rank holds no output layer (not the last pipeline stage)")
    if last.share_embeddings_and_output_weights:
        return last.shared_embedding_or_output_weight().detach()
    return last.output_layer.weight.detach()


def _student_step(processor, data_iterator, model):
    mb: Microbatch
    mb, ctx = next(data_iterator)
    out = model(mb.input_ids, mb.position_ids, None, output_processor=processor,
                output_processor_context=ctx)
    # On the last stage `out` is the processor's LossPathOutput, which the schedule passes
    # to loss_func as is; elsewhere it is the hidden state sent downstream.
    return out, loss_func


def student_pass(
    student_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], contexts: Sequence[MicrobatchContext | None],
    spec: DistillSpec, *, seq_length: int, micro_batch_size: int, forward_only: bool = False,
) -> list[dict]:
    """Student forward/backward with the TIP loss; returns the last stage's reports
    (one per micro-batch, see `loss_func`; empty on other stages). Under sequence
    parallelism every micro-batch's length must be a multiple of tp (ValueError otherwise)."""
    check_sequence_parallel_length(groups, microbatches, seq_length)
    processor = make_output_processor(spec)
    return pipeline.forward_backward(
        partial(_student_step, processor), student_chunks, list(zip(microbatches, contexts)),
        groups, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def check_sequence_parallel_length(groups: ParallelGroups, microbatches: Sequence[Microbatch],
                                   seq_length: int) -> None:
    """Sequence parallelism splits the sequence over the TP ranks: a length that tp does
    not divide would stop in megatron's scatter with a bare assertion; one line instead."""
    if not groups.layout.sequence_parallel:
        return
    tp = groups.layout.tp
    for length in [seq_length, *(mb.input_ids.shape[1] for mb in microbatches)]:
        if length % tp:
            raise ValueError(
                f"sequence length {length}: parallel.sequence_parallel=True with tp={tp} needs a "
                f"multiple of {tp}; right-pad the micro-batches (target_mask False on the padding) "
                f"as the trainer does (train.batches.update_microbatches(seq_multiple=tp))")


def scoring_pass(
    student_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], contexts: Sequence[MicrobatchContext | None],
    spec: DistillSpec, *, seq_length: int, micro_batch_size: int,
) -> Scored:
    """Forward-only scoring pre-pass (scope `global`): this rank's micro-batch signals on
    the last stage (empty lists on other stages). Nothing is selected or learned."""
    reports = student_pass(student_chunks, groups, microbatches, contexts,
                           replace(spec, score_only=True), seq_length=seq_length,
                           micro_batch_size=micro_batch_size, forward_only=True)
    return Scored([r["signals"] for r in reports], [bool(r["finite"]) for r in reports])


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
    `response_hidden` at micro-batch i's target positions, in order
    (`train.batches.response_rows`). Last stage only (an empty list elsewhere)."""
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


def select_prepass(
    selection: SelectionConfig, signals: Sequence[TokenSignals], dp_group, *, step: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(kept masks, quadrant labels) of this rank's micro-batches, chosen over the global
    batch (every DP rank calls it: collectives of `select_global`). The labels use the same
    global statistics, so a `quantile` quadrant rule splits at the batch's quantiles."""
    masks, stats = select_global_with_stats(selection, signals, dp_group, step=step)
    return masks, [selection_labels(selection, s, stats) for s in signals]


def with_preselection(
    contexts: Sequence[MicrobatchContext], signals: Sequence[TokenSignals],
    kept_masks: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None = None,
    finite: Sequence[bool] | None = None,
) -> list[MicrobatchContext]:
    """New contexts carrying the pre-pass's signals, kept masks (and quadrant labels): the
    student pass then neither scores nor selects again. `finite` (`Scored.finite`; None:
    all finite) marks micro-batches whose scored statistics were not finite: their loss is
    NaN, so the update is skipped as when the loss path scores itself."""
    if not len(contexts) == len(signals) == len(kept_masks):
        raise ValueError(f"{len(contexts)} contexts, {len(signals)} signals, {len(kept_masks)} kept masks")
    labels = [None] * len(contexts) if labels is None else labels
    finite = [True] * len(contexts) if finite is None else finite
    return [replace(c, preselection=Preselection(s, m, q, bool(f)))
            for c, s, m, q, f in zip(contexts, signals, kept_masks, labels, finite)]


def make_contexts(
    groups: ParallelGroups, microbatches: Sequence[Microbatch], teacher_hidden: Sequence[torch.Tensor],
    teacher_weight: torch.Tensor | None,
) -> list[MicrobatchContext | None]:
    """Per-micro-batch contexts on the last stage (None elsewhere)."""
    if not groups.is_last_stage:
        return [None] * len(microbatches)
    if len(teacher_hidden) != len(microbatches):
        raise ValueError(f"{len(teacher_hidden)} teacher hidden states for {len(microbatches)} micro-batches")
    return [
        MicrobatchContext(teacher_hidden=th, teacher_weight=teacher_weight,
                          target_mask=mb.target_mask.bool(), rollout_ids=mb.rollout_ids)
        for mb, th in zip(microbatches, teacher_hidden)
    ]
