"""The OPD trainer: one step = rollouts -> teacher pass -> student pass with TIP -> update.

    run(cfg)        # under torchrun, or a single process

Each stage is a named function below; `run` reads as the sequence of stages.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from tip_megatron import launch, parallel
from tip_megatron.config import RunConfig, config_to_dict, dump_config, validate_run
from tip_megatron.distill.loss import DistillSpec
from tip_megatron.distill.step import (
    make_contexts, scoring_pass, student_pass, teacher_hidden_states, teacher_output_weight,
    with_preselection,
)
from tip_megatron.rollout.generate import GenerationConfig, generate
from tip_megatron.tip import select_global
from tip_megatron.train import checkpoint as ckpt, export, validation
from tip_megatron.train.batches import make_microbatches, split_updates
from tip_megatron.train.metrics import MetricsLogger, peak_memory_mib, reduce_reports
from tip_megatron.train.optimizer import build_optimizer, wrap_ddp
from tip_megatron.train.setup import build_models, load_run_tokenizer, prompt_source

logger = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: RunConfig
    groups: Any
    models: Any
    ddp: list
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    prompts: Any
    log: MetricsLogger
    step: int = 0
    history: list = field(default_factory=list)
    validation: Any = None  # train.validation.Validation (eval.every > 0)


# ------------------------------------------------------------------ set-up
def setup(cfg: RunConfig) -> Run:
    world = launch.rank_env().world_size
    validate_run(cfg, world)
    groups = parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    tokenizer = load_run_tokenizer(cfg)
    models = build_models(cfg, groups)
    if tokenizer.vocab_size > models.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the models' shared "
                         f"vocabulary is {models.vocab_size}")
    ddp = wrap_ddp(models.student, groups, cfg.optim)
    total = cfg.train.steps * cfg.train.updates_per_rollout
    optimizer, scheduler = build_optimizer(ddp, groups, cfg.optim, total_steps=total)
    is_logger = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0
    jsonl = cfg.logging.jsonl or (f"{cfg.checkpoint.dir}/metrics.jsonl" if cfg.checkpoint.dir else None)
    log = MetricsLogger(is_logger, jsonl, cfg.logging.wandb, cfg.logging.wandb_project,
                        cfg.logging.run_name, config_to_dict(cfg))
    run = Run(cfg, groups, models, ddp, optimizer, scheduler, tokenizer,
              prompt_source(cfg, tokenizer, groups), log)
    run.validation = validation.setup_validation(cfg, tokenizer, models.student_arch)
    if groups.rank == 0:
        print("effective config:\n" + dump_config(cfg), flush=True)
    maybe_resume(run)
    return run


def maybe_resume(run: Run) -> None:
    cfg = run.cfg.checkpoint
    if cfg.resume == "none":
        return
    path = ckpt.latest_checkpoint(cfg.dir) if cfg.resume == "auto" and cfg.dir else None
    if cfg.resume not in ("auto", "none"):
        path = cfg.resume
    if path is None:
        return
    state = ckpt.load_checkpoint(path, run.ddp, run.optimizer, run.scheduler, run.groups,
                                 expect_arch=run.models.student_arch)
    run.step = int(state["step"])
    run.prompts.load_state_dict(state["prompts"])
    if run.groups.rank == 0:
        print(f"resumed from {path} at step {run.step}", flush=True)


# ------------------------------------------------------------------ one step
def rollouts(run: Run, prompts: list[list[int]]):
    r = run.cfg.rollout
    gen = GenerationConfig.from_sampling(r, stop_ids=run.tokenizer.stop_ids, pad_id=run.tokenizer.pad_id)
    # This replica holds rows [dp_rank * rows, (dp_rank + 1) * rows) of the global batch
    # (the prompt loader hands out consecutive slices), so any DP size draws the same samples.
    rows = len(prompts) * r.n
    return generate(run.ddp, run.groups, run.models.student_arch, prompts, gen,
                    seed=run.cfg.train.seed, step=run.step, row_offset=run.groups.dp_rank * rows)


def microbatches(run: Run, out) -> list:
    rows = out.token_ids.shape[0]
    rollout_ids = run.groups.dp_rank * rows + torch.arange(rows, device=out.token_ids.device)
    return make_microbatches(out.token_ids, out.response_mask, rollout_ids, run.cfg.train.micro_batch_size)


def _spec(run: Run) -> DistillSpec:
    return DistillSpec(run.cfg.selection, run.cfg.loss, run.models.vocab_size,
                       run.groups.tp_group, step=run.step)


def global_preselection(run: Run, mbs: list, contexts: list, shape: dict) -> list:
    """Scope `global`: a forward-only scoring pass, then selection over the global batch;
    the returned contexts carry both, so the student pass does not score again."""
    if run.cfg.selection.scope != "global":
        return contexts
    signals = scoring_pass(run.ddp, run.groups, mbs, contexts, _spec(run), **shape)
    if not run.groups.is_last_stage:
        return contexts
    masks = select_global(run.cfg.selection, signals, run.groups.dp_group, step=run.step)
    return with_preselection(contexts, signals, masks)


def update(run: Run, mbs: list, contexts: list, shape: dict) -> tuple[list, dict]:
    """Student pass with the TIP loss on these micro-batches, then one optimizer step."""
    for chunk in run.ddp:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    reports = student_pass(run.ddp, run.groups, mbs, contexts, _spec(run), **shape)
    metrics = reduce_reports(reports, run.groups.dp_group) if run.groups.is_last_stage else {}
    if _should_skip(run, metrics):
        return reports, dict(metrics, skipped=1)
    _, grad_norm, _ = run.optimizer.step()
    run.scheduler.step(increment=1)
    return reports, dict(metrics, grad_norm=float(grad_norm or 0.0), skipped=0,
                         lr=run.optimizer.param_groups[0]["lr"])


def _should_skip(run: Run, metrics: dict) -> bool:
    """Skip the update (on every rank alike) on a non-finite loss or gradient, or when no
    token was kept in the whole global batch."""
    bad = 0.0
    if run.groups.is_last_stage:
        bad = float(not torch.isfinite(torch.tensor(metrics["loss_sum"])) or metrics["num_kept"] == 0)
    for p in (p for c in run.ddp for p in c.parameters() if getattr(p, "main_grad", None) is not None):
        if not torch.isfinite(p.main_grad).all():
            bad = 1.0
            break
    flag = torch.tensor([bad], device=next(run.ddp[0].parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0 and run.groups.rank == 0:
        logger.warning("step %d: non-finite loss/grad or nothing kept: update skipped", run.step)
    return flag.item() > 0


def train_step(run: Run) -> dict:
    start = time.perf_counter()
    out = rollouts(run, run.prompts.next())
    mbs = microbatches(run, out)
    shape = dict(seq_length=out.token_ids.shape[1], micro_batch_size=run.cfg.train.micro_batch_size)
    hidden = teacher_hidden_states(run.models.teacher, run.groups, mbs, **shape)
    t_weight = teacher_output_weight(run.models.teacher) if run.groups.is_last_stage else None
    contexts = make_contexts(run.groups, mbs, hidden, t_weight)
    contexts = global_preselection(run, mbs, contexts, shape)
    updates = []
    for mb_group, ctx_group in zip(split_updates(mbs, run.cfg.train.updates_per_rollout),
                                   split_updates(contexts, run.cfg.train.updates_per_rollout)):
        updates.append(update(run, mb_group, ctx_group, shape)[1])
    # Selection metrics of the first update (the freshest policy); loss averaged over updates.
    metrics = dict(updates[0])
    if len(updates) > 1 and "loss" in metrics:
        metrics["loss_last_update"] = updates[-1]["loss"]
        metrics["skipped"] = sum(u["skipped"] for u in updates)
    tokens = float(out.response_mask.sum()) * run.groups.dp_size
    elapsed = time.perf_counter() - start
    metrics.update(tokens_per_s=tokens / elapsed, step_s=elapsed, peak_mem_mib=peak_memory_mib(),
                   response_len=float(out.response_lengths.float().mean()))
    return metrics


# ------------------------------------------------------------------ loop
def save(run: Run) -> None:
    c = run.cfg.checkpoint
    ckpt.save_checkpoint(
        c.dir, run.step, run.ddp, run.optimizer, run.scheduler, run.groups,
        extra={"prompts": run.prompts.state_dict()}, config_yaml=dump_config(run.cfg),
        arch_json=json.dumps(run.models.student_arch.to_dict()), keep_last=c.keep_last,
    )
    export.after_save(run)  # model_meta/ once; HF export every checkpoint.export_hf_every


def run(cfg: RunConfig) -> list[dict]:
    """Train; returns the per-step metrics of the logging rank (empty elsewhere)."""
    state = setup(cfg)
    loop(state)
    return state.history


def loop(state: Run) -> None:
    """Steps until train.steps (or train.exit_after_steps), logging and checkpointing."""
    cfg = state.cfg
    c = cfg.checkpoint
    stop = cfg.train.steps
    if cfg.train.exit_after_steps:
        stop = min(stop, state.step + cfg.train.exit_after_steps)
    while state.step < stop:
        metrics = train_step(state)
        state.step += 1
        metrics.update(validation.maybe_validate(state))
        if state.log.active:
            state.history.append(dict(step=state.step, **metrics))
            if state.step % cfg.logging.log_every == 0:
                state.log.log(state.step, metrics)
        if c.dir and ((c.save_every and state.step % c.save_every == 0) or state.step == stop):
            save(state)
    state.log.close()
