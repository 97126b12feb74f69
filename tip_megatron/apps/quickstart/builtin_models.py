"""The quickstart's built-in model sources: `quickstart-teacher` and `quickstart-student`
(the addition task), `quickstart-chain-student` (the chain task, `tasks.py`; its teacher is
`quickstart-teacher`: both tasks' teachers learn the same correct sums).

    student.builtin=quickstart-student teacher.builtin=quickstart-teacher   # any run config

Each provides its architecture, its weights (pre-trained on the addition task by the
engine itself the first time, then read from the cache), the task's character tokenizer
and, for a run without `data.prompts`, the task's prompts. setup.py declares the three
providers as `tip_megatron.builtin_models` entry points; `tip_megatron.checkpoint.sources`
imports this module only when one of these names is first used.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from tip_megatron.checkpoint.sources import BuiltinModel
from tip_megatron.data.sources import PromptRecord
from tip_megatron.apps.quickstart import chain_task, multi_task, pretrain, task, tools_task


def cache_dir() -> Path:
    """Where the trainer's built-ins are cached: `$TIP_MEGATRON_CACHE`, else
    `~/.cache/tip_megatron` (the location the README names; `pretrain.default_cache_dir`,
    the Python API's default, adds `/quickstart`)."""
    return Path(os.environ.get("TIP_MEGATRON_CACHE", Path.home() / ".cache" / "tip_megatron"))


def _cache_entry(builtin: str):
    """(cache name, arch, recipe, data module) of a built-in model, as `_model` caches it."""
    return {"quickstart-teacher": ("teacher", pretrain.teacher_arch(), pretrain.TEACHER_RECIPE, task),
            "quickstart-student": ("student", pretrain.student_arch(), pretrain.STUDENT_RECIPE, task),
            "quickstart-chain-student": ("chain-student", pretrain.chain_student_arch(),
                                         pretrain.CHAIN_STUDENT_RECIPE, chain_task),
            "quickstart-multi-teacher-add": ("multi-teacher-add", pretrain.teacher_arch(),
                                             pretrain.MULTI_TEACHER_ADD_RECIPE, multi_task),
            "quickstart-multi-teacher-sub": ("multi-teacher-sub", pretrain.teacher_arch(),
                                             pretrain.MULTI_TEACHER_SUB_RECIPE, multi_task),
            "quickstart-multi-student": ("multi-student", pretrain.teacher_arch(),
                                         pretrain.MULTI_STUDENT_RECIPE, multi_task),
            "quickstart-tools-teacher": ("tools-teacher", pretrain.tools_arch(),
                                         pretrain.TOOLS_TEACHER_RECIPE, tools_task),
            "quickstart-tools-student": ("tools-student", pretrain.tools_arch(),
                                         pretrain.TOOLS_STUDENT_RECIPE, tools_task)}[builtin]


def set_up_line(teacher: str = "quickstart-teacher", student: str = "quickstart-student",
                task_name: str = "addition") -> str:
    """What the quickstart's set-up will do: pre-train the built-ins (names as in
    `tasks.py`) not in the cache yet (the test `pretrained_model` applies: the file
    exists), or read them from it."""
    missing = [role for role, builtin in (("teacher", teacher), ("student", student))
               if not pretrain.cache_path(cache_dir(), *_cache_entry(builtin)).is_file()]
    if not missing:
        return f"[quickstart] set-up: teacher and student read from the cache {cache_dir()}"
    return (f"[quickstart] set-up: {' and '.join(missing)} pre-training on the {task_name} task "
            f"(first run only, a few minutes; cached afterwards in {cache_dir()})")


class SyntheticPrompts:
    """Prompts of an embedded task, drawn per step (the quickstart's data)."""

    def __init__(self, per_rank: int, dp_rank: int, dp_size: int, seed: int,
                 sample_prompts: Callable = task.sample_prompts, tokenizer: Callable = task.tokenizer) -> None:
        self.per_rank, self.dp_rank, self.dp_size, self.seed = per_rank, dp_rank, dp_size, seed
        self.sample_prompts, self.tokenizer = sample_prompts, tokenizer
        self.step = 0
        self._last: list[list[int]] = []

    def next(self) -> list[list[int]]:
        """This replica's consecutive slice of the step's global batch (DP-invariant)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        start = self.dp_rank * self.per_rank
        self._last = self.sample_prompts(self.per_rank * self.dp_size, gen)[start:start + self.per_rank].tolist()
        return self._last

    def records(self) -> list[PromptRecord]:
        """The records of the batch `next` returned (multi-turn environments are built from
        them): id `<step>:<global index>`, the prompt's ids and text, no answer."""
        tok, first = self.tokenizer(), self.dp_rank * self.per_rank
        return [PromptRecord(prompt_id=f"{self.step - 1}:{first + k}", token_ids=ids, answer=None,
                             text=tok.decode(ids), where=f"embedded prompt {first + k} of step {self.step}")
                for k, ids in enumerate(self._last)]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _model(name: str, arch, recipe: pretrain.SFTRecipe, data: ModuleType = task) -> BuiltinModel:
    def full_state(groups) -> dict:
        return pretrain.pretrained_model(cache_dir(), name, arch, recipe, groups, data=data)[0]

    return BuiltinModel(arch=arch, full_state=full_state, tokenizer=data.tokenizer,
                        prompts=partial(SyntheticPrompts, sample_prompts=data.sample_prompts,
                                        tokenizer=data.tokenizer))


def teacher() -> BuiltinModel:
    return _model(*_cache_entry("quickstart-teacher"))


def student() -> BuiltinModel:
    return _model(*_cache_entry("quickstart-student"))


def chain_student() -> BuiltinModel:
    return _model(*_cache_entry("quickstart-chain-student"))


def multi_teacher_add() -> BuiltinModel:
    return _model(*_cache_entry("quickstart-multi-teacher-add"))


def multi_teacher_sub() -> BuiltinModel:
    return _model(*_cache_entry("quickstart-multi-teacher-sub"))


def multi_student() -> BuiltinModel:
    return _model(*_cache_entry("quickstart-multi-student"))


def tools_teacher() -> BuiltinModel:
    return _model(*_cache_entry("quickstart-tools-teacher"))


def tools_student() -> BuiltinModel:
    return _model(*_cache_entry("quickstart-tools-student"))

