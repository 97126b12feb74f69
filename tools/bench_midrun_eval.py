"""Cost of the quickstart's mid-run evaluation next to the OPD step it interleaves with.

    python tools/bench_midrun_eval.py --tp 2 --steps 12 --evals 4 --json runs/bench_midrun_eval.json

One run, side by side: the quickstart's trainer (its recipe, built-in models from the cache:
run `tip-megatron quickstart` once first) times `--steps` OPD steps (`trainer.train_step`,
after 2 warm-up steps), then `--evals` calls of `quickstart.evaluation.evaluate` (2,000
hold-out problems, greedy, 4 tokens: what `MidRunValidation` runs). The overhead column
is the default cadence's: steps/8 evaluations in a 240-step run, i.e.
8 x eval_s / (240 x step_s). Prints a table and writes JSON (with `uptime`'s load).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUN_STEPS = 240  # the quickstart's default: 8 mid-run evaluations (every 30 steps)


def _measure(tp: int, steps: int, evals: int, out: str) -> dict:
    from tip_megatron.apps.quickstart.command import run_config
    from tip_megatron.apps.quickstart.evaluation import evaluate
    from tip_megatron.train import trainer

    args = SimpleNamespace(rule="soft_or", rho=0.5, steps=RUN_STEPS, tp=tp, out=out, overrides=[])
    state = trainer.setup(run_config(args))
    arch = state.models.student_arch

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def step() -> None:
        trainer.train_step(state)
        state.step += 1

    for _ in range(2):
        step()
    step_s = [timed(step) for _ in range(steps)]
    eval_s = [timed(lambda: evaluate(state.ddp, state.groups, arch)) for _ in range(evals)]
    return dict(step_s=step_s, eval_s=eval_s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2, the quickstart's)")
    p.add_argument("--steps", type=int, default=12, help="timed OPD steps")
    p.add_argument("--evals", type=int, default=4, help="timed evaluations")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    from tip_megatron.testing.distributed import run_distributed

    out = f"/tmp/bench_midrun_eval_{os.getpid()}"
    results = run_distributed(_measure, args.tp, args=(args.tp, args.steps, args.evals, out),
                              timeout_s=3600)
    r = results[0]
    step_s, eval_s = statistics.median(r["step_s"]), statistics.median(r["eval_s"])
    overhead = 8 * eval_s / (RUN_STEPS * step_s)
    load = os.getloadavg()
    rows = [("OPD step (median)", f"{step_s:.3f} s", len(r["step_s"])),
            ("evaluation, 2000 greedy problems (median)", f"{eval_s:.3f} s", len(r["eval_s"])),
            (f"overhead of 8 evaluations in {RUN_STEPS} steps", f"{100 * overhead:.1f} %", "")]
    print(f"TP={args.tp}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| measured | value | samples |\n|---|---|---|")
    for name, value, n in rows:
        print(f"| {name} | {value} | {n} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(
            tp=args.tp, step_s=r["step_s"], eval_s=r["eval_s"], median_step_s=step_s,
            median_eval_s=eval_s, overhead_default=overhead, loadavg=load,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
