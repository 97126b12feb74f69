"""The quickstart's pieces: the embedded tasks (`tasks.py`: the addition task `task.py`, the
chain task `chain_task.py`, the two-domain multi task `multi_task.py`), pre-training of
tiny teachers and students with the engine's own stack (cached), accuracy through the
engine's eval path, and the built-in model sources `quickstart-teacher` /
`quickstart-student` / `quickstart-chain-student` / `quickstart-multi-*` (`builtin_models.py`,
found by `tip_megatron.checkpoint.sources`; the trainer never imports this package).

    from tip_megatron.apps.quickstart import task, pretrained_models, evaluate

See docs/quickstart.md for the task, the sizes, the recipes and the measured times.
"""
from __future__ import annotations


def register(subparsers) -> None:
    """The `tip-megatron quickstart` subcommand (see apps/quickstart/command.py)."""
    # lazy: training ranks import this package (builtin_models) and need no command parser
    from tip_megatron.apps.quickstart.command import register as _register

    _register(subparsers)


def __getattr__(name: str):
    # Lazy: `tip-megatron --help` imports this package and must not import torch or megatron.
    if name in ("pretrained_models", "pretrained_model", "sft", "SFTRecipe", "TEACHER_RECIPE",
                "STUDENT_RECIPE", "CHAIN_STUDENT_RECIPE", "teacher_arch", "student_arch",
                "chain_student_arch", "default_cache_dir"):
        from tip_megatron.apps.quickstart import pretrain  # lazy: imports torch, as above

        return getattr(pretrain, name)
    if name == "evaluate":
        from tip_megatron.apps.quickstart import evaluation  # lazy: imports torch, as above

        return evaluation.evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
