"""One typed configuration tree for a distillation run: YAML file + `key=value` overrides.

    cfg = load_config("run.yaml", ["parallel.tp=2", "selection.rule=soft_or"])

Every default lives in the dataclasses below (one docstring per field); unknown keys,
wrong types and bad values are `ValueError`s naming the dotted key and what is accepted.
The trainer logs a one-line summary at start and the full effective config at DEBUG,
writes it to `<checkpoint.dir>/config.yaml` and saves it with every checkpoint
(`config_to_dict` / `dump_config`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import yaml

from tip_megatron.checkpoint.sources import ModelSource, builtin_model
from tip_megatron.data.config import DataConfig
from tip_megatron.distill.spec import LossConfig
from tip_megatron.distill.teacher_config import (
    TeacherConfig, teacher_ranks, teachers_of, validate_teachers,
)
from tip_megatron.eval.config import EvalConfig
from tip_megatron.models.options import ModelOptions
from tip_megatron.rollout.env import load_factory
from tip_megatron.rollout.types import SamplingConfig
from tip_megatron.runtime.parallel import ParallelLayout
from tip_megatron.runtime.signals import parse_signals
from tip_megatron.runtime.typed_tree import (
    at_least, check_choice, check_seed, config_to_dict, from_dict, leaf_keys, merge, yaml_value,
    parse_overrides,
)
from tip_megatron.tip import QuadrantRule, SelectionConfig


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine schedule. Defaults follow the TIP paper's student runs (lr 1e-6)."""

    lr: float = 1e-6
    """Peak learning rate (after warm-up)."""
    min_lr: float = 0.0
    """Floor of the cosine decay."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay, constant over the run."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay, in [0, 1)."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay, in [0, 1)."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon (numerical safety)."""
    clip_grad: float = 1.0
    """Global grad-norm clip (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's distributed optimizer)."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and all-reduce grads in fp32 even when params are bf16."""
    overlap_grad_reduce: bool = False
    """Overlap the DP grad reduce-scatter with backward (GPU; off on CPU/gloo)."""

    def validate(self, prefix: str = "optim.") -> None:
        # NaN fails every comparison: each check is written so that NaN (and inf) is refused.
        if not 0 < self.lr < math.inf:
            raise ValueError(f"{prefix}lr={self.lr}: must be a finite number > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"{prefix}min_lr={self.min_lr}: must be in [0, {prefix}lr={self.lr}]")
        at_least(prefix, self, warmup_steps=0)
        if not 0 <= self.clip_grad < math.inf:
            raise ValueError(f"{prefix}clip_grad={self.clip_grad}: must be a finite number >= 0 (0 disables)")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"{prefix}weight_decay={self.weight_decay}: must be a finite number >= 0")
        # eps = 0 turns a parameter that never got a gradient (m = v = 0) into 0/0 = NaN.
        if not 0 < self.adam_eps < math.inf:
            raise ValueError(f"{prefix}adam_eps={self.adam_eps}: must be a finite number > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{prefix}{name}={getattr(self, name)}: must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """How long the run is and how a rollout batch is cut into updates and micro-batches."""

    steps: int = 100
    """Rollout batches (each followed by `updates_per_rollout` optimizer steps)."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout batch (the rollout batch is split into this many
    consecutive mini-batches; 1 = strictly on-policy)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch."""
    seed: int = 1234
    """Model init, sampling and selection seed."""
    exit_after_steps: Optional[int] = None
    """Stop this launch after N steps (saving first when checkpoint.dir is set); the
    learning-rate schedule still spans `steps`. For time-limited (e.g. Slurm) jobs."""
    exit_signal: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    """Signals that make every rank save a checkpoint at the next step boundary (when
    checkpoint.dir is set) and exit 0 (Slurm: SIGTERM at preemption / time limit, SIGUSR1
    from `#SBATCH --signal=USR1@120`); [] keeps the default action (terminate)."""
    max_skipped_steps: int = 5
    """Stop the run after this many consecutive skipped updates (non-finite loss, grad or
    TIP signals); the checkpoints on disk stay the last good ones."""

    def validate(self, prefix: str = "train.") -> None:
        at_least(prefix, self, steps=1, updates_per_rollout=1, micro_batch_size=1,
                 max_skipped_steps=1)
        if self.exit_after_steps is not None:  # 0 or less would end the launch at once, unsaved
            at_least(prefix, self, exit_after_steps=1)
        check_seed(f"{prefix}seed", self.seed)
        parse_signals(self.exit_signal, f"{prefix}exit_signal")


@dataclass(frozen=True)
class CheckpointConfig:
    """Training checkpoints (model, optimizer, scheduler, data position), saved atomically."""

    dir: Optional[str] = None
    """Where checkpoints go (`step_000010/` ...); null disables saving."""
    save_every: int = 0
    """Save every N steps (0: only at the end, when dir is set)."""
    keep_last: int = 3
    """Keep the newest K checkpoints, and the newest K HF exports (`export_hf_every`) (0:
    keep all)."""
    resume: str = "auto"
    """auto (the newest step of the directory's lineage, if any), none (start over: refused
    when dir holds steps, unless overwrite), or a step directory (an older step of dir
    moves the newer ones to `<dir>/branches/`; see docs/checkpoints.md)."""
    overwrite: bool = False
    """Let a fresh start (resume=none, or a step from another directory) into a dir that
    holds steps move them, with metrics.jsonl, config.yaml, hf/ and model_meta/, aside
    into `<dir>/previous/<run_id>/` (never deleted)."""
    break_lock: bool = False
    """Take over the run lock (`<dir>/run.lock`) that a launch on ANOTHER host holds (a
    lock of a dead process on this host is taken over without it)."""
    export_hf_every: int = 0
    """Also write an HF export (`<dir>/hf/step_000010/`, loads in transformers) of each
    checkpoint saved at a step that is a multiple of N (step % N == 0; a step that saves
    nothing exports nothing, so save_every should divide N) (0: off; `tip-megatron convert
    mcore-to-hf` on a step directory does it at any time)."""
    verify: str = "full"
    """What each checkpoint's MANIFEST.json records, checked by every reader (resume,
    generate/eval --ckpt, mcore-to-hf, model sources): full (a checksum of every whole file:
    any damaged byte is caught; a save and a verification read the checkpoint once more) or
    edges (whole files up to 4 MiB, only the first and last MiB of larger shards: cheaper,
    misses damage in the middle of a shard). Cost per GiB: docs/checkpoints.md, "Cost"."""

    def validate(self, prefix: str = "checkpoint.") -> None:
        at_least(prefix, self, save_every=0, keep_last=0, export_hf_every=0)
        check_choice(prefix, self, "verify", ("full", "edges"))


@dataclass(frozen=True)
class LoggingConfig:
    """Console progress, metrics files and per-token dumps (all on the logging rank)."""

    log_every: int = 1
    """Print the progress line and write metrics every N steps."""
    jsonl: Optional[str] = None
    """Metrics file (one JSON object per step); null = <checkpoint.dir>/metrics.jsonl or none."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_API_KEY is set; needs the wandb extra)."""
    wandb_project: str = "tip_megatron"
    """Weights & Biases project name."""
    run_name: Optional[str] = None
    """Run name shown by Weights & Biases (null: wandb picks one)."""
    tensorboard: Union[bool, str, None] = None
    """TensorBoard event files: a directory, or true = <checkpoint.dir>/tb; null/false: off
    (needs the `tensorboard` package)."""
    dump_tokens_every: int = 0
    """Write a per-token dump (entropy, reverse/forward KL, kept, loss weight, quadrant,
    rollout id, position) every N steps to <checkpoint.dir or the jsonl's dir>/token_dumps/ (0: off);
    `tip-megatron plot` draws them."""
    dump_tokens_max: int = 20000
    """At most this many tokens per dump (a uniform sample of the step's response tokens)."""
    logprob_gap_every: int = 0
    """Every N steps, rerun the step's rollouts through the training forward (one extra
    forward) and log `rollout/logprob_gap_max` / `rollout/logprob_gap_mean`: |log-prob of
    each sampled response token under the sampler - under the training forward|, over all
    response tokens (kept or not), at the rollout's temperature/top-k/top-p (0: off)."""

    def validate(self, prefix: str = "logging.") -> None:
        at_least(prefix, self, log_every=1, dump_tokens_every=0, logprob_gap_every=0,
                 dump_tokens_max=1)


@dataclass(frozen=True)
class RunConfig:
    """The whole run."""

    student: ModelSource = field(default_factory=ModelSource)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Unset `teacher.parallel` keys follow the student's; docs/teacher.md has both placements."""
    teachers: tuple[TeacherConfig, ...] = ()
    """Several teachers instead of `teacher:`: each entry a teacher section plus `name`,
    `serves` and `default`; prompts are routed by `data.route_field` (docs/teacher.md,
    "Several teachers")."""
    shared_vocab_size: Optional[int] = None
    """Teacher and student TRUE vocabularies must match; name the shared prefix size here to
    distill between models whose embedding tables differ (e.g. 152064 vs 151936)."""
    model: ModelOptions = field(default_factory=ModelOptions)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    """The student's tp, pp, vpp, sequence_parallel (the teacher's follow unless
    `teacher.parallel` sets its own)."""
    data: DataConfig = field(default_factory=DataConfig)
    rollout: SamplingConfig = field(default_factory=SamplingConfig)
    """n, max_new_tokens, temperature, top_p, top_k (the generation engine's own options)."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def config_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the tree (frozen by a test so new options are deliberate)."""
    return leaf_keys(cls, prefix)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (optional) and apply key=value overrides."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {path!r} not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"config file {path!r}: not UTF-8 text (byte {err.start}); a YAML "
                             "run config") from None
        data = yaml_value(text, f"config file {path!r}") or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r}: top level must be a mapping")
    data = merge(data, parse_overrides(overrides))
    return from_dict(RunConfig, data)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def validate_run(cfg: RunConfig, world_size: int) -> None:
    """Every section's own `validate(prefix)`, then the checks that need several sections,
    before anything heavy. Ordered so that every value is checked on its own before it
    enters a product or a division: the user sees the message about the key they set."""
    cfg.student.validate("student")
    validate_teachers(cfg)
    for name in ("rollout", "train", "data", "checkpoint", "logging", "eval", "optim", "model",
                 "selection", "loss"):
        getattr(cfg, name).validate(f"{name}.")
    students = student_world_size(cfg, world_size)
    try:
        cfg.parallel.validate(students, "parallel.")
    except ValueError as err:
        if students == world_size:
            raise
        raise ValueError(f"{err} (the student's ranks: a world of {world_size} less the "
                         f"teacher's own {world_size - students}, placement=separate)") from None
    _check_teacher_layout(cfg, world_size)
    _check_eval_logging(cfg)
    _check_logging_dirs(cfg)
    _check_batch(cfg, cfg.parallel.dp(students))
    _check_prepass_source(cfg)
    _check_prompt_source(cfg)
    _check_multi_turn(cfg)
    _check_teacher_signal(cfg)


def _check_multi_turn(cfg: RunConfig) -> None:
    """Environments are built from prompt records (files, or the embedded task's prompts:
    `train.setup.prompt_source` checks they have records) and imported here, on every rank
    and in the launcher, before anything heavy."""
    if cfg.rollout.env is None:
        return
    if not cfg.data.prompts and not (cfg.student.builtin and builtin_model(cfg.student.builtin).prompts):
        raise ValueError(f"rollout.env={cfg.rollout.env!r} builds environments from prompt records: "
                         "name prompt files in data.prompts (or a builtin student with an embedded task)")
    load_factory(cfg.rollout.env)  # an import error names rollout.env now, not at the first rollout


def student_world_size(cfg: RunConfig, world_size: int) -> int:
    """The student's ranks: the whole world, less the teacher's own under `separate`."""
    own = teacher_ranks(cfg)
    if own and own >= world_size:
        names = [t.name for t in cfg.teachers if t.separate]
        who = (f"teachers {names} with placement=separate take" if len(names) > 1
               else "teacher.placement=separate takes")
        raise ValueError(
            f"{who} {own} ranks (teacher tp x pp x dp) of a world of "
            f"{world_size}: none left for the student; accepted: world size = student ranks + "
            f"{own} (e.g. torchrun --nproc_per_node {own + cfg.parallel.tp * cfg.parallel.pp})")
    return world_size - own


def _check_teacher_signal(cfg: RunConfig) -> None:
    """`teacher.signal: topk` has its own loss op: loss.impl=unfused cannot apply to it."""
    teacher = teachers_of(cfg)[0]  # topk: a single teacher (validate_teachers)
    if teacher.signal == "topk" and cfg.loss.impl != "fused":
        raise ValueError(f"teacher.signal='topk' computes its own loss; loss.impl={cfg.loss.impl!r} "
                         "applies to teacher.signal='full' only (accepted with topk: 'fused')")
    if teacher.signal == "topk" and cfg.loss.mix != "none":
        raise ValueError(f"teacher.signal='topk' with loss.mix={cfg.loss.mix!r}: the per-token mix "
                         "runs in the full-vocabulary fused pass only; accepted with topk: loss.mix=none")


def _check_teacher_layout(cfg: RunConfig, world_size: int) -> None:
    """Each teacher's own layout against its ranks (one line naming `teacher.parallel.*`, or
    `teachers[i].parallel.*`)."""
    for i, teacher in enumerate(teachers_of(cfg)):
        layout = teacher.parallel.resolve(cfg.parallel)
        ranks = teacher.ranks(cfg.parallel) or (world_size - teacher_ranks(cfg))
        layout.validate(ranks, f"teachers[{i}].parallel." if cfg.teachers else "teacher.parallel.")


def _check_batch(cfg: RunConfig, dp: int) -> None:
    """The global batch splits into DP shards, then updates, then micro-batches."""
    if cfg.data.prompts_per_step % dp != 0:
        raise ValueError(f"data.prompts_per_step={cfg.data.prompts_per_step} is not divisible by "
                         f"the data-parallel size {dp}")
    rows = cfg.data.prompts_per_step * cfg.rollout.n
    if cfg.train.updates_per_rollout > rows:
        raise ValueError(f"train.updates_per_rollout={cfg.train.updates_per_rollout} exceeds the "
                         f"{rows} rollouts per step (data.prompts_per_step x rollout.n)")
    if rows % (dp * cfg.train.updates_per_rollout * cfg.train.micro_batch_size) != 0:
        raise ValueError(
            f"global batch of {rows} rollouts (prompts_per_step x rollout.n) is not divisible by "
            f"dp x updates_per_rollout x micro_batch_size = {dp} x {cfg.train.updates_per_rollout} "
            f"x {cfg.train.micro_batch_size}"
        )


def run_selection(cfg: RunConfig) -> SelectionConfig:
    """`cfg.selection` with `prepass_source=auto` resolved: `generation` where the rollout's
    own weights are the ones the pre-pass must score with (one update per rollout batch, or
    several with `rescore_each_update=false`: every mask is chosen before the first
    update), else `recompute` (an update re-scored with moved weights)."""
    sel = cfg.selection
    if sel.prepass_source != "auto":
        return sel
    same_weights = cfg.train.updates_per_rollout == 1 or not sel.rescore_each_update
    return replace(sel, prepass_source="generation" if same_weights else "recompute")


def _check_prepass_source(cfg: RunConfig) -> None:
    """Hidden states from generation hold the policy that sampled the rollouts: they cannot
    re-score an update whose weights moved."""
    sel, updates = cfg.selection, cfg.train.updates_per_rollout
    if sel.prepass_from_generation and updates > 1 and sel.rescore_each_update:
        raise ValueError(f"selection.prepass_source=generation scores with the rollout policy, but "
                         f"train.updates_per_rollout={updates} with selection.rescore_each_update=true "
                         "re-scores every update with its current weights; set "
                         "selection.prepass_source=recompute or selection.rescore_each_update=false")


def logging_dir(cfg: RunConfig) -> Optional[str]:
    """Where run files other than checkpoints go: checkpoint.dir, else logging.jsonl's dir."""
    if cfg.checkpoint.dir:
        return cfg.checkpoint.dir
    return str(Path(cfg.logging.jsonl).parent) if cfg.logging.jsonl else None


def tensorboard_dir(cfg: RunConfig) -> Optional[str]:
    tb = cfg.logging.tensorboard
    if tb is None or tb is False:
        return None
    if tb is True:
        return f"{cfg.checkpoint.dir}/tb" if cfg.checkpoint.dir else None
    return tb


def _check_logging_dirs(cfg: RunConfig) -> None:
    if cfg.logging.tensorboard is True and not cfg.checkpoint.dir:
        raise ValueError("logging.tensorboard=true: writes to <checkpoint.dir>/tb but "
                         "checkpoint.dir is not set; name a directory instead")
    if cfg.logging.dump_tokens_every and not logging_dir(cfg):
        raise ValueError(f"logging.dump_tokens_every={cfg.logging.dump_tokens_every}: dumps go "
                         "under checkpoint.dir (or logging.jsonl's directory); set one of them")


def _check_eval_logging(cfg: RunConfig) -> None:
    every, log_every = cfg.eval.every, cfg.logging.log_every
    if every and every % log_every:
        raise ValueError(f"eval.every={every} must be a multiple of logging.log_every={log_every} "
                         "(validation metrics are logged with their step)")


def _check_prompt_source(cfg: RunConfig) -> None:
    if cfg.data.prompts:
        return
    if not (cfg.student.builtin and builtin_model(cfg.student.builtin).prompts):
        raise ValueError("data.prompts is empty: name prompt files (JSONL or parquet); only a "
                         "builtin student with an embedded task (student.builtin) comes with prompts")


__all__ = [
    "CheckpointConfig", "DataConfig", "EvalConfig", "LoggingConfig", "LossConfig",
    "ModelOptions", "ModelSource", "OptimConfig", "ParallelLayout", "QuadrantRule",
    "RunConfig", "SamplingConfig", "SelectionConfig", "TeacherConfig", "TrainConfig", "config_keys",
    "config_to_dict", "dump_config", "from_dict", "load_config", "logging_dir", "parse_overrides",
    "student_world_size", "tensorboard_dir", "validate_run",
]
