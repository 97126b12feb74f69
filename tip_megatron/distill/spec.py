"""The loss path's frozen inputs and outputs (distill/loss.py computes with them).

A step's constants (`DistillSpec`: selection, `LossConfig`, vocabulary, TP group), one
micro-batch's inputs to the output processor (`MicrobatchContext`, with the scoring
pre-pass's `Preselection` under scope `global`), what the processor hands megatron's
`loss_func` (`LossPathOutput`), and what `loss_func` keeps per micro-batch for the trainer
(`MicrobatchResult`). All frozen: no object of the loss path is written after it is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from tip_megatron.ops.divergences import Divergence
from tip_megatron.ops.fused_linear_kl import DEFAULT_FUSED_CHUNK
from tip_megatron.ops.topk_divergence import TopkSignal
from tip_megatron.distill.mix import validate_mix
from tip_megatron.tip import SelectionConfig, TokenSignals
from tip_megatron.tip.normalize import RunningNorm

#: `loss.impl` values.
LOSS_IMPLS = ("fused", "unfused")
#: Default tokens per scoring chunk: at V = 151,936 fp32 the two logit chunks take 297 MiB,
#: under the kept-token loss of rho >= 0.1 at 2,048 response tokens (measured 4 x 512 table).
DEFAULT_SCORE_CHUNK = 256


@dataclass(frozen=True)
class LossConfig:
    """How the kept tokens' loss is computed (not which tokens: that is SelectionConfig)."""

    impl: str = "fused"
    """`fused`: chunked output layer + `divergence` with the gradient computed in the forward
    (nothing [k, V/tp] kept for backward); `unfused`: ordinary autograd on the kept tokens
    (reverse KL only)."""
    chunk_size: int = DEFAULT_FUSED_CHUNK
    """Tokens per chunk of the fused loss (two [chunk, V/tp] logit buffers)."""
    score_chunk_size: int = DEFAULT_SCORE_CHUNK
    """Tokens per chunk of the no-grad scoring (student + teacher [chunk, V/tp] logits).
    Scoring sees every response token whatever rho is, so this chunk is the loss path's
    memory floor at small rho (docs/selection_memory.md)."""
    divergence: str = "reverse_kl"
    """What the kept tokens learn from (docs/ops.md): `reverse_kl` KL(P_S||P_T) (the paper),
    `forward_kl` KL(P_T||P_S), `jsd` generalized JSD of GKD. Selection signals do not change."""
    jsd_beta: float = 0.5
    """`jsd` and the JSD part of `mix`: teacher weight in M = beta P_T + (1 - beta) P_S; in (0, 1)."""
    mix: str = "none"
    """Per-token mix of reverse KL, forward KL and JSD (distill/mix.py, docs/ops.md):
    `none`, `entropy_aware` (reverse KL everywhere + forward KL where the teacher's entropy
    > mix_threshold) or `custom` (the mix_* keys below). Fused path only."""
    mix_signal: str = "teacher_entropy"
    """`custom`: the signal that gates the mix: teacher_entropy (nats), entropy_norm,
    reverse_kl, forward_kl (nats)."""
    mix_threshold: float = 0.5
    """The gate: a token uses `mix_high` when its signal > this, else `mix_low`."""
    mix_low: tuple[float, ...] = (1.0, 0.0, 0.0)
    """`custom`: coefficients (reverse KL, forward KL, JSD) >= 0 below the threshold."""
    mix_high: tuple[float, ...] = (1.0, 1.0, 0.0)
    """`custom`: coefficients (reverse KL, forward KL, JSD) >= 0 above the threshold."""
    one_pass: bool = True
    """Rule `all` (the kept set does not depend on the signals): score and learn in one
    fused pass, the statistics read from the loss's own logit chunks (distill/one_pass.py,
    docs/tip.md "LM-head matmuls per step"); False: a separate scoring pass first (the
    reference path). Fused loss without `mix` only; other rules are not affected."""

    def __post_init__(self) -> None:
        self.validate()  # built directly by the engine and tests too, not only from a config

    def validate(self, prefix: str = "loss.") -> None:
        """ValueError naming `<prefix><field>` and what is accepted."""
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f"{prefix}impl={self.impl!r}: accepted values are {list(LOSS_IMPLS)}")
        try:
            Divergence(self.divergence, self.jsd_beta)  # one-line errors for both keys
        except ValueError as err:  # Divergence names them `loss.*`
            raise ValueError(str(err).replace("loss.", prefix, 1)) from None
        validate_mix(self, prefix)
        if self.impl == "unfused" and self.divergence != "reverse_kl":
            raise ValueError(f"{prefix}impl='unfused' supports {prefix}divergence='reverse_kl' "
                             f"only; got {self.divergence!r} (use {prefix}impl='fused')")
        if not isinstance(self.one_pass, bool):
            raise ValueError(f"{prefix}one_pass={self.one_pass!r}: must be true or false")
        for name in ("chunk_size", "score_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{prefix}{name}={value!r}: must be an integer >= 1")


@dataclass(frozen=True)
class Preselection:
    """The scoring pre-pass's products for one micro-batch (scope `global`)."""

    signals: TokenSignals
    """The micro-batch's signals over [b*s] tokens, as the pre-pass scored them."""
    kept_mask: torch.Tensor
    """[b*s] bool kept mask chosen over the global batch."""
    labels: Optional[torch.Tensor] = None
    """[b*s] int64 quadrant labels under the global statistics (needed by a `quantile`
    quadrant rule; None: labels are computed at the output layer, fixed rule only)."""
    finite: bool = True
    """Whether every statistic the pre-pass scored was finite (`build_signals`); it becomes
    the micro-batch's `MicrobatchResult.finite`, as when the loss path scores itself."""
    weights: Optional[torch.Tensor] = None
    """[b*s] float32 weights of a weighted rule (0 outside the kept mask); None: a mask."""
    running_norm: Optional[RunningNorm] = None
    """`selection.normalize=running`: the moving average after this pre-pass (the trainer
    keeps it for the next step and the checkpoint)."""


@dataclass(frozen=True)
class MicrobatchContext:
    """What the output processor reads for one micro-batch (inputs only; never written)."""

    teacher_hidden: Any
    """[s, b, h_t] teacher final hidden states (after its final norm), no grad; or, from a
    teacher on a grid of its own, a pending transfer whose `.get()` waits for them
    (distill.teacher_link)."""
    teacher_weight: torch.Tensor
    """[V/tp, h_t] teacher output-weight shard (same padded vocab as the student)."""
    target_mask: torch.Tensor
    """[b, s] bool: position t is in the loss (its next token is a response token)."""
    rollout_ids: torch.Tensor
    """[b] int64 global rollout ids."""
    preselection: Optional[Preselection] = None
    """Scope `global`: signals and kept mask from the pre-pass; None: score and select here."""
    target_ids: Optional[torch.Tensor] = None
    """[b, s] int64 id of the token position t predicts (the sampled token t+1; any id where
    target_mask is False); read only by signals that need it (`teacher_rank`)."""
    teacher_parts: Optional[tuple] = None
    """Several teachers: one `distill.teachers.TeacherPart` per teacher with rows in this
    micro-batch (its rows, hidden states and output weight), used instead of
    teacher_hidden / teacher_weight; None: one teacher."""


@dataclass(frozen=True)
class LossPathOutput:
    """What the output processor returns and `loss_func` consumes (one micro-batch)."""

    loss_sum: torch.Tensor
    """0-dim sum over the kept tokens of the per-token `loss.divergence` (reverse KL, forward
    KL or JSD), differentiable (zero in the pre-pass)."""
    signals: TokenSignals
    """The signals the selection used ([b*s] tokens)."""
    kept_mask: Optional[torch.Tensor] = None
    """[b*s] bool kept mask; None in the scoring pre-pass (nothing selected yet)."""
    metric_sums: Optional[dict] = None
    """Selection metric sums (see tip.metrics); None in the scoring pre-pass."""
    labels: Optional[torch.Tensor] = None
    """[b*s] int64 quadrant labels the metrics used; None in the scoring pre-pass."""
    finite: bool = True
    """Whether the statistics the selection used were finite (`MicrobatchResult.finite`)."""
    weights: Optional[torch.Tensor] = None
    """[b*s] float32 per-token weights of a weighted rule (0 outside `kept_mask`); None: a
    mask (every kept token weighs 1)."""
    teacher_sums: Optional[dict] = None
    """Several teachers: {name: its selection metric sums} (`tip.teacher_metric_sums`)."""


@dataclass(frozen=True)
class DistillSpec:
    """Everything constant across micro-batches of a step."""

    selection: SelectionConfig
    loss: LossConfig
    vocab_size: int
    tp_group: Any
    step: int = 0
    running_norm: Optional[RunningNorm] = None
    """`selection.normalize=running`: the moving average before this step (None: none yet)."""
    score_only: bool = False
    """Scoring pre-pass (global scope): compute and return the signals, no loss."""
    teacher_signal: Optional[TopkSignal] = None
    """`teacher.signal: topk`: the kept tokens learn from the teacher's top-k (+ tail) through
    `ops.topk_divergence` (loss.impl does not apply); None: the exact full vocabulary."""
    teacher_names: tuple[str, ...] = ()
    """Several teachers: their names, in index order (per-teacher metric sums `teacher/<name>/*`
    in each micro-batch's report); (): one teacher."""


@dataclass(frozen=True)
class MicrobatchResult:
    """One micro-batch's products on the last stage, collected by `make_loss_func`'s loss
    function in micro-batch order (the student pass returns them)."""

    signals: TokenSignals
    """The signals the selection used ([b*s] tokens)."""
    kept_mask: Optional[torch.Tensor]
    """[b*s] bool kept mask; None in the scoring pre-pass."""
    labels: Optional[torch.Tensor]
    """[b*s] int64 quadrant labels the metrics used; None in the scoring pre-pass."""
    metric_sums: dict
    """The report handed to megatron: `distill` ([loss_sum, num_kept, weight_sum] float64;
    weight_sum == num_kept for a mask) and the `tip/*` selection metric sums, reduced by
    train.metrics.reduce_reports; {} in the scoring pre-pass."""
    finite: bool
    """Whether every statistic the selection used was finite. False: the signals were
    zeroed where not finite, so the kept mask and loss mean nothing; the trainer skips the
    update (and the save check refuses the weights)."""
    weights: Optional[torch.Tensor] = None
    """[b*s] float32 per-token weights of a weighted rule; None: a mask."""
