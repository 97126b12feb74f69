"""Set-up of a distillation run: models (student and teacher, same TP/PP grid, one padded
vocabulary), tokenizer checks and the prompt source. Every check runs before the first step.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tip_megatron.config import ModelSource, RunConfig
from tip_megatron.models.arch import ModelArch, padded_vocab_size
from tip_megatron.models.build import BuildOptions, build_model
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


def quickstart_cache_dir() -> Path:
    return Path(os.environ.get("TIP_MEGATRON_CACHE", Path.home() / ".cache" / "tip_megatron"))


def source_arch(src: ModelSource, builtin_archs: dict) -> ModelArch:
    if src.builtin:
        return builtin_archs[src.builtin]
    if src.ckpt:
        from tip_megatron.models.checkpoint import read_arch

        return read_arch(src.ckpt)
    return ModelArch.from_hf_config(src.hf)


def _load_weights(chunks, groups, arch, src: ModelSource, builtin_states: dict) -> None:
    from tip_megatron.models.state import load_full_state_dict

    if src.builtin:
        load_full_state_dict(chunks, builtin_states[src.builtin], groups, arch)
    elif src.ckpt:
        from tip_megatron.models.checkpoint import load_model_checkpoint

        load_model_checkpoint(chunks, groups, src.ckpt, expect_arch=arch)
    else:
        from tip_megatron.convert.hf_io import HFCheckpoint
        from tip_megatron.convert.importer import LazyFullState

        ckpt = HFCheckpoint(src.hf)
        load_full_state_dict(chunks, LazyFullState(ckpt), groups, arch)
        ckpt.close()


def _builtin(cfg: RunConfig, groups: ParallelGroups) -> tuple[dict, dict]:
    if not (cfg.student.builtin or cfg.teacher.builtin):
        return {}, {}
    from tip_megatron.quickstart import pretrained_models

    t_full, s_full, t_arch, s_arch, info = pretrained_models(quickstart_cache_dir(), groups)
    archs = {"quickstart-teacher": t_arch, "quickstart-student": s_arch}
    states = {"quickstart-teacher": t_full, "quickstart-student": s_full}
    return archs, states


def check_lengths(cfg: RunConfig, arch: ModelArch, who: str) -> None:
    longest = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    if longest > arch.max_position_embeddings:
        raise ValueError(
            f"rollouts of up to data.max_prompt_len + rollout.max_new_tokens = {longest} tokens "
            f"exceed the {who}'s max_position_embeddings={arch.max_position_embeddings}; lower "
            "one of them"
        )


def build_models(cfg: RunConfig, groups: ParallelGroups) -> Models:
    """Student (trainable) and teacher (frozen) at this rank's layout, weights loaded."""
    builtin_archs, builtin_states = _builtin(cfg, groups)
    s_arch = source_arch(cfg.student, builtin_archs)
    t_arch = source_arch(cfg.teacher, builtin_archs)
    vocab = check_vocab_compat(s_arch.vocab_size, t_arch.vocab_size, cfg.shared_vocab_size)
    for arch, who in ((s_arch, "student"), (t_arch, "teacher")):
        arch.validate_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
        check_lengths(cfg, arch, who)
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
    _load_weights(student, groups, s_arch, cfg.student, builtin_states)
    _load_weights(teacher, groups, t_arch, cfg.teacher, builtin_states)
    return Models(student, teacher, s_arch, t_arch, vocab)


# ------------------------------------------------------------------ tokenizer + prompts
def load_run_tokenizer(cfg: RunConfig):
    """The tokenizer of the run; a teacher checkpoint with a different one is refused."""
    from tip_megatron.rollout.tokenizers import load_tokenizer

    if cfg.student.builtin or cfg.data.tokenizer == "char":
        from tip_megatron.rollout.tokenizers import CharTokenizer

        return CharTokenizer()  # the embedded addition task's 12 characters + eos/pad
    path = cfg.data.tokenizer or _bundled_tokenizer(cfg.student)
    if path is None:
        raise ValueError("no tokenizer: set data.tokenizer (a tokenizer directory or a "
                         "SentencePiece .model), or use a student checkpoint that bundles one")
    tok = load_tokenizer(path)
    teacher_path = _bundled_tokenizer(cfg.teacher)
    if teacher_path is not None:
        teacher_tok = load_tokenizer(teacher_path)
        if teacher_tok.fingerprint() != tok.fingerprint():
            raise ValueError(
                f"teacher tokenizer ({teacher_path}) differs from the run's tokenizer ({path}): "
                "on-policy distillation needs one shared vocabulary (same token -> id map)"
            )
    return tok


def _bundled_tokenizer(src: ModelSource) -> Optional[str]:
    if src.hf and any((Path(src.hf) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        return src.hf
    if src.ckpt:
        from tip_megatron.models.checkpoint import TOKENIZER_DIR

        bundled = Path(src.ckpt) / TOKENIZER_DIR
        return str(bundled) if bundled.is_dir() else None
    return None


class SyntheticPrompts:
    """Prompts of the embedded addition task, drawn per step (the quickstart's data)."""

    def __init__(self, per_rank: int, dp_rank: int, dp_size: int, seed: int) -> None:
        self.per_rank, self.dp_rank, self.dp_size, self.seed = per_rank, dp_rank, dp_size, seed
        self.step = 0

    def next(self) -> list[list[int]]:
        """This replica's consecutive slice of the step's global batch (DP-invariant)."""
        from tip_megatron.quickstart import task

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        start = self.dp_rank * self.per_rank
        return task.sample_prompts(self.per_rank * self.dp_size, gen)[start:start + self.per_rank].tolist()

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class FilePrompts:
    """Prompts from JSONL/parquet files through the DP-sharded, resumable loader."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, groups: ParallelGroups) -> None:
        from tip_megatron.rollout.data import PromptDataset, PromptFields, PromptLoader

        fields = PromptFields(prompt=cfg.data.prompt_field, messages=cfg.data.messages_field,
                              answer=cfg.data.answer_field)
        dataset = PromptDataset(list(cfg.data.prompts), tokenizer, fields=fields,
                                apply_chat_template=cfg.data.apply_chat_template,
                                max_prompt_len=cfg.data.max_prompt_len, overlong=cfg.data.overlong)
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
    if cfg.data.prompts:
        return FilePrompts(cfg, tokenizer, groups)
    if not cfg.student.builtin:
        raise ValueError("data.prompts is empty: name prompt files (JSONL or parquet); only the "
                         "builtin quickstart models come with an embedded task")
    return SyntheticPrompts(cfg.data.prompts_per_step // groups.dp_size, groups.dp_rank,
                            groups.dp_size, cfg.data.seed)
