"""The two grids of a teacher on a grid of its own, as every rank sees them without talking:
sizes, megatron's rank order, and a step's shapes (distill/teacher_link.py uses them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tip_megatron.runtime.parallel import ParallelLayout


@dataclass(frozen=True)
class Grid:
    """One model's grid as every rank sees it: sizes and the job-wide first rank."""

    tp: int
    pp: int
    dp: int
    offset: int

    @classmethod
    def of(cls, layout: ParallelLayout, ranks: int, offset: int) -> "Grid":
        return cls(layout.tp, layout.pp, ranks // (layout.tp * layout.pp), offset)

    def rank(self, tp: int, pp: int, dp: int) -> int:
        return self.offset + tp + self.tp * dp + self.tp * self.dp * pp

    def replica(self, dp: int) -> list[int]:
        return [self.rank(t, p, dp) for p in range(self.pp) for t in range(self.tp)]


@dataclass(frozen=True)
class LinkSpec:
    """What both sides know without talking: the two grids and a step's shapes."""

    student: Grid
    teacher: Grid
    microbatches: int
    """Micro-batches per student replica per step (M)."""
    hidden_size: int
    """The teacher's hidden size h_t."""
    dtype: torch.dtype
    """The teacher's compute dtype (its hidden states and output weight)."""
    padded_vocab: int
    queue_depth: int = 2
    teacher_sequence_parallel: bool = False
    separate: bool = False
    """The teacher's ranks are its own: after each step they tell the student's rank 0
    whether a stop signal reached them (`teacher_signal`)."""
    tag_base: int = 0
    """Added to every message tag of this link (several teachers: one range each, so two
    links between the same pair of ranks never match each other's messages)."""


def spec_grids(spec: LinkSpec) -> tuple[Grid, Grid, LinkSpec]:
    return spec.student, spec.teacher, spec
