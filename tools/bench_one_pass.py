"""Benchmark: the output layer's loss path with one logit pass per token (rule `all`,
`loss.one_pass=true`) next to the two-pass path (`false`: scoring, then the fused loss),
and a rule that selects (soft_or, unaffected by the key) as the control (issue 28).

    python tools/bench_one_pass.py                        # ~1 min on 2 CPU cores
    python tools/bench_one_pass.py --vocab 32000 --tokens 2048 --json runs/one_pass.json

One process, no model: random hidden states [tokens, h] (student) and [tokens, h_t]
(teacher) and output weights [V, h], [V, h_t]; the output processor megatron's GPTModel
calls (`distill.processor.make_output_processor`) forward + backward, as on the last
pipeline stage at TP 1. Rows are run round-robin (`--reps` rounds after one warm-up
round), so load on a shared machine hits every row alike; min and median per row. Each
row also reports the LM-head product rows of one step (`testing.lm_head`: logits,
hidden-gradient, weight-gradient rows; docs/tip.md "LM-head matmuls per step"). The load
average is printed before and after: on a shared machine the times are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from types import SimpleNamespace

import torch

from tip_megatron.distill.spec import DistillSpec, LossConfig, MicrobatchContext
from tip_megatron.distill.processor import make_output_processor
from tip_megatron.testing.lm_head import LMHeadCounter
from tip_megatron.tip import SelectionConfig

ROWS = {  # name -> (selection, loss.one_pass)
    "all, two passes": (SelectionConfig(rule="all"), False),
    "all, one pass": (SelectionConfig(rule="all"), True),
    "soft_or@0.5": (SelectionConfig(rule="soft_or", rho=0.5), True),
}


def _inputs(args):
    g = torch.Generator().manual_seed(0)
    seq = args.tokens // args.rows
    hidden = torch.randn(seq, args.rows, args.hidden, generator=g)
    teacher = torch.randn(seq, args.rows, args.teacher_hidden, generator=g)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).requires_grad_()
    t_weight = torch.randn(args.vocab, args.teacher_hidden, generator=g) / args.teacher_hidden ** 0.5
    mask = torch.zeros(args.rows, seq, dtype=torch.bool)
    mask[:, args.prompt:] = True
    ctx = MicrobatchContext(teacher, t_weight, mask, torch.arange(args.rows))
    return hidden, weight, ctx


def _step(args, hidden, weight, ctx, selection, one_pass):
    spec = DistillSpec(selection, replace(LossConfig(chunk_size=args.chunk), one_pass=one_pass),
                       args.vocab, None)
    h = hidden.detach().requires_grad_()
    weight.grad = None
    out = make_output_processor(spec)(hidden_states=h, output_layer=SimpleNamespace(weight=weight),
                                      output_weight=None, context=ctx)
    out.loss_sum.backward()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the micro-batch")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16, help="prompt positions per row (not in the loss)")
    p.add_argument("--chunk", type=int, default=1024, help="loss.chunk_size")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    load_before = os.getloadavg()
    hidden, weight, ctx = _inputs(args)
    width = (args.vocab,)
    counts, times = {}, {name: [] for name in ROWS}
    for name, (sel, flag) in ROWS.items():  # warm-up round, with the product rows counted
        with LMHeadCounter(width, (args.hidden, args.teacher_hidden)) as count:
            _step(args, hidden, weight, ctx, sel, flag)
        counts[name] = dict(count.rows)
    for _ in range(args.reps):
        for name, (sel, flag) in ROWS.items():
            start = time.perf_counter()
            _step(args, hidden, weight, ctx, sel, flag)
            times[name].append((time.perf_counter() - start) * 1e3)
    load_after = os.getloadavg()
    n = int(ctx.target_mask.sum())
    base = statistics.median(times["all, two passes"])
    print(f"V {args.vocab}, h {args.hidden} / teacher {args.teacher_hidden}, {n} response tokens, "
          f"{torch.get_num_threads()} threads; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    print(f"{'row':18s} {'min ms':>9s} {'median ms':>10s} {'vs two passes':>14s}  LM-head rows "
          "(logits, grad hidden, grad weight)")
    out = dict(vars(args), response_tokens=n, threads=torch.get_num_threads(),
               load_before=load_before, load_after=load_after, rows={})
    for name in ROWS:
        med = statistics.median(times[name])
        c = counts[name]
        print(f"{name:18s} {min(times[name]):9.1f} {med:10.1f} {med / base:14.2f}  "
              f"{c.get('logits', 0)}, {c.get('grad_hidden', 0)}, {c.get('grad_weight', 0)}")
        out["rows"][name] = dict(min_ms=min(times[name]), median_ms=med, ms=times[name],
                                 lm_head_rows=c, median_over_two_passes=med / base)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
