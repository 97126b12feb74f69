"""Set-up of a distillation run: models (student and teacher, each on its grid, one padded
vocabulary) and the prompt source. The checks (architectures, lengths, tokenizer) are in
train/preflight.py, run before any process group exists.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

from tip_megatron.config import RunConfig
from tip_megatron.models.arch import ModelArch, padded_vocab_size
from tip_megatron.models.build import BuildOptions, build_model
from tip_megatron.checkpoint.sources import builtin_model, load_source_weights
from tip_megatron.data.prompts import PromptDataset
from tip_megatron.data.sampler import PromptLoader
from tip_megatron.distill.routing import route_table
from tip_megatron.distill.teacher_config import separate_teachers, teacher_ranks, teacher_split, teachers_of
from tip_megatron.distill.teacher_grid import Grid, LinkSpec
from tip_megatron.distill.teacher_link import TeacherLink
from tip_megatron.runtime.device import compute_dtype, current_device
from tip_megatron.runtime.env import rank_env
from tip_megatron.runtime.parallel import ParallelGroups, bridge
# The checks live in preflight.py (the launcher runs them too).
from tip_megatron.train.preflight import Checked, check_all_models

logger = logging.getLogger(__name__)


@dataclass
class TeacherSide:
    """One teacher as this rank holds it."""

    name: str
    chunks: list
    """Its chunks on this rank ([] where it has no place: a student rank under `separate`,
    or a rank of another teacher's own)."""
    arch: ModelArch
    link: Optional[TeacherLink] = None
    """The teacher on a grid of its own (another layout or other ranks); None: the student's grid."""
    weight: Any = None
    """With a link: its output-weight rows of this rank's student vocabulary shard
    [V/tp_s, h_t] (the student's last stage; None elsewhere)."""


@dataclass
class Models:
    student: list
    """The student's chunks ([] on a rank of the teacher's own under `separate`)."""
    teachers: list
    """Every teacher (`TeacherSide`), in `teachers:` order (one for `teacher:`)."""
    student_arch: ModelArch
    vocab_size: int
    """The shared TRUE vocabulary (statistics and sampling never see ids beyond it)."""

    # The first teacher's parts, under the names of the single-teacher engine.
    @property
    def teacher(self) -> list:
        return self.teachers[0].chunks

    @property
    def teacher_arch(self) -> ModelArch:
        return self.teachers[0].arch

    @property
    def link(self) -> Optional[TeacherLink]:
        return self.teachers[0].link

    @property
    def teacher_weight(self) -> Any:
        return self.teachers[0].weight

    def separate_links(self) -> list[TeacherLink]:
        """The links of the teachers on ranks of their own (`separate`)."""
        return [t.link for t in self.teachers if t.link is not None and t.link.spec.separate]


def padded_vocab(cfg: RunConfig, s_arch: ModelArch, t_archs) -> int:
    """One padded size for every model, divisible by every TP size, so the vocabulary
    shards line up on the student's ranks."""
    if isinstance(t_archs, ModelArch):
        t_archs = [t_archs]
    tp = math.lcm(cfg.parallel.tp, *(t.parallel.resolve(cfg.parallel).tp for t in teachers_of(cfg)))
    return max(padded_vocab_size(a.vocab_size, tp) for a in (s_arch, *t_archs))


def build_models(cfg: RunConfig, groups: Optional[ParallelGroups], checked: Optional[Checked] = None,
                 teacher_groups: Optional[dict] = None) -> Models:
    """Student (trainable) and teachers (frozen) at this rank's layouts, weights loaded.
    Every architecture check (`preflight.check_all_models`, or `checked` when the caller ran
    preflight) runs before any weights are read (or a built-in is trained).

    groups: the student's (None on a teacher rank of `separate`); teacher_groups: {teacher
    index: its own grid's groups on this rank} for the teachers on a grid of their own (a
    teacher missing there runs on `groups`, today's one grid, unless it has a grid of its
    own that excludes this rank). With a grid of its own a teacher's output weight is
    re-cut to the student's vocabulary shards through a `TeacherLink`."""
    if checked is None or not checked.teacher_archs:
        s_arch, t_archs, vocab = check_all_models(cfg)
    else:
        s_arch, t_archs, vocab = checked.student_arch, list(checked.teacher_archs), checked.vocab_size
    teacher_groups = teacher_groups or {}
    m = cfg.model
    opts = dict(spec=m.spec, params_dtype=m.params_dtype, fp8_recipe=m.fp8_recipe,
                fp8_amax_history_len=m.fp8_amax_history_len,
                fp8_amax_compute_algo=m.fp8_amax_compute_algo,
                padded_vocab_size=padded_vocab(cfg, s_arch, t_archs),
                init_weights=False, seq_length=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)
    student = []
    if groups is not None:
        student = build_model(s_arch, groups, BuildOptions(
            **opts, fp8=m.fp8, recompute_granularity=m.recompute_granularity))
    sides = []
    for i, (source, t_arch) in enumerate(zip(teachers_of(cfg), t_archs)):
        own_grid = source.own_grid(cfg.parallel)
        on_teacher = teacher_groups.get(i) if own_grid else groups
        chunks = []
        if on_teacher is not None:
            # Forward-only: no recompute; FP8 only when asked for the teacher separately.
            chunks = build_model(t_arch, on_teacher, BuildOptions(**opts, fp8=m.teacher_fp8), frozen=True)
            # Teachers first: the order in which built-ins are pre-trained when not cached yet.
            load_source_weights(chunks, on_teacher, t_arch, source)
        sides.append(TeacherSide(source.name, chunks, t_arch))
    if groups is not None:
        load_source_weights(student, groups, s_arch, cfg.student)
    for i, (source, side) in enumerate(zip(teachers_of(cfg), sides)):
        if source.own_grid(cfg.parallel):
            side.link = make_link(cfg, i, groups, teacher_groups.get(i), side.arch,
                                  opts["padded_vocab_size"])
            side.weight = side.link.output_weight(side.chunks)
    return Models(student, sides, s_arch, vocab)


def make_link(cfg: RunConfig, index: int, groups: Optional[ParallelGroups],
              teacher_groups: Optional[ParallelGroups], t_arch: ModelArch, padded: int) -> TeacherLink:
    """The link between the student's grid (global ranks [0, S)) and teacher `index`'s (its
    own ranks after the student's and the earlier separate teachers' under `separate`, the
    student's ranks under `shared`). Each teacher's messages have a tag range of their own."""
    students = rank_env().world_size - teacher_ranks(cfg)
    source = teachers_of(cfg)[index]
    t_layout = source.parallel.resolve(cfg.parallel)
    if source.separate:
        split, world = teacher_split(cfg, rank_env().world_size), separate_teachers(cfg).index(index)
        teacher = Grid.of(t_layout, split.size(world), split.offset(world))
    else:
        teacher = Grid.of(t_layout, students, 0)
    spec = LinkSpec(
        student=Grid.of(cfg.parallel, students, 0),
        teacher=teacher,
        microbatches=(cfg.data.prompts_per_step // cfg.parallel.dp(students)) * cfg.rollout.n
        // cfg.train.micro_batch_size,
        hidden_size=t_arch.hidden_size, dtype=compute_dtype(cfg.model.params_dtype), padded_vocab=padded,
        queue_depth=source.queue_depth, teacher_sequence_parallel=t_layout.sequence_parallel,
        separate=source.separate, tag_base=16 * index)
    return TeacherLink(groups, teacher_groups, bridge(), spec, current_device())


# ------------------------------------------------------------------ prompts
class FilePrompts:
    """Prompts from JSONL/parquet files through the DP-sharded, resumable loader."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, groups: ParallelGroups) -> None:
        dataset = PromptDataset(list(cfg.data.prompts), tokenizer, fields=cfg.data.prompt_fields(),
                                apply_chat_template=cfg.data.apply_chat_template,
                                max_prompt_len=cfg.data.max_prompt_len, overlong=cfg.data.overlong,
                                chat_template_kwargs=cfg.data.chat_template_kwargs,
                                system_prompt=cfg.data.system_prompt)
        self.stats = dataset.stats
        # data.route_field: each route value's teacher (a value nobody serves stops here)
        self.route_table = (route_table(teachers_of(cfg), dataset.route_where)
                            if cfg.data.route_field else None)
        self.loader = PromptLoader(dataset, prompts_per_rank=cfg.data.prompts_per_step // groups.dp_size,
                                   dp_rank=groups.dp_rank, dp_size=groups.dp_size, seed=cfg.data.seed)

    def next(self) -> list[list[int]]:
        # Token ids only, from memory: reading the records back (`next(self.loader)`) would
        # re-read the files every step and stop the run if one was edited since set-up.
        dataset = self.loader.dataset
        self._last = next(self.loader.sampler)
        return [dataset.token_ids(i) for i in self._last]

    def teachers(self) -> Optional[list[int]]:
        """The teacher index of each prompt `next` returned (memory only); None without
        `data.route_field`."""
        if self.route_table is None:
            return None
        return [self.route_table[self.loader.dataset.route(i)] for i in self._last]

    def records(self) -> list:
        """The full records of the batch `next` returned (read from the files: multi-turn
        environments are built from them)."""
        return self.loader.dataset.records(self._last)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def prompt_source(cfg: RunConfig, tokenizer: Any, groups: ParallelGroups):
    """The prompt files, else the builtin student's embedded task (`validate_run` has
    checked that one of them exists)."""
    if cfg.data.prompts:
        return FilePrompts(cfg, tokenizer, groups)
    make = builtin_model(cfg.student.builtin).prompts
    source = make(cfg.data.prompts_per_step // groups.dp_size, groups.dp_rank, groups.dp_size,
                  cfg.data.seed)
    if cfg.rollout.env is not None and not callable(getattr(source, "records", None)):
        raise ValueError(f"rollout.env={cfg.rollout.env!r}: the prompts of student.builtin="
                         f"{cfg.student.builtin} have no records to build environments from; "
                         "name prompt files in data.prompts")
    return source
