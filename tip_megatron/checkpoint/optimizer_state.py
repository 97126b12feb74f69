"""The distributed optimizer's sharded state for a training checkpoint, in megatron's
`fully_reshardable` format (one fp32 `param`, `exp_avg`, `exp_avg_sq` tensor per model
parameter, of the parameter's shape: loads at any TP/PP/DP), without megatron's copies when
one data-parallel rank holds each parameter whole.

    state = optimizer_sharded_state(optimizer, model_sharded_sd, is_loading=False)

megatron-core 0.19.2 builds that format (`sharded_param_state_fully_reshardable`) from
`get_parameter_state_dp_zero`, which copies the rank's whole optimizer state into flat
"world" buffers (param + 2 moments, fp32), and, on a save, first into per-bucket local
shards and gather buffers too: without overlapped grad reduce the whole grad buffer is one
bucket, so a save held ~3 more copies of the state (measured at the Qwen3-0.6B shape, TP 2:
a rank rose from 9.5 to over 18 GiB and the run was killed; docs/plan.md). When the data-
parallel group has one rank, every model parameter's main copy and moments are already
whole tensors on this rank: the same state dict is made of views of them (same keys,
shapes, replica ids and order as megatron's), a save writes them as they are and a load
reads straight into them (megatron's `load_parameter_state_from_fully_reshardable` then
copies each tensor onto itself). With DP > 1 megatron's own path runs (the moments of one
parameter can be split over DP ranks: the gather is needed).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

#: megatron's default flat-range format is refused by dist_checkpointing 0.19 ("flattened_range
#: is not supported"); this one is canonical per parameter.
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def optimizer_sharded_state(optimizer: Any, model_sd: dict, is_loading: bool) -> dict:
    """`optimizer.sharded_state_dict(model_sd, is_loading, metadata=OPTIM_METADATA)`, made of
    views of the live state where that is possible (module docstring)."""
    inner = _single_distributed_optimizer(optimizer)
    if inner is None or not _views_possible(inner):
        return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIM_METADATA)
    state = inner.state_dict()
    if is_loading:
        # megatron's own call does this too: (re)build the torch state the load fills
        inner.load_state_dict(inner.state_dict())
    state["param_state"] = fully_reshardable_views(inner, model_sd)
    state["param_state_sharding_type"] = OPTIM_METADATA["distrib_optim_sharding_type"]
    return state


def _single_distributed_optimizer(optimizer: Any):
    # megatron, heavy: loaded when a checkpoint is saved or loaded, not on import
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", None)
    inner = chained[0] if chained is not None and len(chained) == 1 else optimizer
    return inner if isinstance(inner, DistributedOptimizer) else None


def _views_possible(inner: Any) -> bool:
    """One DP rank (each parameter whole here), plain fp32 main params (not the precision-
    aware optimizer's scaled or low-precision state), not megatron FSDP."""
    return (inner.data_parallel_group.size() == 1
            and not inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            and not inner.ddp_config.use_megatron_fsdp)


def fully_reshardable_views(inner: Any, model_sd: dict) -> dict:
    """param_idx -> {state key: ShardedTensor} exactly as megatron's
    `sharded_param_state_fully_reshardable` builds it, over views of the live tensors."""
    # megatron, heavy: as above
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory  # heavy, as above
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories  # as above

    tensors_sd, _ = extract_sharded_tensors_and_factories(model_sd)
    metadata_of = {sh.data: sh for sh in nested_values(tensors_sd)}
    keys = ("param",) + tuple(inner.optimizer_state_keys)
    out, param_idx = {}, 0
    for gbuf_idx in range(len(inner.gbuf_ranges)):
        for model_param, (start, end, _) in inner.buffers[gbuf_idx].param_index_map.items():
            meta = metadata_of[model_param]
            live = inner._get_main_param_and_optimizer_states(model_param)
            entry = {}
            for key in keys:
                flat = live[key]
                if flat.numel() != end - start:  # not whole on this rank: never with one DP rank
                    raise RuntimeError(f"optimizer state {key} of {meta.key} has {flat.numel()} "
                                       f"elements, the parameter {end - start}")
                view = flat.view(meta.data.shape)
                kwargs = dict(key=f"optimizer.state.{key}.{meta.key}", data=view, dtype=view.dtype,
                              replica_id=meta.replica_id)
                if isinstance(meta, ShardedTensorFactory):
                    kwargs.pop("dtype")
                entry[key] = replace(meta, **kwargs)
                entry[key].validate_metadata_integrity()
            out[param_idx] = entry
            param_idx += 1
    return out
