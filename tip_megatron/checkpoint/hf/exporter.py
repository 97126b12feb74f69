"""Model checkpoint -> HF checkpoint (safetensors shards + config.json + tokenizer files).

    mcore_to_hf("ckpt/student", "student-hf/")

One process, no model built: tensors are read from the dist_checkpointing files one group
at a time (the embedding; each transformer layer; the final norm and output layer), split
into HF tensors, cast, and written to the current safetensors shard. Peak memory: one
layer's full tensors + one output shard (`max_shard_size`, default 5GB). Vocabulary
padding is cut (`arch.vocab_size` rows). The output loads with
`transformers.AutoModelForCausalLM.from_pretrained`.

Nothing damaged is exported: the checkpoint is verified against its manifest first
(`checkpoint.manifest`: every file's checksum, DCP's pickles), and every tensor must be
finite with |w| <= `max_abs_weight` (default MAX_ABS_WEIGHT = 1e4; 0 turns the bound off):
trained LM weights are O(1) (norm scales O(10-100)); a value beyond that is damage or a
diverged run, and the export stops with one line naming the tensor, before --out exists.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

from tip_megatron.checkpoint.hf.hf_io import (
    PathLike, ShardedSafetensorsWriter, hf_tensor_order, parse_size, plan_shards,
)
from tip_megatron.checkpoint.hf.importer import DTYPES
from tip_megatron.checkpoint.hf.mapping import Rule, expected_hf_shapes, global_rules, layer_rules
from tip_megatron.runtime.atomic import atomic_dir, check_replaceable, write_marker
from tip_megatron.checkpoint import manifest, model as mckpt
from tip_megatron.models.arch import ModelArch
from tip_megatron.runtime.progress import Progress

logger = logging.getLogger(__name__)

#: Default bound on |weight| of an export (`--max-abs-weight`; 0: no bound).
MAX_ABS_WEIGHT = 1e4


def mcore_to_hf(
    ckpt_dir: PathLike,
    out_dir: PathLike,
    *,
    dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    max_abs_weight: float = MAX_ABS_WEIGHT,
    verify: bool = True,
) -> Path:
    """Write the model checkpoint (or training checkpoint: a step or run directory) at
    ckpt_dir as an HF checkpoint at out_dir.

    dtype: float32 | bfloat16 | float16; None keeps the checkpoint's params_dtype.
    max_abs_weight: a tensor with a value beyond it (or not finite) stops the export with a
    ValueError naming it (0: only non-finite values do).
    verify: check the checkpoint against its manifest first (`check_export`); False when
    the caller just did.
    """
    files, out = mckpt.model_files(ckpt_dir), Path(out_dir).absolute()
    ckpt = files.path
    arch, out_dtype_name = check_export(ckpt, out, dtype=dtype, overwrite=overwrite, verify=verify)
    with atomic_dir(out) as tmp:  # this process alone
        try:
            with _world_of_one():
                _write_weights(ckpt, arch, tmp, DTYPES[out_dtype_name], parse_size(max_shard_size),
                               max_abs_weight)
        except ValueError:  # a refused tensor: no partial export is left beside --out
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _write_json(tmp / "config.json", hf_config(arch, out_dtype_name, files.hf_config))
        write_marker(tmp, "HF export")
        if files.tokenizer_dir is not None:
            mckpt.copy_hf_side_files(files.tokenizer_dir, tmp)
    logger.info("wrote HF checkpoint %s (%s, %s)", out, arch.family, out_dtype_name)
    return out


def check_export(
    ckpt_dir: PathLike, out_dir: PathLike, *, dtype: Optional[str] = None, overwrite: bool = False,
    verify: bool = True,
) -> tuple[ModelArch, str]:
    """Checks before any work: a model or training checkpoint that verifies (with
    `verify`: its manifest's checksums, DCP's pickles), a known dtype, a free output path.
    Returns the checkpoint's arch and the output dtype name."""
    files = mckpt.model_files(ckpt_dir)
    arch, meta = files.arch(), files.meta
    dtype_name = dtype or meta.get("params_dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype {dtype_name!r} is not supported; accepted: {sorted(DTYPES)}")
    check_replaceable(out_dir, overwrite=overwrite, sources=[ckpt_dir], option="--out")
    if verify:  # last: it reads the whole checkpoint
        manifest.check_checkpoint(files.path, training=files.kind == "training")
    return arch, dtype_name


def hf_config(arch: ModelArch, dtype_name: str, start: Optional[dict] = None) -> dict:
    """config.json: the HF config a training run started from (`start`), else
    ModelArch.to_hf_config() (carried fields included), with the dtype written."""
    config = dict(start) if start is not None else arch.to_hf_config()
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype_name
    return config


def _read_groups(arch: ModelArch) -> list[list[Rule]]:
    """Rules grouped as they are read: embedding, each layer, final norm + output layer.
    Follows HF tensor order, so each shard is written as soon as its last tensor arrives."""
    head = global_rules(arch)
    return [head[:1]] + [layer_rules(arch, i) for i in range(arch.num_layers)] + [head[1:]]


def _write_weights(ckpt: Path, arch: ModelArch, out: Path, dtype: torch.dtype, max_bytes: int,
                   max_abs_weight: float) -> None:
    metadata = mckpt.stored_metadata(ckpt)
    shapes = expected_hf_shapes(arch)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(name, itemsize * math.prod(shapes[name])) for name in hf_tensor_order(arch)]
    writer = ShardedSafetensorsWriter(out, plan_shards(sizes, max_bytes))
    bar = Progress(len(sizes), "converted", unit="tensor", log=logger)
    for rules in _read_groups(arch):
        full = mckpt.load_full_tensors(ckpt, [r.mcore for r in rules], arch, metadata)
        for rule in rules:
            _check_shape(rule, full[rule.mcore], shapes)
            check_weight_values(rule.mcore, full[rule.mcore], max_abs_weight, ckpt)
            for name, tensor in zip(rule.hf, rule.to_hf(arch, full[rule.mcore])):
                writer.add(name, tensor.to(dtype))
                bar.update()
        del full
    bar.close()
    writer.finish()


def _check_shape(rule: Rule, tensor: torch.Tensor, shapes: dict) -> None:
    # merged tensors stack their HF parts along dim 0
    expected = (sum(shapes[n][0] for n in rule.hf),) + tuple(shapes[rule.hf[0]][1:])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"checkpoint tensor {rule.mcore!r} has shape {list(tensor.shape)}, but "
                         f"its arch.json implies {list(expected)}")


def check_weight_values(name: str, tensor: torch.Tensor, bound: float, ckpt: Path) -> None:
    """A ValueError naming the tensor when it holds a non-finite value, or (bound > 0) a
    value with |w| > bound."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise ValueError(f"checkpoint {ckpt}: tensor {name!r} holds {int((~finite).sum())} NaN/inf "
                         "value(s) (a damaged checkpoint or a diverged run); export refused: "
                         "export an earlier step")
    peak = float(tensor.abs().max()) if tensor.numel() else 0.0
    if bound > 0 and peak > bound:
        raise ValueError(f"checkpoint {ckpt}: tensor {name!r} holds |w| = {peak:.3g} > "
                         f"--max-abs-weight {bound:g} (trained LM weights are O(1); a damaged "
                         "checkpoint or a diverged run); export refused: export an earlier step, "
                         "or raise --max-abs-weight (0: no bound) if the value is real")


@contextlib.contextmanager
def _world_of_one() -> Iterator[None]:
    """dist_checkpointing reads through torch.distributed: give it a private world of one
    (an in-process store: no port, no environment) unless one already exists."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("mcore-to-hf runs in one process; call it outside a multi-rank world")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
