"""The run config's `teacher:` section: where its weights come from (a `ModelSource`), its
own parallel layout, and where its ranks are (`placement`). docs/teacher.md has the data
path and the memory per rank of each placement.

    teacher: {ckpt: ckpt/qwen3-8b, parallel: {tp: 2}, placement: separate}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tip_megatron.checkpoint.sources import ModelSource
from tip_megatron.ops.topk_divergence import TopkSignal
from tip_megatron.runtime.parallel import ParallelLayout

PLACEMENTS = ("shared", "separate")
SIGNALS = ("full", "topk")


@dataclass(frozen=True)
class TeacherLayout:
    """The teacher's own layout; every key left unset (null) takes the student's value
    (`parallel.*`), so an empty section is today's one grid."""

    tp: Optional[int] = None
    """Tensor-parallel size of the teacher."""
    pp: Optional[int] = None
    """Pipeline-parallel size of the teacher."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per teacher rank (needs teacher pp >= 2)."""
    sequence_parallel: Optional[bool] = None
    """Megatron sequence parallelism in the teacher's forward (needs teacher tp > 1)."""
    dp: Optional[int] = None
    """Teacher replicas; `separate` only (its ranks are tp x pp x dp; default 1). Under
    `shared` the teacher's DP is derived: world / (tp x pp)."""

    def resolve(self, student: ParallelLayout) -> ParallelLayout:
        """The teacher's ParallelLayout: unset keys from the student's layout. An unset
        `vpp` or `sequence_parallel` follows the student's only where the teacher's own tp /
        pp allow it (a teacher at pp 1 drops the student's vpp)."""
        tp = self.tp if self.tp is not None else student.tp
        pp = self.pp if self.pp is not None else student.pp
        vpp = self.vpp if self.vpp is not None else (student.vpp if pp >= 2 else None)
        sp = self.sequence_parallel
        if sp is None:
            sp = student.sequence_parallel and tp >= 2
        return ParallelLayout(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp)

    def is_unset(self) -> bool:
        return all(getattr(self, k) is None for k in ("tp", "pp", "vpp", "sequence_parallel", "dp"))


@dataclass(frozen=True)
class TeacherConfig(ModelSource):
    """The frozen teacher: its weights (exactly one of ckpt / hf / builtin), its layout and
    its placement."""

    parallel: TeacherLayout = field(default_factory=TeacherLayout)
    """The teacher's TP / PP / VPP / SP (and DP under `separate`); unset keys follow `parallel.*`."""
    placement: str = "shared"
    """`shared`: the teacher on the student's ranks, with process groups of its own when its
    layout differs; `separate`: the teacher on ranks of its own after the student's (world
    size = student ranks + teacher ranks; the student's ranks come first)."""
    queue_depth: int = 2
    """`separate`: micro-batches whose hidden states a teacher rank may have in flight to
    the student before it waits (the teacher scores micro-batch i+1 while the student
    learns from micro-batch i)."""
    signal: str = "full"
    """What the kept tokens learn from: `full` the exact full-vocabulary divergence; `topk` a
    comparison mode, the divergence over the teacher's `topk` most likely tokens per position
    (+ a tail class), to measure what truncating the teacher costs (docs/ops.md, "Top-k teacher
    signal"). Selection statistics stay exact either way."""
    topk: int = 64
    """`signal: topk`: teacher tokens kept per position (>= the vocabulary size: the exact loss)."""
    topk_tail: bool = True
    """`signal: topk`: add one class holding the remaining probability mass of each model;
    false: both distributions renormalised over the k tokens."""

    def validate(self, name: str = "teacher") -> None:
        super().validate(name)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"{name}.placement={self.placement!r}: accepted values are {list(PLACEMENTS)}")
        p = self.parallel
        for key in ("tp", "pp", "dp"):
            value = getattr(p, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}.parallel.{key}={value!r}: must be an integer >= 1 (or null: "
                                 "the student's)")
        if p.dp is not None and self.placement != "separate":
            raise ValueError(f"{name}.parallel.dp={p.dp}: only with {name}.placement=separate (under "
                             "`shared` the teacher's DP is world / (tp x pp))")
        if not isinstance(self.queue_depth, int) or isinstance(self.queue_depth, bool) or self.queue_depth < 1:
            raise ValueError(f"{name}.queue_depth={self.queue_depth!r}: must be an integer >= 1")
        if self.signal not in SIGNALS:
            raise ValueError(f"{name}.signal={self.signal!r}: accepted values are {list(SIGNALS)}")
        try:
            TopkSignal(self.topk, self.topk_tail)  # one-line errors naming teacher.topk / topk_tail
        except ValueError as err:
            raise ValueError(str(err).replace("teacher.", f"{name}.", 1)) from None

    def topk_signal(self) -> Optional[TopkSignal]:
        """The loss's truncated teacher signal; None = the full vocabulary (`signal: full`)."""
        return TopkSignal(self.topk, self.topk_tail) if self.signal == "topk" else None

    @property
    def separate(self) -> bool:
        return self.placement == "separate"

    def ranks(self, student: ParallelLayout) -> int:
        """Ranks of their own under `separate` (tp x pp x dp); 0 under `shared`."""
        if not self.separate:
            return 0
        layout = self.parallel.resolve(student)
        return layout.tp * layout.pp * (self.parallel.dp or 1)

    def own_grid(self, student: ParallelLayout) -> bool:
        """Whether the teacher needs a grid of its own (another layout or other ranks); False
        is the one-grid case, where the teacher runs on the student's own process groups."""
        if self.separate:
            return True
        mine = self.parallel.resolve(student)
        return (mine.tp, mine.pp, mine.vpp, mine.sequence_parallel) != (
            student.tp, student.pp, student.vpp, student.sequence_parallel)
