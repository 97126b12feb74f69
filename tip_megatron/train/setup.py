"""Set-up of a distillation run: models (student and teacher, same TP/PP grid, one padded
vocabulary) and the prompt source. The checks (architectures, lengths, tokenizer) are in
train/preflight.py, run before any process group exists.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from tip_megatron.config import RunConfig
from tip_megatron.models.arch import ModelArch, padded_vocab_size
from tip_megatron.models.build import BuildOptions, build_model
from tip_megatron.checkpoint.sources import builtin_model, load_source_weights
from tip_megatron.data.prompts import PromptDataset, PromptFields
from tip_megatron.data.sampler import PromptLoader
from tip_megatron.runtime.parallel import ParallelGroups
# The checks live in preflight.py (the launcher runs them too).
from tip_megatron.train.preflight import Checked, check_models

logger = logging.getLogger(__name__)


@dataclass
class Models:
    student: list
    teacher: list
    student_arch: ModelArch
    teacher_arch: ModelArch
    vocab_size: int
    """The shared TRUE vocabulary (statistics and sampling never see ids beyond it)."""


def build_models(cfg: RunConfig, groups: ParallelGroups, checked: Optional[Checked] = None) -> Models:
    """Student (trainable) and teacher (frozen) at this rank's layout, weights loaded.
    Every architecture check (`preflight.check_models`, or `checked` when the caller ran
    preflight) runs before any weights are read (or a built-in is trained)."""
    if checked is None:
        s_arch, t_arch, vocab = check_models(cfg)
    else:
        s_arch, t_arch, vocab = checked.student_arch, checked.teacher_arch, checked.vocab_size
    # One padded size for both, so their vocabulary shards cover the same ids on every rank.
    padded = max(padded_vocab_size(a.vocab_size, cfg.parallel.tp) for a in (s_arch, t_arch))
    m = cfg.model
    opts = dict(spec=m.spec, params_dtype=m.params_dtype, fp8_recipe=m.fp8_recipe,
                fp8_amax_history_len=m.fp8_amax_history_len,
                fp8_amax_compute_algo=m.fp8_amax_compute_algo, padded_vocab_size=padded,
                init_weights=False, seq_length=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)
    student = build_model(s_arch, groups, BuildOptions(
        **opts, fp8=m.fp8, recompute_granularity=m.recompute_granularity))
    # Forward-only: no recompute; FP8 only when asked for the teacher separately.
    teacher = build_model(t_arch, groups, BuildOptions(**opts, fp8=m.teacher_fp8), frozen=True)
    # Teacher first: the order in which built-ins are pre-trained when not cached yet.
    load_source_weights(teacher, groups, t_arch, cfg.teacher)
    load_source_weights(student, groups, s_arch, cfg.student)
    return Models(student, teacher, s_arch, t_arch, vocab)


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
    return make(cfg.data.prompts_per_step // groups.dp_size, groups.dp_rank, groups.dp_size,
                cfg.data.seed)
