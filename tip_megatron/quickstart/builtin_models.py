"""The quickstart's built-in model sources: `quickstart-teacher` and `quickstart-student`.

    student.builtin=quickstart-student teacher.builtin=quickstart-teacher   # any run config

Each provides its architecture, its weights (pre-trained on the addition task by the
engine itself the first time, then read from the cache), the task's character tokenizer
and, for a run without `data.prompts`, the task's prompts. `tip_megatron.models.sources`
imports this module when a built-in name is first looked up (it only registers).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from tip_megatron.models.sources import BuiltinModel, register_builtin
from tip_megatron.quickstart import pretrain, task


def cache_dir() -> Path:
    """Where the trainer's built-ins are cached: `$TIP_MEGATRON_CACHE`, else
    `~/.cache/tip_megatron` (the location the README names; `pretrain.default_cache_dir`,
    the Python API's default, adds `/quickstart`)."""
    return Path(os.environ.get("TIP_MEGATRON_CACHE", Path.home() / ".cache" / "tip_megatron"))


def set_up_line() -> str:
    """What the quickstart's set-up will do: pre-train the built-ins not in the cache yet
    (the test `pretrained_model` applies: the file exists), or read them from it."""
    missing = [name for name, arch, recipe in (
        ("teacher", pretrain.teacher_arch(), pretrain.TEACHER_RECIPE),
        ("student", pretrain.student_arch(), pretrain.STUDENT_RECIPE))
        if not pretrain.cache_path(cache_dir(), name, arch, recipe).is_file()]
    if not missing:
        return f"[quickstart] set-up: teacher and student read from the cache {cache_dir()}"
    return (f"[quickstart] set-up: {' and '.join(missing)} pre-training on the addition task "
            f"(first run only, a few minutes; cached afterwards in {cache_dir()})")


class SyntheticPrompts:
    """Prompts of the embedded addition task, drawn per step (the quickstart's data)."""

    def __init__(self, per_rank: int, dp_rank: int, dp_size: int, seed: int) -> None:
        self.per_rank, self.dp_rank, self.dp_size, self.seed = per_rank, dp_rank, dp_size, seed
        self.step = 0

    def next(self) -> list[list[int]]:
        """This replica's consecutive slice of the step's global batch (DP-invariant)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        start = self.dp_rank * self.per_rank
        return task.sample_prompts(self.per_rank * self.dp_size, gen)[start:start + self.per_rank].tolist()

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _model(name: str, arch, recipe: pretrain.SFTRecipe) -> BuiltinModel:
    def full_state(groups) -> dict:
        return pretrain.pretrained_model(cache_dir(), name, arch, recipe, groups)[0]

    return BuiltinModel(arch=arch, full_state=full_state, tokenizer=task.tokenizer,
                        prompts=SyntheticPrompts)


def teacher() -> BuiltinModel:
    return _model("teacher", pretrain.teacher_arch(), pretrain.TEACHER_RECIPE)


def student() -> BuiltinModel:
    return _model("student", pretrain.student_arch(), pretrain.STUDENT_RECIPE)


register_builtin("quickstart-teacher", teacher)
register_builtin("quickstart-student", student)
