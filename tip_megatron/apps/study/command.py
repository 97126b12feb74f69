"""`tip-megatron study`: run each (rule, seed) cell of a grid (rule, teacher, seed on a task
with several teachers), then write the report.

With `--config`, each cell is a training run of that config (apps/study/config_study.py); the
rest of this module is the embedded task's study.

Each cell is one quickstart run (`tip_megatron.apps.quickstart.command`, its own torchrun job
started by `run_local`, which returns only once every rank has exited: no orphans,
and a crash in one cell cannot corrupt the next one's process state). The quickstart's
built-in teacher and student are read from the on-disk cache, so they are pre-trained once
for the whole grid. Seeds vary the rollouts' prompts, sampling and sampled selection
(`train.seed`, `data.seed`, `selection.seed`); the starting models are the same cached ones.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tip_megatron.apps.launch import run_local
from tip_megatron.apps.quickstart.command import DEFAULTS, write_task_prompts
from tip_megatron.apps.quickstart.tasks import DEFAULT_TASK, get_task
from tip_megatron.apps.study.cells import BOTH, Cell, cells, run_dir, teacher_axis


def register(subparsers) -> None:
    p = subparsers.add_parser("study", help="grid of TIP rules x seeds (the embedded task, or --config)")
    p.add_argument("--rules", nargs="+", required=True,
                   help="rules to compare: 'all', RULE@RHO (e.g. random@0.1 teachability@0.05), "
                        "RULE (rho 1: tip_soft, propose_verify, pkg.mod:fn), mix:NAME "
                        "(e.g. mix:entropy_aware) or SPEC+mix:NAME")
    p.add_argument("--seeds", type=int, default=3, help="seeds per rule (default 3)")
    p.add_argument("--task", default=None,
                   help="embedded task of every cell (quickstart --task; default addition); "
                        "not with --config")
    p.add_argument("--teachers", nargs="+", default=None,
                   help="a task with several teachers (multi): run each rule with `both` (every "
                        "teacher, routed by domain) and/or one teacher's name on every prompt "
                        "(default: each teacher alone, then both)")
    p.add_argument("--steps", type=int, default=None,
                   help="OPD steps (default: the task's; with --config: train.steps)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: the quickstart's; with --config: parallel.tp)")
    p.add_argument("--config", default=None,
                   help="a training run config: each cell is a train run of it, accuracy from its "
                        "eval.* validation (docs/study.md); default: the embedded task")
    p.add_argument("--nproc", type=int, default=0,
                   help="with --config: local ranks per cell (default tp*pp, as train)")
    p.add_argument("--out", default="study_run", help="report and per-run dirs (default ./study_run)")
    p.add_argument("overrides", nargs="*", help="extra trainer key=value overrides for every run")
    p.set_defaults(func=main)


def run_cell(cell: Cell, out: Path, steps: int, tp: int, overrides: list[str],
             task: str = "addition") -> int:
    seed = 1234 + cell.seed
    args = ["--task", task, "--rule", cell.rule, "--rho", str(cell.rho), "--steps", str(steps),
            "--tp", str(tp), "--out", str(run_dir(out, cell)),
            f"train.seed={seed}", f"data.seed={seed}", f"selection.seed={cell.seed}",
            "logging.log_every=1", *cell.overrides, *overrides]  # every step: the loss curves
    if cell.teacher and cell.teacher != BOTH:  # one teacher on every prompt; `both`: the default
        args[2:2] = ["--teacher", cell.teacher]
    # a task with several teachers reads its run's prompt file: written here, as the
    # quickstart's launcher does, before the ranks start (they run the module's worker)
    write_task_prompts(argparse.Namespace(task=task, out=str(run_dir(out, cell))))
    return run_local(tp, "tip_megatron.apps.quickstart.command", args)


def main(args: argparse.Namespace) -> int:
    if args.config is not None:
        if args.task is not None:
            raise ValueError(f"--task {args.task}: picks an embedded task; with --config the "
                             "cells train the config's own models and data (drop one of them)")
        if args.teachers:
            raise ValueError("--teachers: the teacher axis of an embedded task with several "
                             "teachers (--task multi); with --config the cells train its own teachers")
        # lazy: config_study imports the run config and preflight (torch); --help imports
        # this module
        from tip_megatron.apps.study import config_study

        return config_study.main(args)
    args.task = args.task or DEFAULT_TASK
    spec = get_task(args.task)
    grid = cells(args.rules, args.seeds, teacher_axis(args.teachers, tuple(t[0] for t in spec.teachers),
                                                      args.task))
    steps, tp = args.steps or get_task(args.task).steps, args.tp or DEFAULTS["tp"]
    out = Path(args.out)
    for i, cell in enumerate(grid, 1):
        print(f"[study] run {i}/{len(grid)}: {cell.name} seed {cell.seed}", flush=True)
        rc = run_cell(cell, out, steps, tp, list(args.overrides), args.task)
        if rc != 0:
            print(f"error: study run {cell.name} seed {cell.seed} failed (exit {rc}); "
                  f"its output is in {run_dir(out, cell)}", flush=True)
            return rc
    # lazy: the report imports numpy and torch; --help imports this module
    from tip_megatron.apps.study.report import write_report

    for path in write_report(out, [(c.name, run_dir(out, c)) for c in grid]):
        print(f"[study] wrote {path}", flush=True)
    return 0
