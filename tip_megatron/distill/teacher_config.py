"""The run config's `teacher:` section: where its weights come from (a `ModelSource`), its
own parallel layout, and where its ranks are (`placement`). docs/teacher.md has the data
path and the memory per rank of each placement.

    teacher: {ckpt: ckpt/qwen3-8b, parallel: {tp: 2}, placement: separate}

Several teachers (`teachers:`, a list of the same sections plus `name`, `serves` and
`default`): each prompt goes to the teacher whose `serves` lists the value of its
`data.route_field` (docs/teacher.md, "Several teachers").

    teachers: [{name: math, ckpt: ckpt/math, serves: [math]},
               {name: code, ckpt: ckpt/code, serves: [code], default: true}]
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

from tip_megatron.checkpoint.sources import ModelSource
from tip_megatron.ops.topk_divergence import TopkSignal
from tip_megatron.runtime.parallel import ParallelLayout, Split

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
    size = student ranks + teacher ranks; the student's ranks come first; several separate
    `teachers:` follow in list order, a world each)."""
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
    name: str = "teacher"
    """`teachers:` entries: the teacher's name in metrics, logs and errors (unique)."""
    serves: tuple[str, ...] = ()
    """`teachers:` entries: the values of the prompt field `data.route_field` this teacher
    scores (a rollout is scored by its prompt's teacher only)."""
    default: bool = False
    """`teachers:` entries: this teacher also takes every route value no teacher lists (at
    most one default; without one, an unlisted value stops the run naming file and line)."""

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
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"{name}.name={self.name!r}: letters, digits, '_', '-' or '.' (it names "
                             "the teacher's metrics)")
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


def teachers_of(cfg) -> tuple[TeacherConfig, ...]:
    """The run's teachers: `teachers:` when given, else the single `teacher:` (a list of
    one serving every prompt)."""
    return tuple(cfg.teachers) or (cfg.teacher,)


def separate_teachers(cfg) -> list[int]:
    """Indices (in `teachers_of`) of the teachers on ranks of their own (`placement:
    separate`), in the order their worlds follow the student's ranks."""
    return [i for i, t in enumerate(teachers_of(cfg)) if t.separate]


def teacher_ranks(cfg) -> int:
    """Ranks of the job that are teachers' own (0: every teacher on the student's ranks)."""
    return sum(t.ranks(cfg.parallel) for t in teachers_of(cfg))


def teacher_split(cfg, world_size: int) -> Optional[Split]:
    """With teachers on ranks of their own (`placement: separate`): a job of `world_size`
    ranks as the student's ranks, then each such teacher's, in config order (world i of
    the split is `teachers_of(cfg)[separate_teachers(cfg)[i]]`); None when every teacher
    shares the student's ranks. The one place a separate teacher's ranks are counted."""
    own = tuple(teachers_of(cfg)[i].ranks(cfg.parallel) for i in separate_teachers(cfg))
    return Split(world_size - sum(own), own) if own else None


def validate_teachers(cfg) -> None:
    """`teachers:` against `teacher:` and `data.route_field` (one line each). Each entry's own
    keys are checked by `TeacherConfig.validate("teachers[i]")`."""
    if not cfg.teachers:
        cfg.teacher.validate("teacher")
        return
    if cfg.teacher != TeacherConfig():
        raise ValueError("both `teacher:` and `teachers:` are set: give one (a single teacher is "
                         "`teacher:`, or `teachers:` with one entry)")
    names = [t.name for t in cfg.teachers]
    for i, t in enumerate(cfg.teachers):
        t.validate(f"teachers[{i}]")
        if t.name in names[:i]:
            raise ValueError(f"teachers[{i}].name={t.name!r}: two teachers have this name; names "
                             "must be unique (they name the metrics)")
    defaults = [t.name for t in cfg.teachers if t.default]
    if len(defaults) > 1:
        raise ValueError(f"teachers: {defaults} all have default: true; at most one teacher takes "
                         "the route values no teacher lists")
    seen: dict = {}
    for t in cfg.teachers:
        for value in t.serves:
            if value in seen:
                raise ValueError(f"teachers: route value {value!r} is served by both {seen[value]!r} "
                                 f"and {t.name!r}; each value goes to one teacher")
            seen[value] = t.name
    if len(cfg.teachers) > 1 and not cfg.data.route_field:
        raise ValueError(f"teachers: {len(cfg.teachers)} teachers need data.route_field (the prompt "
                         "record field whose value picks each prompt's teacher, e.g. `domain`)")
    if len(cfg.teachers) > 1 and not cfg.data.prompts:
        raise ValueError("teachers: several teachers route prompt records by data.route_field: name "
                         "prompt files in data.prompts (a built-in student's embedded prompts carry "
                         "no route field)")
    if len(cfg.teachers) > 1 and any(t.signal != "full" for t in cfg.teachers):
        raise ValueError("teachers: signal=topk is a single-teacher comparison mode; accepted with "
                         "several teachers: signal=full")
    for t in cfg.teachers if len(cfg.teachers) > 1 else ():  # a list of one serves everything
        if not t.serves and not t.default:
            warnings.warn(f"teachers: {t.name!r} serves no route value and is not the default: it "
                          "will score nothing", stacklevel=2)
