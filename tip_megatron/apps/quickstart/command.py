"""`tip-megatron quickstart`: on-policy distillation with TIP on an embedded task
(`--task`, default the addition task; `tasks.py` lists them).

On a fresh CPU machine, in minutes, with no downloads, at TP=2 on 2 processes (torchrun):
1. a tiny teacher and a defective tiny student are pre-trained by the engine itself (cached
   after the first run);
2. OPD with a TIP rule (the task's default: entropy sampling on the addition task, Soft-OR
   on the chain task; 50% of tokens kept) through the real trainer;
3. a summary: teacher vs student accuracy before/after (per planted defect), kept fraction,
   quadrant fractions of the student's tokens, peak memory, time.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from tip_megatron.apps.launch import run_local
from tip_megatron.runtime.env import under_torchrun
from tip_megatron.runtime.processes import die_with_torchrun, guard_rank_helpers
from tip_megatron.apps.quickstart.tasks import DEFAULT_TASK, TASKS, get_task, register_builtins

#: `rule` and `steps` are the default task's; each task has its own (`tasks.EmbeddedTask`).
DEFAULTS = dict(rule=TASKS[DEFAULT_TASK].rule, rho=0.5, steps=TASKS[DEFAULT_TASK].steps, tp=2)


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="OPD + TIP on an embedded task (CPU, minutes)")
    add_arguments(p)
    p.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", default=None,
                   help=f"TIP selection rule (default: the task's, {DEFAULTS['rule']} for addition)")
    p.add_argument("--rho", type=float, default=DEFAULTS["rho"], help="retention ratio (default 0.5)")
    p.add_argument("--task", default=DEFAULT_TASK,
                   help=f"embedded task: {', '.join(TASKS)} (default {DEFAULT_TASK})")
    p.add_argument("--teacher", default=None,
                   help="a task with several teachers (multi): run with this one only (add or "
                        "sub: the single-teacher baseline); default: all, routed by domain")
    p.add_argument("--steps", type=int, default=None,
                   help=f"OPD steps (default: the task's, {DEFAULTS['steps']} for addition)")
    p.add_argument("--tp", type=int, default=DEFAULTS["tp"], help="tensor-parallel size (default 2)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="held-out exact match every N steps, logged to metrics.jsonl (default: "
                        "steps/8, a multiple of logging.log_every; 0: only before and after)")
    p.add_argument("--out", default="quickstart_run",
                   help="metrics.jsonl, token dumps and plots go here (default ./quickstart_run)")
    p.add_argument("overrides", nargs="*", help="extra trainer key=value overrides")


def main(args: argparse.Namespace) -> int:
    task_defaults(args)  # a bad --task stops here, one line
    every = [] if args.eval_every is None else ["--eval-every", str(args.eval_every)]
    teacher = [] if args.teacher is None else ["--teacher", args.teacher]
    worker_args = ["--task", args.task, *teacher, "--rule", args.rule, "--rho", str(args.rho),
                   "--steps", str(args.steps), "--tp", str(args.tp), "--out", args.out,
                   *every, *args.overrides]
    eval_every(args, run_config(args))  # a bad --eval-every stops here, before any rank starts
    write_task_prompts(args)  # after the checks: a bad command line writes nothing
    if under_torchrun():
        return worker(args)
    return run_local(args.tp, "tip_megatron.apps.quickstart.command", worker_args)


def task_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """--steps and --rule not given: the task's (`tasks.EmbeddedTask`); given ones win."""
    spec = get_task(args.task)
    args.steps, args.rule = args.steps or spec.steps, args.rule or spec.rule
    return args


PROMPTS_FILE = "prompts.jsonl"
#: Prompts in the multi task's file (the sampler runs through it in epochs).
MULTI_PROMPTS = 32768


def write_task_prompts(args: argparse.Namespace) -> None:
    """A task with several teachers reads its prompts from `<out>/prompts.jsonl`, written
    here (by the launcher before the ranks start; under torchrun by every rank, before its
    first collective: `write_prompts` replaces a file only whole), each record with its route
    field: the multi-teacher run routes by it, the single-teacher baselines read the same."""
    spec = get_task(args.task)
    if spec.teachers:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        spec.data.write_prompts(Path(args.out, PROMPTS_FILE), MULTI_PROMPTS)


def teacher_overrides(args: argparse.Namespace) -> list[str]:
    """The teacher keys of the run: the task's teacher; on a task with several teachers
    `--teacher NAME`'s alone, else all of them routed by domain (`teachers:`)."""
    spec = get_task(args.task)
    teacher = getattr(args, "teacher", None)
    if not spec.teachers:
        return [f"teacher.builtin={spec.teacher_builtin(teacher)}"]
    prompts = [f"data.prompts=[{Path(args.out, PROMPTS_FILE)}]"]
    if teacher is not None:
        return [f"teacher.builtin={spec.teacher_builtin(teacher)}", *prompts]
    return [*spec.multi_teacher_overrides(), *prompts]


def run_config(args: argparse.Namespace):
    """The trainer config of the quickstart: the task's built-ins and OPD recipe (`tasks.py`)."""
    # heavy: the config's sections import torch; `tip-megatron --help` imports this module
    from tip_megatron.config import load_config

    spec = get_task(args.task)
    register_builtins()  # an editable install made before a task's built-ins were added
    data = spec.data
    rho = 1.0 if args.rule == "all" else args.rho
    return load_config(None, [
        f"student.builtin={spec.student}", *teacher_overrides(args),
        f"parallel.tp={args.tp}", f"data.max_prompt_len={data.PROMPT_LEN}",
        *rollout_overrides(data), "rollout.temperature=1.0",
        f"selection.rule={args.rule}", f"selection.rho={rho}", *spec.opd,
        f"train.steps={args.steps}", "logging.log_every=10",
        f"logging.jsonl={args.out}/metrics.jsonl",
        f"logging.dump_tokens_every={max(1, args.steps // 2)}",
        *args.overrides,
    ])


def rollout_overrides(data) -> list[str]:
    """The task's generation: its answer length (one turn), or its `GENERATION` (the
    budget and the environment of a multi-turn task, e.g. `tools_task`)."""
    generation = getattr(data, "GENERATION", None) or {"max_new_tokens": data.ANSWER_LEN}
    return [f"rollout.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
            for k, v in generation.items()]


def eval_every(args: argparse.Namespace, cfg) -> int:
    """Steps between mid-run evaluations: --eval-every, else steps/8 rounded down to a
    multiple of logging.log_every (the trainer logs validation with its step's line)."""
    log_every = cfg.logging.log_every
    if args.eval_every is None:
        return max(log_every, args.steps // 8 // log_every * log_every)
    if args.eval_every < 0 or args.eval_every % log_every:
        raise ValueError(f"--eval-every {args.eval_every}: must be 0 (off) or a multiple of "
                         f"logging.log_every={log_every} (validation is logged with its step)")
    return args.eval_every


def worker(args: argparse.Namespace) -> int:
    # heavy (torch, megatron): only a rank runs this; `tip-megatron --help` imports this module
    from tip_megatron.runtime import parallel
    from tip_megatron.runtime.device import quiet_third_party_warnings  # heavy, as above
    from tip_megatron.apps.quickstart import builtin_models  # heavy, as above
    from tip_megatron.apps.quickstart.evaluation import MidRunValidation, evaluate  # heavy, as above
    from tip_megatron.train import trainer  # heavy, as above
    from tip_megatron.train.metrics import peak_memory_mib  # heavy, as above

    quiet_third_party_warnings()
    # Progress of the pre-training (first run only) and of OPD.
    logging.getLogger("tip_megatron.apps.quickstart").setLevel(logging.INFO)
    start = time.perf_counter()
    task_defaults(args)
    cfg = run_config(args)
    spec = get_task(args.task)
    data = spec.data
    if int(os.environ.get("RANK", "0")) == 0:
        _fresh_run_dir(args.out)
        print(builtin_models.set_up_line(spec.teacher_builtin(args.teacher), spec.student,
                                         args.task), flush=True)
    state = trainer.setup(cfg)
    m = state.models
    # Several teachers (the multi task without --teacher): each one's accuracy; the first
    # stands in the summary's teacher row.
    reports = [(t.name, evaluate(t.chunks, state.groups, t.arch, spec.eval_size, data=data))
               for t in m.teachers]
    teacher = reports[0][1]
    before = evaluate(state.ddp, state.groups, m.student_arch, spec.eval_size, data=data)
    setup_s = time.perf_counter() - start
    if state.log.active:
        named = len(reports) > 1
        teachers = "\n".join(f"[quickstart] teacher{f' {name}' if named else ''} {_acc(report, data)}"
                              for name, report in reports)
        print(f"{teachers}\n[quickstart] student "
              f"{_acc(before, data)}\n[quickstart] OPD: {args.steps} steps, rule {args.rule}, "
              f"rho {args.rho}", flush=True)
    every = eval_every(args, cfg)
    # Greedy exact match during OPD, logged as eval/mean_at_k (the study's curves); an
    # explicit eval.every (the config's own validation, e.g. of a benchmark file) wins.
    if every and not cfg.eval.every:
        state.validation = MidRunValidation(every, n=spec.eval_size, data=data)
    trainer.loop(state)
    after = evaluate(state.ddp, state.groups, m.student_arch, spec.eval_size, data=data)
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

    spec = get_task(args.task)
    data = spec.data
    # `cases`: the per-case keys of teacher/before/after, with their table labels (the study
    # report's columns). A task with several teachers: the prompt file its dumps' rollouts
    # come from, and which teachers scored them (`both` or one's name).
    several = {"prompts_file": PROMPTS_FILE, "domains": list(data.DOMAINS),
               "teachers_run": getattr(args, "teacher", None) or "both"} if spec.teachers else {}
    result = {"task": args.task, "cases": [[c, data.CASE_LABELS[c]] for c in data.CASES], **several,
              "rule": args.rule, "rho": cfg.selection.rho, "loss_mix": cfg.loss.mix,
              "steps": args.steps, "tp": args.tp,
              "train_seed": cfg.train.seed, "data_seed": cfg.data.seed,
              "prompts_per_step": cfg.data.prompts_per_step,
              "samples_per_prompt": cfg.rollout.n,
              "teacher": teacher, "before": before, "after": after,
              "final_loss": history[-1]["loss"] if history else None}
    Path(args.out, RESULT_FILE).write_text(json.dumps(result, indent=1))


def _fresh_run_dir(run_dir: str) -> None:
    """The metrics file is appended to and dumps are per step: start this run's empty."""

    Path(run_dir, "metrics.jsonl").unlink(missing_ok=True)
    Path(run_dir, RESULT_FILE).unlink(missing_ok=True)
    shutil.rmtree(Path(run_dir, "token_dumps"), ignore_errors=True)


def _plots(run_dir: str) -> None:
    """Learning curves and token scatters of this run, their paths printed (matplotlib: a
    dependency of the default install)."""
    try:
        # lazy: matplotlib loads only when the run draws its plots
        from tip_megatron.apps.plots.cli import write_run_plots
        paths, notes = write_run_plots(Path(run_dir) / "metrics.jsonl",
                                   sorted(Path(run_dir, "token_dumps").glob("step_*.npz")),
                                   Path(run_dir) / "plots")
    except ImportError:
        print("[quickstart] plots: skipped (matplotlib is not installed; bash install.sh "
              "installs it, or pip install 'matplotlib>=3.8')", flush=True)
        return
    print("[quickstart] plots:\n" + "\n".join(f"  {p}" for p in paths)
          + "".join(f"\n  ({note})" for note in notes), flush=True)


def _acc(report: dict, data) -> str:
    keys = (*getattr(data, "DOMAINS", ()), *data.CASES)  # the multi task: per domain first
    cases = "  ".join(f"{c}: {100 * report[c]:5.1f}%" for c in keys)
    return f"{100 * report['exact']:5.1f}%  ({cases})"


def _during(history: list) -> list[str]:
    """One line: the mid-run exact match, when there was any."""
    points = [f"{100 * h['eval/mean_at_k']:.1f}%@{h['step']}" for h in history if "eval/mean_at_k" in h]
    return [f"exact match during OPD : {'  '.join(points)}"] if points else []


def summary(args, teacher, before, after, history, setup_s, total_s, peak_mib) -> str:
    spec = get_task(args.task)
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
        f"teacher                : {_acc(teacher, spec.data)}",
        f"student before OPD     : {_acc(before, spec.data)}",
        f"student after OPD      : {_acc(after, spec.data)}",
        f"  {spec.legend}",
        *_during(history),
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
    parser = argparse.ArgumentParser(prog="python -m tip_megatron.apps.quickstart.command")
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    die_with_torchrun()  # a SIGKILLed torchrun (or launcher) leaves no rank behind
    guard_rank_helpers()  # this rank's helper processes die with it
    sys.exit(worker(parser.parse_args()))
