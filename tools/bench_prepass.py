"""Benchmark: cost of the scoring pre-pass (selection over the global batch) next to the
training pass, from both sources side by side (`selection.prepass_source`, issue 15).

    python tools/bench_prepass.py            # ~2-3 min on 2 CPU cores
    python tools/bench_prepass.py --vocab 32768 --hidden 512 --json runs/prepass.json
    python tools/bench_prepass.py --dtype bf16   # how far the two sources differ in bf16

One process (TP = PP = DP = 1), random student and teacher from `build_model`, rollouts
sampled by the generation engine (dynamic, KV cache; `--prompt` random prompt tokens, then
`--seq - --prompt` new tokens, no stop id), megatron's schedule, rule q3 at rho 0.2 over
the global batch (scope auto). Stages, timed separately, repetitions interleaved
round-robin (load on a shared machine hits every stage alike; the two generation stages
swap places every round), medians reported:
  generate       the rollouts, hidden states not kept
  generate_keep  the same rollouts with `keep_hidden=True` (what `generation` costs there)
  teacher        teacher forward-only pass (final hidden states kept)
  prepass        source `recompute`: `scoring_pass`, student forward-only + no-grad scoring
  prepass_gen    source `generation`: `response_rows` + `scoring_from_generation`, the same
                 no-grad scoring on the engine's kept hidden states (no student forward)
  trunk          student forward-only with the output layer skipped (what `generation` saves)
  select         `select_prepass` over the global batch
  train          `train_pass` with the pre-pass's masks: forward + backward on kept tokens
The JSON also holds the largest signal difference between the two sources (absolute, and
relative to the largest signal), whether their kept masks are identical, and how many
tokens one keeps and the other does not. `--dtype bf16` builds both models in bf16 (CPU
bf16 kernels here: the local layer spec, not Transformer Engine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch


def _stages(args):
    from tip_megatron.runtime import parallel, pipeline
    from tip_megatron.distill.spec import DistillSpec, LossConfig
    from tip_megatron.distill.prepass import (
        response_rows, scoring_from_generation, select_prepass, with_preselection,
    )
    from tip_megatron.distill.step import (
        make_contexts, scoring_pass, teacher_hidden_states, teacher_output_weight, train_pass,
    )
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.init import init_full_state
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.rollout.generate import GenerationConfig, generate
    from tip_megatron.testing.models import tiny_arch
    from tip_megatron.tip import SelectionConfig
    from tip_megatron.train.batches import make_microbatches
    from tip_megatron.train.optimizer import OptimConfig, wrap_ddp

    g = parallel.initialize(parallel.ParallelLayout(), seed=0)
    kw = dict(vocab_size=args.vocab, max_position_embeddings=args.seq)
    s_arch = tiny_arch("llama", hidden_size=args.hidden, num_layers=args.layers,
                       ffn_hidden_size=4 * args.hidden, **kw)
    t_arch = tiny_arch("llama", hidden_size=2 * args.hidden, num_layers=2 * args.layers,
                       ffn_hidden_size=8 * args.hidden, **kw)
    options = BuildOptions(params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    student, teacher = build_model(s_arch, g, options), build_model(t_arch, g, options, frozen=True)
    load_full_state_dict(student, init_full_state(student, g, s_arch, 1), g, s_arch)
    load_full_state_dict(teacher, init_full_state(teacher, g, t_arch, 2), g, t_arch)
    ddp = wrap_ddp(student, g, OptimConfig(use_distributed_optimizer=False))
    gen = torch.Generator().manual_seed(0)
    rows, seq, mbs = args.rows, args.seq, args.micro_batch_size
    prompts = torch.randint(0, args.vocab, (rows, args.prompt), generator=gen).tolist()
    sampling = dict(max_new_tokens=seq - args.prompt, temperature=1.0)

    def rollouts(keep: bool):
        return generate(ddp, g, s_arch, prompts, GenerationConfig(**sampling, keep_hidden=keep), seed=0)

    out = rollouts(True)
    batches = make_microbatches(out.token_ids, out.response_mask, torch.arange(rows), mbs)
    seq = out.token_ids.shape[1]
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
        if stage in ("generate", "generate_keep"):
            kept = rollouts(stage == "generate_keep")
            if kept.response_hidden is not None:
                state["rollouts"] = kept
        elif stage == "teacher":
            state["hidden"] = teacher_hidden_states(teacher, g, batches, **shape)
        elif stage == "prepass":
            ctx = make_contexts(g, batches, state["hidden"], teacher_output_weight(teacher))
            state["ctx"], state["signals"] = ctx, scoring_pass(ddp, g, batches, ctx, spec, **shape).signals
        elif stage == "prepass_gen":
            r = state["rollouts"]
            state["signals_gen"] = scoring_from_generation(
                ddp, g, state["ctx"], spec, r.response_hidden, response_rows(r.response_lengths, batches, 0)).signals
        elif stage == "trunk":
            with torch.no_grad():
                pipeline.forward_backward(trunk, ddp, batches, g, forward_only=True, **shape)
        elif stage == "select":
            state["sel"] = select_prepass(sel, state["signals"], None, step=0)
        elif stage == "train":
            ctx = with_preselection(state["ctx"], state["signals"], *state["sel"])
            for c in ddp:
                c.zero_grad_buffer()
            train_pass(ddp, g, batches, ctx, spec, **shape)
        return time.perf_counter() - t0

    order = ("generate", "generate_keep", "teacher", "prepass", "prepass_gen", "trunk", "select", "train")
    times = {s: [] for s in order}
    for rep in range(args.reps + 1):
        # The two generation stages swap places every round: neither always runs first.
        swapped = ("generate_keep", "generate") + order[2:]
        for stage in (swapped if rep % 2 else order):
            dt = run(stage)
            if rep:  # the first round warms up
                times[stage].append(dt)
    masks_gen, _ = select_prepass(sel, state["signals_gen"], None, step=0)
    fields = ("entropy_norm", "reverse_kl", "forward_kl")
    diff = max(float((getattr(a, f) - getattr(b, f)).abs().max()) for a, b in zip(state["signals"], state["signals_gen"])
               for f in fields)
    scale = max(float(getattr(a, f).abs().max()) for a in state["signals"] for f in fields)
    agree = dict(max_signal_diff=diff, max_signal_diff_rel=diff / max(scale, 1e-30), masks_identical=all(
        torch.equal(a, b) for a, b in zip(state["sel"][0], masks_gen)),
        mask_differences=sum(int((a != b).sum()) for a, b in zip(state["sel"][0], masks_gen)),
        kept_tokens=sum(int(a.sum()) for a in state["sel"][0]),
        response_tokens=int(out.response_mask.sum()),
        kept_hidden_bytes=out.response_hidden.numel() * out.response_hidden.element_size())
    return {s: statistics.median(v) * 1e3 for s, v in times.items()}, agree


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
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from tip_megatron.runtime.processes import run_forked

    ms, agree = run_forked(_stages, 1, args=(args,), timeout_s=1800)[0]
    out = dict(vars(args), ms=ms, **agree, prepass_over_train=ms["prepass"] / ms["train"],
               prepass_gen_over_train=ms["prepass_gen"] / ms["train"],
               trunk_share_of_prepass=ms["trunk"] / ms["prepass"],
               keep_overhead=ms["generate_keep"] / ms["generate"] - 1)
    for stage, v in ms.items():
        print(f"{stage:14s} {v:9.1f} ms")
    print(f"pre-pass / training pass: recompute {out['prepass_over_train']:.2f}, generation "
          f"{out['prepass_gen_over_train']:.2f}; student trunk forward is "
          f"{out['trunk_share_of_prepass']:.0%} of the recomputing pre-pass; keeping hidden states "
          f"costs generation {out['keep_overhead']:+.1%}")
    print(f"sources agree ({args.dtype}): max signal diff {agree['max_signal_diff']:.2e} "
          f"({agree['max_signal_diff_rel']:.1e} of the largest signal), kept masks identical: "
          f"{agree['masks_identical']} ({agree['mask_differences']} of {agree['kept_tokens']} kept "
          f"tokens differ); kept hidden states {agree['kept_hidden_bytes'] / 2**20:.1f} MiB "
          f"for {agree['response_tokens']} response tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
