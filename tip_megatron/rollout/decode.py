"""Forward of one pipeline chunk over a decoding window, and the last-token logit shard.

Shapes: tokens / positions [B, sq], hidden [sq, B, h], RoPE table [max_len, d],
cos / sin [sq, B, 1, d] (per-row positions), logits [B, V/tp], kept hidden states
[response tokens, h] (`HiddenRecorder`).

Two implementations of the transformer layers, chosen by `GenerationConfig.layer_impl`:
- `megatron`: `chunk.decoder(...)`, megatron's own TransformerBlock (any layer spec: local,
  Transformer Engine, FP8), with per-row RoPE frequencies and the cached core attention
  swapped in by `kv_cache.install`.
- `functional`: the same pre-norm layer (norm, QKV, RoPE, attention, proj, residual, norm,
  SwiGLU MLP, residual) written out over megatron's own modules and parameters, for the
  local spec. It skips the per-call machinery of megatron's layer, attention and linear
  wrappers (offloading, recompute, CUDA-graph and FP8 hooks, autograd.Function apply),
  which dominates a decoding step of a small model on CPU (docs/generate.md). It follows
  megatron's contracts exactly, so both give the same bits on CPU (tested):
  ColumnParallelLinear (no SP, gather_output=False) is `x @ W.t() + b` on the local
  shard; RowParallelLinear (input_is_parallel) is an all-reduce over the TP group of
  `x @ W.t()`, then `+ b`; the fused QKV is split per query group; RoPE is megatron's
  non-interleaved rotate-half; the bias-dropout-add is `residual + out` in eval mode.
`auto` takes `functional` when every layer qualifies (`functional_unsupported`), else
`megatron`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tip_megatron.models.state import unwrap

LAYER_IMPLS = ("auto", "functional", "megatron")


def functional_unsupported(chunk) -> Optional[str]:
    """Why the functional layers cannot run this chunk (None when they can)."""
    # heavy: megatron.core takes ~10 s to import; config checks import this module
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    cfg = chunk.config
    flags = dict(sequence_parallel=cfg.sequence_parallel, fp8=bool(cfg.fp8),
                 fp4=bool(getattr(cfg, "fp4", None)), gated_linear_unit=not cfg.gated_linear_unit,
                 fp32_residual_connection=cfg.fp32_residual_connection,
                 rotary_interleaved=cfg.rotary_interleaved,
                 attention_output_gate=getattr(cfg, "attention_output_gate", False),
                 apply_residual_connection_post_layernorm=cfg.apply_residual_connection_post_layernorm)
    bad = [name for name, on in flags.items() if on]
    if bad:
        return f"config {bad}"
    if cfg.activation_func is not F.silu:
        return f"activation {cfg.activation_func}"
    if cfg.num_query_groups < cfg.tensor_model_parallel_size:
        return "fewer query groups than TP ranks"
    if 2 * chunk.rotary_pos_emb.inv_freq.numel() != cfg.kv_channels:
        return "partial rotary embedding (rotary_percent < 1)"
    for layer in chunk.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        linears = {"linear_qkv": (attn.linear_qkv, ColumnParallelLinear),
                   "linear_proj": (attn.linear_proj, RowParallelLinear),
                   "linear_fc1": (getattr(mlp, "linear_fc1", None), ColumnParallelLinear),
                   "linear_fc2": (getattr(mlp, "linear_fc2", None), RowParallelLinear)}
        for name, (module, kind) in linears.items():
            if type(module) is not kind:  # exact type: subclasses (TE) have other forwards
                return f"layer {layer.layer_number} {name} is {type(module).__name__}"
        if any(m.bias is not None for m in (attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2)):
            return "biases on linear_proj / linear_fc1 / linear_fc2"
    return None


def resolve_layer_impl(chunks, impl: str) -> str:
    """`functional` or `megatron` for these (possibly DDP-wrapped) chunks."""
    if impl not in LAYER_IMPLS:
        raise ValueError(f"layer_impl={impl!r}: accepted values are {LAYER_IMPLS}")
    if impl == "megatron":
        return impl
    reasons = [r for r in map(functional_unsupported, map(unwrap, chunks)) if r]
    # With overlap_param_gather, megatron DDP all-gathers parameters in forward pre-hooks of
    # the modules that own them; the functional layers read linear weights without calling
    # those modules, so they would see stale shards.
    if any(getattr(getattr(c, "ddp_config", None), "overlap_param_gather", False) for c in chunks):
        reasons.append("DDP overlap_param_gather (parameters are gathered in module hooks)")
    if reasons and impl == "functional":
        raise ValueError(f"layer_impl='functional' cannot run this model ({reasons[0]}); "
                         "use 'auto' or 'megatron'")
    return "megatron" if reasons else "functional"


def rope_table(chunk, max_len: int) -> torch.Tensor:
    """[max_len, d] RoPE angles of positions 0..max_len-1 (llama3 scaling included)."""
    return chunk.rotary_pos_emb(max_len)[:, 0, 0, :]


def chunk_forward(chunk, impl: str, tokens: torch.Tensor, positions: torch.Tensor,
                  received: Optional[torch.Tensor], table: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """[sq, B, h] output of one GPTModel chunk (final norm applied on the last stage).

    `received` is the previous stage's output (None on the first stage, which embeds
    `tokens`). Mirrors GPTModel.forward (embedding, decoder) but hands the layers per-row
    RoPE angles; GPTModel.forward computes them for positions 0..s-1 only.
    """
    freqs = table[positions.t()].unsqueeze(2)  # [sq, B, 1, d]
    hidden = chunk.embedding(input_ids=tokens, position_ids=positions) if chunk.pre_process else received
    if impl == "megatron":
        if not chunk.pre_process:
            chunk.set_input_tensor(received)
        return chunk.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=freqs)
    cos, sin = freqs.cos().to(hidden.dtype), freqs.sin().to(hidden.dtype)
    tp = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    for layer in chunk.decoder.layers:
        hidden = _functional_layer(layer, hidden, cos, sin, tp)
    norm = chunk.decoder.final_layernorm
    return norm(hidden) if norm is not None else hidden


def last_hidden(hidden: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, h]: the last column of `hidden` [sq, B, h], or column `index[r]` of row r
    (right-padded prefill): what the output layer reads to sample each row's next token."""
    if index is None:
        return hidden[-1]
    return hidden[index, torch.arange(hidden.shape[1], device=hidden.device)]


def last_token_logits(chunk, hidden: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, V/tp] logit shard of `last_hidden(hidden, index)`; no vocabulary gather."""
    weight = chunk.shared_embedding_or_output_weight() if chunk.share_embeddings_and_output_weights else None
    logits, _ = chunk.output_layer(last_hidden(hidden, index)[None], weight=weight,
                                   runtime_gather_output=False)
    return logits[0]


class HiddenRecorder:
    """The student's final hidden states (after the final norm: the output layer's input)
    at every position that predicts a response token, on the last pipeline stage
    (`GenerationConfig.keep_hidden`, for `selection.prepass_source=generation`).

    Memory: only the recorded [k, h] rows, in the compute dtype (no padding to
    max_new_tokens); `packed` copies them once into one [response tokens, h] tensor.
    """

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens
        self.parts: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []

    def record(self, rows: torch.Tensor, new: torch.Tensor, hidden: torch.Tensor) -> None:
        """hidden[i] [h] predicted response token `new[i]` (0 = the first) of row `rows[i]`."""
        # A copy: a slice of the prefill's [sq, B, h] would keep the whole tensor alive.
        self.parts.append(hidden.detach().clone())
        self.keys.append(rows.long() * self.max_new_tokens + new.long())

    def packed(self, lengths: torch.Tensor) -> torch.Tensor:
        """[sum(lengths), h], row-major (row 0's tokens 0..len-1, then row 1's, ...): the
        order of the training micro-batches' target positions, row by row."""
        keys, hidden = torch.cat(self.keys), torch.cat(self.parts)
        self.parts, self.keys = [], []
        order = torch.argsort(keys)
        keys = keys[order]
        rows, new = keys // self.max_new_tokens, keys % self.max_new_tokens
        wanted = new < lengths.to(keys.device)[rows]
        num = int(lengths.sum())
        if int(wanted.sum()) != num or bool((keys[1:] == keys[:-1]).any()):
            raise RuntimeError(f"generation recorded {int(wanted.sum())} hidden states for {num} "
                               "response tokens (an engine bookkeeping error)")
        return hidden[order[wanted]]


@contextlib.contextmanager
def eval_mode(chunks) -> Iterator[None]:
    """Eval mode for the call; every module's own training flag restored afterwards."""
    modes = [(m, m.training) for c in chunks for m in c.modules()]
    try:
        for chunk in chunks:
            chunk.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def pipeline_forward(chunks, impl: str, tables, groups, tokens: torch.Tensor, positions: torch.Tensor,
                     hidden_size: int) -> Optional[torch.Tensor]:
    """[sq, B, h] last-stage output of `tokens` [B, sq] at `positions` [B, sq] through every
    pipeline stage and virtual chunk (docs/generate.md, pipeline step protocol); None off
    the last stage. The cache window must be set by the caller."""
    rows, sq = tokens.shape
    pp, rank = groups.pp_size, groups.pp_rank
    dtype = chunks[0].config.params_dtype
    hidden = None
    for v, (chunk, table) in enumerate(zip(chunks, tables)):
        first_stage = groups.is_first_stage and v == 0
        last_stage = groups.is_last_stage and v == len(chunks) - 1
        if not first_stage:
            hidden = torch.empty((sq, rows, hidden_size), dtype=dtype, device=tokens.device)
            dist.recv(hidden, group=groups.pp_group, group_src=(rank - 1) % pp)
        hidden = chunk_forward(chunk, impl, tokens, positions, hidden, table, groups.tp_group)
        if not last_stage:
            dist.send(hidden.to(dtype).contiguous(), group=groups.pp_group, group_dst=(rank + 1) % pp)
    return hidden if groups.is_last_stage else None


def _functional_layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tp_group) -> torch.Tensor:
    attn, mlp = layer.self_attention, layer.mlp
    q, k, v = _qkv(attn, layer.input_layernorm(x))
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    context = attn.core_attention(q, k, v, None)  # the cached attention (kv_cache.install)
    x = x + _row_parallel(attn.linear_proj, context, tp_group)
    h = _column_parallel(mlp.linear_fc1, layer.pre_mlp_layernorm(x))
    gate, up = torch.chunk(h, 2, dim=-1)
    return x + _row_parallel(mlp.linear_fc2, F.silu(gate) * up, tp_group)


def _column_parallel(linear, x: torch.Tensor) -> torch.Tensor:
    # matmul then add, as megatron's LinearWithGradAccumulation... does (not addmm: bits).
    out = torch.matmul(x, linear.weight.t())
    return out + linear.bias if linear.bias is not None else out


def _row_parallel(linear, x: torch.Tensor, tp_group) -> torch.Tensor:
    out = torch.matmul(x, linear.weight.t())
    if tp_group is not None:
        dist.all_reduce(out, group=tp_group)  # megatron's reduce_from_tensor_model_parallel_region
    return out


def _qkv(attn, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV, split per query group: q [sq, B, np, hn], k / v [sq, B, ng, hn]
    (q/k norms applied, as in Attention.get_query_key_value_tensors)."""
    mixed = _column_parallel(attn.linear_qkv, h)
    heads, groups = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
    hn = attn.hidden_size_per_attention_head
    mixed = mixed.view(*mixed.shape[:-1], groups, (heads // groups + 2) * hn)
    q, k, v = torch.split(mixed, [heads // groups * hn, hn, hn], dim=3)
    q = q.reshape(q.shape[0], q.shape[1], heads, hn)
    if attn.q_layernorm is not None:
        q = attn.q_layernorm(q)
    if attn.k_layernorm is not None:
        k = attn.k_layernorm(k)
    return q, k, v


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved RoPE: t * cos + rotate_half(t) * sin."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin
