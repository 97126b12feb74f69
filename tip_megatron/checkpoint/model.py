"""The model checkpoint: what HF import writes and what the trainer loads (its model part).

    ckpt/
      arch.json     ModelArch.to_dict()
      meta.json     {"format", "format_version", "padded_vocab_size", "params_dtype",
                     "saved_layout", "source", ...}
      tokenizer/    optional: HF tokenizer files (and generation_config.json), copied verbatim
      model/        megatron dist_checkpointing (torch_dist) of the chunks' sharded_state_dict()
      MANIFEST.json size and checksum of every file above, written last (checkpoint/manifest.py)

The tensors in `model/` are GLOBAL (dist_checkpointing records each rank's slice of a global
tensor), so a checkpoint loads at any TP/PP/VPP: dist_checkpointing reshards. Keys follow
megatron's layer-stacked naming (`decoder.layers.self_attention.linear_qkv.weight`
[num_layers, ...]); the local layer spec maps its norms to the Transformer Engine names
(`...linear_qkv.layer_norm_weight`), so TE- and local-spec models read the same files.

Padded vocabulary: the embedding/output rows are saved with the padded size the saving
model was built with (recorded in meta.json). A model built with ANOTHER padded size (a
different TP, or a size shared with a teacher) loads it anyway: megatron marks those two
tensors `allow_shape_mismatch`, zero-fills the model's rows and reads the rows both sizes
share. Rows past `vocab_size` are padding on both sides, so nothing real is lost.

A training step directory (`<run>/step_000200`, see checkpoint/training.py) holds the model
under the same keys in its `dist/` (beside the optimizer's), its `arch.json`, and finds the
tokenizer and HF config in `<run>/model_meta/`. `model_files(path)` resolves either kind
(and a run directory to its newest complete step); every reader here goes through it, so
both kinds load, export and sample alike.

Integrity: `load_model_checkpoint` verifies either kind against its MANIFEST.json first
(rank 0 hashes every file, every rank gets the verdict), and every
dist_checkpointing read here passes `dcp_guard.check_dcp_dir` before DCP unpickles its
metadata (no code runs from a checkpoint). docs/checkpoints.md has the details.

Saving goes through `io_atomic.atomic_dir` (a temp directory beside the target, fsynced,
renamed into place once complete): an interrupted save never damages an existing
checkpoint. Loads are strict: a key the model has and the checkpoint lacks, or the reverse,
is a ValueError naming the keys (`load_sharded_strict`). Scripts that save need an
`if __name__ == "__main__":` guard: dist_checkpointing's writer starts a `spawn`
multiprocessing manager (once per process, ~5 s on a 2-core machine).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist

from tip_megatron.checkpoint import dcp_guard, manifest
from tip_megatron.checkpoint.layout import MODEL_META, resolve_step
from tip_megatron.runtime.megatron_compat import apply_cpu_compat
from tip_megatron.runtime.atomic import atomic_dir, check_replaceable, write_marker
from tip_megatron.runtime.device import release_freed_host_memory
from tip_megatron.models.arch import ModelArch
from tip_megatron.models.state import TE_TO_LOCAL, chunk_key, unwrap
from tip_megatron.runtime.parallel import ParallelGroups

logger = logging.getLogger(__name__)

FORMAT = "tip_megatron.model"
FORMAT_VERSION = 1
ARCH_FILE, META_FILE, MODEL_DIR, TOKENIZER_DIR = "arch.json", "meta.json", "model", "tokenizer"

#: Files of an HF checkpoint directory that travel with the model (never weights).
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                 "chat_template.jinja", "chat_template.json", "generation_config.json")

_LOCAL_TO_TE = {v: k for k, v in TE_TO_LOCAL.items()}
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------ save
def save_model_checkpoint(
    chunks: list[torch.nn.Module],
    groups: ParallelGroups,
    arch: ModelArch,
    out_dir: PathLike,
    *,
    tokenizer_dir: Optional[PathLike] = None,
    meta: Optional[dict] = None,
    overwrite: bool = False,
    verify: str = "full",
) -> Path:
    """Save this world's model chunks as a model checkpoint (collective: every rank calls).

    tokenizer_dir: an HF directory whose tokenizer files are copied into `tokenizer/`.
    meta: extra JSON-serializable fields for meta.json (e.g. `source`).
    overwrite: replace an existing checkpoint at out_dir (else FileExistsError); only a
    directory this tool wrote, never `tokenizer_dir` (`io_atomic.check_replaceable`).
    verify: what MANIFEST.json records (`checkpoint.manifest`: full or edges), written
    last, once every rank's files are closed.
    """
    out = Path(out_dir).absolute()
    sources = [tokenizer_dir] if tokenizer_dir is not None else []
    check_replaceable(out, overwrite=overwrite, sources=sources, legacy_ours=is_model_checkpoint)
    with atomic_dir(out, group=_world_group(), subdirs=(MODEL_DIR,)) as tmp:
        _dist_checkpointing().save(sharded_state_dict(chunks), str(tmp / MODEL_DIR))
        if groups.rank == 0:
            write_marker(tmp, "model checkpoint")
            _write_json(tmp / ARCH_FILE, arch.to_dict())
            _write_json(tmp / META_FILE, _meta(chunks, groups, meta))
            if tokenizer_dir is not None:
                copy_hf_side_files(tokenizer_dir, tmp / TOKENIZER_DIR)
        _write_manifest_last(tmp, groups.rank, verify)
    if groups.rank == 0:
        logger.info("saved model checkpoint %s", out)
    return out


def _write_manifest_last(tmp: Path, rank: int, mode: str) -> None:
    if dist.is_initialized():
        dist.barrier()  # every rank's dist_checkpointing files are written and closed
    if rank == 0:
        manifest.write_manifest(tmp, mode)


def sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """Megatron-LM's layout: one key per model chunk (`models.state.chunk_key`). Replicas
    are numbered in each chunk's own DP group (megatron would read its global one, which
    is another model's when this one was built on a grid of its own)."""
    out = {}
    for i, c in enumerate(chunks):
        model = unwrap(c)
        metadata = {"dp_cp_group": model.pg_collection.dp_cp}
        out[chunk_key(i, len(chunks))] = model.sharded_state_dict(metadata=metadata)
    return out


def load_chunks(chunks: list[torch.nn.Module], loaded: dict) -> None:
    """Restore the chunks' non-tensor extra states from a loaded sharded state dict
    (the tensors were loaded in place), strictly."""
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[chunk_key(i, len(chunks))], strict=True)


def _meta(chunks: list[torch.nn.Module], groups: ParallelGroups, extra: Optional[dict]) -> dict:
    model = unwrap(chunks[0])
    layout = groups.layout
    meta: dict[str, Any] = dict(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        padded_vocab_size=int(model.vocab_size),
        params_dtype=str(model.config.params_dtype).replace("torch.", ""),
        saved_layout=dict(tp=layout.tp, pp=layout.pp, vpp=layout.vpp),
    )
    meta.update(extra or {})
    return meta


def copy_hf_side_files(src: PathLike, dst: PathLike) -> list[str]:
    """Copy the tokenizer files (and generation_config.json) of an HF directory."""
    src, dst = Path(src), Path(dst)
    names = [n for n in HF_SIDE_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


# ------------------------------------------------------------------------------ load
def load_model_checkpoint(
    chunks: list[torch.nn.Module],
    groups: ParallelGroups,
    ckpt_dir: PathLike,
    *,
    expect_arch: Optional[ModelArch] = None,
) -> ModelArch:
    """Load a model checkpoint into this rank's chunks, at any TP/PP/VPP (collective).

    expect_arch: the architecture the chunks were built from; a checkpoint of another
    architecture is a ValueError naming the differing fields. Without it the chunks'
    megatron config is checked against the checkpoint's arch. Returns the checkpoint's arch.
    """
    files = model_files(ckpt_dir)
    manifest.check_checkpoint_collective(files.path, training=files.kind == "training")
    ckpt, arch = files.path, files.arch()
    if expect_arch is not None:
        _raise_on_mismatch(arch_differences(arch, expect_arch), ckpt, "the expected architecture")
    _raise_on_mismatch(_chunk_differences(arch, chunks), ckpt, "the model being loaded")
    # Tensors load in place (in the model's dtype, cast from the stored one); a training
    # checkpoint's optimizer state is stored beside the model and not read.
    ignored = ("optimizer.",) if files.kind == "training" else ()
    load_chunks(chunks, load_sharded_strict(sharded_state_dict(chunks), files.weights,
                                            ignore_stored=ignored))
    release_freed_host_memory()  # read buffers and merged copies, freed but still resident
    if groups.rank == 0:
        logger.info("loaded model checkpoint %s (%s, %d layers)", ckpt, arch.family, arch.num_layers)
    return arch


def load_sharded_strict(sharded: dict, directory: PathLike, ignore_stored: tuple[str, ...] = ()) -> dict:
    """dist_checkpointing.load of `sharded` from `directory` (collective), refusing any key
    mismatch with one ValueError, the same on every rank, naming the keys: "missing" (the
    model asks for them, the checkpoint lacks them) and "unexpected" (stored, not asked for,
    except keys starting with one of `ignore_stored`).
    """
    # heavy: megatron loads only when a checkpoint is read (read_arch and --help need none)
    from megatron.core.dist_checkpointing.validation import StrictHandling

    dcp_guard.check_dcp_dir(directory)  # before dist_checkpointing unpickles anything
    with _quiet_dcp_load():
        # megatron names these the other way round: its "missing" keys are in the checkpoint
        # only. They are equal on all ranks; the ones the model lacks are per rank (another
        # pipeline stage asks for other keys), so they are gathered before anyone raises.
        loaded, stored_only, asked_only = _dist_checkpointing().load(
            sharded, str(directory), strict=StrictHandling.RETURN_ALL)
    asked_only = _union_over_ranks(asked_only)
    stored_only = {k for k in stored_only if not k.startswith(ignore_stored)} if ignore_stored else stored_only
    if stored_only or asked_only:
        raise ValueError(
            f"checkpoint {directory} does not match the model's keys: "
            f"missing (not in the checkpoint): {_key_list(asked_only)}; "
            f"unexpected (in the checkpoint, not in the model): {_key_list(stored_only)}")
    return loaded


def _key_list(keys: set, limit: int = 10) -> str:
    if not keys:
        return "none"
    shown = sorted(keys)[:limit]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{shown}{more}"


def _union_over_ranks(keys: set) -> set:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return set(keys)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(keys))
    return set().union(*every)


def read_arch(ckpt_dir: PathLike) -> ModelArch:
    """The ModelArch a model checkpoint (or a training checkpoint) was saved with."""
    return model_files(ckpt_dir).arch()


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's parts are, in a model checkpoint or a training step directory."""

    path: Path
    """The model checkpoint, or the training step directory (a run directory resolved)."""
    kind: str
    """`model` (tip-megatron convert / save_model_checkpoint) or `training` (a step)."""
    weights: Path
    """The dist_checkpointing directory: `model/`, or the step's `dist/`."""
    meta: dict
    """meta.json (training: `<run>/model_meta/meta.json`, empty when the run predates it)."""
    tokenizer_dir: Optional[Path]
    hf_config: Optional[dict]
    """The HF config the run started from (training kind), else None."""

    def arch(self) -> ModelArch:
        return ModelArch.from_dict(json.loads((self.path / ARCH_FILE).read_text()))


def model_files(path: PathLike) -> ModelFiles:
    """Resolve a model checkpoint, a training step directory or a run directory (its newest
    complete step); anything else is a one-line ValueError."""

    p = Path(path)
    if (p / META_FILE).is_file():
        tok = p / TOKENIZER_DIR
        return ModelFiles(p, "model", p / MODEL_DIR, read_meta(p), tok if tok.is_dir() else None, None)
    step = resolve_step(p) if p.is_dir() else None
    if step is None:
        raise ValueError(
            f"{path} is neither a tip_megatron model checkpoint ({META_FILE} is missing) nor a "
            "training checkpoint (a step_NNNNNN directory with COMPLETE, or a run directory "
            "holding them); create a model checkpoint with `tip-megatron convert hf-to-mcore`")
    run_meta = step.parent / MODEL_META
    meta_file, hf_file, tok = (run_meta / "meta.json", run_meta / "hf_config.json",
                               run_meta / TOKENIZER_DIR)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    hf_config = json.loads(hf_file.read_text()) if hf_file.is_file() else None
    return ModelFiles(step, "training", step / "dist", meta, tok if tok.is_dir() else None, hf_config)


def read_meta(ckpt_dir: PathLike) -> dict:
    """meta.json of a model checkpoint; a ValueError when ckpt_dir is not one."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise ValueError(
            f"{ckpt_dir} is not a tip_megatron model checkpoint ({META_FILE} is missing); "
            "create one with `tip-megatron convert hf-to-mcore`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r} is not "
            f"supported; accepted: {FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta


def is_model_checkpoint(ckpt_dir: PathLike) -> bool:
    """Whether ckpt_dir holds a model checkpoint's meta.json (of any readable version)."""
    try:
        return json.loads((Path(ckpt_dir) / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def arch_differences(a: ModelArch, b: ModelArch) -> list[str]:
    """`field: a != b` for every architecture field that differs (carried HF extras ignored)."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} != {db[k]!r}" for k in da if k != "extra" and da[k] != db[k]]


def _chunk_differences(arch: ModelArch, chunks: list[torch.nn.Module]) -> list[str]:
    model = unwrap(chunks[0])
    cfg = model.config
    pairs = {
        "num_layers": (arch.num_layers, cfg.num_layers),
        "hidden_size": (arch.hidden_size, cfg.hidden_size),
        "num_attention_heads": (arch.num_attention_heads, cfg.num_attention_heads),
        "num_kv_heads": (arch.num_kv_heads, cfg.num_query_groups),
        "ffn_hidden_size": (arch.ffn_hidden_size, cfg.ffn_hidden_size),
        "head_dim": (arch.kv_channels, cfg.kv_channels),
        "qkv_bias": (arch.qkv_bias, cfg.add_qkv_bias),
        "qk_norm": (arch.qk_norm, cfg.qk_layernorm),
        "tie_word_embeddings": (arch.tie_word_embeddings, model.share_embeddings_and_output_weights),
    }
    diffs = [f"{k}: checkpoint {a!r} != model {b!r}" for k, (a, b) in pairs.items() if a != b]
    if model.vocab_size < arch.vocab_size:
        diffs.append(f"vocab_size: checkpoint {arch.vocab_size} > model rows {model.vocab_size}")
    return diffs


def _raise_on_mismatch(diffs: list[str], ckpt: Path, what: str) -> None:
    if diffs:
        raise ValueError(f"model checkpoint {ckpt} does not match {what}: " + "; ".join(diffs))


# ------------------------------------------------------------------------------ stored keys
def stored_key(full_name: str) -> tuple[str, Optional[int]]:
    """Full name (models.state naming) -> (dist_checkpointing key, layer index or None).

    Layer tensors are stored stacked along a leading [num_layers] axis under one key; the
    norms under their Transformer Engine names (megatron's local spec maps them so).
    """
    parts = full_name.split(".")
    if full_name.startswith("decoder.layers."):
        rest = ".".join(parts[3:])
        return f"decoder.layers.{_LOCAL_TO_TE.get(rest, rest)}", int(parts[2])
    return full_name, None


def stored_metadata(ckpt_dir: PathLike) -> dict:
    """dist_checkpointing key -> ShardedTensor metadata (global_shape, dtype), no data read."""
    weights = model_files(ckpt_dir).weights
    dcp_guard.check_dcp_dir(weights)  # before dist_checkpointing unpickles .metadata
    return _dist_checkpointing().load_tensors_metadata(str(weights))


def load_full_tensors(
    ckpt_dir: PathLike, names: list[str], arch: ModelArch, metadata: Optional[dict] = None
) -> dict[str, torch.Tensor]:
    """Read whole tensors by full name (models.state naming) without building a model.

    Reads only those tensors (one layer's slice of the stacked layer tensors), in their
    stored dtype; vocabulary tensors come back with `arch.vocab_size` rows (padding cut).
    Needs torch.distributed initialized (a world of one will do); every rank reads what
    it asks for, so this is not a collective.
    """
    from megatron.core.dist_checkpointing import ShardedTensor  # heavy, loaded on use

    metadata = metadata if metadata is not None else stored_metadata(ckpt_dir)
    request = {}
    for name in names:
        key, layer = stored_key(name)
        if key not in metadata:
            raise KeyError(f"tensor {name!r} (stored as {key!r}) is not in the checkpoint {ckpt_dir}")
        shape, dtype = tuple(metadata[key].global_shape), metadata[key].dtype
        if layer is None:
            data = torch.empty(shape, dtype=dtype)
            request[name] = ShardedTensor.from_rank_offsets(key, data, replica_id=0)
        else:
            data = torch.empty((1,) + shape[1:], dtype=dtype)
            request[name] = ShardedTensor.from_rank_offsets(key, data, (0, layer, shape[0]), replica_id=0)
    weights = model_files(ckpt_dir).weights
    dcp_guard.check_dcp_dir(weights)  # once per file version: cheap on later calls
    # A partial read by design: the access-integrity check wants the whole tensor covered.
    with _quiet_dcp_load():
        loaded = _dist_checkpointing().load(request, str(weights), validate_access_integrity=False)
    out = {}
    for name in names:
        tensor = loaded[name]
        if stored_key(name)[1] is not None:
            tensor = tensor[0]
        elif name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            tensor = tensor[: arch.vocab_size]
        out[name] = tensor
    return out


# ------------------------------------------------------------------------------ helpers
def _dist_checkpointing():
    """megatron.core.dist_checkpointing with the CPU redirect applied (platform imports its
    lazily loaded writer/reader modules first)."""
    from megatron.core import dist_checkpointing  # heavy, loaded on use

    apply_cpu_compat()
    return dist_checkpointing


@contextlib.contextmanager
def _quiet_dcp_load() -> Iterator[None]:
    """megatron reads with torch DCP's `no_dist=True` on purpose (each rank reads its own
    shards), and DCP warns about exactly that on every load: silence those two warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="The argument order of load has been changed")
        yield


def _world_group():
    """Every rank saves into the same directory (None outside torch.distributed)."""
    return dist.group.WORLD if dist.is_initialized() else None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
