"""Training checkpoints: model, optimizer, scheduler, RNG states, data cursor, step, config.

Layout of `<dir>/step_000010/`:
    dist/          megatron dist_checkpointing (model + distributed optimizer state; any
                   TP/PP/DP can load it: dist_checkpointing reshards)
    state.pt       replicated state: step, scheduler, data cursor, extra (rank 0 writes)
    rng/rank_N.pt  per-rank RNG states (restored only when the layout is unchanged)
    config.yaml    the effective run config
    arch.json      the student architecture
    COMPLETE       written last: a directory without it is not a checkpoint

Atomicity: everything is written into `step_000010.tmp-<nonce>/`, then rank 0 renames it
to `step_000010/` after a barrier. A crash mid-save leaves only a temp directory, which the
next save removes; the last complete checkpoint is never touched until a newer one is
complete (then `keep_last` prunes the oldest).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from tip_megatron import platform
from tip_megatron.models.arch import ModelArch
from tip_megatron.models.checkpoint import arch_differences, sharded_state_dict
from tip_megatron.models.state import unwrap
from tip_megatron.parallel import ParallelGroups

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{6,})$")
COMPLETE = "COMPLETE"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core import tensor_parallel

    state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(chunks: Sequence, optimizer: Any, is_loading: bool) -> dict:
    # The model part has the layout (and names) of a converted model checkpoint.
    model_sd = sharded_state_dict(list(chunks))
    state = dict(model_sd)
    if optimizer is not None:
        # `fully_reshardable`: optimizer state in the canonical per-parameter form, so a
        # checkpoint loads under any TP/PP/DP (megatron's default flat-range format is
        # refused by dist_checkpointing 0.19: "flattened_range is not supported").
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPTIM_METADATA)
    return state


def _ensure_optimizer_state(optimizer: Any) -> None:
    """Give a fresh torch Adam the state it creates lazily on its first step.

    megatron's DistributedOptimizer reads `state[p]["step"]` of every parameter when it
    builds the state dict to load INTO; a torch Adam that has not stepped has none (apex/TE
    Adam would). Zeros are what Adam starts from, and loading overwrites them.
    """
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in inner:
        torch_opt = opt.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                if len(torch_opt.state[p]) == 0:
                    torch_opt.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32),
                        "exp_avg": torch.zeros_like(p.data),
                        "exp_avg_sq": torch.zeros_like(p.data),
                    }


def _unshare_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own Adam `step` tensor after a load.

    Without apex/TE, megatron's DistributedOptimizer.load_state_dict assigns ONE step
    tensor to all parameter states; torch Adam increments `state["step"]` in place per
    parameter, so a shared tensor advances once per parameter per step and the bias
    correction drifts (measured: the second step after a resume differed).
    """
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in inner:
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _layout_key(groups: ParallelGroups) -> list[int]:
    return [groups.tp_size, groups.pp_size, groups.dp_size]


def save_checkpoint(
    root: str | Path, step: int, chunks: Sequence, optimizer: Any, scheduler: Any,
    groups: ParallelGroups, *, extra: dict, config_yaml: str, arch_json: str, keep_last: int = 0,
) -> Path:
    """Write checkpoint `step` atomically under `root`; returns its final path."""
    from megatron.core import dist_checkpointing

    platform.apply_cpu_compat()  # swaps megatron modules imported since (savers load lazily)
    root = Path(root)
    final = step_dir(root, step)
    nonce = [uuid.uuid4().hex[:8] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(nonce, src=0)
    tmp = root / f"{final.name}.tmp-{nonce[0]}"
    if dist.get_rank() == 0:
        _remove_stale_temps(root)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()
    dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False), str(tmp / "dist"))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        state = {"step": step, "scheduler": scheduler.state_dict(), "layout": _layout_key(groups),
                 "world_size": groups.world_size, **extra}
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "arch.json").write_text(arch_json)
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _remove_stale_temps(root: Path) -> None:
    for p in root.glob("step_*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: str | Path, chunks: Sequence, optimizer: Any, scheduler: Any, groups: ParallelGroups,
    *, expect_arch: Optional[ModelArch] = None,
) -> dict:
    """Restore model, optimizer, scheduler (and RNG when the layout is unchanged) from a
    complete checkpoint; returns its replicated state (step, data cursor, extra)."""
    from megatron.core import dist_checkpointing

    platform.apply_cpu_compat()
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path} is not a complete tip_megatron checkpoint (no {COMPLETE} marker)")
    if expect_arch is not None:
        saved = ModelArch.from_dict(json.loads((path / "arch.json").read_text()))
        diffs = arch_differences(saved, expect_arch)
        if diffs:
            raise ValueError(f"checkpoint {path} was saved for a different architecture: "
                             + "; ".join(diffs))
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
    sharded = _sharded_state(chunks, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path / "dist"))
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    state = torch.load(path / "state.pt", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if state["layout"] == _layout_key(groups) and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("checkpoint layout %s differs from %s: RNG states not restored",
                       state["layout"], _layout_key(groups))
    return state
