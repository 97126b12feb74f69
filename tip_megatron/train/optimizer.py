"""Megatron DDP, the (distributed) AdamW optimizer with grad clipping, and the cosine
learning-rate schedule with warm-up.

    ddp_chunks = wrap_ddp(chunks, groups, OptimConfig())
    optimizer, scheduler = build_optimizer(ddp_chunks, groups, OptimConfig(), total_steps=100)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from tip_megatron.config import OptimConfig
from tip_megatron.runtime.device import default_backend
from tip_megatron.runtime.parallel import ParallelGroups


def _model_config(chunk: torch.nn.Module):
    return getattr(chunk, "config", None) or chunk.module.config


def wrap_ddp(chunks: Sequence[torch.nn.Module], groups: ParallelGroups, cfg: OptimConfig) -> list:
    """Wrap each chunk in megatron's DistributedDataParallel (contiguous grad buffers)."""
    # heavy: megatron.core takes ~10 s to import; config checks reach this module (built-ins)
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )

    overlap = cfg.overlap_grad_reduce and default_backend().is_cuda
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.grad_reduce_in_fp32,
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=_model_config(chunk), ddp_config=ddp_config, module=chunk,
            # Megatron-LM disables bucketing for all but the first chunk (interleaved PP).
            disable_bucketing=i > 0, pg_collection=groups.pg_collection,
        ))
    config = _model_config(chunks[0])
    # The schedule calls this after the last backward with the token count of this DP
    # rank; megatron all-reduces it over DP and divides the grads once (per-token loss).
    config.finalize_model_grads_func = finalize_model_grads
    if overlap:
        syncs = [c.no_sync for c in wrapped]
        config.no_sync_func = syncs[0] if len(syncs) == 1 else syncs
    return wrapped


def _set_grad_stats_group(optimizer, groups: ParallelGroups, distributed: bool) -> None:
    """The group the gradient norm (clipping) is reduced over, set on every sub-optimizer:
    megatron-core 0.19 leaves it unset on some wrappers and then falls back to its global
    model-parallel group, which is not this model's when the model was built on a grid of
    its own (`parallel.grid_groups`: a teacher or student beside another layout). The
    distributed optimizer shards state over every rank of the grid; the plain one holds
    whole DP replicas, so its norm is reduced over one model-parallel group."""
    group = (groups.world_group or dist.group.WORLD) if distributed else groups.mp_group
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        sub.grad_stats_parallel_group = group


def build_optimizer(ddp_chunks: Sequence, groups: ParallelGroups, cfg: OptimConfig, total_steps: int):
    """AdamW (megatron optimizer; distributed when configured) and its LR scheduler."""
    # heavy: megatron.core takes ~10 s to import; config checks reach this module (built-ins)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # heavy, as above

    cfg.validate()
    config = _model_config(ddp_chunks[0])
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(
        opt_config, list(ddp_chunks), pg_collection=groups.pg_collection,
        # Explicit process groups and megatron's extra gloo groups are exclusive; the
        # distributed optimizer state is saved through dist_checkpointing instead.
        use_gloo_process_groups=False,
    )
    config.grad_scale_func = optimizer.scale_loss
    _set_grad_stats_group(optimizer, groups, cfg.use_distributed_optimizer)
    decay_steps = max(total_steps, cfg.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # A resume keeps only the step count: lr, min_lr, warm-up, decay length and weight
        # decay are this config's (changed ones apply from the resume step on; the checkpoint
        # loader says so). megatron's default would keep the checkpoint's, silently: a raised
        # train.steps then ran its extra steps at min_lr.
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler
