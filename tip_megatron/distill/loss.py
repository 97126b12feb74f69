"""The TIP loss path at the student's output layer (last pipeline stage).

Shapes: hidden [s, b, h] (megatron layout; [s/tp, b, h] under sequence parallelism,
gathered first by `full_sequence`) -> flattened [b*s, h] (batch-major, matching the [b, s]
masks); k = kept tokens; V/tp = this rank's vocabulary shard.

Per micro-batch, inside `GPTModel.forward(..., output_processor=...)` (the processor itself
is distill/processor.py; rule `all` runs a-c as one fused pass, distill/one_pass.py):
  a. score (no grad, in chunks of `score_chunk_size`): student and teacher logit shards of the response positions
     -> entropy, reverse KL, forward KL through vocab-parallel all-reduces; only [tokens]
     statistics survive. Skipped under scope `global`: the scoring pre-pass already
     computed the signals, and the micro-batch's `Preselection` carries them here;
  b. select: a TIP rule turns them into a kept mask (or takes the pre-pass's mask);
  c. drop, then learn: only the kept positions' hidden states go through the output layer
     with grad, fused with `loss.divergence` (or unfused, for comparison), teacher logits
     recomputed from the cached teacher hidden states of the kept tokens.

Data flow (no shared mutable object; the types are in distill/spec.py): the inputs are a
frozen `MicrobatchContext`; the output processor returns a `LossPathOutput`, which
megatron's schedule hands unchanged to `loss_func` (GPTModel.forward returns the processor's value as the model output, the
schedule calls `loss_func(output)` on the last stage). `loss_func` returns megatron's
(loss_sum, num_kept, report), the report holding metric sums only, and appends the
micro-batch's typed `MicrobatchResult` (signals, kept mask, labels, metric sums, `finite`)
to the list the student pass returns. Megatron divides the gradients once by the global
kept count. Non-finite statistics are zeroed so selection runs, and `finite=False` says so:
the trainer skips that update.
"""
from __future__ import annotations

from typing import Optional

import torch

from tip_megatron.ops import (
    fused_linear_divergence, unfused_linear_divergence, vocab_parallel_rank, vocab_parallel_stats,
    vocab_parallel_topk_mass,
)
from tip_megatron.ops.divergences import Divergence
from tip_megatron.ops.sequence_parallel import gather_sequence
from tip_megatron.ops.topk_divergence import topk_linear_divergence
from tip_megatron.distill.mix import mixed_divergence
from tip_megatron.distill.spec import (
    DistillSpec, LossPathOutput, MicrobatchContext, MicrobatchResult,
)
from tip_megatron.distill.views import teacher_views, token_teacher_ids
from tip_megatron.tip import TokenSignals

#: The signals `score_tokens` returns, in order: always the first four, then those asked for.
BASE_SIGNALS = ("entropy_norm", "reverse_kl", "forward_kl", "teacher_entropy")


def chunk_signals(student, teacher, spec: DistillSpec, extra: tuple, token_ids,
                  shard_width: Optional[int] = None, work=None) -> list:
    """The [c] rows of one scoring chunk: BASE_SIGNALS, then `extra` in order.
    `shard_width`, `work`: the padded shard width when the chunks hold only the true-vocab
    columns, and the fused loss's scratch buffers (its observer; no extra signals then)."""
    kw = dict(tp_group=spec.tp_group, vocab_size=spec.vocab_size)
    if shard_width is not None and extra:
        raise ValueError(f"signals {list(extra)} need the padded logit shard (no shard_width)")
    scratch = {} if work is None else dict(work=work, chunk_size=work.buffers[0].shape[0])
    stats = vocab_parallel_stats(student, teacher, shard_width=shard_width, **scratch, **kw)
    rows = [stats.student_entropy_norm, stats.reverse_kl, stats.forward_kl, stats.teacher_entropy]
    for name in extra:
        if name == "teachability":
            rows.append(vocab_parallel_topk_mass(student, teacher, spec.selection.top_k, **kw))
        elif name == "teacher_rank":
            if token_ids is None:
                raise ValueError("the teacher_rank signal needs MicrobatchContext.target_ids")
            rows.append(vocab_parallel_rank(teacher, token_ids, **kw))
    return [r.to(rows[0].dtype) for r in rows]


@torch.no_grad()
def score_tokens(hidden_flat, weight, teacher_flat, teacher_weight, positions, spec: DistillSpec,
                 *, student_rows=None, target_ids=None, teacher_rows=None):
    """[BASE_SIGNALS + extra signals] tuple of [n] for the rows `positions` (chunked); the
    extra ones (`extra_signals(spec)`) only when the selection reads them.

    student_rows: [n] rows of `hidden_flat` holding the student's hidden state at each of
    `positions` (default: `positions` themselves). The generation engine's kept hidden
    states ([response tokens, h], `Rollouts.response_hidden`) are read this way, one
    chunk at a time: nothing of the micro-batch's size is copied.
    target_ids: [b*s] ids each position predicts (needed by `teacher_rank`).
    teacher_rows: [n] rows of `teacher_flat` of each position (default: `positions`)."""
    parts = []
    chunk = spec.loss.score_chunk_size
    extra = extra_signals(spec)
    rows = positions if student_rows is None else student_rows.to(hidden_flat.device)
    t_rows = positions if teacher_rows is None else teacher_rows
    if rows.numel() != positions.numel():
        raise ValueError(f"{rows.numel()} student rows for {positions.numel()} scored positions")
    for start in range(0, positions.numel(), chunk):
        idx = positions[start:start + chunk]
        ids = None if target_ids is None else target_ids[idx].clamp(0, spec.vocab_size - 1)
        parts.append(torch.stack(chunk_signals(
            hidden_flat[rows[start:start + chunk]] @ weight.t(),
            teacher_flat[t_rows[start:start + chunk]] @ teacher_weight.t(),
            spec, extra, ids)))
    if not parts:
        return (hidden_flat.new_zeros(0, dtype=torch.float32),) * (len(BASE_SIGNALS) + len(extra))
    return tuple(torch.cat(parts, dim=1).float())


def extra_signals(spec: DistillSpec) -> tuple[str, ...]:
    """The optional signals beyond BASE_SIGNALS that this step's selection reads."""
    return tuple(n for n in ("teachability", "teacher_rank") if n in spec.selection.signals_needed)


def build_signals(hidden_flat, weight, ctx: MicrobatchContext, spec: DistillSpec, *, student_rows=None):
    """(signals over all [b*s] positions, whether every statistic was finite); statistics
    are computed for target positions only (`student_rows`: see `score_tokens`)."""
    target = ctx.target_mask.reshape(-1).to(hidden_flat.device)
    all_positions = target.nonzero().squeeze(1)
    target_ids = None if ctx.target_ids is None else ctx.target_ids.reshape(-1).to(target.device)
    full, names, finite = _empty_signals(target, spec), BASE_SIGNALS + extra_signals(spec), True
    for view in teacher_views(ctx, target.device):
        positions = all_positions if view.tokens is None else all_positions[view.tokens[all_positions]]
        student = None if student_rows is None else (
            student_rows if view.tokens is None else student_rows[view.tokens[all_positions]])
        scored = score_tokens(hidden_flat, weight, view.flat, view.weight, positions, spec,
                              student_rows=student, target_ids=target_ids,
                              teacher_rows=None if view.local is None else view.local[positions])
        finite = _fill(full, names, scored, positions) and finite
    return _finish(full, target, ctx), finite


def assemble_signals(scored, positions: torch.Tensor, ctx: MicrobatchContext, spec: DistillSpec):
    """(signals over all [b*s] positions, whether every statistic was finite) from the
    [n] rows `scored` (BASE_SIGNALS + extra, as `score_tokens` returns them) of the target
    `positions` (one teacher)."""
    target = ctx.target_mask.reshape(-1).to(positions.device)
    full = _empty_signals(target, spec)
    finite = _fill(full, BASE_SIGNALS + extra_signals(spec), scored, positions)
    return _finish(full, target, ctx), finite


def _empty_signals(target: torch.Tensor, spec: DistillSpec) -> dict:
    return {n: torch.zeros(target.numel(), dtype=torch.float32, device=target.device)
            for n in BASE_SIGNALS + extra_signals(spec)}


def _fill(full: dict, names: tuple, scored, positions: torch.Tensor) -> bool:
    """Write the scored rows at `positions`; whether every one was finite."""
    finite = all(bool(torch.isfinite(x).all()) for x in scored)
    for name, src in zip(names, scored):
        # KL and entropy >= 0 (clamps fp32 rounding); non-finite values (diverged weights)
        # become 0 so selection runs, and `finite` tells the trainer to skip the update.
        full[name][positions] = torch.nan_to_num(src, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    return finite


def _finish(full: dict, target: torch.Tensor, ctx: MicrobatchContext) -> TokenSignals:
    full["entropy_norm"] = full["entropy_norm"].clamp_max(1.0)
    seq = ctx.target_mask.shape[1]
    rollout = ctx.rollout_ids.to(target.device).repeat_interleave(seq)
    return TokenSignals(**full, response_mask=target, rollout_ids=rollout,
                        teacher_ids=token_teacher_ids(ctx, target.device))


def kept_loss(hidden_flat, weight, ctx: MicrobatchContext, kept: torch.Tensor, spec: DistillSpec,
              *, sequence_parallel: bool = False, weights: Optional[torch.Tensor] = None,
              signals: Optional[TokenSignals] = None):
    """(sum of `loss.divergence` over kept positions, with grad to hidden and weight; the
    detached [num kept] per-token divergence, for the metrics' `q*_loss_share`).

    weights: [b*s] per-token weights (a weighted rule); the sum is then sum_i w_i D_i over
    the kept positions (every kept weight is > 0). None: every kept token weighs 1, the
    unweighted op call of a mask.
    signals: the micro-batch's signals; `loss.mix` reads its gate from them.

    sequence_parallel: `hidden_flat` comes from `gather_sequence`, whose backward
    reduce-scatters the hidden state's gradient; the loss op must not all-reduce it too.
    """
    fn = fused_linear_divergence if spec.loss.impl == "fused" else unfused_linear_divergence
    base = {"chunk_size": spec.loss.chunk_size} if spec.loss.impl == "fused" else {}
    if spec.teacher_signal is not None:  # comparison mode: the teacher truncated to its top-k
        fn, base = topk_linear_divergence, {"chunk_size": spec.loss.chunk_size,
                                            "signal": spec.teacher_signal}
    if spec.loss.mix != "none" and signals is None:  # refused with teacher.signal=topk (config)
        raise ValueError("loss.mix needs the micro-batch's signals (kept_loss(signals=...))")
    views = teacher_views(ctx, kept.device)
    if len(views) > 1:  # several teachers: each one's kept tokens, in token order overall
        order = torch.cumsum(kept.long(), 0) - 1
        token_loss = None
        loss_sum = None
    for view in views:
        mine = kept if view.tokens is None else kept & view.tokens
        idx = mine.nonzero().squeeze(1)
        rows = idx if view.local is None else view.local[idx]
        kwargs = dict(base)
        if weights is not None:
            kwargs["token_weights"] = weights.to(idx.device).index_select(0, idx)
        divergence = Divergence(spec.loss.divergence, spec.loss.jsd_beta)
        if spec.loss.mix != "none":
            divergence = mixed_divergence(spec.loss, signals, mine)
        out = fn(hidden_flat.index_select(0, idx), weight, view.flat.index_select(0, rows), view.weight,
                 tp_group=spec.tp_group, vocab_size=spec.vocab_size,
                 reduce_hidden_grad=not sequence_parallel, divergence=divergence, **kwargs)
        if len(views) == 1:
            return out
        if token_loss is None:
            token_loss = out[1].new_zeros(int(kept.sum()))
        token_loss[order[idx]] = out[1]
        loss_sum = out[0] if loss_sum is None else loss_sum + out[0]
    return loss_sum, token_loss


def full_sequence(hidden_states: torch.Tensor, output_layer, tp_group) -> tuple[torch.Tensor, bool]:
    """([s, b, h] hidden states, whether they were gathered from sequence-parallel shards).

    Under sequence parallelism megatron's output layer is tagged `sequence_parallel` and
    receives [s/tp, b, h]; the loss path gathers the whole sequence on every TP rank
    (scoring and the loss need every token against this rank's vocabulary shard), and the
    gather's backward returns the gradient in the sequence-sharded layout.
    """
    if not getattr(output_layer, "sequence_parallel", False):
        return hidden_states, False
    return gather_sequence(hidden_states, tp_group), True


def make_loss_func(results: list):
    """megatron's loss function for the student pass; appends each micro-batch's
    `MicrobatchResult` to `results` (the last stage calls it once per micro-batch, in order)."""

    def loss_func(out: LossPathOutput):
        """megatron's loss contract: (loss_sum, num_tokens, report); the report holds only
        metric sums (`distill` [loss_sum, num_kept, weight_sum] and `tip/*`). Megatron
        divides the gradients once by the global kept count (an int: its schedules add it
        into an int tensor); for a weighted rule `train_pass` then rescales them by
        global kept count / global weight sum (`distill.weighting`)."""
        if out.kept_mask is None:  # scoring pre-pass: no loss, only the signals
            results.append(MicrobatchResult(out.signals, None, None, {}, out.finite))
            return out.loss_sum, torch.zeros((), dtype=torch.int), {}
        num_kept = int(out.kept_mask.sum())
        weight_sum = (float(num_kept) if out.weights is None
                      else float(out.weights.double().sum()))
        report = {"distill": torch.stack([out.loss_sum.detach().clone().double(),
                                          torch.tensor(float(num_kept), dtype=torch.float64,
                                                       device=out.loss_sum.device),
                                          torch.tensor(weight_sum, dtype=torch.float64,
                                                       device=out.loss_sum.device)])}
        report.update({f"tip/{k}": v.detach() for k, v in out.metric_sums.items()})
        for name, sums in (out.teacher_sums or {}).items():
            report.update({f"teacher/{name}/{k}": v.detach() for k, v in sums.items()})
        results.append(MicrobatchResult(out.signals, out.kept_mask, out.labels, report, out.finite,
                                        out.weights))
        return out.loss_sum, torch.tensor(num_kept, dtype=torch.int, device=out.loss_sum.device), report

    return loss_func
