"""Several teachers in one step: each teacher scores only the rollout rows routed to it
(`Microbatch.teacher_ids`), and the student's loss path reads, per micro-batch, one
`TeacherPart` per teacher that has rows there (docs/teacher.md, "Several teachers").

A teacher's rows of this replica are packed, in micro-batch order, into micro-batches of
its own of the student's size b (the last one right-padded with dummy rows): a teacher
with n rows runs ceil(n / b) micro-batches, none when it has no row. Its hidden states
come back per packed micro-batch ([s, b, h_t], from its own grid or the student's) and
each student micro-batch's part gathers its rows from them ([s, n_i, h_t]).

Shapes: rows [n_i] int64 indices into the student micro-batch's b rows (ascending);
hidden [s, n_i, h_t].
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch

from tip_megatron.distill.spec import MicrobatchContext
from tip_megatron.distill.step import (
    Microbatch, ScheduleShape, make_contexts, teacher_hidden_states, teacher_output_weight,
)
from tip_megatron.runtime.parallel import ParallelGroups


@dataclass(frozen=True)
class TeacherPart:
    """One teacher's rows of one student micro-batch."""

    index: int
    """The teacher's index in `teachers:`."""
    rows: torch.Tensor
    """[n] int64 rows of the micro-batch this teacher scored (ascending)."""
    hidden: Any
    """[s, n, h_t] its final hidden states of those rows, or a `GatheredRows` whose `.get()`
    waits for them."""
    weight: torch.Tensor
    """[V/tp, h_t] its output-weight shard on this rank."""

    def states(self) -> torch.Tensor:
        return self.hidden if isinstance(self.hidden, torch.Tensor) else self.hidden.get()


class GatheredRows:
    """Rows [s, n, h_t] gathered from packed micro-batches' hidden states (tensors or
    pending transfers), on first use."""

    def __init__(self, sources: Sequence[Any], picks: list[tuple[int, int]]) -> None:
        self._sources, self._picks, self._value = sources, picks, None

    def get(self) -> torch.Tensor:
        if self._value is None:
            cols = []
            for k, r in self._picks:
                src = self._sources[k]
                src = src if isinstance(src, torch.Tensor) else src.get()
                cols.append(src[:, r:r + 1])
            self._value = torch.cat(cols, dim=1)
        return self._value


def pack_rows(mbs: Sequence[Microbatch], teacher: int, size: int):
    """(packed micro-batches of `teacher`'s rows, per student micro-batch the (rows, picks)
    of that teacher: rows [n_i] int64, picks [(packed index, row)] per row)."""
    ids, pos, owners = [], [], []
    for i, mb in enumerate(mbs):
        rows = torch.nonzero(mb.teacher_ids == teacher).flatten()
        owners.append(rows)
        ids.append(mb.input_ids[rows])
        pos.append(mb.position_ids[rows])
    ids, pos = torch.cat(ids), torch.cat(pos)
    n = ids.shape[0]
    packed = []
    for start in range(0, n, size):
        chunk_ids, chunk_pos = ids[start:start + size], pos[start:start + size]
        pad = size - chunk_ids.shape[0]
        if pad:  # dummy rows: their hidden states are never read
            chunk_ids = torch.cat([chunk_ids, chunk_ids.new_zeros(pad, chunk_ids.shape[1])])
            chunk_pos = torch.cat([chunk_pos, chunk_pos[:1].expand(pad, -1)])
        b, s = chunk_ids.shape
        packed.append(Microbatch(chunk_ids.contiguous(), chunk_pos.contiguous(),
                                 torch.zeros(b, s, dtype=torch.bool, device=ids.device),
                                 torch.zeros(b, dtype=torch.int64, device=ids.device)))
    where, flat = [], 0
    for rows in owners:
        picks = [((flat + j) // size, (flat + j) % size) for j in range(rows.numel())]
        where.append((rows, picks))
        flat += rows.numel()
    return packed, where


def routed_contexts(sides: Sequence[Any], groups: ParallelGroups, mbs: list[Microbatch],
                    shape: ScheduleShape) -> list[Optional[MicrobatchContext]]:
    """Per micro-batch contexts carrying one `TeacherPart` per teacher with rows there
    (last stage; None elsewhere). `sides`: the run's `TeacherSide`s (train.setup)."""
    parts: list[list[TeacherPart]] = [[] for _ in mbs]
    for t, side in enumerate(sides):
        packed, where = pack_rows(mbs, t, shape.micro_batch_size)
        if side.link is not None:  # every rank of both grids takes part, rows or not
            hidden = side.link.exchange(packed, side.chunks)
            weight = side.weight
        else:
            hidden = (teacher_hidden_states(side.chunks, groups, packed, seq_length=shape.seq_length,
                                            micro_batch_size=shape.micro_batch_size) if packed else [])
            weight = teacher_output_weight(side.chunks) if groups.is_last_stage else None
        if not groups.is_last_stage:
            continue
        for i, (rows, picks) in enumerate(where):
            if rows.numel():
                parts[i].append(TeacherPart(t, rows, GatheredRows(hidden, picks), weight))
    contexts = make_contexts(groups, mbs, [None] * len(mbs), None)
    if not groups.is_last_stage:
        return contexts
    return [replace(ctx, teacher_parts=tuple(p)) for ctx, p in zip(contexts, parts)]
