"""The memory plan's shapes and formulas (train/memory_plan.py assembles them per rank;
docs/plan.md writes them out). Bytes and MiB per rank; no tensor is made.

    shape = grid_shape(cfg, layout, ranks, s_arch, t_arch, device)  # one model's grid
    stage_params(arch, shape, stage)                                  # parameters on one rank
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from tip_megatron.config import RunConfig
from tip_megatron.models.arch import ModelArch, padded_vocab_size
from tip_megatron.runtime.parallel import ParallelLayout

MIB = 2**20
#: Fixed GPU margin: CUDA context with torch's kernels (~500-600 MiB), NCCL communicators
#: of the TP/PP/DP groups (~100-300 MiB), cuBLAS / Transformer Engine workspaces (~32-256 MiB).
CUDA_FIXED_MIB = 1024.0
#: GPU margin for the caching allocator's fragmentation: this fraction of the peak phase.
CUDA_ALLOCATOR_FRACTION = 0.10
#: CPU only: host objects a run adds after set-up (Python and megatron module objects,
#: gloo buffers, the prompt loader, small tensors glibc keeps), 30-40 MiB measured at
#: every size (docs/plan.md); on a GPU they are host memory, not device memory.
CPU_HOST_OBJECTS_MIB = 32.0
#: CPU only, a rank of the teacher's own (`separate`): no optimizer, DDP buffers or prompt
#: loader; 12 MiB settled after its weights loaded plus 7 while it served, measured on the
#: "S sep" run (docs/plan.md).
CPU_TEACHER_HOST_OBJECTS_MIB = 20.0


@dataclass(frozen=True)
class Term:
    """One memory term of one rank."""

    name: str
    mib: float
    phase: str
    """resident (whole run), rollout (generation only), score (the teacher's forward pass),
    train (the student pass), step (the optimizer step), host (host memory on a GPU run: not
    in the device total), load (reading the weights at set-up), margin."""
    cut: str
    """The setting that makes it smaller."""
    spans: tuple[str, ...] = ()
    """Further phases the term is alive in (the stashed teacher hidden states fill up while
    the teacher scores and stay through the student pass)."""
    after_load: bool = False
    """A resident term made once the weights are loaded (grads, optimizer state, the
    teacher's output-weight copy): not alive in the `load` phase."""


@dataclass(frozen=True)
class Shape:
    """What the plan needs of one model's grid, derived once from the config."""

    tp: int
    pp: int
    dp: int
    vocab_shard: int
    """Padded vocabulary rows per TP rank of this grid (both models share the padded size)."""
    act_bytes: int
    """Bytes per parameter and activation element (bf16 2, fp32 4)."""
    seq: int
    """Positions of one micro-batch (padded to a multiple of tp under sequence parallelism)."""
    micro_batch: int
    microbatches: int
    """Micro-batches per optimizer update on one student DP rank."""
    rows: int
    """Rollouts of one student DP rank per step (all decoded at once by the trainer)."""
    kept: int
    """Kept tokens of one micro-batch at the configured rho (responses at full length)."""
    te_spec: bool
    """The Transformer Engine spec (a GPU): its prefill attention is fused too. The training
    and teacher passes store no [b, heads, s, s] scores with either spec (TE's fused
    attention; the local spec's `SdpaAttention`)."""

    @property
    def last(self) -> int:
        return self.pp - 1


def padded_vocab(cfg: RunConfig, s_arch: ModelArch, t_arch: ModelArch) -> int:
    """The padded vocabulary both models are built with: a multiple of 128 x lcm(student tp,
    teacher tp), so both grids' shards line up (train/setup.py `padded_vocab`)."""
    t_tp = cfg.teacher.parallel.resolve(cfg.parallel).tp
    tp = math.lcm(cfg.parallel.tp, t_tp)
    return max(padded_vocab_size(a.vocab_size, tp) for a in (s_arch, t_arch))


def grid_shape(cfg: RunConfig, layout: ParallelLayout, ranks: int, student_dp: int, padded: int,
               device: str) -> Shape:
    """The shape of one grid (`layout` over `ranks` ranks); batch sizes are the student's
    (`student_dp` replicas share the step's rollouts)."""
    bf16 = cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and device == "cuda")
    seq = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    if layout.sequence_parallel:
        seq = -(-seq // layout.tp) * layout.tp
    rows = cfg.data.prompts_per_step // student_dp * cfg.rollout.n
    mbs = cfg.train.micro_batch_size
    kept = math.floor(cfg.selection.rho * mbs * cfg.rollout.max_new_tokens)
    spec_te = cfg.model.spec == "te" or (cfg.model.spec == "auto" and device == "cuda")
    return Shape(layout.tp, layout.pp, ranks // (layout.tp * layout.pp), padded // layout.tp,
                 2 if bf16 else 4, seq, mbs, rows // cfg.train.updates_per_rollout // mbs, rows,
                 max(kept, 1), spec_te)


def teacher_shape(student: Shape, layout: ParallelLayout, ranks: int, padded: int,
                  max_len: int) -> Shape:
    """The teacher's grid: its own tp / pp / dp and vocabulary shard, the student's batch."""
    seq = -(-max_len // layout.tp) * layout.tp if layout.sequence_parallel else max_len
    return replace(student, tp=layout.tp, pp=layout.pp, dp=ranks // (layout.tp * layout.pp),
                   vocab_shard=padded // layout.tp, seq=seq)


# ------------------------------------------------------------------ parameters
def layer_params(arch: ModelArch, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norms replicated)."""
    h, d, heads, groups = arch.hidden_size, arch.kv_channels, arch.num_attention_heads, arch.num_kv_heads
    qkv = (heads + 2 * groups) * d * (h + (1 if arch.qkv_bias else 0)) // tp
    proj = heads * d * h // tp
    mlp = 3 * arch.ffn_hidden_size * h // tp
    norms = 2 * h + (2 * d if arch.qk_norm else 0)
    return qkv + proj + mlp + norms


def stage_params(arch: ModelArch, shape: Shape, stage: int) -> int:
    """Parameters one rank of `stage` holds: its layers, the embedding (first stage), the
    final norm and the output layer (last stage; a tied one has a copy there when pp > 1)."""
    h, first, last = arch.hidden_size, stage == 0, stage == shape.last
    count = arch.num_layers // shape.pp * layer_params(arch, shape.tp)
    table = shape.vocab_shard * h
    if first:
        count += table
    if last:
        count += h + (table if not arch.tie_word_embeddings or shape.pp > 1 else 0)
    return count


def largest_tensor(arch: ModelArch, shape: Shape, stage: int) -> int:
    """Elements of the largest parameter one rank of `stage` holds."""
    h, d = arch.hidden_size, arch.kv_channels
    layer = max((arch.num_attention_heads + 2 * arch.num_kv_heads) * d * h, 2 * arch.ffn_hidden_size * h)
    has_table = stage == 0 or stage == shape.last
    return max(layer // shape.tp, shape.vocab_shard * h if has_table else 0)


# ------------------------------------------------------------------ activations
def layer_activation_bytes(arch: ModelArch, shape: Shape, recompute: Optional[str],
                           sequence_parallel: bool) -> float:
    """Bytes one layer keeps for backward per micro-batch token (Korthikanti et al. 2022's
    accounting, for GQA + SwiGLU + RMSNorm): norm inputs/outputs, q/k/v before and after
    their norms and RoPE, the attention context, the SwiGLU input and output (the attention
    is fused with either spec: no [heads/tp, s] probabilities, so `selective` recompute has
    nothing to drop). `full` recompute keeps each layer's input only."""
    e, tp = shape.act_bytes, shape.tp
    h, d, heads, groups = arch.hidden_size, arch.kv_channels, arch.num_attention_heads, arch.num_kv_heads
    norm_side = 4 * h / (tp if sequence_parallel else 1)
    qk = (heads + groups) * d / tp * (2 if arch.qk_norm else 1)
    elements = norm_side + (heads + 2 * groups) * d / tp + qk + 2 * heads * d / tp
    elements += 3 * arch.ffn_hidden_size / tp
    if recompute == "full":
        return e * h / (tp if sequence_parallel else 1)
    return e * elements


def forward_activation_bytes(arch: ModelArch, shape: Shape) -> float:
    """Bytes per token a forward-only (no grad) pass holds at its peak inside one layer: the
    residual stream in and out (2h) and the larger block's live tensors (attention: norm
    output, q/k/v, rotated q/k, context, projection output; SwiGLU: norm output, fc1's 2 ffn/tp,
    the gated ffn/tp, fc2's output); the attention is fused (no scores). Nothing is kept
    between layers or micro-batches."""
    e, tp = shape.act_bytes, shape.tp
    h, d, heads, groups = arch.hidden_size, arch.kv_channels, arch.num_attention_heads, arch.num_kv_heads
    attention = 2 * h + ((heads + 2 * groups) + (heads + groups) + heads) * d / tp
    mlp = 2 * h + 3 * arch.ffn_hidden_size / tp
    return e * (2 * h + max(attention, mlp))


def student_activation_term(cfg: RunConfig, shape: Shape, arch: ModelArch, stage: int) -> Term:
    """The student's stored activations: 1F1B keeps pp - stage micro-batches in flight."""
    recompute, sp = cfg.model.recompute_granularity, cfg.parallel.sequence_parallel
    tokens = shape.micro_batch * shape.seq
    in_flight = min(shape.pp - stage, shape.microbatches)
    per_mb = arch.num_layers // shape.pp * layer_activation_bytes(arch, shape, recompute, sp) * tokens
    if recompute == "full":  # one layer's full activations while it is recomputed
        per_mb += layer_activation_bytes(arch, shape, None, sp) * tokens / in_flight
    cut = {None: "model.recompute_granularity=selective (or full)",
           "selective": "model.recompute_granularity=full, or train.micro_batch_size",
           "full": "train.micro_batch_size, or data.max_prompt_len + rollout.max_new_tokens"}
    return Term("student.activations", per_mb * in_flight / MIB, "train", cut[recompute])


def teacher_activation_term(arch: ModelArch, shape: Shape) -> Term:
    """The teacher's forward-only pass over one micro-batch (any stage)."""
    tokens = shape.micro_batch * shape.seq
    return Term("teacher.activations", forward_activation_bytes(arch, shape) * tokens / MIB, "score",
                "teacher.parallel.tp, or train.micro_batch_size")


def hidden_bytes(shape: Shape, arch: ModelArch) -> int:
    """One micro-batch's final hidden states [s, b, h] in the compute dtype."""
    return shape.micro_batch * shape.seq * arch.hidden_size * shape.act_bytes


# ------------------------------------------------------------------ student
def student_state_terms(cfg: RunConfig, shape: Shape, arch: ModelArch, stage: int) -> list[Term]:
    """The student's weights, grad buffer, optimizer state and the step's transient."""
    o, e = cfg.optim, shape.act_bytes
    n = stage_params(arch, shape, stage)
    shard = shape.dp if o.use_distributed_optimizer else 1
    grad_bytes = 4 if o.grad_reduce_in_fp32 or e == 4 else 2
    # Adam's two moments in fp32, plus fp32 main params when the model params are bf16.
    optim_bytes = 8 + (4 if e == 2 else 0)
    dist_cut = ("more data-parallel ranks" if o.use_distributed_optimizer else
                "optim.use_distributed_optimizer=true (shards it over DP)")
    # torch Adam (no apex / TE fused Adam) makes two fp32 temporaries of each main param
    # in turn: the largest one sets the step's transient (a DP shard may hold it whole).
    step = 2 * 4 * largest_tensor(arch, shape, stage)
    if grad_bytes == 2:  # bf16 grads: the step first copies them into fp32 main grads
        step += n * 4 / shard  # (measured at the Qwen3-0.6B shape: docs/plan.md)
    return [
        Term("student.params", n * e / MIB, "resident", "parallel.tp / parallel.pp"),
        Term("student.grads", n * grad_bytes / MIB, "resident",
             "parallel.tp / parallel.pp (grad_reduce_in_fp32=false halves it, the step adds fp32 main grads)",
             after_load=True),
        Term("student.optimizer", n * optim_bytes / shard / MIB, "resident", dist_cut, after_load=True),
        Term("student.optimizer_step", step / MIB, "step", dist_cut),
    ]


def rollout_terms(cfg: RunConfig, shape: Shape, arch: ModelArch, last: bool) -> list[Term]:
    """The KV cache of this stage's layers for every rollout of the DP rank, the sampling
    logits (last stage) and, on the local spec, the prefill's attention scores."""
    e, layers = shape.act_bytes, arch.num_layers // shape.pp
    positions = shape.rows * shape.seq
    kv = positions * layers * 2 * (arch.num_kv_heads // shape.tp) * arch.kv_channels * e
    cut = "data.prompts_per_step / rollout.n / rollout.max_new_tokens, or more DP ranks"
    terms = [Term("rollout.kv_cache", kv / MIB, "rollout", cut)]
    if last:  # fp32 logits, probabilities and the sampling workspace of one decode step
        terms.append(Term("rollout.logits", 3 * shape.rows * shape.vocab_shard * 4 / MIB, "rollout", cut))
    if not shape.te_spec:  # the local spec's prefill: masked attention (rollout/kv_cache.py)
        prompts, p = shape.rows // cfg.rollout.n, cfg.data.max_prompt_len
        scores = prompts * arch.num_attention_heads // shape.tp * p * p * 4
        terms.append(Term("rollout.prefill_scores", scores / MIB, "rollout",
                          "model.spec=te on a GPU (fused attention), or data.max_prompt_len"))
    return terms


def loss_path_term(cfg: RunConfig, shape: Shape, arch: ModelArch) -> Term:
    """The output layer's chunks (docs/selection_memory.md): scoring holds student + teacher
    logits of `score_chunk_size` tokens; the fused loss two [min(chunk, k), V/tp] buffers,
    the output weight's fp32 gradient and the kept hidden states' gradient; the unfused
    loss three [k, V/tp] rows. fp32 logits; a bf16 product is upcast (6 bytes a logit)."""
    loss, k, h = cfg.loss, shape.kept, arch.hidden_size
    row = shape.vocab_shard * (4 if shape.act_bytes == 4 else 6)
    responses = shape.micro_batch * cfg.rollout.max_new_tokens
    scoring = 2 * min(loss.score_chunk_size, responses) * row
    if loss.impl == "fused":
        learn = 2 * min(loss.chunk_size, k) * row + shape.vocab_shard * h * 4 + k * h * 8
        cut = "loss.chunk_size / loss.score_chunk_size"
    else:
        learn = 3 * k * row
        cut = "loss.impl=fused, or selection.rho"
    return Term("loss.output_layer", max(scoring, learn) / MIB, "train", cut)


def load_term(device: str, weights_bytes: float, teacher_only: bool = False) -> Term:
    """The checkpoint reader's buffers while one model's weights load (the rank's larger
    model: they load one after the other): about the weights once more, in host memory
    (measured 0.9x on the CPU, docs/plan.md); on a GPU they stay on the host."""
    cut = ("teacher.parallel.tp / teacher.parallel.pp" if teacher_only else "parallel.tp / parallel.pp") + \
        " (the rank's share of the weights)"
    return Term("load.read_buffers", weights_bytes / MIB, "load" if device != "cuda" else "host", cut)


def margin_terms(device: str, peak_phase_mib: float, teacher_only: bool = False) -> list[Term]:
    if device != "cuda":
        mib = CPU_TEACHER_HOST_OBJECTS_MIB if teacher_only else CPU_HOST_OBJECTS_MIB
        return [Term("cpu.host_objects", mib, "margin", "fixed (CPU runs only)")]
    return [Term("cuda.context_nccl_workspaces", CUDA_FIXED_MIB, "margin",
                 "fixed: CUDA context, NCCL buffers, cuBLAS/TE workspaces"),
            Term("cuda.allocator", CUDA_ALLOCATOR_FRACTION * peak_phase_mib, "margin",
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")]
