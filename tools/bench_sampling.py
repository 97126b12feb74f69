"""Benchmark: one decode step's draw (`ops.sampling.vocab_parallel_sample`) at several
sizes of its float64 exp pass on CPU (`MASS_PASS_ELEMENTS_CPU`), side by side with the
pass over all rows at once (the baseline: one buffer of every row, memory-bound).

    python tools/bench_sampling.py                         # a few seconds, one thread
    python tools/bench_sampling.py --vocab 151936 --rows 128 --json runs/sampling.json

One process, TP = 1, random fp32 logits [rows, vocab] (scale 3), temperature 1 (the
untruncated path the decoding engine takes without top-k/top-p), one `SamplingBuffers`
reused every call as the engine does. Each setting is timed `--reps` times in rounds
whose order rotates; the table shows the median per draw in ms. Every setting draws the
same ids and log-probs bit for bit (checked before timing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tip_megatron.ops import sampling


def _draw(logits: torch.Tensor, buffers, step: int):
    return sampling.vocab_parallel_sample(logits, tp_group=None, vocab_size=logits.shape[1],
                                          seed=3, step=step, buffers=buffers)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--passes", type=str, default="1,2,4,8",
                   help="rows of the exp pass at a time, besides 'all' (comma separated)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 3
    settings = {"all": args.rows * args.vocab}
    settings.update({f"{r} rows": r * args.vocab for r in map(int, args.passes.split(","))})
    default = sampling.MASS_PASS_ELEMENTS_CPU
    settings[f"default (2^{default.bit_length() - 1} elements)"] = default
    times: dict[str, list[float]] = {name: [] for name in settings}
    try:
        ref = None
        for name, elements in settings.items():  # same bits at every pass size
            sampling.MASS_PASS_ELEMENTS_CPU = elements
            got = _draw(logits, sampling.SamplingBuffers(), 0)
            ref = ref or got
            if not (torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])):
                raise SystemExit(f"pass {name}: the draw differs from pass 'all'")
        names = list(settings)
        buffers = {name: sampling.SamplingBuffers() for name in names}
        for rep in range(args.reps + 1):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                sampling.MASS_PASS_ELEMENTS_CPU = settings[name]
                t0 = time.perf_counter()
                _draw(logits, buffers[name], rep)
                if rep:  # the first round warms the buffers
                    times[name].append(time.perf_counter() - t0)
    finally:
        sampling.MASS_PASS_ELEMENTS_CPU = default
    base = statistics.median(times["all"])
    print(f"rows {args.rows}, vocab {args.vocab}, {args.threads} thread(s), {args.reps} reps")
    print("| exp pass | ms per draw (median) | min | vs all |")
    print("|---|---|---|---|")
    result = {"rows": args.rows, "vocab": args.vocab, "threads": args.threads, "settings": {}}
    for name in settings:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.2f} | {min(times[name]) * 1e3:.2f} | {base / med:.2f}x |")
        result["settings"][name] = {"elements": settings[name], "median_ms": med * 1e3,
                                    "min_ms": min(times[name]) * 1e3}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
