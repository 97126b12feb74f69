"""The output processor megatron's GPTModel.forward calls on the last stage: the TIP loss
path of one micro-batch (distill/loss.py holds its parts; rule `all` runs as one fused
pass, distill/one_pass.py).

Shapes: hidden [s, b, h] ([s/tp, b, h] under sequence parallelism) -> [b*s, h].
"""
from __future__ import annotations

from typing import Any

from tip_megatron.distill import one_pass
from tip_megatron.distill.loss import build_signals, full_sequence, kept_loss
from tip_megatron.distill.spec import DistillSpec, LossPathOutput, MicrobatchContext
from tip_megatron.distill.views import flat_tokens
from tip_megatron.tip import select_weighted, selection_labels, selection_metric_sums
from tip_megatron.tip.metrics import teacher_metric_sums


def _signals_and_kept(hidden_flat, weight, ctx: MicrobatchContext, spec: DistillSpec):
    """(signals, kept mask or None, labels, finite, weights or None): the pre-pass's when
    given, else scored (and selected, labeled) here."""
    pre = ctx.preselection
    if pre is not None:
        if spec.score_only:
            raise ValueError("the scoring pre-pass got micro-batches that were already scored")
        labels = pre.labels if pre.labels is not None else selection_labels(spec.selection, pre.signals)
        return pre.signals, pre.kept_mask, labels, pre.finite, pre.weights
    signals, finite = build_signals(hidden_flat.detach(), weight.detach(), ctx, spec)
    if spec.score_only:
        return signals, None, None, finite, None
    kept, weights = select_weighted(spec.selection, signals, step=spec.step)
    return signals, kept, selection_labels(spec.selection, signals), finite, weights


def _merged(hidden_flat, weight, ctx: MicrobatchContext, spec: DistillSpec, sp: bool) -> LossPathOutput:
    """Rule `all`: signals and loss from one fused pass (distill.one_pass)."""
    out = one_pass.score_and_learn(hidden_flat, weight, ctx, spec, sequence_parallel=sp)
    sums = selection_metric_sums(out.signals, out.kept_mask, out.labels, out.token_loss)
    return LossPathOutput(out.loss_sum, out.signals, out.kept_mask, sums, out.labels, out.finite)


def make_output_processor(spec: DistillSpec):
    """The `output_processor` for GPTModel.forward: returns a `LossPathOutput`."""

    def output_processor(*, hidden_states, output_layer, output_weight, context, **_: Any):
        ctx: MicrobatchContext = context
        weight = output_weight if output_weight is not None else output_layer.weight
        hidden_states, sp = full_sequence(hidden_states, output_layer, spec.tp_group)
        hidden_flat = flat_tokens(hidden_states)
        if one_pass.applies(spec, ctx):
            return _merged(hidden_flat, weight, ctx, spec, sp)
        signals, kept, labels, finite, weights = _signals_and_kept(hidden_flat, weight, ctx, spec)
        if kept is None:
            return LossPathOutput(hidden_states.new_zeros(()), signals, finite=finite)
        loss_sum, token_loss = kept_loss(hidden_flat, weight, ctx, kept, spec, sequence_parallel=sp,
                                         weights=weights, signals=signals)
        if weights is not None:  # the metrics' loss shares split the weighted loss
            token_loss = token_loss * weights.to(token_loss.device)[kept].to(token_loss.dtype)
        per_teacher = None
        if spec.teacher_names:  # several teachers: each one's sums too
            sums = teacher_metric_sums(signals, kept, labels, token_loss, len(spec.teacher_names))
            per_teacher = dict(zip(spec.teacher_names, sums))
        return LossPathOutput(loss_sum, signals, kept, selection_metric_sums(signals, kept, labels, token_loss),
                              labels, finite, weights, per_teacher)

    return output_processor
