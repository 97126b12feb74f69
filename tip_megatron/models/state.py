"""Full (unsharded) state dicts <-> this rank's TP/PP shards.

The "full" naming is megatron's TP=1/PP=1 local-spec naming with GLOBAL layer indices:
`embedding.word_embeddings.weight [V, h]`, `decoder.layers.{i}.self_attention.linear_qkv.weight`,
`decoder.layers.{i}.input_layernorm.weight`, ..., `decoder.final_layernorm.weight`,
`output_layer.weight [V, h]` (absent when embeddings are tied). Vocabulary rows are the TRUE
vocabulary (TP padding stripped on gather, zero rows added on load).

Used by the parallel-parity tests (same weights under every layout; gradients gathered
back to full shapes) and by the HF converters. Gathering materializes the whole model on
every rank: meant for tests and small models; large checkpoints go through
dist_checkpointing.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from tip_megatron.models.arch import ModelArch
from tip_megatron.runtime.parallel import ParallelGroups

#: Transformer Engine fuses the norms into the following linear: TE name -> local name.
TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def canonical_name(name: str, layer_offset: int) -> str:
    """Local module name of one chunk -> full name (global layer index, local-spec names)."""
    m = _LAYER_RE.match(name)
    if not m:
        return name
    rest = TE_TO_LOCAL.get(m.group(2), m.group(2))
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{rest}"


def layer_offset(chunk: torch.nn.Module) -> int:
    """Global index of the chunk's first transformer layer (megatron's layer_number is 1-based)."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    if not layers:
        return 0
    return layers[0].layer_number - 1


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def chunk_key(index: int, num_chunks: int) -> str:
    """Checkpoint key of model chunk `index` of `num_chunks` (Megatron-LM's layout):
    `model` for a single chunk, `model0`, `model1`, ... for virtual pipeline stages."""
    return "model" if num_chunks == 1 else f"model{index}"


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP (or any `.module`) wrapper."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _named_params(chunks: Iterable[torch.nn.Module]):
    for chunk in map(unwrap, chunks):
        offset = layer_offset(chunk)
        for name, param in chunk.named_parameters():
            full = canonical_name(name, offset)
            if full == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False):
                continue  # tied: the last stage's copy of the embedding
            yield full, param


def _tp_gather(local: torch.Tensor, param: torch.nn.Parameter, name: str, tp_group) -> torch.Tensor:
    tp = dist.get_world_size(tp_group)
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    dim = param.partition_dim
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    if _is_gated_fc1(name):
        # Each shard is [gate_shard; up_shard]: regroup into [gate_full; up_full].
        gates = [p.chunk(2, dim=0)[0] for p in parts]
        ups = [p.chunk(2, dim=0)[1] for p in parts]
        return torch.cat(gates + ups, dim=0)
    return torch.cat(parts, dim=dim)


def _tp_slice(full: torch.Tensor, param: torch.nn.Parameter, name: str, tp_rank: int, tp: int) -> torch.Tensor:
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if _is_gated_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=param.partition_dim)[tp_rank]


def gather_full_state_dict(
    chunks: list[torch.nn.Module],
    groups: ParallelGroups,
    arch: ModelArch,
    tensor_of: Optional[Callable[[torch.nn.Parameter], torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Every rank gets the full-shape state dict (or grads: `tensor_of=lambda p: p.main_grad`)."""
    tensor_of = tensor_of or (lambda p: p.detach())
    local: dict[str, torch.Tensor] = {}
    for name, param in _named_params(chunks):
        full = _tp_gather(tensor_of(param), param, name, groups.tp_group)
        if name in _VOCAB_PARAMS:
            full = full[: arch.vocab_size]
        local[name] = full.cpu().clone()
    if groups.pp_size == 1:
        return local
    stages: list = [None] * groups.pp_size
    dist.all_gather_object(stages, local, group=groups.pp_group)
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        merged.update(stage)  # tied embeddings: both ends hold the same tensor
    return merged


@torch.no_grad()
def load_full_state_dict(
    chunks: list[torch.nn.Module],
    full: dict[str, torch.Tensor],
    groups: ParallelGroups,
    arch: ModelArch,
) -> None:
    """Copy this rank's TP/PP slice of `full` into the chunks' parameters (strict)."""
    for name, param in _named_params(chunks):
        if name not in full:
            raise KeyError(f"tensor {name!r} is missing from the state dict")
        value = full[name]
        if name in _VOCAB_PARAMS:
            padded = param.shape[0] * (groups.tp_size if param.tensor_model_parallel else 1)
            value = _pad_rows(value, padded)
        shard = _tp_slice(value, param, name, groups.tp_rank, groups.tp_size)
        if shard.shape != param.shape:
            raise ValueError(
                f"tensor {name!r}: shard shape {tuple(shard.shape)} from full shape "
                f"{tuple(value.shape)} does not match the model's {tuple(param.shape)}"
            )
        param.copy_(shard.to(param.dtype))
    _sync_tied_output(chunks, groups)


def _pad_rows(value: torch.Tensor, rows: int) -> torch.Tensor:
    if value.shape[0] > rows:
        raise ValueError(f"vocabulary of {value.shape[0]} rows does not fit {rows} padded rows")
    if value.shape[0] == rows:
        return value
    pad = value.new_zeros((rows - value.shape[0],) + tuple(value.shape[1:]))
    return torch.cat([value, pad], dim=0)


def _sync_tied_output(chunks: list[torch.nn.Module], groups: ParallelGroups) -> None:
    """With tied embeddings and PP > 1 the last stage holds its own copy of the embedding
    (megatron keeps them equal by all-reducing grads over the embedding group): copy it."""
    for module in map(unwrap, chunks):
        if not getattr(module, "share_embeddings_and_output_weights", False):
            continue
        if module.post_process and not module.pre_process:
            weight = module.shared_embedding_or_output_weight()
            # The first stage's embedding was loaded; the all-reduce over the embedding
            # group (first + last stage) of (first, zeros) gives the first stage's value.
            weight.zero_()
        if module.pre_process or module.post_process:
            if groups.embd_group is not None and dist.get_world_size(groups.embd_group) > 1:
                dist.all_reduce(module.shared_embedding_or_output_weight().data, group=groups.embd_group)
