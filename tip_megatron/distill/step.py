"""One distillation step through megatron's pipeline schedules: the teacher's forward-only
pass (final hidden states kept on the last stage), then the student's pass with the TIP
loss at the output layer, in three roles over one implementation: `train_pass` (forward +
backward), `forward_loss_pass` (the loss of the current weights, forward only: the check
before a save) and `scoring_pass` (signals only: the scope-`global` pre-pass, see
distill/prepass.py). Each returns the last stage's `MicrobatchResult`s.

Shapes: a micro-batch holds input_ids / position_ids / target_mask [b, s] and rollout_ids
[b]; teacher hidden states are [s, b, h_t] (megatron layout), one per micro-batch, on the
last pipeline stage only (nothing on the host, no logits).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from tip_megatron.runtime import pipeline
from tip_megatron.distill.loss import full_sequence, make_loss_func
from tip_megatron.distill.spec import DistillSpec, MicrobatchContext, MicrobatchResult
from tip_megatron.distill.processor import make_output_processor
from tip_megatron.distill.weighting import rescale_weighted_grads
from tip_megatron.models.state import unwrap
from tip_megatron.runtime.parallel import ParallelGroups
from tip_megatron.tip import TokenSignals


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
    teacher_ids: Optional[torch.Tensor] = None
    """[b] int64 index of each row's teacher (several teachers, `teachers:`); None: one teacher."""


class ScheduleShape(NamedTuple):
    """The pipeline schedule's micro-batch shape for one rollout batch (the passes below
    take it as `**shape._asdict()`, megatron's keyword names)."""

    seq_length: int
    """Tokens per row of every micro-batch (sequence parallelism pads it to a multiple of tp)."""
    micro_batch_size: int
    """Rows per micro-batch."""


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


def _stash(store: list, sink, hidden: torch.Tensor):
    if sink is not None:  # handed on at once (a teacher on its own grid sends it)
        sink(len(store), hidden.detach())
        store.append(None)
    else:
        store.append(hidden.detach())
    zero = hidden.new_zeros(())
    return zero, torch.zeros((), dtype=torch.int), {}


def _teacher_step(store: list, sink, tp_group, data_iterator, model):
    mb: Microbatch = next(data_iterator)
    out = model(mb.input_ids, mb.position_ids, None, output_processor=partial(_hidden_only, tp_group))
    return out, partial(_stash, store, sink)


@torch.no_grad()
def teacher_hidden_states(
    teacher_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], *, seq_length: int, micro_batch_size: int,
    sink: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> list[Optional[torch.Tensor]]:
    """Forward-only teacher pass; returns [s, b, h_t] per micro-batch on the last stage
    (an empty list on other stages). `sink(index, hidden)`: called on the last stage as
    each micro-batch's hidden states are done, instead of keeping them (None entries)."""
    check_sequence_parallel_length(groups, microbatches, seq_length)
    store: list[Optional[torch.Tensor]] = []
    pipeline.forward_backward(
        partial(_teacher_step, store, sink, groups.tp_group), teacher_chunks, list(microbatches), groups,
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


def _student_step(processor, loss_func, data_iterator, model):
    mb: Microbatch
    mb, ctx = next(data_iterator)
    out = model(mb.input_ids, mb.position_ids, None, output_processor=processor,
                output_processor_context=ctx)
    # On the last stage `out` is the processor's LossPathOutput, which the schedule passes
    # to loss_func as is; elsewhere it is the hidden state sent downstream.
    return out, loss_func


def _run_student(
    student_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], contexts: Sequence[MicrobatchContext | None],
    spec: DistillSpec, *, seq_length: int, micro_batch_size: int, forward_only: bool,
) -> list[MicrobatchResult]:
    """The one student pass under the three roles below: the last stage's results (one
    per micro-batch, in order; empty on other stages). Under sequence parallelism every
    micro-batch's length must be a multiple of tp (ValueError otherwise)."""
    check_sequence_parallel_length(groups, microbatches, seq_length)
    results: list[MicrobatchResult] = []
    pipeline.forward_backward(
        partial(_student_step, make_output_processor(spec), make_loss_func(results)),
        student_chunks, list(zip(microbatches, contexts)), groups, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only,
    )
    return results


def train_pass(
    student_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], contexts: Sequence[MicrobatchContext | None],
    spec: DistillSpec, *, seq_length: int, micro_batch_size: int,
) -> list[MicrobatchResult]:
    """Student forward + backward with the TIP loss (gradients accumulate in the DDP
    buffers; megatron divides them once by the global kept count; a weighted rule's are
    then rescaled to the global weight sum, distill.weighting). Last stage's results."""
    results = _run_student(student_chunks, groups, microbatches, contexts, spec,
                           seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False)
    if spec.selection.weighted:
        rescale_weighted_grads(student_chunks, groups, results)
    return results


def forward_loss_pass(
    student_chunks: Sequence[torch.nn.Module], groups: ParallelGroups,
    microbatches: Sequence[Microbatch], contexts: Sequence[MicrobatchContext | None],
    spec: DistillSpec, *, seq_length: int, micro_batch_size: int,
) -> list[MicrobatchResult]:
    """The TIP loss of the current weights, forward only (no gradient): the trainer's check
    of new weights before it saves them. Last stage's results."""
    return _run_student(student_chunks, groups, microbatches, contexts, spec,
                        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)


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
    """Forward-only scoring pre-pass (scope `global`, distill.prepass): this rank's
    micro-batch signals on the last stage (empty lists on other stages). Nothing is
    selected or learned."""
    results = _run_student(student_chunks, groups, microbatches, contexts,
                           replace(spec, score_only=True), seq_length=seq_length,
                           micro_batch_size=micro_batch_size, forward_only=True)
    return Scored([r.signals for r in results], [r.finite for r in results])


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
                          target_mask=mb.target_mask.bool(), rollout_ids=mb.rollout_ids,
                          target_ids=next_token_ids(mb.input_ids))
        for mb, th in zip(microbatches, teacher_hidden)
    ]


def next_token_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] id of the token each position predicts (input_ids shifted left; the last
    column, never a target, repeats the last id)."""
    return torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1).long()
