"""The state of one training run (`Run`), shared by the trainer's stages.

    run = trainer.setup(cfg)    # builds it; every stage reads and updates it
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol

import torch

from tip_megatron.config import RunConfig
from tip_megatron.data.tokenizers import Tokenizer
from tip_megatron.distill.spec import MicrobatchContext
from tip_megatron.distill.step import Microbatch, ScheduleShape
from tip_megatron.runtime.parallel import ParallelGroups
from tip_megatron.tip.normalize import RunningNorm
from tip_megatron.train.metrics import MetricsLogger
from tip_megatron.train.progress import StageTimers, TrainProgress
from tip_megatron.train.setup import Models

if TYPE_CHECKING:  # annotations only: train.optimizer imports megatron's optimizer modules
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from tip_megatron.checkpoint.rundir import Lineage


class PromptSource(Protocol):
    """This DP replica's prompts, one batch per step, resumable (train.setup.prompt_source)."""

    def next(self) -> list[list[int]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Validator(Protocol):
    """train.validation.Validation, or any object like it (the quickstart's benchmark)."""

    every: int

    def __call__(self, run: Run) -> dict[str, float]: ...


@dataclass(frozen=True)
class LastUpdate:
    """What `save` checks the new weights on: the last update's first micro-batch."""

    microbatches: list[Microbatch]
    contexts: list[Optional[MicrobatchContext]]
    shape: ScheduleShape


@dataclass
class Run:
    """Everything a training launch holds: config, groups, models, optimizer, prompts,
    logging, and the counters the stages update (step, skips, the last update)."""

    cfg: RunConfig
    groups: ParallelGroups
    models: Models
    ddp: list[torch.nn.Module]
    """The student's chunks wrapped in megatron's DistributedDataParallel."""
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    tokenizer: Tokenizer
    prompts: PromptSource
    log: MetricsLogger
    step: int = 0
    history: list[dict] = field(default_factory=list)
    timers: StageTimers = field(default_factory=StageTimers)
    validation: Optional[Validator] = None
    """train.validation.Validation (eval.every > 0), or any object with `every` and
    `__call__(run) -> metrics` (the quickstart's in-memory benchmark)."""
    progress: Optional[TrainProgress] = None
    skip_streak: int = 0
    """Consecutive skipped updates (non-finite loss/grad/signals or nothing kept)."""
    num_skipped: int = 0
    """Skipped updates in this launch."""
    last_update: Optional[LastUpdate] = None
    save_refused: str = ""
    """Why the last `save` wrote nothing ('' = it saved)."""
    running_norm: Optional[RunningNorm] = None
    """`selection.normalize=running`: the moving average of the global statistics (last
    pipeline stage; saved in the checkpoint as `selection_norm`)."""
    lineage: Optional["Lineage"] = None
    """checkpoint.rundir.Lineage this launch writes (recorded in every step it saves)."""
