"""Benchmark of the vocab-parallel reverse KL against the alternatives (issue 3).

Shapes: [tokens, V/tp] logit shards; [tokens, h] hidden states; [V/tp, h] weight shards.

    python tools/bench_vocab_parallel.py --quick                  # small vocab, < 1 min
    python tools/bench_vocab_parallel.py --json runs/bench.json   # tokens 512/2048/4096, V 151,936

Rows (fwd + bwd of one loss, TP ranks forked on this machine over gloo):
  ours_kl             vocab_parallel_reverse_kl on given logit shards
  ours_unfused_linear student output layer + vocab_parallel_reverse_kl by autograd
  ours_fused_linear   fused_linear_divergence (no [tokens, V/tp] tensor survives a chunk)
  ours_fused_mix_linear  the same with `loss.mix` (ops.mixed): reverse KL + forward KL on
                      every other token + JSD everywhere (all three parts: the costliest mix)
  naive_allgather_kl  all-gather both vocabularies, then torch log_softmax / KL
  megatron_ce         megatron-core vocab_parallel_cross_entropy alone (one pass; floor)
The logit rows (ours_kl, naive, megatron_ce) start from logit shards; the *_linear rows
start from hidden states and weight shards and include the output-layer matmuls.

Timing: per token count, all rows run in one process group, round-robin (A B C A B C...),
so load from other work on a shared machine hits every row alike; median per row, max over
ranks. Peak memory, after the timings, row by row, over one more fwd + bwd step: the
maximum of live tensor bytes allocated during the step (torch.profiler with
profile_memory=True; inputs excluded; the CPU analogue of torch.cuda.max_memory_allocated
above the baseline); max over ranks. Peak RSS was tried and rejected: glibc keeps freed
tensors resident and hands them out again, so a step's RSS peak depends on what ran
before it. Each token count runs in freshly forked ranks. Rows whose estimated footprint
exceeds the free memory are skipped and marked so.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_megatron.ops import (  # noqa: E402
    fused_linear_divergence,
    unfused_linear_divergence,
    vocab_parallel_reverse_kl,
)
from tip_megatron.ops.fused_linear_kl import DEFAULT_FUSED_CHUNK  # noqa: E402
from tip_megatron.ops.mixed import MixedDivergence  # noqa: E402
from tip_megatron.testing.distributed import run_distributed  # noqa: E402

IMPLS = ("ours_kl", "ours_unfused_linear", "ours_fused_linear", "ours_fused_mix_linear",
         "naive_allgather_kl", "megatron_ce")
#: Rough resident bytes per rank, in units of one fp32 [tokens, V/tp] shard (inputs
#: included); the fused row is sized separately. Only used to skip rows that cannot fit.
_FOOTPRINT_SHARDS = {"ours_kl": 4.5, "ours_unfused_linear": 5.5, "naive_allgather_kl": 18.0,
                     "megatron_ce": 4.5}


@dataclass(frozen=True)
class Case:
    impl: str
    tp: int
    tokens: int
    vocab: int
    hidden: int
    iters: int
    warmup: int
    fused_chunk: int

    @property
    def width(self) -> int:
        return -(-self.vocab // self.tp)  # padded shard width


# ----------------------------------------------------------------------------------------
# Per-rank work
# ----------------------------------------------------------------------------------------
def _peak_allocated_mib(step: Callable[[], None]) -> float:
    """Peak MiB of tensors allocated during `step` and alive at once (inputs excluded).

    From the allocation and free events of torch's profiler (profile_memory=True): the
    CPU analogue of torch.cuda.max_memory_allocated() above the baseline. Unlike peak RSS
    it does not depend on how glibc caches freed memory.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    # Replay allocations and frees of blocks allocated during the step; frees of older
    # blocks (inputs, earlier steps) are ignored, so the inputs are excluded.
    live, current, peak = set(), 0, 0
    for event in memory:
        nbytes, addr = event["args"]["Bytes"], event["args"]["Addr"]
        if nbytes > 0:
            live.add(addr)
        elif addr not in live:
            continue
        else:
            live.discard(addr)
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def _logit_inputs(case: Case, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    shape = (case.tokens, case.width)
    return {"student": (torch.randn(shape, generator=g) * 2).requires_grad_(),
            "teacher": torch.randn(shape, generator=g) * 2,
            "target": torch.randint(0, case.vocab, (case.tokens,), generator=g)}


def _linear_inputs(case: Case, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)  # hidden states are TP-replicated: same on all ranks
    hidden = torch.randn(case.tokens, case.hidden, generator=g).requires_grad_()
    teacher_hidden = torch.randn(case.tokens, case.hidden, generator=g)
    g.manual_seed(2000 + rank)
    scale = 2.0 / case.hidden**0.5
    return {"hidden": hidden, "teacher_hidden": teacher_hidden,
            "weight": (torch.randn(case.width, case.hidden, generator=g) * scale).requires_grad_(),
            "teacher_weight": torch.randn(case.width, case.hidden, generator=g) * scale}


class _GatherVocab(torch.autograd.Function):
    """All-gather along the vocab; backward keeps this rank's slice (naive baseline)."""

    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor, group: Any) -> torch.Tensor:
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), shard.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[:, ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width].contiguous(), None


def _step_fn(case: Case, x: dict[str, torch.Tensor], group: Any) -> Callable[[], None]:
    """A closure running one forward + backward of the row's loss."""
    kw = {"tp_group": group, "vocab_size": case.vocab}
    params = [x[k] for k in ("student", "hidden", "weight") if k in x]

    def run(loss: torch.Tensor) -> None:
        loss.backward()
        for p in params:
            p.grad = None

    if case.impl == "ours_kl":
        return lambda: run(vocab_parallel_reverse_kl(x["student"], x["teacher"], **kw).sum())
    if case.impl in ("ours_unfused_linear", "ours_fused_linear", "ours_fused_mix_linear"):
        args = (x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"])
        if case.impl == "ours_fused_linear":
            return lambda: run(fused_linear_divergence(*args, chunk_size=case.fused_chunk, **kw)[0])
        if case.impl == "ours_fused_mix_linear":
            coefs = torch.tensor([[1.0, float(i % 2), 0.5] for i in range(case.tokens)])
            mix = MixedDivergence(coefs, beta=0.5, use_jsd=True)
            return lambda: run(fused_linear_divergence(*args, chunk_size=case.fused_chunk,
                                                       divergence=mix, **kw)[0])
        return lambda: run(unfused_linear_divergence(*args, **kw)[0])
    if case.impl == "naive_allgather_kl":
        def naive() -> None:
            student = _GatherVocab.apply(x["student"], group)[:, : case.vocab]
            with torch.no_grad():
                teacher = _GatherVocab.apply(x["teacher"], group)[:, : case.vocab]
            ls, lt = student.log_softmax(-1), teacher.log_softmax(-1)
            run((ls.exp() * (ls - lt)).sum())
        return naive
    if case.impl == "megatron_ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # Megatron overwrites fp32 logits in place: it gets a clone (part of its cost).
        return lambda: run(
            vocab_parallel_cross_entropy(x["student"].clone(), x["target"], tp_group=group).sum())
    raise ValueError(f"impl={case.impl!r}: accepted values are {IMPLS}")


def _setup(case: Case) -> Any:
    """The TP group (= the world of this benchmark). megatron's CE gets the group
    explicitly, so its global parallel state is not needed, only the CPU redirects."""

    from tip_megatron.runtime.megatron_compat import apply_cpu_compat  # the benchmark alone needs it
    apply_cpu_compat()
    dist.init_process_group("gloo")
    return dist.group.WORLD


def _inputs_for(case: Case, cache: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Logit rows share one set of logit inputs, linear rows one set of hidden/weights."""
    kind = "linear" if case.impl.endswith("_linear") else "logits"
    if kind not in cache:
        make = _linear_inputs if kind == "linear" else _logit_inputs
        cache[kind] = make(case, dist.get_rank())
    return cache[kind]


def _time_rows(steps: dict[str, Callable[[], None]], case: Case, group: Any) -> dict[str, list[float]]:
    """Round-robin timing (A B C A B C ...): load drift on a shared machine hits every row
    alike instead of whichever row ran during a busy minute."""
    for step in steps.values():
        for _ in range(case.warmup):
            step()
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(case.iters):
        for impl, step in steps.items():
            dist.barrier(group=group)
            start = time.perf_counter()
            step()
            times[impl].append((time.perf_counter() - start) * 1e3)
    return times


def _peak_mib(step: Callable[[], None], group: Any) -> float:
    gc.collect()
    dist.barrier(group=group)
    return _peak_allocated_mib(step)


def _rank_bench(cases: list[Case]) -> dict[str, Any]:
    """Time all rows of one token count together, then measure each row's memory."""
    group, cache = _setup(cases[0]), {}
    steps = {c.impl: _step_fn(c, _inputs_for(c, cache), group) for c in cases}
    times = _time_rows(steps, cases[0], group)
    peaks = {impl: _peak_mib(step, group) for impl, step in steps.items()}
    return {"times_ms": times, "peak_mib": peaks}


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------
def _estimated_gib(case: Case) -> float:
    shard = case.tokens * case.width * 4
    if case.impl in ("ours_fused_linear", "ours_fused_mix_linear"):
        chunk_temps = 3 * case.fused_chunk * case.width * 4  # logit + logit-grad chunk buffers
        chunk_temps += (5 * case.fused_chunk * case.width * 4 if "mix" in case.impl else 0)
        return (chunk_temps + 4 * case.width * case.hidden * 4) / 2**30
    return _FOOTPRINT_SHARDS[case.impl] * shard / 2**30


def _row(case: Case, note: str = "") -> dict[str, Any]:
    return {"impl": case.impl, "tp": case.tp, "tokens": case.tokens, "vocab": case.vocab,
            "fwd_bwd_ms_median": None, "peak_mib": None, "hidden": case.hidden, "note": note}


def run_token_count(cases: list[Case]) -> list[dict[str, Any]]:
    """Rows of one token count, in one fresh set of ranks: skip what cannot fit, time the
    rest together, then measure each row's memory."""
    import psutil

    rows, runnable = {}, []
    for case in cases:
        need, free = _estimated_gib(case) * case.tp, psutil.virtual_memory().available / 2**30
        fits = need <= 0.8 * free
        note = "" if fits else f"skipped: needs ~{need:.1f} GiB, {free:.1f} GiB free"
        rows[case.impl] = _row(case, note)
        if fits:
            runnable.append(case)
    if not runnable:
        return list(rows.values())
    per_rank = run_distributed(_rank_bench, world_size=cases[0].tp, args=(runnable,), timeout_s=3600)
    for case in runnable:
        row = rows[case.impl]
        medians = [statistics.median(r["times_ms"][case.impl]) for r in per_rank]
        row["fwd_bwd_ms_median"] = round(max(medians), 1)
        row["peak_mib"] = round(max(r["peak_mib"][case.impl] for r in per_rank), 1)
    return list(rows.values())


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'impl':<22}{'tp':>3}{'tokens':>8}{'vocab':>9}{'fwd_bwd_ms':>12}{'peak_MiB':>10}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = "-" if r["fwd_bwd_ms_median"] is None else f"{r['fwd_bwd_ms_median']:.1f}"
        mib = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['impl']:<22}{r['tp']:>3}{r['tokens']:>8}{r['vocab']:>9}"
                     f"{ms:>12}{mib:>10}  {r['note']}")
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, gloo, "
            f"fp32, 1 intra-op thread per rank")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="vocab 8192, tokens 256/512, hidden 64, fused chunk 128")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None, help="h of the *_linear rows")
    parser.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--fused-chunk", type=int, default=None,
                        help="chunk_size of ours_fused_linear (default 1024; --quick 128)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    tokens = args.tokens or ([256, 512] if args.quick else [512, 2048, 4096])
    vocab = args.vocab or (8192 if args.quick else 151936)
    hidden = args.hidden or (64 if args.quick else 256)
    iters = args.iters or (5 if args.quick else 3)
    fused_chunk = args.fused_chunk or (128 if args.quick else DEFAULT_FUSED_CHUNK)
    # Imported once here so that forked ranks inherit megatron instead of importing it each.
    from megatron.core import parallel_state, tensor_parallel  # noqa: F401

    rows = []
    for n in tokens:
        cases = [Case(impl, args.tp, n, vocab, hidden, iters, 1, fused_chunk) for impl in args.impl]
        new = run_token_count(cases)
        print("\n".join(format_table(new).splitlines()[2:]), flush=True)
        rows += new
    print(f"\nmachine: {machine()}")
    print(f"fwd_bwd_ms: median of {iters} steps per row, rows interleaved round-robin in one "
          "process group, max over ranks")
    print("peak_MiB: peak of live tensor bytes allocated during one fwd+bwd step (torch.profiler "
          "profile_memory; inputs excluded), max over ranks")
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
