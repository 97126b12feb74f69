"""Score and learn in one fused pass over the logits (rule `all`): the statistics of every
response token are read from the fused loss's own logit chunks, so each token's student
and teacher logits are computed once per step instead of twice (a scoring pass, then the
loss over the kept tokens).

Shapes: hidden [b*s, h] flattened batch-major; n = the micro-batch's response (target)
positions; [c, w] = one chunk's logits over the shard's w true-vocab columns.

Where it applies (`applies`): the kept set does not depend on the signals (rule `all`
keeps every response token), so the loss can run before the selection; the fused loss
without `loss.mix` (the mix gates each token by a signal before its divergence); no
teacher top-k signal; no optional signal that needs the padded shard; the micro-batch was
not pre-scored (scope `global` brings its signals) and this is not the pre-pass itself.
Every other rule keeps today's order (score every token, select, the fused loss on the
kept tokens): its kept set needs the statistics of the whole rollout or batch first, and
the fused loss already computes the gradient in its forward, so nothing is computed a
third time (docs/tip.md, "LM-head matmuls per step").
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from tip_megatron.ops import fused_linear_divergence
from tip_megatron.ops.divergences import Divergence
from tip_megatron.distill.loss import BASE_SIGNALS, assemble_signals, chunk_signals, extra_signals
from tip_megatron.distill.spec import DistillSpec, MicrobatchContext
from tip_megatron.distill.views import flat_tokens, teacher_states
from tip_megatron.tip import TokenSignals, select_weighted, selection_labels

#: Rules whose kept set is every response token whatever the signals.
SIGNAL_FREE_RULES = ("all",)


class OnePass(NamedTuple):
    """The merged pass's products for one micro-batch."""

    signals: TokenSignals
    kept_mask: torch.Tensor
    """[b*s] bool: the response positions (what the rule keeps)."""
    labels: torch.Tensor
    finite: bool
    loss_sum: torch.Tensor
    """0-dim differentiable sum of `loss.divergence` over the kept tokens."""
    token_loss: torch.Tensor
    """[n] detached per-token divergence."""


def applies(spec: DistillSpec, ctx: MicrobatchContext) -> bool:
    """Whether this micro-batch scores and learns in one pass (module docstring)."""
    return (spec.loss.one_pass and spec.selection.rule in SIGNAL_FREE_RULES
            and not spec.selection.weighted and ctx.preselection is None and not spec.score_only
            and spec.loss.impl == "fused" and spec.loss.mix == "none"
            and spec.teacher_signal is None and not extra_signals(spec)
            and ctx.teacher_parts is None)  # several teachers: the loss path's parts


def score_and_learn(hidden_flat: torch.Tensor, weight: torch.Tensor, ctx: MicrobatchContext,
                    spec: DistillSpec, *, sequence_parallel: bool = False) -> OnePass:
    """Signals, kept mask, labels and the loss of one micro-batch from ONE fused pass.

    hidden_flat: [b*s, h] student hidden states (grad flows to them and to `weight`).
    sequence_parallel: as `loss.kept_loss` (the caller's gather reduce-scatters the grad).
    The signals equal `build_signals`'s up to the rounding of a logit row computed in a
    chunk of another size; the loss and gradients equal `kept_loss` on the same kept set."""
    target = ctx.target_mask.reshape(-1).to(hidden_flat.device)
    positions = target.nonzero().squeeze(1)
    parts: list[torch.Tensor] = []

    def observe(_rows: slice, student: torch.Tensor, teacher: torch.Tensor, work) -> None:
        parts.append(torch.stack(chunk_signals(student, teacher, spec, (), None,
                                               shard_width=weight.shape[0], work=work)))

    loss_sum, token_loss = fused_linear_divergence(
        hidden_flat.index_select(0, positions), weight,
        flat_tokens(teacher_states(ctx)).index_select(0, positions), ctx.teacher_weight,
        tp_group=spec.tp_group, vocab_size=spec.vocab_size, chunk_size=spec.loss.chunk_size,
        reduce_hidden_grad=not sequence_parallel,
        divergence=Divergence(spec.loss.divergence, spec.loss.jsd_beta), observe=observe)
    scored = (tuple(torch.cat(parts, dim=1).float()) if parts else
              (hidden_flat.new_zeros(0, dtype=torch.float32),) * len(BASE_SIGNALS))
    signals, finite = assemble_signals(scored, positions, ctx, spec)
    kept = _kept(spec, signals, target)
    return OnePass(signals, kept, selection_labels(spec.selection, signals), finite,
                   loss_sum, token_loss)


def _kept(spec: DistillSpec, signals: TokenSignals, target: torch.Tensor) -> torch.Tensor:
    """The rule's kept mask, checked to be the rows the loss already covered."""
    kept, weights = select_weighted(spec.selection, signals, step=spec.step)
    if weights is not None or not torch.equal(kept, target):
        raise RuntimeError(f"rule {spec.selection.rule!r} did not keep exactly the response tokens: "
                           "it cannot run in one pass (remove it from one_pass.SIGNAL_FREE_RULES)")
    return kept

