"""Training checkpoints: model, optimizer, scheduler, RNG states, data cursor, step, config.

Layout of `<dir>/step_000010/`:
    dist/          megatron dist_checkpointing (model + distributed optimizer state; any
                   TP/PP/DP can load it: dist_checkpointing reshards)
    state.pt       replicated state: step, scheduler, data cursor, extra (rank 0 writes)
    rng/rank_N.pt  per-rank RNG states (restored only when the layout is unchanged)
    config.yaml    the effective run config
    arch.json      the student architecture
    MANIFEST.json  size and a digest of every file above (`checkpoint.manifest`: whole files
                   by default, `checkpoint.verify=edges` for their ends only)
    COMPLETE       marker, written last: a directory without it is not a checkpoint
and, once per run, `<dir>/model_meta/` (tokenizer/, hf_config.json, meta.json: what the run
started from), so a step directory is a model source (`models.checkpoint.model_files`):
its model keys in dist/ are those of a model checkpoint's model/.

Atomicity (`io_atomic.atomic_dir`): every rank writes into `.step_000010.tmp-<nonce>/`; after
a barrier rank 0 records the manifest and the marker, the files are fsynced and rank 0
renames the directory to `step_000010/`. A crash mid-save leaves only a temp directory,
which the next save removes; the last complete checkpoint is never touched until a newer
one is complete (then `keep_last` prunes the oldest). Weights that are not finite are
never saved. A full disk is an error saying so and naming the checkpoint.

Resume: `find_resumable` verifies the newest checkpoint against its manifest (and that
state.pt / rng/*.pt load with weights_only=True, and that DCP's pickles hold only DCP's
own classes: `checkpoint.dcp_guard`); a damaged one is renamed
`step_N.damaged` with a warning naming its bad files, and the next older one is tried.
`state.pt` and `rng/*.pt` hold only tensors and plain types and load with
`torch.load(weights_only=True)`; `dist/.metadata` is torch DCP's own pickle, read first
by a restricted unpickler (see docs/checkpoints.md: what trusting a checkpoint means). Loads are strict: a key mismatch
between the checkpoint and the model or optimizer is a ValueError naming the keys.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import resource
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from tip_megatron.runtime.megatron_compat import apply_cpu_compat, apply_torch_adam_compat
from tip_megatron.runtime.torch_adam import prepare_torch_adam_for_load, unshare_torch_adam_steps
from tip_megatron.runtime.atomic import atomic_dir
from tip_megatron.runtime.device import release_freed_host_memory
from tip_megatron.models.arch import ModelArch
from tip_megatron.checkpoint.model import (
    arch_differences, copy_hf_side_files, load_chunks, load_sharded_strict, sharded_state_dict,
)
from tip_megatron.runtime.parallel import ParallelGroups
from tip_megatron.checkpoint import manifest
from tip_megatron.checkpoint.optimizer_state import optimizer_sharded_state
from tip_megatron.checkpoint.layout import COMPLETE, LINEAGE, MODEL_META, list_checkpoints, step_dir
from tip_megatron.checkpoint.rundir import Lineage, owned_checkpoints

logger = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file size limit exceeded (ulimit -f)"}
#: Less free space than this after a failed save: the disk is taken to be full.
_LOW_SPACE_BYTES = 64 << 20


def write_model_meta(root: str | Path, *, hf_config: dict, meta: dict,
                     tokenizer_dir: Optional[str | Path]) -> Optional[Path]:
    """Write `<root>/model_meta/` unless it exists (this process alone, atomically)."""
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
    """Every RNG state as tensors and plain types (loadable with weights_only=True)."""
    # heavy: megatron loads on use, not on import
    from megatron.core import tensor_parallel

    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                       int(np_has_gauss), float(np_gauss)],
             "torch": torch.get_rng_state(),
             "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    # heavy: megatron loads on use, not on import
    from megatron.core import tensor_parallel

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
        # checkpoint loads under any TP/PP/DP; views of the live state at one DP rank.
        state["optimizer"] = optimizer_sharded_state(optimizer, model_sd, is_loading)
    return state


def _layout_key(groups: ParallelGroups) -> list[int]:
    return [groups.tp_size, groups.pp_size, groups.dp_size]


def save_checkpoint(
    root: str | Path, step: int, chunks: Sequence, optimizer: Any, scheduler: Any,
    groups: ParallelGroups, *, extra: dict, config_yaml: str, arch_json: str, keep_last: int = 0,
    verify: str = "full",
) -> Path:
    """Write checkpoint `step` atomically under `root`; returns its final path.

    Refuses (ValueError, on every rank alike, before anything is written) weights that are
    not finite. COMPLETE is written last, after MANIFEST.json, and both are fsynced with
    the rest before the directory gets its name (`io_atomic.atomic_dir`). `verify`: what
    the manifest records (`checkpoint.verify`: full or edges; `checkpoint.manifest`).
    """
    # heavy: megatron loads on use, not on import
    from megatron.core import dist_checkpointing

    apply_cpu_compat()  # swaps megatron modules imported since (savers load lazily)
    bad = nonfinite_parameters(chunks)
    if bad:
        raise ValueError(f"checkpoint step {step} not saved: non-finite weights ({bad}); "
                         f"the checkpoints under {root} are left as they were")
    final = step_dir(root, step)
    # Other steps' temp directories are left by crashed saves: removed first.
    with disk_errors_named(final), atomic_dir(final, group=dist.group.WORLD, subdirs=("dist", "rng"),
                                              stale=(".step_*.tmp-*",)) as tmp:
        # dist_checkpointing raises on every rank when any rank's write failed.
        dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False), str(tmp / "dist"))
        _on_every_rank(lambda: _write_small_files(tmp, step, scheduler, groups, extra,
                                                  config_yaml, arch_json))
        _on_every_rank(lambda: _write_manifest(tmp, step, verify))
    if dist.get_rank() == 0:
        _prune(Path(root), keep_last)
    dist.barrier()
    release_freed_host_memory()  # the writer's staging copies of views
    return final


def _write_small_files(tmp: Path, step: int, scheduler: Any, groups: ParallelGroups, extra: dict,
                       config_yaml: str, arch_json: str) -> None:
    torch.save(_rng_state(), tmp / "rng" / f"rank_{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        state = {"step": step, "scheduler": scheduler.state_dict(), "layout": _layout_key(groups),
                 "world_size": groups.world_size, **extra}
        torch.save(state, tmp / "state.pt")
        if "lineage" in extra:  # the run that wrote this step (checkpoint/rundir.py)
            (tmp / LINEAGE).write_text(json.dumps(extra["lineage"]) + "\n")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "arch.json").write_text(arch_json)


def _write_manifest(tmp: Path, step: int, mode: str) -> None:
    if dist.get_rank() == 0:  # every rank's files are closed (`_on_every_rank` barriers)
        manifest.write_manifest(tmp, mode)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))


def _on_every_rank(write) -> None:
    """Run `write` here; if it fails on any rank, raise on every rank (no rank is left
    waiting at the next barrier for one that failed)."""
    error = None
    try:
        write()
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        error = err
    flag = torch.tensor([float(error is not None)])
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if flag.item():
        raise RuntimeError("another rank failed to write its checkpoint files (see its log)")


def nonfinite_parameters(chunks: Sequence) -> str:
    """'' when every parameter of every rank is finite; else how many tensors are not
    (all-reduced: every rank returns the same)."""
    count = sum(int(not torch.isfinite(p.detach()).all()) for c in chunks for p in c.parameters())
    flag = torch.tensor([count], dtype=torch.float64, device=next(chunks[0].parameters()).device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return f"{int(flag.item())} parameter tensor(s) hold NaN or inf" if flag.item() else ""


class CheckpointNotSaved(OSError):
    """A save failed for lack of space (or a file-size limit): the message says so."""


@contextlib.contextmanager
def disk_errors_named(target: Path) -> Iterator[None]:
    """A save that fails on a full disk (ENOSPC, EDQUOT) or a file-size limit (EFBIG,
    `ulimit -f`) becomes one CheckpointNotSaved saying so and naming the checkpoint.
    dist_checkpointing's writer workers report a failure without its errno ("Worker
    failure ... starting worker 0"), so the disk and the limit are also probed."""
    try:
        yield
    except BaseException as err:  # torch DCP's CheckpointException is a BaseException
        why = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else _disk_full_reason(err, target.parent)
        if why is None:
            raise
        raise CheckpointNotSaved(
            errno.ENOSPC, f"checkpoint {target} not saved: {why}; the previous checkpoints are "
            "intact (partial files in its .tmp- directory beside it are removed by the next "
            "save); free space or raise the limit, then resume") from err


def _disk_full_reason(err: BaseException, where: Path) -> Optional[str]:
    cause: Optional[BaseException] = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            return f"{_DISK_FULL[cause.errno]} ({cause.filename or where})"
        cause = cause.__cause__ or cause.__context__
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"{_DISK_FULL[errno.EFBIG]}: files are limited to {soft} bytes in {where}"
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    if free < _LOW_SPACE_BYTES:
        return f"{_DISK_FULL[errno.ENOSPC]} ({free // 2**20} MiB free on the filesystem of {where})"
    return None


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ changed settings
#: Scheduler fields set from the run config (train/optimizer.py), and the keys they come from.
_SCHEDULE_KEYS = {"max_lr": "optim.lr", "min_lr": "optim.min_lr", "lr_warmup_steps": "optim.warmup_steps",
                  "lr_decay_steps": "train.steps x train.updates_per_rollout (updates of the decay)",
                  "start_wd": "optim.weight_decay"}
#: Param-group fields megatron copies from the config: saved groups take the current values.
_GROUP_CONFIG_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def schedule_changes(saved: dict, scheduler: Any) -> list[str]:
    """`key old -> new` for each schedule setting of this config that differs from the
    checkpoint's (the scheduler keeps this config's: `override_opt_param_scheduler`)."""
    return [f"{key} {saved[name]:g} -> {getattr(scheduler, name):g}" for name, key in _SCHEDULE_KEYS.items()
            if name in saved and saved[name] != getattr(scheduler, name)]


def adopt_current_schedule(saved_optimizer: Any, optimizer: Any) -> None:
    """Give the saved param groups this config's lr and weight-decay values. megatron pairs
    saved and current groups by a key that includes them (a changed optim.lr was a
    `KeyError: (None, 0.03, ...)`), and its scheduler reads max_lr / min_lr from the
    groups: left as saved, they would override the config. Groups pair by the rest of the
    key (lr / wd multipliers, expert and decoupled flags)."""
    # heavy: megatron loads on use, not on import
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    rest = [k for k in param_group_identifier_keys if k not in _GROUP_CONFIG_KEYS]
    current = {tuple(g.get(k) for k in rest): g for g in optimizer.param_groups}
    for groups in _saved_param_groups(saved_optimizer):
        for group in groups:
            match = current.get(tuple(group.get(k) for k in rest))
            if match is not None:
                group.update({k: match[k] for k in _GROUP_CONFIG_KEYS if k in match})


def _saved_param_groups(state: Any) -> Iterator[list]:
    """Every `param_groups` list in a (possibly chained, nested) optimizer state dict."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            yield state["param_groups"]
        for value in state.values():
            yield from _saved_param_groups(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _saved_param_groups(value)


# ------------------------------------------------------------------ verify + resume
def find_resumable(root: str | Path, lineage: Optional[Lineage] = None) -> Optional[Path]:
    """The newest checkpoint under `root` of the directory's `lineage` (all of them when
    None) that verifies (collective: rank 0 checks, every rank gets its answer). Each newer
    one that does not is renamed `<name>.damaged` (never deleted) with a warning naming its
    bad files; a newer one of another lineage is skipped with a warning."""
    box: list = [_newest_good(Path(root), lineage) if dist.get_rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    found, damaged = box[0]
    if found is None and damaged:
        raise ValueError(f"checkpoint.resume=auto: no checkpoint under {root} verifies (damaged, "
                         f"renamed: {damaged}); set checkpoint.resume=none to start over or "
                         "checkpoint.resume=PATH to pick one")
    return found


def _newest_good(root: Path, lineage: Optional[Lineage]) -> tuple[Optional[Path], list[str]]:
    damaged = []
    mine, others = owned_checkpoints(root, lineage)
    if others:
        logger.warning("checkpoint.resume=auto: %s under %s belong to no step of this directory's "
                       "lineage (run %s): not resumed (left in place)",
                       ", ".join(p.name for p in others), root, lineage.run_id)
    for path in reversed(mine):
        problems = manifest.verify(path)
        if not problems:
            return path, damaged
        aside = path.with_name(path.name + ".damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged{n}")
        os.rename(path, aside)
        logger.warning("checkpoint %s is damaged: %s. Renamed to %s (not deleted: inspect it, "
                       "then delete it); trying the next older checkpoint", path,
                       "; ".join(problems), aside.name)
        damaged.append(aside.name)
    return None, damaged


def check_resumable(path: str | Path) -> None:
    """An explicit `checkpoint.resume=PATH` that does not verify is an error naming the
    files (collective: rank 0 checks)."""
    problems: list = [manifest.verify(Path(path)) if dist.get_rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(problems, src=0)
    if problems[0]:
        raise ValueError(f"checkpoint.resume={path}: damaged checkpoint: {'; '.join(problems[0])}; "
                         "accepted: a complete checkpoint (checkpoint.resume=auto picks the newest "
                         "one that verifies)")


def load_checkpoint(
    path: str | Path, chunks: Sequence, optimizer: Any, scheduler: Any, groups: ParallelGroups,
    *, expect_arch: Optional[ModelArch] = None,
) -> dict:
    """Restore model, optimizer, scheduler (and RNG when the layout is unchanged) from a
    complete checkpoint; returns its replicated state (step, data cursor, extra).
    state.pt and the RNG files load with weights_only=True (no pickled code runs)."""
    apply_cpu_compat()
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path} is not a complete tip_megatron checkpoint (no {COMPLETE} marker)")
    if expect_arch is not None:
        saved = ModelArch.from_dict(json.loads((path / "arch.json").read_text()))
        diffs = arch_differences(saved, expect_arch)
        if diffs:
            raise ValueError(f"checkpoint {path} was saved for a different architecture: "
                             + "; ".join(diffs))
    # megatron wraps torch Adam (apex/TE absent, on any device): its three load fixes.
    torch_adam = optimizer is not None and apply_torch_adam_compat()
    if torch_adam:
        prepare_torch_adam_for_load(optimizer)
    loaded = load_sharded_strict(_sharded_state(chunks, optimizer, is_loading=True), path / "dist")
    load_chunks(list(chunks), loaded)
    if optimizer is not None:
        adopt_current_schedule(loaded["optimizer"], optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
    if torch_adam:
        unshare_torch_adam_steps(optimizer)
    release_freed_host_memory()  # read buffers, merged SwiGLU copies: freed, still resident
    state = torch.load(path / "state.pt", weights_only=True)
    changes = schedule_changes(state["scheduler"], scheduler)
    scheduler.load_state_dict(state["scheduler"])  # the step count; the rest: this config's
    if changes and dist.get_rank() == 0:
        logger.warning("resumed %s with a changed learning-rate schedule (%s): this config's "
                       "schedule applies from update %d on (lr now %.6g)", path, "; ".join(changes),
                       scheduler.num_steps, optimizer.param_groups[0]["lr"] if optimizer else float("nan"))
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if state["layout"] == _layout_key(groups) and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("checkpoint layout %s differs from %s: RNG states not restored",
                       state["layout"], _layout_key(groups))
    return state
