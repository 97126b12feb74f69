"""The OPD trainer: one step = rollouts -> teacher pass -> student pass with TIP -> update.

    run(cfg)        # under torchrun, or a single process

Each stage is a named function below; `run` reads as the sequence of stages.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from tip_megatron.runtime import parallel
from tip_megatron.runtime.device import current_device, default_backend
from tip_megatron.runtime.env import rank_env
from tip_megatron.runtime.errors import rank_exit
from tip_megatron.config import RunConfig, config_to_dict, dump_config, run_selection, tensorboard_dir
from tip_megatron.distill.spec import DistillSpec, MicrobatchResult
from tip_megatron.distill.prepass import global_preselection
from tip_megatron.distill.teacher_config import teacher_split, teachers_of
from tip_megatron.distill.teacher_link import TeacherRankLost
from tip_megatron.distill.step import Microbatch, ScheduleShape, forward_loss_pass, train_pass
from tip_megatron.rollout.consistency import gap_metrics
from tip_megatron.rollout.generate import Episodes, GenerationConfig, generate
from tip_megatron.rollout.types import Rollouts
from tip_megatron.tip import warn_ill_posed_budget
from tip_megatron.tip.normalize import RunningNorm
from tip_megatron.runtime.collectives import all_gather_varlen, all_reduce_sum
from tip_megatron.checkpoint import training as ckpt
from tip_megatron.train import export, run_dir, validation
from tip_megatron.train.batch_metrics import global_response_counts, rollout_batch_metrics
from tip_megatron.train.batches import update_microbatches
from tip_megatron.train.metrics import MetricsLogger, peak_memory_mib
from tip_megatron.train.optimizer import build_optimizer, wrap_ddp
from tip_megatron.train.preemption import StopOnSignal
from tip_megatron.train.preflight import preflight
from tip_megatron.train.progress import StageTimers, TrainProgress, config_summary, write_effective_config
from tip_megatron.train.run_state import LastUpdate, Run
from tip_megatron.train.setup import build_models, prompt_source
from tip_megatron.train.teacher import (
    link_metrics, row_teachers, serve_teacher, teacher_contexts, teacher_names, teacher_signal,
)
from tip_megatron.train.skip import TrainingDiverged, count_skip, reduce_results, should_skip
from tip_megatron.train.token_dumps import maybe_dump_tokens
from tip_megatron.train.turn_metrics import turn_metrics
from tip_megatron.checkpoint.layout import latest_checkpoint

logger = logging.getLogger(__name__)

#: Exit code of a run stopped by `train.max_skipped_steps` consecutive skips.
EXIT_DIVERGED = 3
#: Exit code of a run whose checkpoint could not be written (disk full, file-size limit).
EXIT_NOT_SAVED = 4
#: Exit code of a student rank whose teacher rank (`separate`) died or hung up.
EXIT_TEACHER_LOST = 5


# ------------------------------------------------------------------ set-up
def setup(cfg: RunConfig) -> Run:
    # Every check before the process group: each rank fails alone, no collective needed.
    checked = preflight(cfg, rank_env().world_size)
    split = teacher_split(cfg, rank_env().world_size)
    groups = parallel.initialize(cfg.parallel, seed=cfg.train.seed, split=split)
    teacher_groups = {i: parallel.grid_groups(t.parallel.resolve(cfg.parallel), 0, groups.world_size)
                      for i, t in enumerate(teachers_of(cfg))  # another layout, same ranks
                      if t.own_grid(cfg.parallel) and not t.separate}
    run_dir.claim(cfg, groups)  # the run directory's lock, before anything is written there
    tokenizer = checked.tokenizer
    models = build_models(cfg, groups, checked, teacher_groups)
    ddp = wrap_ddp(models.student, groups, cfg.optim)
    total = cfg.train.steps * cfg.train.updates_per_rollout
    optimizer, scheduler = build_optimizer(ddp, groups, cfg.optim, total_steps=total)
    is_logger = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0
    jsonl = cfg.logging.jsonl or (f"{cfg.checkpoint.dir}/metrics.jsonl" if cfg.checkpoint.dir else None)
    log = MetricsLogger(is_logger, jsonl, cfg.logging.wandb, cfg.logging.wandb_project,
                        cfg.logging.run_name, config_to_dict(cfg), tensorboard=tensorboard_dir(cfg))
    run = Run(cfg, groups, models, ddp, optimizer, scheduler, tokenizer,
              prompt_source(cfg, tokenizer, groups), log, timers=StageTimers(_sync()))
    run.validation = validation.setup_validation(cfg, tokenizer, models.student_arch)
    if groups.rank == 0:
        logger.info("%s", config_summary(cfg, groups.world_size))
        logger.debug("effective config:\n%s", dump_config(cfg))
    maybe_resume(run)
    # The full config of this launch in <checkpoint.dir>/config.yaml, written only once the
    # resume succeeded: a launch that fails at set-up leaves the run directory as it was.
    if groups.rank == 0 and cfg.checkpoint.dir:
        logger.info("effective config written to %s",
                    write_effective_config(cfg.checkpoint.dir, dump_config(cfg)))
    run.progress = TrainProgress(cfg.train.steps, start=run.step, active=is_logger)
    return run


def _sync():
    """Stage timers wait for the accelerator's queue (CUDA runs asynchronously)."""
    return torch.cuda.synchronize if default_backend().is_cuda else None


def maybe_resume(run: Run) -> None:
    """Load what `run_dir.plan_resume` picks; then settle the run directory's lineage."""
    plan = run_dir.plan_resume(run.cfg, run.groups)
    path = plan.path
    if path is not None:
        state = ckpt.load_checkpoint(path, run.ddp, run.optimizer, run.scheduler, run.groups,
                                     expect_arch=run.models.student_arch)
        run.step = int(state["step"])
        run.prompts.load_state_dict(state["prompts"])
        if "selection_norm" in state:  # selection.normalize=running: continue the average
            run.running_norm = RunningNorm.from_tensor(torch.tensor(state["selection_norm"]))
    run.lineage = run_dir.settle(run.cfg, plan, run.groups)  # only after a load that worked
    run.log.run_id = run.lineage.run_id
    if path is None:
        return
    # Steps after the checkpoint were logged by the interrupted launch: logged again now.
    run.log.truncate_after(run.step, runs=run.lineage.runs())
    if run.groups.rank == 0:
        print(f"resumed from {path} at step {run.step}", flush=True)


# ------------------------------------------------------------------ one step
def generate_rollouts(run: Run, prompts: list[list[int]]) -> Rollouts:
    """The current student's samples for this replica's prompts (`rollout.n` each)."""
    r = run.cfg.rollout
    every = run.cfg.logging.logprob_gap_every  # one extra forward on those steps (as logged)
    # No vocab_limit here (validation, generate and eval set it): with it, DP2 draws DP1's
    # rollouts exactly, but a Soft-OR near-tie at step 3 swaps two kept tokens and the layout
    # test's strict equality fails (docs/data.md); training never decodes.
    gen = GenerationConfig.from_sampling(r, stop_ids=run.tokenizer.stop_ids, pad_id=run.tokenizer.pad_id,
                                         check_logprobs=bool(every) and (run.step + 1) % every == 0,
                                         keep_hidden=run_selection(run.cfg).prepass_from_generation)
    # This replica holds rows [dp_rank * rows, (dp_rank + 1) * rows) of the global batch
    # (the prompt loader hands out consecutive slices), so any DP size draws the same samples.
    rows = len(prompts) * r.n
    # Multi-turn: one environment per rollout, rebuilt from this step's records (so a
    # resumed run rebuilds exactly the environments the interrupted one had).
    episodes = (Episodes(run.prompts.records(), run.tokenizer,
                         template_kwargs=dict(run.cfg.data.chat_template_kwargs))
                if r.env is not None else None)
    return generate(run.ddp, run.groups, run.models.student_arch, prompts, gen,
                    seed=run.cfg.train.seed, step=run.step, row_offset=run.groups.dp_rank * rows,
                    episodes=episodes)


def microbatches(run: Run, out: Rollouts) -> list[list[Microbatch]]:
    """This replica's micro-batches, one list per update (global rollout id % updates)."""
    rows = out.token_ids.shape[0]
    rollout_ids = run.groups.dp_rank * rows + torch.arange(rows, device=out.token_ids.device)
    layout = run.groups.layout
    return update_microbatches(out.token_ids, out.response_mask, rollout_ids,
                               run.cfg.train.updates_per_rollout, run.cfg.train.micro_batch_size,
                               seq_multiple=layout.tp if layout.sequence_parallel else 1,
                               teacher_ids=row_teachers(run, out.token_ids.device))


def _spec(run: Run) -> DistillSpec:
    return DistillSpec(run_selection(run.cfg), run.cfg.loss, run.models.vocab_size,
                       run.groups.tp_group, step=run.step, teacher_signal=teachers_of(run.cfg)[0].topk_signal(),
                       running_norm=run.running_norm, teacher_names=teacher_names(run.cfg))


def _preselect(run: Run, mbs: list[Microbatch], contexts: list,
               shape: ScheduleShape, rollouts: Optional[Rollouts] = None) -> list:
    """Scope `global`: distill.prepass selects over the global batch (scoring timed as
    `student`); keeps the `selection.normalize=running` average it returns."""
    contexts = global_preselection(run.ddp, run.groups, mbs, contexts, _spec(run), shape,
                                   rollouts=rollouts, scoring_timer=lambda: run.timers("student"))
    pre = next((c.preselection for c in contexts if c is not None and c.preselection is not None), None)
    if pre is not None and pre.running_norm is not None:
        run.running_norm = pre.running_norm
    return contexts


def _regroup(items: list, sizes: list[int]) -> list[list]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [items[a:a + n] for a, n in zip(starts, sizes)]


def run_updates(run: Run, mb_groups: list[list[Microbatch]], contexts: list, shape: ScheduleShape,
                rollouts: Optional[Rollouts] = None) -> list[tuple[list[MicrobatchResult], dict]]:
    """The optimizer updates of one rollout batch; (results, metrics) per update.

    Scope `global` with `selection.rescore_each_update` scores and selects each update's
    mini-batch right before it (current weights); otherwise one pre-pass over the whole
    rollout batch selects for every update (`rollouts`: read by the `generation` source)."""
    mbs = [mb for group in mb_groups for mb in group]
    rescore = run.cfg.selection.rescore_each_update and len(mb_groups) > 1
    if not rescore:
        contexts = _preselect(run, mbs, contexts, shape, rollouts)
    out = []
    for mb_group, ctx_group in zip(mb_groups, _regroup(contexts, [len(g) for g in mb_groups])):
        if rescore:
            ctx_group = _preselect(run, mb_group, ctx_group, shape)
        out.append(update(run, mb_group, ctx_group, shape))
    return out


def check_budget(run: Run, mb_groups: list[list[Microbatch]]) -> None:
    """Warn once (rank 0) when floor(rho * m) per count group misses rho badly."""
    cfg = run.cfg.selection
    unit = cfg.count_unit
    if unit is None:
        return
    per_row = [[mb.target_mask.sum(1).long() for mb in group] for group in mb_groups]
    if unit == "rollout":
        sizes = all_gather_varlen(torch.cat([m for g in per_row for m in g]), run.groups.dp_group)
    elif unit == "microbatch":
        sizes = all_gather_varlen(torch.stack([m.sum() for g in per_row for m in g]),
                                  run.groups.dp_group)
    else:  # one group per selection: each update's mini-batch, or the whole rollout batch
        local = torch.stack([sum(m.sum() for m in g) for g in per_row])
        if not (cfg.rescore_each_update and len(mb_groups) > 1):
            local = local.sum().reshape(1)
        sizes = all_reduce_sum(local, run.groups.dp_group)
    if run.groups.rank == 0:
        warn_ill_posed_budget(cfg, sizes)


def update(run: Run, mbs: list[Microbatch], contexts: list,
           shape: ScheduleShape) -> tuple[list[MicrobatchResult], dict]:
    """Student pass with the TIP loss on these micro-batches, then one optimizer step
    (skipped on every rank alike when `train.skip.should_skip` says so)."""
    for chunk in run.ddp:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    with run.timers("student"):
        results = train_pass(run.ddp, run.groups, mbs, contexts, _spec(run), **shape._asdict())
    metrics, finite = reduce_results(run, results)
    run.last_update = LastUpdate(mbs[:1], contexts[:1], shape)
    reason = should_skip(run, metrics, finite)
    if reason:
        count_skip(run, reason)
        return results, dict(metrics, skipped=1, skipped_total=run.num_skipped)
    run.skip_streak = 0
    with run.timers("optimizer"):
        _, grad_norm, _ = run.optimizer.step()
        run.scheduler.step(increment=1)
    return results, dict(metrics, grad_norm=float(grad_norm or 0.0), skipped=0,
                         skipped_total=run.num_skipped, lr=run.optimizer.param_groups[0]["lr"])


def train_step(run: Run) -> dict:
    """One step, stage by stage: rollouts -> micro-batches -> teacher -> (pre-pass +) updates."""
    start = time.perf_counter()
    run.timers.reset()
    with run.timers("rollout"):
        out = generate_rollouts(run, run.prompts.next())
    mb_groups = microbatches(run, out)
    mbs = [mb for group in mb_groups for mb in group]
    check_budget(run, mb_groups)
    # The micro-batch length, not the rollouts': sequence parallelism pads it to a multiple of tp.
    shape = ScheduleShape(mbs[0].input_ids.shape[1], run.cfg.train.micro_batch_size)
    with run.timers("teacher"):
        contexts = teacher_contexts(run, mbs, shape)
    updates = run_updates(run, mb_groups, contexts, shape, out)
    # Dumps follow the micro-batch order of the updates (each update's results in turn).
    maybe_dump_tokens(run.cfg, run.groups, run.step + 1, mbs,
                      [r for res, _ in updates for r in res])  # step as logged
    metrics = rollout_batch_metrics(run, updates)
    if out.turn_ids is not None and run.groups.is_last_stage:
        metrics.update(turn_metrics(out, mbs, [r for res, _ in updates for r in res],
                                    run.groups.dp_rank * out.num_rows, run.cfg.rollout.max_turns,
                                    run.groups.dp_group))
    tokens, rows = global_response_counts(run, out)
    elapsed = time.perf_counter() - start
    metrics.update(tokens_per_s=tokens / elapsed, step_s=elapsed, peak_mem_mib=peak_memory_mib(),
                   response_len=tokens / rows, **run.timers.metrics())
    metrics.update(link_metrics(run))
    if out.logprob_gap is not None:
        metrics.update(gap_metrics(out.logprob_gap, run.groups.dp_group))
    return metrics


# ------------------------------------------------------------------ loop
def _running_norm_extra(run: Run) -> dict:
    """{"selection_norm": [5] floats} under `selection.normalize=running`, else {}. The
    average lives on the last pipeline stage; rank 0 writes the replicated state, so it is
    broadcast over the pipeline group first (every rank calls this)."""
    if run.cfg.selection.normalize != "running":
        return {}
    state = (run.running_norm or RunningNorm()).to_tensor()
    pp = run.groups.pp_group
    if dist.is_initialized() and dist.get_world_size(pp) > 1:
        state = state.to(current_device())  # the process groups' backend: NCCL on a GPU
        dist.broadcast(state, src=dist.get_global_rank(pp, dist.get_world_size(pp) - 1), group=pp)
    return {"selection_norm": state.cpu().tolist()}


def save(run: Run) -> Optional[Path]:
    """Save a checkpoint unless the weights are suspect: the last update was skipped, or
    the weights it produced give a non-finite loss on its own first micro-batch (an update
    to finite but huge weights, e.g. optim.lr=1e10, only shows in the next forward).
    Returns the saved step directory, or None when refused (`run.save_refused` says why)."""
    c = run.cfg.checkpoint
    why = "the last update was skipped" if run.skip_streak else _check_new_weights(run)
    run.save_refused = why
    if why:
        if run.groups.rank == 0:
            logger.warning("step %d: checkpoint not saved (%s); the checkpoints under %s are "
                           "unchanged", run.step, why, c.dir)
        return None
    start = time.perf_counter()
    path = ckpt.save_checkpoint(
        c.dir, run.step, run.ddp, run.optimizer, run.scheduler, run.groups,
        extra={"prompts": run.prompts.state_dict(), "lineage": run.lineage.step_record(),
               **_running_norm_extra(run)},
        config_yaml=dump_config(run.cfg),
        arch_json=json.dumps(run.models.student_arch.to_dict()), keep_last=c.keep_last,
        verify=c.verify,
    )
    if run.progress is not None:
        run.progress.checkpoint(path, time.perf_counter() - start)
    export.after_save(run)  # model_meta/ once; HF export every checkpoint.export_hf_every
    return Path(path)


def _check_new_weights(run: Run) -> str:
    """'' when the current weights are finite and give a finite loss (forward only) on
    the last update's first micro-batch; else why not. Collective."""
    bad = ckpt.nonfinite_parameters(run.ddp)
    if bad or run.last_update is None:
        return bad
    last = run.last_update
    results = forward_loss_pass(run.ddp, run.groups, last.microbatches, last.contexts, _spec(run),
                                **last.shape._asdict())
    code = 0.0
    if run.groups.is_last_stage:
        metrics, finite = reduce_results(run, results)
        code = float(not finite or not torch.isfinite(torch.tensor(metrics["loss_sum"])))
    flag = torch.tensor([code], device=next(run.ddp[0].parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return "the new weights give a non-finite loss (diverged)" if flag.item() else ""


def run(cfg: RunConfig) -> list[dict]:
    """Train; returns the per-step metrics of the logging rank (empty elsewhere). A rank of
    the teacher's own (`separate`) serves the teacher until the student stops."""
    split = teacher_split(cfg, rank_env().world_size)
    if split is not None and split.role(rank_env().rank) == "teacher":
        serve_teacher(cfg, split)
        return []
    try:
        state = setup(cfg)
        try:
            loop(state)
        except (TrainingDiverged, ckpt.CheckpointNotSaved) as err:
            state.log.close()
            code = EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_NOT_SAVED
            # printed once (by the launcher, after torchrun's dump, or by the first rank here)
            raise SystemExit(rank_exit(code, f"tip-megatron train: {err.args[-1]}")) from err
        except TeacherRankLost as err:
            state.log.close()
            raise SystemExit(rank_exit(EXIT_TEACHER_LOST, f"tip-megatron train: rank "
                                       f"{rank_env().rank}: {err}")) from None
    finally:
        run_dir.release(cfg)  # the lock this process took (rank 0 under a bare torchrun)
    return state.history


def loop(state: Run) -> None:
    """Steps until train.steps (or train.exit_after_steps), logging and checkpointing."""
    cfg = state.cfg
    c = cfg.checkpoint
    stop = cfg.train.steps
    if cfg.train.exit_after_steps:
        stop = min(stop, state.step + cfg.train.exit_after_steps)
    signalled = StopOnSignal.install(cfg.train.exit_signal, saving=bool(c.dir))
    while state.step < stop:
        metrics = train_step(state)
        state.step += 1
        metrics.update(validation.maybe_validate(state))
        if state.log.active:
            state.history.append(dict(step=state.step, **metrics))
            logged = state.step % cfg.logging.log_every == 0
            if logged:
                state.log.log(state.step, metrics)
            if state.progress is not None:
                state.progress.step(state.step, metrics, logged)
        teacher_signal(state, signalled)
        preempted = signalled.requested(next(state.ddp[0].parameters()).device)
        saved = None
        if c.dir and ((c.save_every and state.step % c.save_every == 0) or state.step == stop or preempted):
            saved = save(state)
        if preempted:
            _report_stop(state, signalled, saved)
            break
    signalled.close()
    for link in state.models.separate_links():
        link.stop()  # each separate teacher's ranks exit after this
    if state.progress is not None:
        state.progress.close()
    state.log.close()


def _report_stop(state: Run, signalled: StopOnSignal, saved: Optional[Path]) -> None:
    """Rank 0 prints the checkpoint `save` wrote, or why it wrote none and the newest one."""
    if state.groups.rank != 0:
        return
    root = state.cfg.checkpoint.dir
    if saved is not None or not root:
        print(signalled.report(state.step, str(saved) if saved else None), flush=True)
        return
    newest = latest_checkpoint(root)
    print(signalled.report(state.step, None, not_saved=state.save_refused,
                           newest=str(newest) if newest else None), flush=True)
