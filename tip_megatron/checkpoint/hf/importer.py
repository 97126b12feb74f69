"""HF checkpoint -> model checkpoint (megatron dist_checkpointing) at any TP/PP.

    hf_to_mcore("Qwen3-8B/", "ckpt/qwen3-8b", ImportOptions(tp=2, pp=2))

Runs on a world of tp*pp processes: under torchrun (WORLD_SIZE = tp*pp) it runs in place;
from a plain process it forks tp*pp local gloo ranks itself (`run_forked`; CPU, no
GPU needed; the ranks die with this process). Each rank
builds only its own shard of the model (no random init) and fills it through
`models.state.load_full_state_dict` from a lazy view of the HF checkpoint: each Megatron
tensor is made from its HF source tensors when the loader reaches it, sliced to the rank's
shard, and dropped. Per rank, memory = its model shard + about three copies of the single
largest full tensor (HF source, merged/padded full tensor, shard).
"""
from __future__ import annotations


import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from tip_megatron.runtime import parallel
from tip_megatron.runtime.atomic import check_replaceable
from tip_megatron.runtime.env import rank_env, under_torchrun
from tip_megatron.runtime.processes import run_forked, stop_checkpoint_writer_helpers
from tip_megatron.runtime.progress import Progress
from tip_megatron.runtime.signals import exit_on_signals
from tip_megatron.models.arch import ModelArch
from tip_megatron.models.build import BuildOptions, build_model, check_rope_scaling
from tip_megatron.models.state import load_full_state_dict
from tip_megatron.checkpoint.hf.hf_io import HFCheckpoint, PathLike
from tip_megatron.checkpoint.hf.mapping import all_rules
from tip_megatron.checkpoint.model import is_model_checkpoint, save_model_checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ImportOptions:
    """How to import (the architecture comes from the HF config)."""

    tp: int = 1
    """Tensor-parallel size of the saving world (the checkpoint loads at any TP)."""
    pp: int = 1
    """Pipeline-parallel size of the saving world (the checkpoint loads at any PP)."""
    dtype: Optional[str] = None
    """Parameter dtype of the checkpoint: float32 | bfloat16 | float16. None: the HF
    config's `dtype` / `torch_dtype`, else float32. (The local spec's norm weights are
    float32 whatever this says: megatron builds them so.)"""
    allow_pickle: bool = False
    """Accept `pytorch_model*.bin` pickles (loaded with torch.load(weights_only=True))."""
    overwrite: bool = False
    """Replace an existing checkpoint at the output path."""
    timeout_s: float = 24 * 3600.0
    """Wall-clock limit of the spawned ranks (a hung rank is killed after it)."""


class LazyFullState(Mapping):
    """`models.state` full name -> Megatron full tensor, made from HF tensors on access.

    Nothing is cached: every access reads the rule's HF tensors and merges them, so the
    loader holds one full tensor at a time.
    """

    def __init__(self, ckpt: HFCheckpoint, progress=None) -> None:
        self._ckpt = ckpt
        self._rules = {rule.mcore: rule for rule in all_rules(ckpt.arch)}
        self._progress = progress  # a tip_megatron.runtime.progress.Progress, counting tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        rule = self._rules[name]
        full = rule.to_full(self._ckpt.arch, [self._ckpt.get(n) for n in rule.hf])
        if self._progress is not None:
            self._progress.update()
        return full

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._rules

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


def resolve_dtype(name: Optional[str], hf_config: dict) -> torch.dtype:
    name = name or hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; accepted: {sorted(DTYPES)}")
    return DTYPES[name]


def check_import(hf_dir: PathLike, out_dir: PathLike, options: ImportOptions) -> ModelArch:
    """Everything that can be checked before any process starts: config, tensor names and
    shapes, layout, dtype, output path. Raises ValueError / FileExistsError."""
    ckpt = HFCheckpoint(hf_dir, allow_pickle=options.allow_pickle)
    ckpt.validate()
    arch = ckpt.arch
    arch.validate_parallel(options.tp, options.pp)
    check_rope_scaling(arch)
    resolve_dtype(options.dtype, ckpt.config)
    check_replaceable(out_dir, overwrite=options.overwrite, sources=[hf_dir],
                      legacy_ours=is_model_checkpoint)
    return arch


def import_rank(hf_dir: PathLike, out_dir: PathLike, options: ImportOptions, groups=None) -> None:
    """The work of one rank of the tp*pp world (collective). `groups` may be passed when
    the caller already initialized this layout."""
    ckpt = HFCheckpoint(hf_dir, allow_pickle=options.allow_pickle)
    arch = ckpt.arch
    if groups is None:
        groups = parallel.initialize(parallel.ParallelLayout(tp=options.tp, pp=options.pp))
    if (groups.layout.tp, groups.layout.pp) != (options.tp, options.pp):
        raise ValueError(f"groups have tp={groups.layout.tp}, pp={groups.layout.pp}; the import "
                         f"asks for tp={options.tp}, pp={options.pp}")
    # The local spec everywhere: its checkpoint keys are the TE spec's, and conversion
    # needs no kernels.
    build = BuildOptions(spec="local", params_dtype=resolve_dtype(options.dtype, ckpt.config),
                         init_weights=False)
    chunks = build_model(arch, groups, build)
    bar = Progress(len(all_rules(arch)), "converted", unit="tensor", enabled=groups.rank == 0,
                   log=logger)
    load_full_state_dict(chunks, LazyFullState(ckpt, progress=bar), groups, arch)
    bar.close()
    ckpt.close()
    source = dict(kind="hf", path=str(Path(hf_dir).absolute()), model_type=ckpt.config.get("model_type"))
    save_model_checkpoint(chunks, groups, arch, out_dir, tokenizer_dir=hf_dir,
                          meta=dict(source=source), overwrite=options.overwrite)


def hf_to_mcore(hf_dir: PathLike, out_dir: PathLike, options: ImportOptions = ImportOptions()) -> Path:
    """Convert an HF checkpoint directory into a model checkpoint at out_dir."""
    arch = check_import(hf_dir, out_dir, options)
    world = options.tp * options.pp
    logger.info("importing %s (%s, %d layers) at tp=%d pp=%d", hf_dir, arch.family,
                arch.num_layers, options.tp, options.pp)
    if under_torchrun():  # this process is one of the ranks
        torchrun_world = rank_env().world_size
        if torchrun_world != world:
            raise ValueError(f"torchrun world size {torchrun_world} != tp*pp = {world}; "
                             f"launch with --nproc-per-node {world}, or run without torchrun")
        import_rank(hf_dir, out_dir, options)
    else:
        # The writer queue's spawned manager (preload_for_fork starts it) belongs to this
        # process, not to a rank: stop it however the conversion ends, or it outlives the
        # command. A SIGTERM raises SystemExit from before the manager exists, so that the
        # `finally` runs for one that lands before the ranks are forked too.
        with exit_on_signals():
            try:
                preload_for_fork()
                run_forked(import_rank, world, args=(hf_dir, out_dir, options),
                                  timeout_s=options.timeout_s, env={"TIP_MEGATRON_DEVICE": "cpu"})
            finally:
                stop_checkpoint_writer_helpers()
    return Path(out_dir)


def preload_for_fork() -> None:
    """Before forking ranks: import megatron and start dist_checkpointing's writer queue here.

    Forked ranks inherit both instead of each paying for them: the import is ~10 s per
    process on a small machine, and the saver's results queue lives in a `spawn`ed
    multiprocessing manager (a fresh interpreter) that megatron creates once per process.
    A forked rank reconnects to the inherited manager.
    """
    from tip_megatron.checkpoint import model as checkpoint  # noqa: F401

    checkpoint._dist_checkpointing()
    import megatron.core.models.gpt  # noqa: F401
    # here, not at the top: importing megatron before the fork is this function's job
    from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

    get_write_results_queue()
