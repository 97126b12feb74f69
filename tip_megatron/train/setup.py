"""Set-up of a distillation run: models (student and teacher, same TP/PP grid, one padded
vocabulary), tokenizer checks and the prompt source. Every check runs before the first step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tip_megatron.config import ModelSource, RunConfig
from tip_megatron.models.arch import ModelArch, padded_vocab_size
from tip_megatron.models.build import BuildOptions, build_model
from tip_megatron.models.sources import builtin_model, load_source_weights, source_arch
from tip_megatron.ops import check_vocab_compat
from tip_megatron.parallel import ParallelGroups

logger = logging.getLogger(__name__)


@dataclass
class Models:
    student: list
    teacher: list
    student_arch: ModelArch
    teacher_arch: ModelArch
    vocab_size: int
    """The shared TRUE vocabulary (statistics and sampling never see ids beyond it)."""


def check_lengths(cfg: RunConfig, arch: ModelArch, who: str) -> None:
    longest = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    if longest > arch.max_position_embeddings:
        raise ValueError(
            f"rollouts of up to data.max_prompt_len + rollout.max_new_tokens = {longest} tokens "
            f"exceed the {who}'s max_position_embeddings={arch.max_position_embeddings}; lower "
            "one of them"
        )


def build_models(cfg: RunConfig, groups: ParallelGroups) -> Models:
    """Student (trainable) and teacher (frozen) at this rank's layout, weights loaded.
    Every architecture check runs before any weights are read (or a built-in is trained)."""
    s_arch, t_arch = source_arch(cfg.student), source_arch(cfg.teacher)
    vocab = check_vocab_compat(s_arch.vocab_size, t_arch.vocab_size, cfg.shared_vocab_size)
    for arch, who in ((s_arch, "student"), (t_arch, "teacher")):
        arch.validate_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
        check_lengths(cfg, arch, who)
    # One padded size for both, so their vocabulary shards cover the same ids on every rank.
    padded = max(padded_vocab_size(a.vocab_size, cfg.parallel.tp) for a in (s_arch, t_arch))
    opts = dict(spec=cfg.model.spec, fp8=cfg.model.fp8, padded_vocab_size=padded,
                recompute_granularity=cfg.model.recompute_granularity, init_weights=False,
                seq_length=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)
    student = build_model(s_arch, groups, BuildOptions(**opts))
    teacher = build_model(t_arch, groups, BuildOptions(**{**opts, "recompute_granularity": None}),
                          frozen=True)
    # Teacher first: the order in which built-ins are pre-trained when not cached yet.
    load_source_weights(teacher, groups, t_arch, cfg.teacher)
    load_source_weights(student, groups, s_arch, cfg.student)
    return Models(student, teacher, s_arch, t_arch, vocab)


# ------------------------------------------------------------------ tokenizer + prompts
def load_run_tokenizer(cfg: RunConfig):
    """The tokenizer of the run (`data.tokenizer`, else the student's bundled one); a
    teacher that bundles a different one is refused."""
    from tip_megatron.rollout.tokenizers import CharTokenizer, load_tokenizer

    if cfg.data.tokenizer == "char":
        return CharTokenizer()  # an explicit choice: no bundled tokenizer is consulted
    if cfg.data.tokenizer:
        tok, where = load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer
    else:
        bundled = bundled_tokenizer(cfg.student)
        if bundled is None:
            raise ValueError("no tokenizer: set data.tokenizer (a tokenizer directory or a "
                             "SentencePiece .model), or use a student checkpoint that bundles one")
        tok, where = bundled
    teacher = bundled_tokenizer(cfg.teacher)
    if teacher is not None and teacher[0].fingerprint() != tok.fingerprint():
        raise ValueError(
            f"teacher tokenizer ({teacher[1]}) differs from the run's tokenizer ({where}): "
            "on-policy distillation needs one shared vocabulary (same token -> id map)"
        )
    return tok


def bundled_tokenizer(src: ModelSource) -> Optional[tuple[Any, str]]:
    """(tokenizer, where it came from) that ships with the source, or None."""
    from tip_megatron.rollout.tokenizers import load_tokenizer

    if src.builtin:
        make = builtin_model(src.builtin).tokenizer
        return (make(), f"builtin {src.builtin}") if make else None
    path = None
    if src.hf and any((Path(src.hf) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        path = src.hf
    if src.ckpt:  # a model checkpoint or a training step / run directory
        from tip_megatron.models.checkpoint import model_files

        bundled = model_files(src.ckpt).tokenizer_dir
        path = str(bundled) if bundled is not None else None
    return (load_tokenizer(path), path) if path else None


class FilePrompts:
    """Prompts from JSONL/parquet files through the DP-sharded, resumable loader."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, groups: ParallelGroups) -> None:
        from tip_megatron.rollout.data import PromptDataset, PromptFields, PromptLoader

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
        return [r.token_ids for r in next(self.loader)]

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
