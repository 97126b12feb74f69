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
from tip_megatron.data.prompts import PromptDataset, PromptFields
from tip_megatron.data.sampler import PromptLoader
from tip_megatron.distill.teacher_grid import Grid, LinkSpec
from tip_megatron.distill.teacher_link import TeacherLink
from tip_megatron.runtime.device import compute_dtype, current_device
from tip_megatron.runtime.env import rank_env
from tip_megatron.runtime.parallel import ParallelGroups, bridge
# The checks live in preflight.py (the launcher runs them too).
from tip_megatron.train.preflight import Checked, check_models

logger = logging.getLogger(__name__)


@dataclass
class Models:
    student: list
    """The student's chunks ([] on a rank of the teacher's own under `separate`)."""
    teacher: list
    """The teacher's chunks ([] on a student rank under `separate`)."""
    student_arch: ModelArch
    teacher_arch: ModelArch
    vocab_size: int
    """The shared TRUE vocabulary (statistics and sampling never see ids beyond it)."""
    link: Optional[TeacherLink] = None
    """The teacher on a grid of its own (another layout or other ranks); None: one grid."""
    teacher_weight: Any = None
    """With a link: the teacher's output-weight rows of this rank's student vocabulary shard
    [V/tp_s, h_t] (the student's last stage; None elsewhere)."""


def padded_vocab(cfg: RunConfig, s_arch: ModelArch, t_arch: ModelArch) -> int:
    """One padded size for both models, divisible by both TP sizes, so their vocabulary
    shards line up on the student's ranks."""
    t_tp = cfg.teacher.parallel.resolve(cfg.parallel).tp
    tp = math.lcm(cfg.parallel.tp, t_tp)
    return max(padded_vocab_size(a.vocab_size, tp) for a in (s_arch, t_arch))


def build_models(cfg: RunConfig, groups: Optional[ParallelGroups], checked: Optional[Checked] = None,
                 teacher_groups: Optional[ParallelGroups] = None) -> Models:
    """Student (trainable) and teacher (frozen) at this rank's layouts, weights loaded.
    Every architecture check (`preflight.check_models`, or `checked` when the caller ran
    preflight) runs before any weights are read (or a built-in is trained).

    groups: the student's (None on a teacher rank of `separate`); teacher_groups: the
    teacher's own grid (None: the teacher runs on `groups`, today's one grid, or this rank
    has no teacher under `separate`). With a grid of its own the teacher's output weight
    is re-cut to the student's vocabulary shards through a `TeacherLink`."""
    if checked is None:
        s_arch, t_arch, vocab = check_models(cfg)
    else:
        s_arch, t_arch, vocab = checked.student_arch, checked.teacher_arch, checked.vocab_size
    m = cfg.model
    opts = dict(spec=m.spec, params_dtype=m.params_dtype, fp8_recipe=m.fp8_recipe,
                fp8_amax_history_len=m.fp8_amax_history_len,
                fp8_amax_compute_algo=m.fp8_amax_compute_algo,
                padded_vocab_size=padded_vocab(cfg, s_arch, t_arch),
                init_weights=False, seq_length=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)
    own_grid = cfg.teacher.own_grid(cfg.parallel)
    on_teacher = teacher_groups if own_grid else groups
    student = teacher = []
    if groups is not None:
        student = build_model(s_arch, groups, BuildOptions(
            **opts, fp8=m.fp8, recompute_granularity=m.recompute_granularity))
    if on_teacher is not None:
        # Forward-only: no recompute; FP8 only when asked for the teacher separately.
        teacher = build_model(t_arch, on_teacher, BuildOptions(**opts, fp8=m.teacher_fp8), frozen=True)
        # Teacher first: the order in which built-ins are pre-trained when not cached yet.
        load_source_weights(teacher, on_teacher, t_arch, cfg.teacher)
    if groups is not None:
        load_source_weights(student, groups, s_arch, cfg.student)
    models = Models(student, teacher, s_arch, t_arch, vocab)
    if own_grid:
        models.link = make_link(cfg, groups, teacher_groups, t_arch, opts["padded_vocab_size"])
        models.teacher_weight = models.link.output_weight(teacher)
    return models


def make_link(cfg: RunConfig, groups: Optional[ParallelGroups], teacher_groups: Optional[ParallelGroups],
              t_arch: ModelArch, padded: int) -> TeacherLink:
    """The link between the student's grid (global ranks [0, S)) and the teacher's (its
    own ranks after them under `separate`, the same ranks under `shared`)."""
    world = rank_env().world_size
    own = cfg.teacher.ranks(cfg.parallel)
    students = world - own
    t_layout = cfg.teacher.parallel.resolve(cfg.parallel)
    t_ranks = own or world
    spec = LinkSpec(
        student=Grid.of(cfg.parallel, students, 0), teacher=Grid.of(t_layout, t_ranks, students if own else 0),
        microbatches=(cfg.data.prompts_per_step // cfg.parallel.dp(students)) * cfg.rollout.n
        // cfg.train.micro_batch_size,
        hidden_size=t_arch.hidden_size, dtype=compute_dtype(cfg.model.params_dtype), padded_vocab=padded,
        queue_depth=cfg.teacher.queue_depth, teacher_sequence_parallel=t_layout.sequence_parallel,
        separate=cfg.teacher.separate)
    return TeacherLink(groups, teacher_groups, bridge(), spec, current_device())


# ------------------------------------------------------------------ prompts
class FilePrompts:
    """Prompts from JSONL/parquet files through the DP-sharded, resumable loader."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, groups: ParallelGroups) -> None:
        fields = PromptFields(prompt=cfg.data.prompt_field, messages=cfg.data.messages_field,
                              answer=cfg.data.answer_field)
        dataset = PromptDataset(list(cfg.data.prompts), tokenizer, fields=fields,
                                apply_chat_template=cfg.data.apply_chat_template,
                                max_prompt_len=cfg.data.max_prompt_len, overlong=cfg.data.overlong,
                                chat_template_kwargs=cfg.data.chat_template_kwargs,
                                system_prompt=cfg.data.system_prompt)
        self.stats = dataset.stats
        self.loader = PromptLoader(dataset, prompts_per_rank=cfg.data.prompts_per_step // groups.dp_size,
                                   dp_rank=groups.dp_rank, dp_size=groups.dp_size, seed=cfg.data.seed)

    def next(self) -> list[list[int]]:
        # Token ids only, from memory: reading the records back (`next(self.loader)`) would
        # re-read the files every step and stop the run if one was edited since set-up.
        dataset = self.loader.dataset
        self._last = next(self.loader.sampler)
        return [dataset.token_ids(i) for i in self._last]

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
