"""Sequence parallelism for our models: the local spec's norm, and SP off for decoding.

Shapes: the norm maps [..., h] -> [..., h] (h = hidden size, or head dim for q/k norms).

megatron's local spec builds its norms with `WrappedTorchNorm`, which asserts
`sequence_parallel=False`: not because torch's RMSNorm cannot run on a sequence shard (a
norm is per token), but because under sequence parallelism each TP rank normalises only
s/tp tokens, so the weight's gradient is a partial that must be summed over TP. megatron
does that sum in `finalize_model_grads` for every parameter tagged `sequence_parallel`
(TE's and apex's norms tag their weights). This module is torch's RMSNorm, built from
megatron's norm signature, with that tag: a layer-spec submodule, no patch of megatron.
The state-dict key (`weight`) is the same as WrappedTorchNorm's, so checkpoints do not care.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm with megatron's constructor and the SP gradient tag."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5,
                 sequence_parallel: Optional[bool] = None, **_unused: Any) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"LocalRMSNorm: config.normalization={config.normalization!r}; "
                             "accepted: 'RMSNorm'")
        super().__init__(hidden_size, eps=eps)
        # None: a norm over the residual stream (sharded by sequence under SP); the q/k
        # norms pass False: their input is per head after the SP gather, and megatron sums
        # their gradient over TP by name (heads are split), whatever the tag says.
        tag = config.sequence_parallel if sequence_parallel is None else sequence_parallel
        setattr(self.weight, "sequence_parallel", bool(tag))


def local_block_spec(arch: Any, config: Any, vp_stage: Optional[int], pp_rank: int):
    """megatron's local GPT layer spec with every norm (layers and final) a LocalRMSNorm and
    the core attention `SdpaAttention` (models/attention.py), as the
    TransformerBlockSubmodules of this stage."""
    # heavy: megatron.core takes ~10 s to import; config checks import this module
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec  # heavy, as above
    from megatron.core.transformer.transformer_block import (  # heavy, as above
        TransformerBlockSubmodules, get_num_layers_to_build,
    )

    from tip_megatron.models.attention import SdpaAttention  # heavy: imports megatron

    layer = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = LocalRMSNorm
    sub.self_attention.submodules.core_attention = SdpaAttention
    if arch.qk_norm:
        qk = ModuleSpec(module=LocalRMSNorm, params={"sequence_parallel": False})
        sub.self_attention.submodules.q_layernorm = qk
        sub.self_attention.submodules.k_layernorm = qk
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=LocalRMSNorm)


#: Module attributes megatron-core 0.19 derives from config.sequence_parallel at
#: construction and reads in forward.
_SP_MODULE_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def sequence_parallel_off(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run these (possibly wrapped) chunks with sequence parallelism off, restored after.

    Decoding feeds one new token per step, which cannot be split over TP ranks, and the
    weights are the same with SP on or off. megatron reads the flag at forward time from
    the shared TransformerConfig (embedding scatter, block) and from module attributes set
    from it at construction (`_SP_MODULE_FLAGS`: each tensor-parallel linear's
    `sequence_parallel`, the word embedding's `reduce_scatter_embeddings`);
    megatron's GPTModel flips the output layer's attribute the same way for inference.
    Parameters' `sequence_parallel` tags (gradient reduction) are left alone. Forward
    only: the linears' backward flags (allreduce_dgrad) still assume SP.
    """
    saved = []
    for chunk in chunks:
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if getattr(config, "sequence_parallel", False):
                saved.append((config, "sequence_parallel"))
                config.sequence_parallel = False
            for name in _SP_MODULE_FLAGS:
                if getattr(module, name, None) is True:
                    saved.append((module, name))
                    setattr(module, name, False)
    try:
        yield
    finally:
        for owner, name in reversed(saved):
            setattr(owner, name, True)
