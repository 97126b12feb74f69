"""`tip-megatron quickstart`: on-policy distillation with TIP on the embedded addition task.

On a fresh CPU machine, in minutes, with no downloads, at TP=2 on 2 processes (torchrun):
1. a tiny teacher and a defective tiny student are pre-trained by the engine itself (cached
   after the first run);
2. OPD with a TIP rule (default: Soft-OR, 50% of tokens kept) through the real trainer;
3. a summary: teacher vs student accuracy before/after (per planted defect), kept fraction,
   quadrant fractions of the student's tokens, peak memory, time.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from tip_megatron import launch

DEFAULTS = dict(rule="soft_or", rho=0.5, steps=240, tp=2)


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="OPD + TIP on an embedded task (CPU, minutes)")
    add_arguments(p)
    p.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", default=DEFAULTS["rule"], help="TIP selection rule (default soft_or)")
    p.add_argument("--rho", type=float, default=DEFAULTS["rho"], help="retention ratio (default 0.5)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="OPD steps (default 240)")
    p.add_argument("--tp", type=int, default=DEFAULTS["tp"], help="tensor-parallel size (default 2)")
    p.add_argument("--out", default="quickstart_run",
                   help="metrics.jsonl, token dumps and plots go here (default ./quickstart_run)")
    p.add_argument("overrides", nargs="*", help="extra trainer key=value overrides")


def main(args: argparse.Namespace) -> int:
    worker_args = ["--rule", args.rule, "--rho", str(args.rho), "--steps", str(args.steps),
                   "--tp", str(args.tp), "--out", args.out, *args.overrides]
    if launch.under_torchrun():
        return worker(args)
    return launch.run_local(args.tp, "tip_megatron.quickstart.command", worker_args)


def run_config(args: argparse.Namespace):
    """The trainer config of the quickstart (recipe of ../shared/QUICKSTART_TASK.md)."""
    from tip_megatron.config import load_config

    rho = 1.0 if args.rule == "all" else args.rho
    return load_config(None, [
        "student.builtin=quickstart-student", "teacher.builtin=quickstart-teacher",
        f"parallel.tp={args.tp}", "data.prompts_per_step=256", "data.max_prompt_len=8",
        "rollout.max_new_tokens=4", "rollout.temperature=1.0",
        f"selection.rule={args.rule}", f"selection.rho={rho}",
        # Measured (docs/quickstart.md): lr 1e-3 -> 1e-4 over 120 steps ended at 81.7% with
        # the loss still falling; 2e-3 -> 2e-4 over 240 steps with beta2 0.98 repairs A and B.
        "optim.lr=0.002", "optim.warmup_steps=10", "optim.min_lr=0.0002", "optim.clip_grad=1.0",
        "optim.adam_beta2=0.98",
        f"train.steps={args.steps}", "train.micro_batch_size=64", "logging.log_every=10",
        f"logging.jsonl={args.out}/metrics.jsonl",
        f"logging.dump_tokens_every={max(1, args.steps // 2)}",
        *args.overrides,
    ])


def worker(args: argparse.Namespace) -> int:
    from tip_megatron import parallel
    from tip_megatron.platform import quiet_third_party_warnings
    from tip_megatron.quickstart import builtin_models
    from tip_megatron.quickstart.evaluation import evaluate
    from tip_megatron.train import trainer
    from tip_megatron.train.metrics import peak_memory_mib

    quiet_third_party_warnings()
    # Progress of the pre-training (first run only) and of OPD.
    logging.getLogger("tip_megatron.quickstart").setLevel(logging.INFO)
    start = time.perf_counter()
    cfg = run_config(args)
    if int(os.environ.get("RANK", "0")) == 0:
        _fresh_run_dir(args.out)
        print(builtin_models.set_up_line(), flush=True)
    state = trainer.setup(cfg)
    m = state.models
    teacher = evaluate(m.teacher, state.groups, m.teacher_arch)
    before = evaluate(state.ddp, state.groups, m.student_arch)
    setup_s = time.perf_counter() - start
    if state.log.active:
        print(f"[quickstart] teacher {_acc(teacher)}\n[quickstart] student {_acc(before)}\n"
              f"[quickstart] OPD: {args.steps} steps, rule {args.rule}, rho {args.rho}", flush=True)
    trainer.loop(state)
    after = evaluate(state.ddp, state.groups, m.student_arch)
    if state.log.active:
        print(summary(args, teacher, before, after, state.history, setup_s,
                      time.perf_counter() - start, peak_memory_mib()), flush=True)
        write_result(args, cfg, teacher, before, after, state.history)
        _plots(args.out)
    parallel.destroy()
    return 0


RESULT_FILE = "result.json"


def write_result(args, cfg, teacher: dict, before: dict, after: dict, history: list) -> None:
    """`<out>/result.json`: the accuracies this run printed (the study command reads it)."""
    import json
    from pathlib import Path

    result = {"rule": args.rule, "rho": cfg.selection.rho, "steps": args.steps, "tp": args.tp,
              "train_seed": cfg.train.seed, "data_seed": cfg.data.seed,
              "prompts_per_step": cfg.data.prompts_per_step,
              "samples_per_prompt": cfg.rollout.n,
              "teacher": teacher, "before": before, "after": after,
              "final_loss": history[-1]["loss"] if history else None}
    Path(args.out, RESULT_FILE).write_text(json.dumps(result, indent=1))


def _fresh_run_dir(run_dir: str) -> None:
    """The metrics file is appended to and dumps are per step: start this run's empty."""
    import shutil
    from pathlib import Path

    Path(run_dir, "metrics.jsonl").unlink(missing_ok=True)
    Path(run_dir, RESULT_FILE).unlink(missing_ok=True)
    shutil.rmtree(Path(run_dir, "token_dumps"), ignore_errors=True)


def _plots(run_dir: str) -> None:
    """Learning curves and token scatters of this run (needs the plot extra)."""
    from pathlib import Path

    try:
        from tip_megatron.plots.cli import write_run_plots
        paths, notes = write_run_plots(Path(run_dir) / "metrics.jsonl",
                                   sorted(Path(run_dir, "token_dumps").glob("step_*.npz")),
                                   Path(run_dir) / "plots")
    except ImportError:
        print("[quickstart] plots: skipped (install the plot extra: pip install "
              "'tip_megatron[plot]')", flush=True)
        return
    print("[quickstart] plots:\n" + "\n".join(f"  {p}" for p in paths)
          + "".join(f"\n  ({note})" for note in notes), flush=True)


def _acc(report: dict) -> str:
    return (f"{100 * report['exact']:5.1f}%  (A: {100 * report['A']:5.1f}%  B: {100 * report['B']:5.1f}%  "
            f"clean: {100 * report['clean']:5.1f}%)")


def summary(args, teacher, before, after, history, setup_s, total_s, peak_mib) -> str:
    first = history[0] if history else {}
    kept = sum(h.get("kept_fraction", 0.0) for h in history) / max(len(history), 1)
    quads = "  ".join(f"Q{q} {100 * first.get(f'q{q}_fraction_all', float('nan')):5.1f}%"
                      for q in (1, 2, 3, 4))
    quads_kept = "  ".join(f"Q{q} {100 * first.get(f'q{q}_fraction_kept', float('nan')):5.1f}%"
                           for q in (1, 2, 3, 4))
    lines = [
        "", "=" * 78,
        f"tip_megatron quickstart: OPD with TIP rule '{args.rule}' (rho={args.rho}), "
        f"TP={args.tp}, {args.steps} steps",
        "-" * 78,
        f"teacher                : {_acc(teacher)}",
        f"student before OPD     : {_acc(before)}",
        f"student after OPD      : {_acc(after)}",
        "  (A: units carry dropped, confident and wrong; B: thousands digit guessed)",
        f"kept fraction (mean)   : {100 * kept:5.1f}% of response tokens",
        f"quadrants, step 1, all : {quads}",
        f"quadrants, step 1, kept: {quads_kept}",
        f"final loss             : {history[-1]['loss']:.4f}" if history else "",
        f"peak memory (rank 0)   : {peak_mib:.0f} MiB",
        f"time                   : {total_s:.0f} s (set-up incl. pre-training/cache {setup_s:.0f} s)",
        "=" * 78,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tip_megatron.quickstart.command")
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    launch.guard_rank_helpers()  # this rank's helper processes die with it
    sys.exit(worker(parser.parse_args()))
