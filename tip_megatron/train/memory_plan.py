"""Per-rank memory plan of a distillation run: arithmetic on the config and the two
architectures, before launch (no model is built, no weight is read).

    plan = plan_memory(cfg, student_arch, teacher_arch, world_size=2, device="cuda")
    plan.stages[-1].total_mib, plan.to_dict(), format_plan(plan)

Every rank of one pipeline stage holds the same shapes (TP and DP ranks alike), so the plan
has one entry per stage. A stage's peak is what stays resident (both models' weights, the
student's grads and optimizer state) plus the larger of its two phases: rollout (the KV
cache and the sampling logits) and training (teacher hidden states, the student's
activations under the configured recompute, the loss path's chunks at the output layer).
On a GPU a margin covers what the arithmetic does not see (docs/plan.md). The formulas are
written out in docs/plan.md; tests/distributed/test_plan_measured.py holds them against
measured peaks on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from tip_megatron.config import RunConfig
from tip_megatron.models.arch import ModelArch, padded_vocab_size
from tip_megatron.runtime.gpu_memory import gpu_memory_gib

MIB = 2**20
PHASES = ("resident", "rollout", "train", "step", "margin")
#: Phases that follow one another (the peak is the largest of them over the resident terms).
_PEAK_PHASES = ("rollout", "train", "step")
#: Fixed GPU margin: CUDA context with torch's kernels (~500-600 MiB), NCCL communicators
#: of the TP/PP/DP groups (~100-300 MiB), cuBLAS / Transformer Engine workspaces (~32-256 MiB).
CUDA_FIXED_MIB = 1024.0
#: GPU margin for the caching allocator's fragmentation: this fraction of the peak phase.
CUDA_ALLOCATOR_FRACTION = 0.10
#: CPU only: host objects a run adds after set-up (Python and megatron module objects,
#: gloo buffers, the prompt loader, small tensors glibc keeps), 30-40 MiB measured at
#: every size (docs/plan.md); on a GPU they are host memory, not device memory.
CPU_HOST_OBJECTS_MIB = 32.0


@dataclass(frozen=True)
class Term:
    """One memory term of one rank."""

    name: str
    mib: float
    phase: str
    """resident (whole run), rollout (generation only), train (teacher + student pass), step
    (the optimizer step), margin."""
    cut: str
    """The setting that makes it smaller."""


@dataclass(frozen=True)
class StagePlan:
    """The ranks of one pipeline stage (all alike) and their terms."""

    stage: int
    ranks: tuple[int, ...]
    terms: tuple[Term, ...]

    def phase_mib(self, phase: str) -> float:
        return sum(t.mib for t in self.terms if t.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(_PEAK_PHASES, key=self.phase_mib)

    @property
    def total_mib(self) -> float:
        return (self.phase_mib("resident") + self.phase_mib(self.peak_phase)
                + self.phase_mib("margin"))

    @property
    def dominant(self) -> Term:
        """The largest term on the path to the peak (resident or the peak phase)."""
        return max((t for t in self.terms if t.phase in ("resident", self.peak_phase)),
                   key=lambda t: t.mib)


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    world_size: int
    layout: dict
    stages: tuple[StagePlan, ...]
    gpu_memory_gib: Optional[float] = None
    notes: tuple[str, ...] = field(default=())

    @property
    def max_total_mib(self) -> float:
        return max(s.total_mib for s in self.stages)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_memory_gib is None else self.max_total_mib <= self.gpu_memory_gib * 1024

    def to_dict(self) -> dict:
        stages = [dict(stage=s.stage, ranks=list(s.ranks), total_mib=round(s.total_mib, 1),
                       peak_phase=s.peak_phase, dominant=s.dominant.name,
                       phases_mib={p: round(s.phase_mib(p), 1) for p in PHASES},
                       terms=[dict(asdict(t), mib=round(t.mib, 1)) for t in s.terms])
                  for s in self.stages]
        ranks = {r: s["total_mib"] for s in stages for r in s["ranks"]}
        return dict(device=self.device, world_size=self.world_size, layout=self.layout,
                    gpu_memory_gib=self.gpu_memory_gib, fits=self.fits,
                    max_total_mib=round(self.max_total_mib, 1), stages=stages,
                    ranks=[dict(rank=r, total_mib=ranks[r]) for r in sorted(ranks)],
                    notes=list(self.notes))


# ------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class _Shape:
    """What the plan needs of the run, derived once from the config."""

    tp: int
    pp: int
    dp: int
    vocab_shard: int
    """Padded vocabulary rows per TP rank (student and teacher share the padded size)."""
    act_bytes: int
    """Bytes per parameter and activation element (bf16 2, fp32 4)."""
    seq: int
    micro_batch: int
    microbatches: int
    """Micro-batches per optimizer update on one DP rank."""
    rows: int
    """Rollouts of one DP rank per step (all decoded at once by the trainer)."""
    kept: int
    """Kept tokens of one micro-batch at the configured rho (responses at full length)."""
    fused_attention: bool
    """Flash / fused attention (TE spec on a GPU): no [b, heads, s, s] scores are stored."""


def _shape(cfg: RunConfig, s_arch: ModelArch, t_arch: ModelArch, world_size: int,
           device: str) -> _Shape:
    p = cfg.parallel
    dp = p.dp(world_size)
    padded = max(padded_vocab_size(a.vocab_size, p.tp) for a in (s_arch, t_arch))
    bf16 = cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and device == "cuda")
    seq = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    if p.sequence_parallel:
        seq = -(-seq // p.tp) * p.tp
    rows = cfg.data.prompts_per_step // dp * cfg.rollout.n
    mbs = cfg.train.micro_batch_size
    kept = math.floor(cfg.selection.rho * mbs * cfg.rollout.max_new_tokens)
    spec_te = cfg.model.spec == "te" or (cfg.model.spec == "auto" and device == "cuda")
    return _Shape(p.tp, p.pp, dp, padded // p.tp, 2 if bf16 else 4, seq, mbs,
                  rows // cfg.train.updates_per_rollout // mbs, rows, max(kept, 1), spec_te)


def layer_params(arch: ModelArch, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norms replicated)."""
    h, d, heads, groups = arch.hidden_size, arch.kv_channels, arch.num_attention_heads, arch.num_kv_heads
    qkv = (heads + 2 * groups) * d * (h + (1 if arch.qkv_bias else 0)) // tp
    proj = heads * d * h // tp
    mlp = 3 * arch.ffn_hidden_size * h // tp
    norms = 2 * h + (2 * d if arch.qk_norm else 0)
    return qkv + proj + mlp + norms


def stage_params(arch: ModelArch, shape: _Shape, stage: int) -> int:
    """Parameters one rank of `stage` holds: its layers, the embedding (first stage), the
    final norm and the output layer (last stage; a tied one has a copy there when pp > 1)."""
    h, first, last = arch.hidden_size, stage == 0, stage == shape.pp - 1
    count = arch.num_layers // shape.pp * layer_params(arch, shape.tp)
    table = shape.vocab_shard * h
    if first:
        count += table
    if last:
        count += h + (table if not arch.tie_word_embeddings or shape.pp > 1 else 0)
    return count


def largest_tensor(arch: ModelArch, shape: _Shape, stage: int) -> int:
    """Elements of the largest parameter one rank of `stage` holds."""
    h, d = arch.hidden_size, arch.kv_channels
    layer = max((arch.num_attention_heads + 2 * arch.num_kv_heads) * d * h, 2 * arch.ffn_hidden_size * h)
    has_table = stage == 0 or stage == shape.pp - 1
    return max(layer // shape.tp, shape.vocab_shard * h if has_table else 0)


def layer_activation_bytes(arch: ModelArch, shape: _Shape, recompute: Optional[str],
                           sequence_parallel: bool) -> float:
    """Bytes one layer keeps for backward per micro-batch token (Korthikanti et al. 2022's
    accounting, for GQA + SwiGLU + RMSNorm): norm inputs/outputs, q/k/v before and after
    their norms and RoPE, the attention context, the SwiGLU input and output, and, without
    fused attention, the [heads/tp, s] softmax probabilities (+ their dropout copy and mask).
    `full` recompute keeps each layer's input only."""
    e, tp = shape.act_bytes, shape.tp
    h, d, heads, groups = arch.hidden_size, arch.kv_channels, arch.num_attention_heads, arch.num_kv_heads
    norm_side = 4 * h / (tp if sequence_parallel else 1)
    qk = (heads + groups) * d / tp * (2 if arch.qk_norm else 1)
    elements = norm_side + (heads + 2 * groups) * d / tp + qk + 2 * heads * d / tp
    elements += 3 * arch.ffn_hidden_size / tp
    scores = 0.0 if shape.fused_attention or recompute == "selective" else \
        heads / tp * shape.seq * (2 * e + 1)
    if recompute == "full":
        return e * h / (tp if sequence_parallel else 1)
    return e * elements + scores


# ------------------------------------------------------------------ terms
def _state_terms(cfg: RunConfig, shape: _Shape, n_student: int, n_teacher: int,
                 largest: int) -> list[Term]:
    """Weights of both models, the student's grad buffer and optimizer state."""
    o, e = cfg.optim, shape.act_bytes
    shard = shape.dp if o.use_distributed_optimizer else 1
    grad_bytes = 4 if o.grad_reduce_in_fp32 or e == 4 else 2
    # Adam's two moments in fp32, plus fp32 main params when the model params are bf16.
    optim_bytes = 8 + (4 if e == 2 else 0)
    dist_cut = ("more data-parallel ranks" if o.use_distributed_optimizer else
                "optim.use_distributed_optimizer=true (shards it over DP)")
    # torch Adam (no apex / TE fused Adam) makes two fp32 temporaries of each main param
    # in turn: the largest one sets the step's transient (a DP shard may hold it whole).
    step = 2 * 4 * largest
    if grad_bytes == 2:  # bf16 grads: the step first copies them into fp32 main grads
        step += n_student * 4 / shard  # (measured at the Qwen3-0.6B shape: docs/plan.md)
    return [
        Term("student.params", n_student * e / MIB, "resident", "parallel.tp / parallel.pp"),
        Term("student.grads", n_student * grad_bytes / MIB, "resident",
             "parallel.tp / parallel.pp (grad_reduce_in_fp32=false halves it, the step adds fp32 main grads)"),
        Term("student.optimizer", n_student * optim_bytes / shard / MIB, "resident", dist_cut),
        Term("teacher.params", n_teacher * e / MIB, "resident", "parallel.tp / parallel.pp"),
        Term("student.optimizer_step", step / MIB, "step", dist_cut),
    ]


def _rollout_terms(cfg: RunConfig, shape: _Shape, arch: ModelArch, last: bool) -> list[Term]:
    """The KV cache of this stage's layers for every rollout of the DP rank, the sampling
    logits (last stage) and, without fused attention, the prefill's attention scores."""
    e, layers = shape.act_bytes, arch.num_layers // shape.pp
    positions = shape.rows * shape.seq
    kv = positions * layers * 2 * (arch.num_kv_heads // shape.tp) * arch.kv_channels * e
    cut = "data.prompts_per_step / rollout.n / rollout.max_new_tokens, or more DP ranks"
    terms = [Term("rollout.kv_cache", kv / MIB, "rollout", cut)]
    if last:  # fp32 logits, probabilities and the sampling workspace of one decode step
        terms.append(Term("rollout.logits", 3 * shape.rows * shape.vocab_shard * 4 / MIB, "rollout", cut))
    if not shape.fused_attention:
        prompts, p = shape.rows // cfg.rollout.n, cfg.data.max_prompt_len
        scores = prompts * arch.num_attention_heads // shape.tp * p * p * 4
        terms.append(Term("rollout.prefill_scores", scores / MIB, "rollout",
                          "model.spec=te on a GPU (fused attention), or data.max_prompt_len"))
    return terms


def _activation_term(cfg: RunConfig, shape: _Shape, arch: ModelArch, stage: int) -> Term:
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


def _loss_path_term(cfg: RunConfig, shape: _Shape, arch: ModelArch) -> Term:
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


def _train_terms(cfg: RunConfig, shape: _Shape, s_arch: ModelArch, t_arch: ModelArch,
                 stage: int) -> list[Term]:
    terms = [_activation_term(cfg, shape, s_arch, stage)]
    if stage == shape.pp - 1:
        # The teacher pass stashes its final hidden states of every micro-batch of the step.
        mbs_per_step = shape.microbatches * cfg.train.updates_per_rollout
        hidden = mbs_per_step * shape.micro_batch * shape.seq * t_arch.hidden_size * shape.act_bytes
        terms.append(Term("teacher.hidden_states", hidden / MIB, "train",
                          "data.prompts_per_step / rollout.n, or more DP ranks"))
        terms.append(_loss_path_term(cfg, shape, s_arch))
        if cfg.selection.prepass_from_generation:
            kept = shape.rows * cfg.rollout.max_new_tokens * s_arch.hidden_size * shape.act_bytes
            terms.append(Term("rollout.kept_hidden", kept / MIB, "train",
                              "selection.prepass_source=recompute"))
    return terms


def _margin_terms(device: str, peak_phase_mib: float) -> list[Term]:
    if device != "cuda":
        return [Term("cpu.host_objects", CPU_HOST_OBJECTS_MIB, "margin", "fixed (CPU runs only)")]
    return [Term("cuda.context_nccl_workspaces", CUDA_FIXED_MIB, "margin",
                 "fixed: CUDA context, NCCL buffers, cuBLAS/TE workspaces"),
            Term("cuda.allocator", CUDA_ALLOCATOR_FRACTION * peak_phase_mib, "margin",
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")]


def _stage_plan(cfg: RunConfig, shape: _Shape, s_arch: ModelArch, t_arch: ModelArch,
                stage: int, device: str) -> StagePlan:
    last = stage == shape.pp - 1
    terms = _state_terms(cfg, shape, stage_params(s_arch, shape, stage), stage_params(t_arch, shape, stage),
                         largest_tensor(s_arch, shape, stage))
    terms += _rollout_terms(cfg, shape, s_arch, last)
    terms += _train_terms(cfg, shape, s_arch, t_arch, stage)
    partial = StagePlan(stage, (), tuple(terms))
    terms += _margin_terms(device, partial.phase_mib(partial.peak_phase))
    # megatron's default rank order tp-cp-ep-dp-pp: a stage's ranks are contiguous.
    width = shape.tp * shape.dp
    return StagePlan(stage, tuple(range(stage * width, (stage + 1) * width)), tuple(terms))


def plan_memory(cfg: RunConfig, student_arch: ModelArch, teacher_arch: ModelArch, world_size: int,
                device: str = "cuda", gpu_memory: Optional[object] = None) -> MemoryPlan:
    """The plan of every pipeline stage; ValueError (one line) when the layout cannot cut
    the models or the world. `gpu_memory`: GiB or a GPU name (default parallel.gpu_memory_gib)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: accepted values are 'cuda', 'cpu'")
    p = cfg.parallel
    p.validate(world_size)
    for who, arch in (("student", student_arch), ("teacher", teacher_arch)):
        try:
            arch.validate_parallel(p.tp, p.pp, p.vpp)
        except ValueError as err:
            raise ValueError(f"parallel (tp={p.tp}, pp={p.pp}): the {who} cannot be cut: {err}") from None
    if cfg.data.prompts_per_step % p.dp(world_size):
        raise ValueError(f"data.prompts_per_step={cfg.data.prompts_per_step} is not divisible by the "
                         f"data-parallel size {p.dp(world_size)} (world {world_size} / tp*pp)")
    gib = gpu_memory if gpu_memory is not None else p.gpu_memory_gib
    gib = None if gib is None else gpu_memory_gib(gib, "--gpu-mem" if gpu_memory is not None
                                                   else "parallel.gpu_memory_gib")
    shape = _shape(cfg, student_arch, teacher_arch, world_size, device)
    stages = tuple(_stage_plan(cfg, shape, student_arch, teacher_arch, s, device) for s in range(p.pp))
    layout = dict(tp=p.tp, pp=p.pp, dp=shape.dp, vpp=p.vpp, sequence_parallel=p.sequence_parallel,
                  dtype="bf16" if shape.act_bytes == 2 else "fp32", placement="shared",
                  seq=shape.seq, rows_per_dp_rank=shape.rows, microbatches_per_update=shape.microbatches,
                  kept_per_microbatch=shape.kept, fused_attention=shape.fused_attention)
    notes = ["teacher placement: shared (the teacher on the student's ranks and grid, as the "
             "trainer builds it)",
             "rollouts: every rollout of a DP rank is decoded at once (the trainer's "
             "max_batch_tokens = 0); responses are planned at rollout.max_new_tokens"]
    if p.vpp:
        notes.append("parallel.vpp: the interleaved schedule keeps more micro-batches in flight "
                     "than planned here (planned as plain 1F1B)")
    if cfg.model.fp8 or cfg.model.teacher_fp8:
        notes.append("FP8: planned at the bf16 sizes (FP8 weight copies and amax history not counted)")
    return MemoryPlan(device, world_size, layout, stages, gib, tuple(notes))


# ------------------------------------------------------------------ text
def _ranks_text(ranks: tuple[int, ...]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def format_stage(stage: StagePlan, gib: Optional[float]) -> list[str]:
    lines = [f"stage {stage.stage} (ranks {_ranks_text(stage.ranks)})",
             f"  {'term':<30} {'phase':<9} {'MiB':>11}  cut by"]
    for t in stage.terms:
        lines.append(f"  {t.name:<30} {t.phase:<9} {t.mib:>11,.1f}  {t.cut}")
    verdict = ""
    if gib is not None:
        verdict = (f" of {gib:g} GiB: " + ("fits" if stage.total_mib <= gib * 1024 else
                                           f"EXCEEDS by {stage.total_mib / 1024 - gib:,.1f} GiB"))
    lines.append(f"  total = resident + {stage.peak_phase} + margin = {stage.total_mib:,.1f} MiB "
                 f"({stage.total_mib / 1024:,.2f} GiB){verdict}")
    d = stage.dominant
    lines.append(f"  dominant: {d.name} ({d.mib:,.1f} MiB); cut by: {d.cut}")
    return lines


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table per stage (what `tip-megatron plan` and preflight print)."""
    lay = plan.layout
    head = (f"memory plan per rank ({plan.device}, {lay['dtype']}; world {plan.world_size} = "
            f"tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']}; sequence {lay['seq']}, "
            f"{lay['rows_per_dp_rank']} rollouts per DP rank, {lay['kept_per_microbatch']} kept "
            "tokens per micro-batch)")
    lines = [head]
    for stage in plan.stages:
        lines += format_stage(stage, plan.gpu_memory_gib)
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
