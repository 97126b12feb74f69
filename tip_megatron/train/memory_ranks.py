"""Which memory terms one rank of the job holds, by placement (train/memory_plan.py groups
the ranks; the formulas are in train/memory_terms.py, the data path they follow in
distill/teacher_link.py).

    sides = Sides.of(cfg, s_arch, t_arch, world_size, student_world, device)
    side, stage, teacher_stage, terms = rank_terms(sides, rank)

Ranks are numbered in megatron's order inside each grid (TP fastest, then DP, then PP), the
student's grid from 0, the teacher's from 0 (`shared`) or after the student's (`separate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tip_megatron.config import RunConfig, run_selection
from tip_megatron.models.arch import ModelArch
from tip_megatron.runtime.parallel import ParallelLayout
from tip_megatron.train.memory_terms import (
    MIB, Shape, Term, grid_shape, hidden_bytes, load_term, loss_path_term, padded_vocab, rollout_terms,
    stage_params, student_activation_term, student_state_terms, teacher_activation_term,
    teacher_shape)

_STASH_CUT = "data.prompts_per_step / rollout.n, or more DP ranks"


@dataclass(frozen=True)
class Sides:
    """Both grids of the job and what the plan needs of the run."""

    cfg: RunConfig
    s_arch: ModelArch
    t_arch: ModelArch
    student: Shape
    teacher: Shape
    teacher_layout: ParallelLayout
    world: int
    students: int
    teacher_ranks: int
    teacher_offset: int
    own_grid: bool
    device: str

    @classmethod
    def of(cls, cfg: RunConfig, s_arch: ModelArch, t_arch: ModelArch, world: int, students: int,
           device: str) -> "Sides":
        padded = padded_vocab(cfg, s_arch, t_arch)
        student = grid_shape(cfg, cfg.parallel, students, cfg.parallel.dp(students), padded, device)
        layout = cfg.teacher.parallel.resolve(cfg.parallel)
        own = cfg.teacher.ranks(cfg.parallel)
        t_ranks = own or world
        teacher = teacher_shape(student, layout, t_ranks, padded,
                                cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)
        return cls(cfg, s_arch, t_arch, student, teacher, layout, world, students, t_ranks,
                   students if own else 0, cfg.teacher.own_grid(cfg.parallel), device)

    @property
    def step_microbatches(self) -> int:
        """Micro-batches of one student replica per step (the teacher scores them all)."""
        return self.student.microbatches * self.cfg.train.updates_per_rollout

    def student_coords(self, rank: int) -> Optional[tuple[int, int, int]]:
        """(tp, dp, pp) of `rank` in the student's grid; None for a teacher rank of its own."""
        return None if rank >= self.students else _coords(self.student, rank)

    def teacher_coords(self, rank: int) -> Optional[tuple[int, int, int]]:
        local = rank - self.teacher_offset
        return _coords(self.teacher, local) if 0 <= local < self.teacher_ranks else None

    def teacher_rank(self, tp: int, dp: int, pp: int) -> int:
        t = self.teacher
        return self.teacher_offset + tp + t.tp * dp + t.tp * t.dp * pp


def _coords(shape: Shape, rank: int) -> tuple[int, int, int]:
    return rank % shape.tp, rank // shape.tp % shape.dp, rank // (shape.tp * shape.dp)


def rank_terms(sides: Sides, rank: int) -> tuple[str, int, Optional[int], list[Term]]:
    """(side, its stage, the teacher's stage on this rank or None, the terms before margin)."""
    s, t = sides.student_coords(rank), sides.teacher_coords(rank)
    terms: list[Term] = []
    if s is not None:
        terms += _student_terms(sides, rank, s)
    if t is not None:
        terms += _teacher_terms(sides, rank, t)
    weights = [t.mib * MIB for t in terms if t.name in ("student.params", "teacher.params")]
    terms.append(load_term(sides.device, max(weights), teacher_only=s is None))
    if s is None:
        return "teacher", t[2], t[2], terms
    return "student", s[2], None if t is None else t[2], terms


# ------------------------------------------------------------------ student ranks
def _student_terms(sides: Sides, rank: int, coords: tuple[int, int, int]) -> list[Term]:
    cfg, shape, arch = sides.cfg, sides.student, sides.s_arch
    stage = coords[2]
    last = stage == shape.last
    terms = student_state_terms(cfg, shape, arch, stage)
    if sides.own_grid and last:
        # The teacher's output-weight rows of this rank's vocabulary shard, re-cut at set-up.
        copy = shape.vocab_shard * sides.t_arch.hidden_size * shape.act_bytes
        terms.append(Term("teacher.output_weight", copy / MIB, "resident",
                          "parallel.tp (the student's vocabulary shard)", after_load=True))
    terms += rollout_terms(cfg, shape, arch, last)
    terms.append(student_activation_term(cfg, shape, arch, stage))
    if last:
        terms += _stash_terms(sides, rank, coords)
        terms.append(loss_path_term(cfg, shape, arch))
        if run_selection(cfg).prepass_from_generation:
            kept = shape.rows * cfg.rollout.max_new_tokens * arch.hidden_size * shape.act_bytes
            terms.append(Term("rollout.kept_hidden", kept / MIB, "train", "selection.prepass_source=recompute"))
    return terms


def _stash_terms(sides: Sides, rank: int, coords: tuple[int, int, int]) -> list[Term]:
    """The teacher's final hidden states of every micro-batch of the step, kept on the
    student's last stage from the teacher pass to the end of the student pass (on the
    device, whichever rank scored them). What crossed from another rank first lands in a host
    buffer (a GPU run; on the CPU it is the same memory), moved to the device when the loss
    path reads it and then dropped: under `separate` at most `teacher.queue_depth` receives
    are posted ahead of the one being read, under `shared` every remote one at once
    (distill/teacher_link.py)."""
    one = hidden_bytes(sides.student, sides.t_arch)
    total = sides.step_microbatches
    local = _local_microbatches(sides, rank, coords) if sides.own_grid else total
    terms = [Term("teacher.hidden_states", total * one / MIB, "train", _STASH_CUT, spans=("score",))]
    remote = total - local
    if sides.device == "cuda" and remote:
        staged = min(remote, sides.cfg.teacher.queue_depth + 1) if sides.cfg.teacher.separate else remote
        terms.append(Term("teacher.hidden_states.host", staged * one / MIB, "host",
                          "teacher.queue_depth" if sides.cfg.teacher.separate else _STASH_CUT))
    return terms


def _local_microbatches(sides: Sides, rank: int, coords: tuple[int, int, int]) -> int:
    """Micro-batches this student rank receives from itself (teacher_link: micro-batch g of
    replica d comes from teacher rank (tp r % TP_t, last stage, replica g % DP_t))."""
    r, d, _ = coords
    t, m = sides.teacher, sides.student.microbatches
    g = [d * m + i for i in range(sides.step_microbatches)]
    return sum(sides.teacher_rank(r % t.tp, x % t.dp, t.last) == rank for x in g)


# ------------------------------------------------------------------ teacher ranks
def _teacher_terms(sides: Sides, rank: int, coords: tuple[int, int, int]) -> list[Term]:
    """The frozen teacher on this rank: its weights at its own sharding, its forward pass
    over one micro-batch and, on its last stage under a grid of its own, the hidden states
    it has sent and not yet seen delivered (at most `teacher.queue_depth` micro-batches per
    destination)."""
    shape, arch, stage = sides.teacher, sides.t_arch, coords[2]
    cut = "teacher.parallel.tp / teacher.parallel.pp" if sides.own_grid else "parallel.tp / parallel.pp"
    terms = [Term("teacher.params", stage_params(arch, shape, stage) * shape.act_bytes / MIB, "resident", cut),
             teacher_activation_term(arch, shape)]
    if sides.own_grid and stage == shape.last:
        terms += _in_flight_terms(sides, rank, coords)
    return terms


def _in_flight_terms(sides: Sides, rank: int, coords: tuple[int, int, int]) -> list[Term]:
    k, j, _ = coords
    s, t, q = sides.student, sides.teacher, sides.cfg.teacher.queue_depth
    fanout = len(range(k, s.tp, t.tp))  # student TP ranks this teacher TP rank feeds
    items = sum((g % t.dp) == j for g in range(s.dp * sides.step_microbatches))
    if not fanout or not items:
        return []
    one = hidden_bytes(s, sides.t_arch)
    cut = "teacher.queue_depth"
    if sides.device == "cuda":  # one host copy per destination; trimmed to q x max(1, tp_s/tp_t)
        copies = min(q * max(1, s.tp // t.tp) + fanout, items * fanout)
        return [Term("teacher.hidden_in_flight.host", copies * one / MIB, "host", cut)]
    # On the CPU every destination's message is a view of the one output: queue_depth of
    # them wait besides the micro-batch being scored (counted in teacher.activations).
    return [Term("teacher.hidden_in_flight", min(q, items) * one / MIB, "score", cut)]
