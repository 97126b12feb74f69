"""Benchmark: memory and time of one student training step per TIP rule and loss path (issue 4).

Shapes: hidden [s, b, h] (megatron layout) -> [N, h] with N = b*s; logits [N, V]; k = kept
tokens; teacher hidden [s, b, h_t] and teacher output weight [V, h_t] (precomputed inputs).

    python tools/bench_selection_memory.py --quick                  # V 16,384, 2 x 256, ~1 min
    python tools/bench_selection_memory.py --json runs/sel.json     # V 151,936, 4 x 2048

One process (TP = PP = DP = 1), a small student from `build_model`, megatron DDP + AdamW,
one micro-batch; a step = zero grads, megatron's schedule (fwd + bwd through the model, the
loss at the output layer via `output_processor`), optimizer step. The teacher pass is not
measured: its hidden states are a precomputed tensor, its output weight a random matrix.
Modes (only the output processor differs):
  unfused    the engine, LossConfig(impl='unfused'): chunked no-grad scoring, selection,
             output layer + vocab-parallel KL by autograd on the kept rows only
  fused      the engine, LossConfig(impl='fused'): same, with the chunked fused linear + KL
  reference  the paper's reference way: student [N, V] logits with grad and teacher [N, V]
             logits for every token, signals and selection AFTER the LM head, fp32
             log_softmax KL by autograd on the kept rows (`--reference-rows all`: every row,
             masked afterwards); loss = sum / kept
Rows: `all` at rho 1.0; entropy_sample, soft_or, q3 at each rho < 1 (at 1.0 = `all`).
Memory: torch.profiler(profile_memory=True) records each allocation and free; replaying them
gives the live tensor bytes over time (the CPU analogue of cuda.max_memory_allocated above
the window's start; peak RSS is useless: glibc keeps freed memory resident).
  step_peak_mib       the whole step, above what existed before it (weights, grad buffer,
                      Adam state, inputs); frees of blocks older than the profiler are
                      invisible to it and not subtracted (checked negligible)
  loss_path_peak_mib  from the output processor's entry to the completed gradient of its
                      input hidden states (a tensor hook marks it): scoring, selection, loss
                      fwd + bwd incl. the output weight's gradient
Time: step_ms_median over unprofiled steps, rows interleaved round-robin (A B C A B C) so
load on a shared machine hits every row alike. Details: docs/selection_memory.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform as pyplatform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_megatron.distill.loss import make_loss_func  # noqa: E402
from tip_megatron.distill.spec import (  # noqa: E402
    DistillSpec, LossConfig, LossPathOutput, MicrobatchContext,
)
from tip_megatron.distill.processor import make_output_processor  # noqa: E402
from tip_megatron.ops import vocab_parallel_stats  # noqa: E402
from tip_megatron.tip import (  # noqa: E402
    SelectionConfig, TokenSignals, quadrant_labels, select, selection_metric_sums,
)

MODES = ("unfused", "fused", "reference")
RULES = ("all", "entropy_sample", "soft_or", "q3")
RHOS = (1.0, 0.5, 0.2, 0.1)
_START, _END = "bench::loss_path_start", "bench::loss_path_end"


@dataclass(frozen=True)
class BenchConfig:
    """Model and batch of the benchmark (one micro-batch of `rollouts` sequences)."""

    vocab: int
    hidden: int
    teacher_hidden: int
    layers: int
    heads: int
    ffn: int
    rollouts: int
    response: int
    prompt: int
    chunk: int
    """LossConfig.chunk_size: tokens per chunk of the fused loss."""
    score_chunks: tuple[int, ...]
    """LossConfig.score_chunk_size values: the engine rows run once per value."""
    iters: int
    warmup: int
    reference_rows: str
    seed: int = 0

    @property
    def seq(self) -> int:
        return self.prompt + self.response


@dataclass(frozen=True)
class Row:
    mode: str
    rule: str
    rho: float
    score_chunk: Optional[int] = None
    """The engine modes' scoring chunk; None for the reference (it scores from its logits)."""


# ------------------------------------------------------------------ reference loss path
def _flat(hidden: torch.Tensor) -> torch.Tensor:
    """[s, b, h] -> [b*s, h], batch-major like the [b, s] masks."""
    return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])


def _signals_from_logits(student, teacher, ctx: MicrobatchContext,
                         spec: DistillSpec) -> TokenSignals:
    """TIP signals of every row from the full logits that already exist (no grad)."""
    stats = vocab_parallel_stats(student.detach(), teacher, tp_group=spec.tp_group,
                                 vocab_size=spec.vocab_size)
    target = ctx.target_mask.reshape(-1)
    keep = lambda x: torch.where(target, x.float().clamp_min(0.0), 0.0)  # noqa: E731
    rollout = ctx.rollout_ids.repeat_interleave(ctx.target_mask.shape[1])
    return TokenSignals(entropy_norm=keep(stats.student_entropy_norm).clamp_max(1.0),
                        reverse_kl=keep(stats.reverse_kl), forward_kl=keep(stats.forward_kl),
                        response_mask=target, rollout_ids=rollout)


def _torch_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows] KL(P_S || P_T) the plain-torch way: fp32 log_softmax, autograd keeps
    log p_s, p_s and (log p_s - log p_t), three [rows, V] fp32 tensors, for backward."""
    log_p = student[:, :vocab].float().log_softmax(-1)
    with torch.no_grad():
        log_q = teacher[:, :vocab].float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def make_reference_processor(spec: DistillSpec, rows: str) -> Callable:
    """The paper's reference loss path as a GPTModel `output_processor` (TP=1 only)."""

    def processor(*, hidden_states, output_layer, output_weight, context, **_: Any):
        ctx: MicrobatchContext = context
        weight = output_weight if output_weight is not None else output_layer.weight
        student = _flat(hidden_states) @ weight.t()  # [N, V]: every token, with grad
        with torch.no_grad():
            teacher = _flat(ctx.teacher_hidden) @ ctx.teacher_weight.t()
        signals = _signals_from_logits(student, teacher, ctx, spec)
        kept = select(spec.selection, signals, step=spec.step)
        sums = selection_metric_sums(signals, kept,
                                     quadrant_labels(signals, spec.selection.quadrant_rule))
        if rows == "all":  # KL of every row, masked afterwards
            loss_sum = (_torch_reverse_kl(student, teacher, spec.vocab_size) * kept).sum()
        else:
            idx = kept.nonzero().squeeze(1)
            loss_sum = _torch_reverse_kl(student.index_select(0, idx), teacher.index_select(0, idx),
                                         spec.vocab_size).sum()
        return LossPathOutput(loss_sum, signals, kept, sums)

    return processor


# ------------------------------------------------------------------ model, inputs, step
def _mark(name: str) -> None:
    with torch.profiler.record_function(name):
        pass


def _marked(processor: Callable) -> Callable:
    """Mark the loss-path window: processor entry .. gradient of its input hidden states."""

    def wrapped(*, hidden_states, **kwargs: Any):
        _mark(_START)
        if hidden_states.requires_grad:
            hidden_states.register_hook(lambda grad: _mark(_END))
        return processor(hidden_states=hidden_states, **kwargs)

    return wrapped


def _forward_step(processor: Callable, data_iterator, model):
    mb, ctx = next(data_iterator)
    out = model(mb.input_ids, mb.position_ids, None, output_processor=processor,
                output_processor_context=ctx)
    return out, make_loss_func([])  # the kept count is read from megatron's report


class Bench:
    """The student (DDP + AdamW), one micro-batch and the teacher's inputs, built once."""

    def __init__(self, cfg: BenchConfig) -> None:
        from tip_megatron.runtime import parallel
        from tip_megatron.models import build_model
        from tip_megatron.models.arch import ModelArch
        from tip_megatron.models.build import BuildOptions
        from tip_megatron.train.optimizer import OptimConfig, build_optimizer, wrap_ddp

        self.cfg = cfg
        self.groups = parallel.initialize(parallel.ParallelLayout(), seed=cfg.seed)
        arch = ModelArch(family="qwen3", vocab_size=cfg.vocab, hidden_size=cfg.hidden,
                         num_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_kv_heads=max(1, cfg.heads // 2), ffn_hidden_size=cfg.ffn,
                         head_dim=cfg.hidden // cfg.heads, max_position_embeddings=cfg.seq,
                         qk_norm=True)
        self.padded_vocab = arch.padded_vocab_size(1)
        chunks = build_model(arch, self.groups, BuildOptions(spec="local", seq_length=cfg.seq))
        self.num_params = sum(p.numel() for c in chunks for p in c.parameters())
        self.ddp = wrap_ddp(chunks, self.groups, OptimConfig())
        self.optimizer, _ = build_optimizer(self.ddp, self.groups, OptimConfig(), total_steps=10**6)
        self.microbatch, self.teacher_hidden, self.teacher_weight = self._inputs()
        self.step_index = 0

    def _inputs(self):
        from tip_megatron.distill.step import Microbatch

        cfg, gen = self.cfg, torch.Generator().manual_seed(self.cfg.seed + 1)
        b, s = cfg.rollouts, cfg.seq
        target = torch.zeros(b, s, dtype=torch.bool)
        target[:, cfg.prompt - 1: s - 1] = True  # position t predicts token t+1 of the response
        mb = Microbatch(input_ids=torch.randint(0, cfg.vocab, (b, s), generator=gen),
                        position_ids=torch.arange(s).expand(b, s).contiguous(),
                        target_mask=target, rollout_ids=torch.arange(b, dtype=torch.int64))
        teacher_hidden = torch.randn(s, b, cfg.teacher_hidden, generator=gen)
        # Teacher-like: logits of std ~4, so the teacher is far sharper than the fresh student.
        teacher_weight = torch.randn(self.padded_vocab, cfg.teacher_hidden, generator=gen)
        teacher_weight *= 4.0 / cfg.teacher_hidden ** 0.5
        return mb, teacher_hidden, teacher_weight

    def processor(self, row: Row) -> tuple[Callable, MicrobatchContext]:
        cfg = self.cfg
        impl = "fused" if row.mode == "fused" else "unfused"
        spec = DistillSpec(SelectionConfig(rule=row.rule, rho=row.rho, seed=cfg.seed, scope="rollout"),
                           LossConfig(impl=impl, chunk_size=cfg.chunk,
                                      score_chunk_size=row.score_chunk or cfg.score_chunks[0]),
                           cfg.vocab,
                           self.groups.tp_group, step=self.step_index)
        ctx = MicrobatchContext(teacher_hidden=self.teacher_hidden,
                                teacher_weight=self.teacher_weight,
                                target_mask=self.microbatch.target_mask,
                                rollout_ids=self.microbatch.rollout_ids)
        if row.mode == "reference":
            return _marked(make_reference_processor(spec, cfg.reference_rows)), ctx
        return _marked(make_output_processor(spec)), ctx

    def step(self, row: Row) -> int:
        """One training step for `row`; returns the number of kept tokens."""
        from tip_megatron.runtime import pipeline

        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        processor, ctx = self.processor(row)
        (report,) = pipeline.forward_backward(
            partial(_forward_step, processor), self.ddp, [(self.microbatch, ctx)], self.groups,
            seq_length=self.cfg.seq, micro_batch_size=self.cfg.rollouts)
        self.optimizer.step()
        self.step_index += 1
        return int(report["distill"][1])  # [loss_sum, num_kept]


# ------------------------------------------------------------------ memory
def _profiled(step: Callable[[], int]) -> tuple[int, list[dict]]:
    """Run `step` under torch.profiler(profile_memory=True); its result and trace events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return result, json.loads(trace.read_text())["traceEvents"]


def _peak_bytes(memory: list[dict]) -> int:
    """Peak of the running sum of allocations (+) and frees (-), relative to the start."""
    current = peak = 0
    for event in memory:
        current += event["args"]["Bytes"]
        peak = max(peak, current)
    return peak


def window_peaks_mib(events: list[dict]) -> tuple[float, float]:
    """(step peak, loss-path peak) in MiB from a trace; the loss path is the largest of
    its windows (one per micro-batch)."""
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    starts = sorted(e["ts"] for e in events if e.get("name") == _START)
    ends = sorted(e["ts"] for e in events if e.get("name") == _END)
    if not starts or len(starts) != len(ends):
        raise RuntimeError(f"loss-path markers: {len(starts)} starts, {len(ends)} ends")
    loss = max(_peak_bytes([m for m in memory if s <= m["ts"] <= e]) for s, e in zip(starts, ends))
    return _peak_bytes(memory) / 2**20, loss / 2**20


def estimated_gib(cfg: BenchConfig, row: Row) -> float:
    """Rough peak of a row (fp32 [rows, V] tensors + resident); only to skip rows that
    cannot fit in the free memory."""
    n = cfg.rollouts * cfg.seq
    kept = max(1, int(row.rho * cfg.rollouts * cfg.response))
    per_row = cfg.vocab * 4
    if row.mode == "reference":
        kl_rows = n if cfg.reference_rows == "all" else kept
        big = (2 * n + 7 * kl_rows) * per_row  # measured: ~2 [N, V] + ~7 [k, V] fp32
    elif row.mode == "unfused":
        big = max(2 * (row.score_chunk or cfg.chunk), 3 * kept) * per_row
    else:
        big = max(2 * (row.score_chunk or cfg.chunk), 3 * min(cfg.chunk, n)) * per_row
    resident = cfg.vocab * (2 * cfg.hidden * 16 + cfg.teacher_hidden * 4)
    return (big + resident) / 2**30


# ------------------------------------------------------------------ driver
def bench_rows(modes=MODES, rules=RULES, rhos=RHOS, score_chunks=(None,)) -> list[Row]:
    """`all` at rho 1.0; every other rule at each rho < 1 (at 1.0 it equals `all`); the
    engine modes once per scoring chunk."""
    rows = []
    for mode in modes:
        for sc in (score_chunks if mode != "reference" else (None,)):
            rows += [Row(mode, "all", 1.0, sc)] if "all" in rules and 1.0 in rhos else []
            rows += [Row(mode, r, rho, sc) for r in rules if r != "all" for rho in rhos if rho < 1.0]
    return rows


def _result(row: Row, note: str = "") -> dict[str, Any]:
    return {"mode": row.mode, "rule": row.rule, "rho": row.rho, "score_chunk": row.score_chunk,
            "kept_tokens": None,
            "loss_path_peak_mib": None, "step_peak_mib": None, "step_ms_median": None,
            "note": note}


def run(cfg: BenchConfig, rows: list[Row], log: Callable[[str], None] = print) -> list[dict]:
    """Warm up, time all runnable rows round-robin, then profile each row's memory."""
    import psutil

    bench, results, runnable = Bench(cfg), {}, []
    free = psutil.virtual_memory().available / 2**30
    for row in rows:
        need = estimated_gib(cfg, row)
        fits = need <= 0.8 * free
        note = "" if fits else f"skipped: needs ~{need:.1f} GiB, {free:.1f} GiB free"
        results[row] = _result(row, note)
        runnable += [row] if fits else []
    log(f"student: {bench.num_params / 1e6:.1f} M params; {len(runnable)}/{len(rows)} rows fit")
    if runnable:  # creates the Adam state before anything is timed or profiled
        bench.step(runnable[0])
    times = {row: [] for row in runnable}
    for i in range(cfg.warmup + cfg.iters):
        for row in runnable:
            start = time.perf_counter()
            bench.step(row)
            if i >= cfg.warmup:
                times[row].append((time.perf_counter() - start) * 1e3)
        log(f"  {'warm-up' if i < cfg.warmup else 'timed'} round {i + 1} done")
    for row in runnable:
        kept, events = _profiled(partial(bench.step, row))
        step_mib, loss_mib = window_peaks_mib(events)
        ms = statistics.median(times[row]) if times[row] else None
        results[row].update(kept_tokens=kept, loss_path_peak_mib=round(loss_mib, 1),
                            step_peak_mib=round(step_mib, 1),
                            step_ms_median=None if ms is None else round(ms, 1))
        log(format_table([results[row]], header=False))
    return [results[row] for row in rows]


def format_table(rows: list[dict], header: bool = True) -> str:
    head = (f"{'mode':<10}{'rule':<16}{'rho':>5}{'score_c':>8}{'kept':>8}{'loss_path_MiB':>15}"
            f"{'step_MiB':>10}{'step_ms':>10}  note")
    lines = [head, "-" * len(head)] if header else []
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"{r['mode']:<10}{r['rule']:<16}{r['rho']:>5.2f}"
                     f"{fmt(r.get('score_chunk'), 'd'):>8}{fmt(r['kept_tokens'], 'd'):>8}"
                     f"{fmt(r['loss_path_peak_mib'], '.1f'):>15}"
                     f"{fmt(r['step_peak_mib'], '.1f'):>10}{fmt(r['step_ms_median'], '.0f'):>10}"
                     f"  {r['note']}")
    return "\n".join(lines)


# ------------------------------------------------------------------ targets (issue 4)
def _get(rows: list[dict], mode: str, rule: str, rho: float) -> Optional[dict]:
    for r in rows:
        if (r["mode"], r["rule"], r["rho"]) == (mode, rule, rho) and r["step_peak_mib"] is not None:
            return r
    return None


def _target(text: str, ratios: dict[str, float], limit: float, higher_ok: bool = False) -> str:
    """'MET|MISSED|n/a  text: worst ... (limit)' over the measured ratios, each listed."""
    if not ratios:
        return f"n/a    {text}: not measured"
    worst = (min if higher_ok else max)(ratios, key=ratios.get)
    ok = ratios[worst] >= limit if higher_ok else ratios[worst] <= limit
    listed = ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
    return (f"{'MET   ' if ok else 'MISSED'} {text} ({'>=' if higher_ok else '<='} {limit}): "
            f"worst {worst} {ratios[worst]:.3f} [{listed}]")


def fused_budget_mib(cfg: BenchConfig, kept: int, score_chunk: int) -> float:
    """Analytic budget of the fused loss path: one chunk's transient, the larger of the
    scoring chunk (student + teacher logits, [c_s, V] each) and the fused chunk (at most four
    [min(c, k), V] fp32 buffers: both logit chunks, the logit gradient, KL workspace), plus
    the output weight's fp32 gradient ([V, h], accumulator + scaled copy) and the [k, h]
    hidden gradient (x2). An upper bound, independent of how the op splits its buffers."""
    chunk = 4 * cfg.vocab * max(2 * score_chunk, 4 * min(cfg.chunk, kept))
    return (chunk + 8 * cfg.vocab * cfg.hidden + 8 * kept * cfg.hidden) / 2**20


def _label(r: dict) -> str:
    return f"{r['rule']}@{r['rho']}"


def check_targets(rows: list[dict], cfg: BenchConfig, score_chunk: Optional[int] = None) -> list[str]:
    """One line per target of issue 4 with every ratio it covers; never adjusts a number.
    Engine rows at `score_chunk` (default: the first one run) against the reference rows."""
    lp, sp = "loss_path_peak_mib", "step_peak_mib"
    score_chunk = score_chunk or cfg.score_chunks[0]
    rows = [r for r in rows if r["mode"] == "reference" or r.get("score_chunk") == score_chunk]
    got = [r for r in rows if r[sp] is not None]
    by_mode = {m: [r for r in got if r["mode"] == m] for m in MODES}
    ref = lambda r: _get(rows, "reference", r["rule"], r["rho"])  # noqa: E731
    out = []
    base = _get(rows, "unfused", "all", 1.0)
    for rho, limit in ((0.5, 0.55), (0.1, 0.15)):
        ratios = {_label(r): r[lp] / base[lp]
                  for r in by_mode["unfused"] if base and r["rho"] == rho}
        out.append(_target(f"unfused loss path at rho={rho} / at rho=1.0", ratios, limit))
    out.append(_target("fused loss path / analytic chunk+[V,h]+[k,h] budget (fused_budget_mib)",
                       {_label(r): r[lp] / fused_budget_mib(cfg, r["kept_tokens"], score_chunk)
                        for r in by_mode["fused"]}, 1.0))
    flat = [r[lp] for r in by_mode["fused"] if r["kept_tokens"] >= cfg.chunk]
    out.append(_target(f"fused loss path max/min over rows with kept >= chunk {cfg.chunk}",
                       {"spread": max(flat) / min(flat)} if flat else {}, 1.10))
    out.append(_target("fused loss path / reference loss path, rho >= 0.5",
                       {_label(r): r[lp] / ref(r)[lp] for r in by_mode["fused"]
                        if r["rho"] >= 0.5 and ref(r)}, 0.25))
    fused, reference = _get(rows, "fused", "all", 1.0), _get(rows, "reference", "all", 1.0)
    out.append(_target("step peak: fused rho=1.0 saving vs reference rho=1.0",
                       {"saving": 1 - fused[sp] / reference[sp]} if fused and reference else {},
                       0.47, higher_ok=True))
    for mode in ("unfused", "fused"):
        out.append(_target(f"step peak: {mode} / reference at the same rule and rho",
                           {_label(r): r[sp] / ref(r)[sp] for r in by_mode[mode] if ref(r)}, 1.0))
    return out + [_time_line(rows, mode) for mode in MODES]


def _time_line(rows: list[dict], mode: str) -> str:
    """Step time at rho=0.1 (mean over rules) vs rho=1.0: selection should save LM-head work."""
    full = _get(rows, mode, "all", 1.0)
    low = [r["step_ms_median"] for r in rows if r["mode"] == mode and r["rho"] == 0.1
           and r["step_ms_median"] is not None]
    if full is None or full["step_ms_median"] is None or not low:
        return f"n/a    step time {mode}: not measured"
    ratio = statistics.mean(low) / full["step_ms_median"]
    text = (f"step time {mode}: rho=0.1 / rho=1.0 = {ratio:.2f} "
            f"({statistics.mean(low):.0f} vs {full['step_ms_median']:.0f} ms)")
    if mode == "reference":  # full logits for every token at any rho: shown, not a target
        return f"info   {text}"
    return f"{'MET   ' if ratio < 1.0 else 'MISSED'} {text} (< 1)"


def source_digest() -> str:
    """sha256 (12 hex) of the loss-path sources as this process imported them: the ops,
    the distillation loss and the selection rules may change between runs."""
    root = Path(__file__).resolve().parents[1] / "tip_megatron"
    digest = hashlib.sha256()
    for path in sorted(p for d in ("ops", "distill", "tip") for p in (root / d).glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


_SOURCE_DIGEST = source_digest()


def machine(threads: int) -> str:
    return (f"{pyplatform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{threads} intra-op thread(s), fp32, {datetime.date.today().isoformat()}, "
            f"loss-path sources sha256 {_SOURCE_DIGEST}")


def describe(cfg: BenchConfig) -> list[str]:
    """What the table's columns are, printed above it and stored in the JSON."""
    return [
        f"machine: {machine(torch.get_num_threads())}",
        f"tokens: {cfg.rollouts} x ({cfg.prompt} prompt + {cfg.response} response) in one "
        f"micro-batch; V {cfg.vocab}, student h {cfg.hidden} x {cfg.layers} layers, teacher h "
        f"{cfg.teacher_hidden}, chunk_size {cfg.chunk}, score_chunk_size (score_c) "
        f"{' / '.join(map(str, cfg.score_chunks))}",
        "loss_path_MiB: peak live tensor bytes from the output processor's entry to the gradient "
        "of its input hidden states (torch.profiler profile_memory; relative to the window start)",
        "step_MiB: peak live tensor bytes over one whole step (zero grads, fwd+bwd, AdamW) above "
        "what was allocated before it (weights, grad buffer, Adam state, inputs)",
        f"step_ms: median of {cfg.iters} unprofiled step(s) per row after one untimed step and "
        f"{cfg.warmup} warm-up round(s), rows round-robin",
    ]


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    def pick(value: Optional[int], quick: int, full: int) -> int:
        return value if value is not None else (quick if args.quick else full)

    return BenchConfig(
        vocab=pick(args.vocab, 16384, 151936), hidden=pick(args.hidden, 128, 256),
        teacher_hidden=pick(args.teacher_hidden, 256, 512), layers=args.layers, heads=args.heads,
        ffn=pick(args.ffn, 384, 768), rollouts=pick(args.rollouts, 2, 4),
        response=pick(args.response, 256, 2048), prompt=pick(args.prompt, 16, 64),
        chunk=pick(args.chunk, 128, LossConfig().chunk_size),
        score_chunks=tuple(args.score_chunk or [LossConfig().score_chunk_size]),
        iters=pick(args.iters, 3, 2),
        warmup=pick(args.warmup, 1, 0), reference_rows=args.reference_rows)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="V 16,384, h 128, 2 x 256 response tokens, chunk 128 (about a minute)")
    for name in ("vocab", "hidden", "teacher-hidden", "ffn", "rollouts", "response", "prompt",
                 "chunk", "iters", "warmup"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--score-chunk", type=int, nargs="+", default=None,
                   help="loss.score_chunk_size value(s); engine rows run once per value "
                        f"(default {LossConfig().score_chunk_size}); targets use the first")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--rhos", nargs="+", type=float, default=list(RHOS))
    p.add_argument("--reference-rows", choices=("kept", "all"), default="kept",
                   help="reference KL on the kept rows only (default) or on every row, masked")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The profiler replay counts CPU allocator events: this benchmark runs on the CPU.
    os.environ["TIP_MEGATRON_DEVICE"] = "cpu"
    from tip_megatron.runtime.device import quiet_third_party_warnings

    quiet_third_party_warnings()
    cfg = config_from_args(args)
    print(f"config: {json.dumps(asdict(cfg))}", flush=True)
    rows = run(cfg, bench_rows(args.modes, args.rules, args.rhos, cfg.score_chunks),
               log=lambda line: print(line, flush=True))
    notes = describe(cfg)
    targets = []
    for sc in cfg.score_chunks:
        targets += [f"targets (issues 4 and 14) at score_chunk_size={sc}:"] + check_targets(rows, cfg, sc)
    print("\n" + "\n".join(notes) + "\n\n" + format_table(rows) + "\n\n" + "\n".join(targets))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(torch.get_num_threads()),
                                         "config": asdict(cfg), "notes": notes, "rows": rows,
                                         "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
