"""Benchmark: cost of the scoring pre-pass (selection over the global batch) next to the
training pass, and the part of it a student forward accounts for (issue 15).

    python tools/bench_prepass.py            # ~1-2 min on 2 CPU cores
    python tools/bench_prepass.py --vocab 32768 --hidden 512 --json runs/prepass.json

One process (TP = PP = DP = 1), random student and teacher from `build_model`, megatron's
schedule, rule q3 at rho 0.2 over the global batch (scope auto). Stages, timed separately,
repetitions interleaved round-robin (load on a shared machine hits every stage alike),
medians reported:
  teacher    teacher forward-only pass (final hidden states kept)
  prepass    `scoring_pass`: student forward-only + no-grad scoring at the output layer
  trunk      student forward-only with the output layer skipped: the part of the pre-pass
             that kept generation hidden states would save (the scoring itself stays)
  select     `select_prepass` over the global batch
  train      `student_pass` with the pre-pass's masks: forward + backward, loss on kept tokens
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch


def _stages(args):
    from tip_megatron import parallel, pipeline
    from tip_megatron.distill.loss import DistillSpec, LossConfig
    from tip_megatron.distill.step import (
        Microbatch, make_contexts, scoring_pass, select_prepass, student_pass,
        teacher_hidden_states, teacher_output_weight, with_preselection,
    )
    from tip_megatron.models import build_model
    from tip_megatron.models.init import init_full_state
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.testing.models import tiny_arch
    from tip_megatron.tip import SelectionConfig
    from tip_megatron.train.optimizer import OptimConfig, wrap_ddp

    g = parallel.initialize(parallel.ParallelLayout(), seed=0)
    kw = dict(vocab_size=args.vocab, max_position_embeddings=args.seq)
    s_arch = tiny_arch("llama", hidden_size=args.hidden, num_layers=args.layers,
                       ffn_hidden_size=4 * args.hidden, **kw)
    t_arch = tiny_arch("llama", hidden_size=2 * args.hidden, num_layers=2 * args.layers,
                       ffn_hidden_size=8 * args.hidden, **kw)
    student, teacher = build_model(s_arch, g), build_model(t_arch, g, frozen=True)
    load_full_state_dict(student, init_full_state(student, g, s_arch, 1), g, s_arch)
    load_full_state_dict(teacher, init_full_state(teacher, g, t_arch, 2), g, t_arch)
    ddp = wrap_ddp(student, g, OptimConfig(use_distributed_optimizer=False))
    gen = torch.Generator().manual_seed(0)
    rows, seq, mbs = args.rows, args.seq, args.micro_batch_size
    ids = torch.randint(0, args.vocab, (rows, seq), generator=gen)
    target = torch.zeros(rows, seq, dtype=torch.bool)
    target[:, args.prompt - 1:seq - 1] = True
    pos = torch.arange(seq).expand(rows, seq)
    batches = [Microbatch(ids[i:i + mbs], pos[i:i + mbs].contiguous(), target[i:i + mbs],
                          torch.arange(i, i + mbs)) for i in range(0, rows, mbs)]
    shape = dict(seq_length=seq, micro_batch_size=mbs)
    sel = SelectionConfig(rule="q3", rho=0.2)
    spec = DistillSpec(sel, LossConfig(), args.vocab, g.tp_group)

    def trunk(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb.input_ids, mb.position_ids, None, output_processor=lambda **k: k["hidden_states"])
        return out, lambda h: (h.new_zeros(()), torch.zeros((), dtype=torch.int), {})

    state = {}

    def run(stage):
        t0 = time.perf_counter()
        if stage == "teacher":
            state["hidden"] = teacher_hidden_states(teacher, g, batches, **shape)
        elif stage == "prepass":
            ctx = make_contexts(g, batches, state["hidden"], teacher_output_weight(teacher))
            state["ctx"], state["signals"] = ctx, scoring_pass(ddp, g, batches, ctx, spec, **shape)
        elif stage == "trunk":
            with torch.no_grad():
                pipeline.forward_backward(trunk, ddp, batches, g, forward_only=True, **shape)
        elif stage == "select":
            state["sel"] = select_prepass(sel, state["signals"], None, step=0)
        elif stage == "train":
            ctx = with_preselection(state["ctx"], state["signals"], *state["sel"])
            for c in ddp:
                c.zero_grad_buffer()
            student_pass(ddp, g, batches, ctx, spec, **shape)
        return time.perf_counter() - t0

    order = ("teacher", "prepass", "trunk", "select", "train")
    times = {s: [] for s in order}
    for rep in range(args.reps + 1):
        for stage in order:
            dt = run(stage)
            if rep:  # the first round warms up
                times[stage].append(dt)
    return {s: statistics.median(v) * 1e3 for s, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from tip_megatron.launch import run_forked

    ms = run_forked(_stages, 1, args=(args,), timeout_s=1800)[0]
    out = dict(vars(args), ms=ms, prepass_over_train=ms["prepass"] / ms["train"],
               trunk_share_of_prepass=ms["trunk"] / ms["prepass"])
    for stage, v in ms.items():
        print(f"{stage:8s} {v:9.1f} ms")
    print(f"pre-pass / training pass: {out['prepass_over_train']:.2f}; student trunk forward "
          f"is {out['trunk_share_of_prepass']:.0%} of the pre-pass")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
