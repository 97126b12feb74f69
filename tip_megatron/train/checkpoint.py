"""Training checkpoints: model, optimizer, scheduler, RNG states, data cursor, step, config.

Layout of `<dir>/step_000010/`:
    dist/          megatron dist_checkpointing (model + distributed optimizer state; any
                   TP/PP/DP can load it: dist_checkpointing reshards)
    state.pt       replicated state: step, scheduler, data cursor, extra (rank 0 writes)
    rng/rank_N.pt  per-rank RNG states (restored only when the layout is unchanged)
    config.yaml    the effective run config
    arch.json      the student architecture
    COMPLETE       marker: a directory without it is not a checkpoint
and, once per run, `<dir>/model_meta/` (tokenizer/, hf_config.json, meta.json: what the run
started from), so a step directory is a model source (`models.checkpoint.model_files`):
its model keys in dist/ are those of a model checkpoint's model/.

Atomicity (`io_atomic.atomic_dir`): every rank writes into `.step_000010.tmp-<nonce>/`; after
a barrier the files are fsynced and rank 0 renames the directory to `step_000010/`. A crash
mid-save leaves only a temp directory, which the next save removes; the last complete
checkpoint is never touched until a newer one is complete (then `keep_last` prunes the
oldest). Loads are strict: a key mismatch between the checkpoint and the model or
optimizer is a ValueError naming the keys.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from tip_megatron import platform
from tip_megatron.io_atomic import atomic_dir
from tip_megatron.models.arch import ModelArch
from tip_megatron.models.checkpoint import (
    arch_differences, load_chunks, load_sharded_strict, sharded_state_dict,
)
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


def resolve_step(path: str | Path) -> Optional[Path]:
    """A training step directory as given, or a run directory's newest complete step;
    None when `path` is neither (a run directory with no complete step is a ValueError)."""
    p = Path(path)
    if _STEP_RE.match(p.name) and (p / COMPLETE).is_file():
        return p
    if not p.is_dir() or not any(_STEP_RE.match(c.name) for c in p.iterdir()):
        return None
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"run directory {p} holds no complete checkpoint (step_* without "
                         f"{COMPLETE}); pass a complete step directory")
    return latest


#: `<checkpoint.dir>/model_meta/`: what the run started from, written once (rank 0) so that
#: every step exports and samples on its own: tokenizer/, hf_config.json, meta.json.
MODEL_META = "model_meta"


def write_model_meta(root: str | Path, *, hf_config: dict, meta: dict,
                     tokenizer_dir: Optional[str | Path]) -> Optional[Path]:
    """Write `<root>/model_meta/` unless it exists (this process alone, atomically)."""
    from tip_megatron.models.checkpoint import copy_hf_side_files

    out = Path(root) / MODEL_META
    if out.is_dir():
        return None
    with atomic_dir(out) as tmp:
        (tmp / "hf_config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            copy_hf_side_files(tokenizer_dir, tmp / "tokenizer")
    return out


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


def _layout_key(groups: ParallelGroups) -> list[int]:
    return [groups.tp_size, groups.pp_size, groups.dp_size]


def save_checkpoint(
    root: str | Path, step: int, chunks: Sequence, optimizer: Any, scheduler: Any,
    groups: ParallelGroups, *, extra: dict, config_yaml: str, arch_json: str, keep_last: int = 0,
) -> Path:
    """Write checkpoint `step` atomically under `root`; returns its final path."""
    from megatron.core import dist_checkpointing

    platform.apply_cpu_compat()  # swaps megatron modules imported since (savers load lazily)
    final = step_dir(root, step)
    # Other steps' temp directories are left by crashed saves: removed first.
    with atomic_dir(final, group=dist.group.WORLD, subdirs=("dist", "rng"),
                    stale=(".step_*.tmp-*",)) as tmp:
        dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False), str(tmp / "dist"))
        torch.save(_rng_state(), tmp / "rng" / f"rank_{dist.get_rank()}.pt")
        if dist.get_rank() == 0:
            state = {"step": step, "scheduler": scheduler.state_dict(), "layout": _layout_key(groups),
                     "world_size": groups.world_size, **extra}
            torch.save(state, tmp / "state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "arch.json").write_text(arch_json)
            (tmp / COMPLETE).write_text(json.dumps({"step": step}))
    if dist.get_rank() == 0:
        _prune(Path(root), keep_last)
    dist.barrier()
    return final


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
        platform.prepare_torch_adam_for_load(optimizer)
    loaded = load_sharded_strict(_sharded_state(chunks, optimizer, is_loading=True), path / "dist")
    load_chunks(list(chunks), loaded)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        platform.unshare_torch_adam_steps(optimizer)
    state = torch.load(path / "state.pt", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if state["layout"] == _layout_key(groups) and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("checkpoint layout %s differs from %s: RNG states not restored",
                       state["layout"], _layout_key(groups))
    return state
