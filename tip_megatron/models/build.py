"""Build the pipeline stage(s) of a Llama/Qwen model that belong to this rank.

    chunks = build_model(arch, groups, options)   # list of GPTModel, one per virtual stage

Local layer spec on CPU; Transformer Engine spec when TE is importable and CUDA is present
(which one was chosen is logged). The teacher is built the same way, then frozen.

Why GPTModel and not HybridModel: megatron-core 0.19 logs a deprecation of GPTModel in
favour of HybridModel, but the TIP loss path needs the `output_processor` seam of
`GPTModel.forward` (the hook that hands us the final hidden states and the output layer
before any logits exist), and a pure-attention decoder is exactly GPTModel's case. See
docs/design_notes.md for the full note and the migration plan.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from tip_megatron.runtime.device import compute_dtype, current_device, default_backend
from tip_megatron.runtime.megatron_compat import apply_cpu_compat, megatron_config_overrides
from tip_megatron.runtime.optional import check_fp8, optional_deps, require
from tip_megatron.models.arch import ModelArch, RopeScaling
from tip_megatron.models.sequence_parallel import local_block_spec
from tip_megatron.runtime.parallel import ParallelGroups

logger = logging.getLogger(__name__)

#: megatron-core applies Llama-3 RoPE scaling with these fixed frequency factors; only
#: `factor` is a constructor argument.
_MEGATRON_ROPE_SCALING = RopeScaling()


@dataclass(frozen=True)
class BuildOptions:
    """How to build (not what to build: that is `ModelArch`)."""

    spec: Literal["auto", "local", "te"] = "auto"
    """Layer implementation: `te` (Transformer Engine; needs TE + CUDA), `local`
    (megatron-core modules only), `auto` (TE when usable, else local)."""
    params_dtype: Optional[torch.dtype] = None
    """Parameter dtype; None means bf16 on GPU and fp32 on CPU."""
    padded_vocab_size: Optional[int] = None
    """Embedding/output rows. None pads arch.vocab_size to a multiple of 128 * tp. Student
    and teacher are built with the same value so their vocab shards line up."""
    seq_length: Optional[int] = None
    """Longest sequence the model will see (defaults to arch.max_position_embeddings)."""
    fp8: Optional[str] = None
    """FP8 format of the TE transformer layers ("hybrid" / "e4m3"); needs the TE spec on a
    GPU whose compute capability has `fp8_recipe`. The output layer stays out of FP8."""
    fp8_recipe: str = "delayed"
    """megatron's fp8_recipe: delayed, tensorwise, blockwise, mxfp8."""
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    recompute_granularity: Optional[str] = None
    """Megatron activation recompute: None, "selective" or "full"."""
    init_weights: bool = True
    """Run megatron's random initialization. False when the weights are loaded right after
    (checkpoint, HF conversion): saves the init time of a large model."""


def resolve_spec(spec: str) -> str:
    if spec not in ("auto", "local", "te"):
        raise ValueError(f"model spec {spec!r}: accepted values are 'auto', 'local', 'te'")
    if spec == "te":
        require("transformer_engine", "the Transformer Engine layer spec")
        return "te"
    if spec == "auto" and optional_deps().te_usable:
        return "te"
    return "local"


def transformer_config(arch: ModelArch, groups: ParallelGroups, options: BuildOptions):
    """Megatron TransformerConfig for `arch` under this process's layout."""
    # heavy: megatron.core takes ~10 s to import; config checks import this module
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = default_backend().is_cuda
    deps = optional_deps()
    dtype = compute_dtype(options.params_dtype, on_gpu)
    if options.fp8:
        if resolve_spec(options.spec) != "te":
            raise ValueError("model.fp8 needs the Transformer Engine spec (model.spec=te) on a GPU")
        check_fp8(options.fp8_recipe, "model.fp8")
    layout = groups.layout
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.kv_channels,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=arch.qk_norm,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=options.init_weights,
        # Fusions: the jit-scripted bias/activation and bias/dropout ones are plain torch;
        # the fused softmax needs megatron's compiled extension, the persistent layer norm
        # apex (the local spec's torch norm asserts it off): on only where they exist.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu and deps.softmax_kernels,
        apply_rope_fusion=False,
        persist_layer_norm=on_gpu and deps.apex,
        # Loss contract: the loss function returns (loss_sum, num_tokens, report) and
        # megatron normalizes once by the global token count.
        calculate_per_token_loss=True,
        # FP8 covers the transformer layers only: megatron wraps each layer of the block in
        # its fp8 context, while GPTModel's output layer is a plain ColumnParallelLinear
        # outside it (unless fp8_output_proj with mxfp8, never set here); the TIP loss path
        # multiplies hidden states by the output weight itself, in bf16/fp32.
        fp8=options.fp8,
        fp8_recipe=options.fp8_recipe,
        fp8_amax_history_len=options.fp8_amax_history_len,
        fp8_amax_compute_algo=options.fp8_amax_compute_algo,
        recompute_granularity=options.recompute_granularity,
        recompute_method="uniform" if options.recompute_granularity == "full" else None,
        recompute_num_layers=1 if options.recompute_granularity == "full" else None,
        **megatron_config_overrides(),
    )


def layer_spec(arch: ModelArch, spec: str, config, vp_stage: Optional[int], pp_rank: int):
    """TE: megatron's TE layer spec (its norms handle sequence parallelism). Local:
    megatron's local spec with `LocalRMSNorm` norms, whose weights carry the
    `sequence_parallel` tag that finalize_model_grads needs (models/sequence_parallel.py)."""
    # heavy: megatron.core takes ~10 s to import; config checks import this module
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    if spec == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return local_block_spec(arch, config, vp_stage, pp_rank)


def check_rope_scaling(arch: ModelArch) -> None:
    rs = arch.rope_scaling
    if rs is None:
        return
    fixed = _MEGATRON_ROPE_SCALING
    if (rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) != (
        fixed.low_freq_factor, fixed.high_freq_factor, fixed.original_max_position_embeddings
    ):
        raise ValueError(
            f"rope_scaling {rs} is not supported: megatron-core applies Llama-3 scaling with "
            f"low_freq_factor={fixed.low_freq_factor}, high_freq_factor={fixed.high_freq_factor}, "
            f"original_max_position_embeddings={fixed.original_max_position_embeddings} "
            "(only `factor` may vary)"
        )


def build_model(
    arch: ModelArch,
    groups: ParallelGroups,
    options: BuildOptions = BuildOptions(),
    *,
    frozen: bool = False,
) -> list[torch.nn.Module]:
    """Build this rank's model chunk(s): one GPTModel per virtual pipeline stage.

    frozen=True builds a teacher: eval mode, requires_grad False (no grads, and so no
    optimizer state, ever).
    """
    # heavy: megatron.core takes ~10 s to import; config checks import this module
    from megatron.core.models.gpt import GPTModel

    layout = groups.layout
    arch.validate_parallel(layout.tp, layout.pp, layout.vpp)
    check_rope_scaling(arch)
    apply_cpu_compat()
    spec = resolve_spec(options.spec)
    config = transformer_config(arch, groups, options)
    vocab = options.padded_vocab_size or arch.padded_vocab_size(layout.tp)
    if vocab < arch.vocab_size or vocab % layout.tp != 0:
        raise ValueError(
            f"padded_vocab_size={vocab} must be >= vocab_size={arch.vocab_size} and divisible "
            f"by tp={layout.tp}"
        )
    seq_length = options.seq_length or arch.max_position_embeddings
    num_chunks = layout.vpp or 1
    chunks = []
    for vp_stage in range(num_chunks):
        first = groups.is_first_stage and vp_stage == 0
        last = groups.is_last_stage and vp_stage == num_chunks - 1
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(arch, spec, config, vp_stage if layout.vpp else None,
                                              groups.pp_rank),
            vocab_size=vocab,
            max_sequence_length=seq_length,
            pre_process=first,
            post_process=last,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rope_scaling=arch.rope_scaling is not None,
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
            pg_collection=groups.pg_collection,
            vp_stage=vp_stage if layout.vpp else None,
        )
        if frozen:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        chunks.append(model.to(current_device()))
    if groups.rank == 0:
        logger.info(
            "built %s (%s spec%s): %d layers, hidden %d, vocab %d padded to %d, %d chunk(s)",
            arch.family, spec, ", frozen" if frozen else "", arch.num_layers, arch.hidden_size,
            arch.vocab_size, vocab, num_chunks,
        )
    return chunks
