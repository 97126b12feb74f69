"""The teacher stage against a plain forward of the same model (issue: a leaner step, item 3).

    python tools/bench_teacher_stage.py --json runs/bench_teacher_stage.json
    python tools/bench_teacher_stage.py --profile      # + the engine stage's top ops

One random-init HF Llama teacher (the v32k setup of tools/bench_peer.py: h512 x 8 layers,
GQA 8/4 heads, SwiGLU 1408, V 32,000), loaded into the engine through the converter's name
tables; 32 rows x 256 tokens, fp32, forward only, torch intra-op threads `--threads`.
Rows, interleaved each round (median and min over `--rounds` after one warm-up round):

  engine stage      `distill.step.teacher_hidden_states` over the step's micro-batches:
                    what a step's teacher stage runs (megatron's schedule, the hidden-
                    states-only output processor; no logits)
  engine stage, megatron attention
                    the same with megatron's own `DotProductAttention` as the core
                    attention (what the local spec used before `models/attention.py`)
  megatron forward  the same megatron model called directly, one call per micro-batch,
                    hidden states only (the plain forward of the same model)
  HF body           the same weights in transformers (`model.model`, sdpa): hidden states
  HF forward        transformers with the LM head: what TRL's teacher forward computes

The engine stage should cost no more than the megatron forward (the schedule's own
overhead), and the megatron forward no more than HF's body (per-layer overheads); the
header line gives the largest hidden-state difference of the engine against HF and
against megatron's attention.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as py_platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEACHER = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=512,
               rms_norm_eps=1e-6, initializer_range=0.05, tie_word_embeddings=False,
               bos_token_id=None, eos_token_id=None, pad_token_id=0)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=0, help="rows per micro-batch (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", type=int, default=TEACHER["num_hidden_layers"])
    p.add_argument("--profile", action="store_true", help="print the engine stage's top ops")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import torch
    import transformers

    from tip_megatron.checkpoint.hf.mapping import all_rules
    from tip_megatron.distill.step import Microbatch, _hidden_only, teacher_hidden_states
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.attention import SdpaAttention
    from tip_megatron.models.arch import ModelArch
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.runtime import parallel
    from tip_megatron.runtime.env import free_port

    torch.set_num_threads(args.threads)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    g = parallel.initialize(parallel.ParallelLayout(), seed=0)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **dict(TEACHER, num_hidden_layers=args.layers), attn_implementation="sdpa")).eval()
    arch = ModelArch.from_hf_config(hf.config.to_dict())
    sd = hf.state_dict()
    full = {r.mcore: r.to_full(arch, [sd[n] for n in r.hf]) for r in all_rules(arch)}
    chunks = build_model(arch, g, BuildOptions(init_weights=False, seq_length=args.seq), frozen=True)
    load_full_state_dict(chunks, full, g, arch)
    del sd, full

    b = args.micro_batch_size or args.rows
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, TEACHER["vocab_size"], (args.rows, args.seq), generator=gen)
    pos = torch.arange(args.seq).expand(args.rows, -1).contiguous()
    mbs = [Microbatch(ids[i:i + b], pos[i:i + b], torch.ones(b, args.seq, dtype=torch.bool),
                      torch.arange(i, i + b)) for i in range(0, args.rows, b)]
    model = chunks[0]

    def engine_stage():
        return teacher_hidden_states(chunks, g, mbs, seq_length=args.seq, micro_batch_size=b)

    def engine_stage_megatron_attention():
        cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
        for core in cores:  # SdpaAttention is a DotProductAttention: the parent's forward
            core.__class__ = DotProductAttention
        try:
            return engine_stage()
        finally:
            for core in cores:
                core.__class__ = SdpaAttention

    @torch.no_grad()
    def megatron_forward():
        return [model(mb.input_ids, mb.position_ids, None, output_processor=partial(_hidden_only, g.tp_group))
                for mb in mbs]

    @torch.no_grad()
    def hf_body():
        return [hf.model(input_ids=mb.input_ids).last_hidden_state for mb in mbs]

    @torch.no_grad()
    def hf_forward():
        return [hf(input_ids=mb.input_ids).logits for mb in mbs]

    # the same hidden states (fp32; megatron [s, b, h] vs HF [b, s, h])
    ours = engine_stage()[0].transpose(0, 1)
    theirs = hf_body()[0]
    max_diff = float((ours - theirs).abs().max())
    megatron_diff = float((engine_stage_megatron_attention()[0] - engine_stage()[0]).abs().max())
    rows = {"engine stage": engine_stage, "engine stage, megatron attention": engine_stage_megatron_attention,
            "megatron forward": megatron_forward, "HF body": hf_body,
            "HF forward": hf_forward}
    times: dict[str, list[float]] = {k: [] for k in rows}
    load_before = os.getloadavg()[0]
    names = list(rows)
    for r in range(args.rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            rows[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    base = statistics.median(times["megatron forward"])
    print(f"teacher h{TEACHER['hidden_size']} x {args.layers} layers, V {TEACHER['vocab_size']}, "
          f"{args.rows} rows x {args.seq} tokens in micro-batches of {b}, {args.threads} thread(s), fp32; "
          f"max |engine - HF| hidden {max_diff:.2e}, |SDPA - megatron attention| {megatron_diff:.2e}; load {load_before:.1f} -> {load_after:.1f}")
    print("| row | s (min / median) | vs megatron forward |")
    print("|---|---|---|")
    for name in names:
        t = times[name]
        print(f"| {name} | {min(t):.3f} / {statistics.median(t):.3f} | {statistics.median(t) / base:.2f}x |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine_stage()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(
            args=vars(args), machine=py_platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
            load_before=load_before, load_after=load_after, max_hidden_diff=max_diff,
            max_attention_diff=megatron_diff,
            seconds={k: dict(min=min(v), median=statistics.median(v), all=v) for k, v in times.items()},
        ), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
