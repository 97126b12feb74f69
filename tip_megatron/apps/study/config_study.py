"""`tip-megatron study --config X`: the rule x seed grid as training runs of a user config.

Each cell is `tip-megatron train --config X [overrides] <cell keys>`: the same launcher
(`run_local` of `tip_megatron.train`, nproc = --nproc or tp x pp), the config's
layout, models and data, with the cell's keys set last (`cell_overrides`). Accuracy is the
config's own validation (`eval.*`, run by the trainer every `eval.every` steps through
`train.validation.evaluate_in_engine`, the eval path `tip-megatron eval` shares): its
points are the accuracy curve, and the one at the last step, taken after the last update,
is the final accuracy. A config without a benchmark is refused before any run starts.

A cell whose run directory already holds a finished run of the same effective config is
not run again; one that holds another config's run stops the study before it starts.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tip_megatron.config import dump_config, load_config
from tip_megatron.checkpoint.layout import COMPLETE, step_dir
from tip_megatron.train.preflight import preflight
from tip_megatron.apps.launch import run_local
from tip_megatron.apps.plots.curves import read_metrics
from tip_megatron.apps.study.cells import Cell, cells, run_dir
from tip_megatron.apps.study.config_report import write_report

#: Keys every cell sets (an override of one would be silently replaced: refused instead).
CELL_KEYS = ("selection.rule", "selection.rho", "selection.seed", "train.seed", "data.seed",
             "checkpoint.dir", "logging.jsonl", "logging.log_every")


def cell_overrides(cell: Cell, out: Path, eval_every: int) -> list[str]:
    """The keys of one cell, applied after the user's overrides (seeds as the embedded
    study's; every step logged, for the loss curves)."""
    seed, d = 1234 + cell.seed, run_dir(out, cell)
    return [f"selection.rule={cell.rule}", f"selection.rho={cell.rho}",
            f"train.seed={seed}", f"data.seed={seed}", f"selection.seed={cell.seed}",
            f"checkpoint.dir={d / 'ckpt'}", f"logging.jsonl={d / 'metrics.jsonl'}",
            "logging.log_every=1", f"eval.every={eval_every}", *cell.overrides]


def user_overrides(args: argparse.Namespace) -> list[str]:
    """--steps / --tp as keys, then the command line's key=value overrides."""
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if key in CELL_KEYS:
            raise ValueError(f"override {item!r}: the study sets {key} per cell (--rules, --seeds, "
                             f"--out); keys it sets: {', '.join(CELL_KEYS)}")
    flags = [f"train.steps={args.steps}"] if args.steps else []
    flags += [f"parallel.tp={args.tp}"] if args.tp else []
    return flags + list(args.overrides)


def default_eval_every(steps: int) -> int:
    """The largest divisor of `steps` not above max(1, steps / 8): ~8 curve points, one of
    them at the last step."""
    limit = max(1, steps // 8)
    return max(d for d in range(1, limit + 1) if steps % d == 0)


def study_eval_every(cfg) -> int:
    """eval.every for the cells; ValueError (one line) when the config has no benchmark or
    its validation would miss the last step."""
    e, steps = cfg.eval, cfg.train.steps
    if not e.prompts:
        raise ValueError("eval.prompts is empty: a config study measures each cell's accuracy on "
                         "a benchmark; set eval.prompts (JSONL/parquet files with prompt or "
                         "messages, and answer) and the eval.* keys (docs/eval.md)")
    if e.every and steps % e.every:
        raise ValueError(f"eval.every={e.every} does not divide train.steps={steps}: the study's "
                         "final accuracy is the validation at the last step; use a divisor, or "
                         "eval.every=0 for the study's default (about steps/8)")
    return e.every or default_eval_every(steps)


def check_cell(config: str, overrides: list[str], out: Path, cell: Cell, nproc: int):
    """The cell's effective config after the train CLI's checks (preflight: one line on bad
    input); a ValueError when its run directory holds a different config's run."""
    cfg = load_config(config, overrides)
    preflight(cfg, nproc)
    saved = Path(cfg.checkpoint.dir) / "config.yaml"
    if saved.is_file() and saved.read_text() != dump_config(cfg):
        raise ValueError(f"{run_dir(out, cell)}: holds a run of another config (its "
                         f"ckpt/config.yaml differs from this cell's); use another --out or "
                         "remove that directory")
    return cfg


def finished(cfg) -> bool:
    """The cell's metrics hold its last step's validation and its last checkpoint exists."""
    jsonl = Path(cfg.logging.jsonl)
    if not jsonl.is_file() or not (step_dir(cfg.checkpoint.dir, cfg.train.steps) / COMPLETE).is_file():
        return False
    records = read_metrics(jsonl)
    return bool(records) and records[-1]["step"] == cfg.train.steps and "eval/mean_at_k" in records[-1]


def main(args: argparse.Namespace) -> int:
    grid, out = cells(args.rules, args.seeds), Path(args.out)
    base = user_overrides(args)
    first = load_config(args.config, base)
    every = study_eval_every(first)
    nproc = args.nproc or first.parallel.tp * first.parallel.pp
    plans = []
    for cell in grid:  # every cell checked before the first one runs
        overrides = base + cell_overrides(cell, out, every)
        plans.append((cell, overrides, check_cell(args.config, overrides, out, cell, nproc)))
    for i, (cell, overrides, cfg) in enumerate(plans, 1):
        if finished(cfg):
            print(f"[study] run {i}/{len(grid)}: {cell.name} seed {cell.seed}: finished "
                  f"earlier, kept ({run_dir(out, cell)})", flush=True)
            continue
        print(f"[study] run {i}/{len(grid)}: {cell.name} seed {cell.seed}", flush=True)
        rc = run_local(nproc, "tip_megatron.train", ["--config", args.config, *overrides])
        if rc != 0:
            print(f"error: study run {cell.name} seed {cell.seed} failed (exit {rc}); "
                  f"its output is in {run_dir(out, cell)}", flush=True)
            return rc
    for path in write_report(out, args.config, [(c.name, cfg) for c, _, cfg in plans]):
        print(f"[study] wrote {path}", flush=True)
    return 0
