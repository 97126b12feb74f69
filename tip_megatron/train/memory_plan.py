"""Per-rank memory plan of a distillation run: arithmetic on the config and the two
architectures, before launch (no model is built, no weight is read).

    plan = plan_memory(cfg, student_arch, teacher_arch, world_size=16, device="cuda")
    plan.stages[-1].total_mib, plan.to_dict(), format_plan(plan)

`world_size` counts every rank of the job: the student's and, under `teacher.placement:
separate`, the teacher's own after them. Ranks holding the same shapes form one entry of
`plan.stages` (a student pipeline stage; under `shared` with another teacher layout, a
student stage and a teacher stage; under `separate`, a teacher stage). A rank's peak is
what stays resident (weights, the student's grads and optimizer state, the teacher's
output-weight copy) plus the largest of its phases, which follow one another: rollout (KV
cache, sampling logits), score (the teacher's forward pass), train (stashed teacher hidden
states, the student's activations, the loss path's chunks) and the optimizer step. On a GPU
a margin covers what the arithmetic does not see, and the hidden states that cross between
the two grids through host memory (distill/teacher_link.py stages every transfer in host
memory for gloo) are listed as `host` terms outside the device total. The formulas are in
docs/plan.md; tests/distributed/test_plan_measured.py holds them against measured peaks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from tip_megatron.config import RunConfig, student_world_size
from tip_megatron.models.arch import ModelArch
from tip_megatron.runtime.gpu_memory import gpu_memory_gib
from tip_megatron.train.memory_ranks import Sides, rank_terms
from tip_megatron.train.memory_terms import Term, margin_terms

PHASES = ("resident", "load", "rollout", "score", "train", "step", "host", "margin")
#: Phases that follow one another (the peak is the largest of them over the resident terms).
_PEAK_PHASES = ("load", "rollout", "score", "train", "step")


@dataclass(frozen=True)
class StagePlan:
    """Ranks that hold the same shapes (all TP and DP ranks of a stage alike) and their terms."""

    stage: int
    """The pipeline stage of `side`'s grid."""
    ranks: tuple[int, ...]
    terms: tuple[Term, ...]
    side: str = "student"
    """`student` (the student's ranks, with the teacher on them under `shared`) or `teacher`
    (the teacher's own ranks under `separate`)."""
    teacher_stage: Optional[int] = None
    """The teacher's pipeline stage on these ranks (None: no teacher weights here)."""

    def phase_mib(self, phase: str) -> float:
        return sum(t.mib for t in self.terms if t.phase == phase or phase in t.spans)

    def alive(self, phase: str) -> list[Term]:
        """The terms alive in `phase`: the resident ones (those made after the load but
        there) and the phase's own."""
        return [t for t in self.terms if (t.phase == "resident" and not (phase == "load" and t.after_load))
                or t.phase == phase or phase in t.spans]

    def phase_total_mib(self, phase: str) -> float:
        return sum(t.mib for t in self.alive(phase))

    @property
    def peak_phase(self) -> str:
        return max(_PEAK_PHASES, key=self.phase_total_mib)

    @property
    def total_mib(self) -> float:
        return self.phase_total_mib(self.peak_phase) + self.phase_mib("margin")

    @property
    def dominant(self) -> Term:
        """The largest term on the path to the peak (resident or the peak phase)."""
        return max(self.alive(self.peak_phase), key=lambda t: t.mib)

    @property
    def title(self) -> str:
        if self.side == "teacher":
            return f"teacher stage {self.stage}"
        if self.teacher_stage is None or self.teacher_stage == self.stage:
            return f"stage {self.stage}"
        return f"stage {self.stage}, teacher stage {self.teacher_stage}"


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    world_size: int
    layout: dict
    stages: tuple[StagePlan, ...]
    gpu_memory_gib: Optional[float] = None
    notes: tuple[str, ...] = field(default=())

    @property
    def max_total_mib(self) -> float:
        return max(s.total_mib for s in self.stages)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_memory_gib is None else self.max_total_mib <= self.gpu_memory_gib * 1024

    def to_dict(self) -> dict:
        stages = [dict(side=s.side, stage=s.stage, teacher_stage=s.teacher_stage, ranks=list(s.ranks),
                       total_mib=round(s.total_mib, 1), peak_phase=s.peak_phase,
                       dominant=s.dominant.name,
                       phases_mib={p: round(s.phase_mib(p), 1) for p in PHASES},
                       terms=[dict(asdict(t), spans=list(t.spans), mib=round(t.mib, 1)) for t in s.terms])
                  for s in self.stages]
        ranks = {r: (s["side"], s["total_mib"], s["phases_mib"]["host"]) for s in stages for r in s["ranks"]}
        return dict(device=self.device, world_size=self.world_size, layout=self.layout,
                    gpu_memory_gib=self.gpu_memory_gib, fits=self.fits,
                    max_total_mib=round(self.max_total_mib, 1), stages=stages,
                    ranks=[dict(rank=r, side=ranks[r][0], total_mib=ranks[r][1], host_mib=ranks[r][2])
                           for r in sorted(ranks)],
                    notes=list(self.notes))


# ------------------------------------------------------------------ the plan
def _check(cfg: RunConfig, s_arch: ModelArch, t_arch: ModelArch, world_size: int) -> int:
    """Every layout refusal, one line each; the student's world."""
    p, teacher = cfg.parallel, cfg.teacher
    students = student_world_size(cfg, world_size)
    p.validate(students)
    t = teacher.parallel.resolve(p)
    t.validate(teacher.ranks(p) or world_size, "teacher.parallel.")
    t_key = "teacher.parallel" if teacher.own_grid(p) else "parallel"
    for key, who, arch, lay in (("parallel", "student", s_arch, p), (t_key, "teacher", t_arch, t)):
        try:
            arch.validate_parallel(lay.tp, lay.pp, lay.vpp)
        except ValueError as err:
            raise ValueError(f"{key} (tp={lay.tp}, pp={lay.pp}): the {who} cannot be cut: {err}") from None
    if cfg.data.prompts_per_step % p.dp(students):
        raise ValueError(f"data.prompts_per_step={cfg.data.prompts_per_step} is not divisible by the "
                         f"data-parallel size {p.dp(students)} (student world {students} / tp*pp)")
    return students


def _group(sides: Sides, device: str) -> tuple[StagePlan, ...]:
    """One entry per set of ranks with the same terms, in rank order, margins added."""
    groups: dict = {}
    for rank in range(sides.world):
        side, stage, t_stage, terms = rank_terms(sides, rank)
        groups.setdefault((side, stage, t_stage, tuple(terms)), []).append(rank)
    out = []
    for (side, stage, t_stage, terms), ranks in sorted(groups.items(), key=lambda kv: kv[1][0]):
        partial = StagePlan(stage, (), terms)
        terms += tuple(margin_terms(device, partial.phase_mib(partial.peak_phase), side == "teacher"))
        out.append(StagePlan(stage, tuple(ranks), terms, side, t_stage))
    return tuple(out)


def single_teacher(cfg: RunConfig) -> RunConfig:
    """The run with its one teacher under `teacher:` (a `teachers:` list of one is the same
    run); ValueError for several teachers, which the plan does not model yet."""
    if len(cfg.teachers) > 1:
        raise ValueError(f"the memory plan models one teacher; this run has {len(cfg.teachers)} "
                         "(teachers:): plan each teacher's run on its own for now")
    return replace(cfg, teacher=cfg.teachers[0], teachers=()) if cfg.teachers else cfg


def plan_memory(cfg: RunConfig, student_arch: ModelArch, teacher_arch: ModelArch, world_size: int,
                device: str = "cuda", gpu_memory: Optional[object] = None) -> MemoryPlan:
    """The plan of every rank (grouped); ValueError (one line) when a layout cannot cut the
    models or the world. `world_size`: all ranks of the job (student + the teacher's own).
    `gpu_memory`: GiB or a GPU name (default parallel.gpu_memory_gib)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: accepted values are 'cuda', 'cpu'")
    cfg = single_teacher(cfg)
    students = _check(cfg, student_arch, teacher_arch, world_size)
    p = cfg.parallel
    gib = gpu_memory if gpu_memory is not None else p.gpu_memory_gib
    gib = None if gib is None else gpu_memory_gib(gib, "--gpu-mem" if gpu_memory is not None
                                                   else "parallel.gpu_memory_gib")
    sides = Sides.of(cfg, student_arch, teacher_arch, world_size, students, device)
    s, t = sides.student, sides.teacher
    layout = dict(tp=s.tp, pp=s.pp, dp=s.dp, vpp=p.vpp, sequence_parallel=p.sequence_parallel,
                  dtype="bf16" if s.act_bytes == 2 else "fp32", placement=cfg.teacher.placement,
                  seq=s.seq, rows_per_dp_rank=s.rows, microbatches_per_update=s.microbatches,
                  kept_per_microbatch=s.kept, te_spec=s.te_spec,
                  student_ranks=[0, students - 1],
                  teacher=dict(tp=t.tp, pp=t.pp, dp=t.dp, vpp=sides.teacher_layout.vpp,
                               sequence_parallel=sides.teacher_layout.sequence_parallel,
                               own_grid=sides.own_grid, queue_depth=cfg.teacher.queue_depth,
                               ranks=[sides.teacher_offset, sides.teacher_offset + sides.teacher_ranks - 1]))
    return MemoryPlan(device, world_size, layout, _group(sides, device), gib, _notes(cfg, sides))


def _notes(cfg: RunConfig, sides: Sides) -> tuple[str, ...]:
    placement = {
        (False, False): "shared (the teacher on the student's ranks and grid)",
        (False, True): "shared, the teacher at its own layout on the student's ranks (its hidden "
                       "states and output-weight rows re-cut to the student's last stage)",
        (True, True): "separate (the teacher on ranks of its own; hidden states cross through "
                      "host memory)"}[(cfg.teacher.separate, sides.own_grid)]
    notes = [f"teacher placement: {placement}",
             "rollouts: every rollout of a DP rank is decoded at once (the trainer's "
             "max_batch_tokens = 0); responses are planned at rollout.max_new_tokens"]
    if sides.device == "cuda":
        notes.append("host terms: host memory of the rank's process (the checkpoint reader's buffers; "
                     "what crosses between two grids, staged for gloo), not in the GPU total")
    if cfg.parallel.vpp or sides.teacher_layout.vpp:
        notes.append("vpp: the interleaved schedule keeps more micro-batches in flight "
                     "than planned here (planned as plain 1F1B)")
    if cfg.model.fp8 or cfg.model.teacher_fp8:
        notes.append("FP8: planned at the bf16 sizes (FP8 weight copies and amax history not counted)")
    return tuple(notes)


# ------------------------------------------------------------------ text
def ranks_text(ranks) -> str:
    """'0-3,8-11' for (0, 1, 2, 3, 8, 9, 10, 11)."""
    runs, start = [], None
    ranks = list(ranks)
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            runs.append(str(r) if r == start else f"{start}-{r}")
            start = None
    return ",".join(runs)


def format_stage(stage: StagePlan, gib: Optional[float]) -> list[str]:
    lines = [f"{stage.title} (ranks {ranks_text(stage.ranks)})",
             f"  {'term':<30} {'phase':<9} {'MiB':>11}  cut by"]
    for t in stage.terms:
        lines.append(f"  {t.name:<30} {t.phase:<9} {t.mib:>11,.1f}  {t.cut}")
    verdict = ""
    if gib is not None:
        verdict = (f" of {gib:g} GiB: " + ("fits" if stage.total_mib <= gib * 1024 else
                                           f"EXCEEDS by {stage.total_mib / 1024 - gib:,.1f} GiB"))
    what = "weights + load" if stage.peak_phase == "load" else f"resident + {stage.peak_phase}"
    lines.append(f"  total = {what} + margin = {stage.total_mib:,.1f} MiB "
                 f"({stage.total_mib / 1024:,.2f} GiB){verdict}")
    d = stage.dominant
    lines.append(f"  dominant: {d.name} ({d.mib:,.1f} MiB); cut by: {d.cut}")
    return lines


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table per rank group (what `tip-megatron plan` and preflight print)."""
    lay, t = plan.layout, plan.layout["teacher"]
    s_ranks, t_ranks = lay["student_ranks"], t["ranks"]
    head = (f"memory plan per rank ({plan.device}, {lay['dtype']}; world {plan.world_size}; sequence "
            f"{lay['seq']}, {lay['rows_per_dp_rank']} rollouts per DP rank, "
            f"{lay['kept_per_microbatch']} kept tokens per micro-batch)")
    grid = ", its own grid" if t["own_grid"] else ", the student's grid"
    sides = [f"student: ranks {ranks_text(range(s_ranks[0], s_ranks[1] + 1))} "
             f"(tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']})",
             f"teacher ({lay['placement']}): ranks {ranks_text(range(t_ranks[0], t_ranks[1] + 1))} "
             f"(tp {t['tp']} x pp {t['pp']} x dp {t['dp']}{grid})"]
    lines = [head] + sides
    for stage in plan.stages:
        lines += format_stage(stage, plan.gpu_memory_gib)
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
